"""Checkpoint folders: atomic writes, discovery, pruning and trainer-state I/O.

A checkpoint is `OUTPUT_DIR/checkpoint-{step}/` holding
  config.json + model.safetensors   the backbone, in its own Hugging Face format
  preprocessor_config.json           the image processor
  head.safetensors + classifier.json the classification head and label layout (model.py)
  trainer_state.pt                   optimizer, GradScaler and RNG states (tensors only, weights_only=True)
  training_info.json                 step, epoch, args, metrics at that step, best so far
It is written under `.tmp-checkpoint-{step}` and renamed into place only when complete,
so a folder named checkpoint-* is always whole. Nothing here unpickles.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import torch

INFO_FILE = "training_info.json"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path):
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir):
    """Complete checkpoint folders in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if checkpoint_step(name) is not None and os.path.isfile(os.path.join(path, INFO_FILE)):
            found.append(path)
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume, output_dir):
    """`latest` -> newest complete checkpoint in output_dir; otherwise the given folder, checked."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder with {INFO_FILE} in {output_dir}")
        return found[-1]
    if not os.path.isfile(os.path.join(resume, INFO_FILE)):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint ({INFO_FILE} is missing)")
    return resume


def write_atomically(final_path, write_fn):
    """Call write_fn(tmp_folder), then rename tmp_folder to final_path in one step."""
    parent, name = os.path.split(os.path.normpath(final_path))
    tmp = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_fn(tmp)
    if os.path.exists(final_path):  # re-saving the same step: replace the old folder whole
        old = os.path.join(parent, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final_path, old)
        os.rename(tmp, final_path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final_path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_info(folder):
    with open(os.path.join(folder, INFO_FILE)) as f:
        return json.load(f)


def prune_checkpoints(output_dir, keep_last, protect=()):
    """Delete all but the `keep_last` newest checkpoints, never those in `protect` (e.g. the best)."""
    found = list_checkpoints(output_dir)
    keep = {os.path.normpath(p) for p in found[len(found) - keep_last:] if keep_last > 0}
    keep |= {os.path.normpath(p) for p in protect if p}
    removed = [p for p in found if os.path.normpath(p) not in keep]
    for path in removed:
        shutil.rmtree(path)
    return removed


def rng_state():
    """Python, NumPy and torch RNG states as tensors (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_trainer_state(folder):
    path = os.path.join(folder, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: this checkpoint cannot be resumed from") from None
    except Exception as e:
        raise RuntimeError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from None
