"""Checkpoint folders: atomic writes, discovery, pruning and trainer-state I/O.

A checkpoint is `OUTPUT_DIR/checkpoint-{step}/` holding
  config.json + model.safetensors   the whole backbone in its own Hugging Face format (eval.py)
  preprocessor_config.json, ...      the image processor / tokenizer
  head.safetensors + classifier.json the classification head and label layout (model.py)
  state/shard-*.safetensors          model + optimizer state as each rank holds it
                                     (torch.distributed.checkpoint), read back on any number of
                                     processes, sharded or not: what resuming loads
  trainer_state.pt                   GradScaler and per-rank RNG states (tensors only)
  training_info.json                 step, epoch, args, metrics at that step, best so far
  ema_state/, ema/                   with --ema_decay: the EMA shadow as each rank holds it (what
                                     resuming loads), and the EMA model in the same files as the
                                     model above (eval.py evaluates checkpoint-N/ema)
It is written under `.tmp-checkpoint-{step}` and renamed into place by rank 0 only when complete,
so a folder named checkpoint-* is always whole. Nothing here unpickles: the sharded state is
safetensors whose shard offsets are JSON in the file headers (DCP's default format pickles
its metadata file, so it is not used).
"""
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from distributed import all_gather_objects, barrier
from ema import MODEL_DIR as EMA_MODEL_DIR, save_ema_state, swapped_in
from faults import injected_fault

INFO_FILE = "training_info.json"
STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "state"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file."""


def checkpoint_step(path):
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def checkpoint_folder(path):
    """The checkpoint-N folder a model folder belongs to: itself, or for the EMA model
    (checkpoint-N/ema) its parent, which holds training_info.json."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if os.path.basename(path) == EMA_MODEL_DIR and checkpoint_step(parent) is not None:
        return parent
    return path


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
            raise FileNotFoundError(
                f"--resume latest: no checkpoint-* folder with {INFO_FILE} in {output_dir}")
        return found[-1]
    if not os.path.isfile(os.path.join(resume, INFO_FILE)):
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint ({INFO_FILE} is missing)")
    return resume


def write_atomically(final_path, write_fn, rank=0):
    """Every rank calls write_fn(tmp_folder); then rank 0 renames it to final_path in one step."""
    parent, name = os.path.split(os.path.normpath(final_path))
    tmp = os.path.join(parent, f".tmp-{name}")
    # a full disk or an unwritable folder: remove the partial folder, keep every earlier checkpoint
    try:
        if rank == 0:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)  # left by a process killed while writing it
            os.makedirs(tmp)
        barrier()
        write_fn(tmp)
        barrier()
        if rank == 0:
            if os.path.exists(final_path):  # re-saving the same step: replace the old folder whole
                old = os.path.join(parent, f".old-{name}")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final_path, old)
                os.rename(tmp, final_path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final_path)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{e.strerror}: {e.filename}" if isinstance(
            e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"cannot write {final_path} ({reason}); nothing of it was kept, earlier "
            f"checkpoints are intact") from None
    barrier()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_info(folder):
    path = os.path.join(folder, INFO_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None


def model_signature(folder):
    """Fingerprint of what a checkpoint folder holds beside weights and training state: configs,
    processor and tokenizer files, the task's own JSON. Checkpoints with the same one build the
    same model and preprocess their inputs alike (eval.py reuses both)."""
    digest = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
                or name in (INFO_FILE, STATE_FILE) or not os.path.isfile(path)):
            continue
        with open(path, "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def prune_checkpoints(output_dir, keep_last, protect=()):
    """Delete all but the `keep_last` newest checkpoints, never those in `protect` (the best)."""
    found = list_checkpoints(output_dir)
    keep = {os.path.normpath(p) for p in found[max(0, len(found) - keep_last):] if keep_last > 0}
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
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(
        (state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_trainer_state(folder):
    path = os.path.join(folder, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint cannot be resumed from") from None
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from None


def save_sharded_state(folder, model, optimizer):
    """Every rank writes the model and optimizer state it holds (FSDP2: its shards; DDP: rank 0
    writes the replicated tensors once) to folder/state as safetensors."""
    model_state, optim_state = get_state_dict(model, optimizer)
    save_state_files(os.path.join(folder, SHARDED_DIR),
                     {"model": model_state, "optim": optim_state["state"]})


# DCP's safetensors writer builds each file in memory before writing it (twice the file's size):
# what a rank holds goes into up to STATE_FILES files, none smaller than MIN_FILE_BYTES, so that
# writing costs a small part of it, not two copies.
STATE_FILES = 16
MIN_FILE_BYTES = 64 << 20


def save_state_files(path, state):
    """torch.distributed.checkpoint (safetensors) of `state` (nested dicts of tensors, DTensor
    shards too): every rank writes what it holds, in files of bounded size (file_indices)."""
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore",
                                message=".*assuming the intent is to save in a single process")
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(
            path, fqn_to_index_mapping=file_indices(state), save_distributed=True))


def file_indices(state):
    """{DCP key (nested keys joined by dots): file number from 1}: consecutive tensors share a file
    up to 1/STATE_FILES of what a rank holds (at least MIN_FILE_BYTES), sized from the global
    shapes, so every rank computes the same numbers."""
    sizes = {key: held_bytes(value) for key, value in flat_items(state)}
    limit = max(MIN_FILE_BYTES, sum(sizes.values()) / STATE_FILES)
    indices, index, used = {}, 1, 0
    for key, size in sizes.items():
        if used and used + size > limit:
            index, used = index + 1, 0
        indices[key], used = index, used + size
    return indices


def flat_items(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def held_bytes(value):
    """Bytes of a tensor as one rank holds it (a DTensor: its share of the shards)."""
    from torch.distributed.tensor import DTensor
    if not torch.is_tensor(value):
        return 0
    size = value.numel() * value.element_size()
    if isinstance(value, DTensor):
        size //= math.prod(n for n, p in zip(value.device_mesh.shape, value.placements)
                           if p.is_shard())
    return size


def load_sharded_state(folder, model, optimizer=None):
    """Load what save_sharded_state wrote into `model` (and `optimizer`), on any world size and
    wrapping.

    Every model tensor must be in the checkpoint. An optimizer entry may be missing: AdamW keeps no
    state for a parameter that never had a gradient (e.g. a pooler the chosen pooling skips)."""
    path = os.path.join(folder, SHARDED_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint cannot be resumed from")
    reader = dcp.HuggingFaceStorageReader(path)
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the sharded state ({type(e).__name__}: {e})") from None
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
    missing = [k for k in model_state if f"model.{k}" not in saved]
    if missing:
        raise CheckpointError(
            f"{path} does not fit this model: {len(missing)} tensor(s) are missing, e.g. "
            f"{missing[:3]}"
        )
    state = {"model": model_state}
    if optim_state is not None:
        state["optim"] = optim_state["state"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(state, storage_reader=reader,
                     planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        # a truncated shard file, a shape that does not fit
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"{path}: cannot load the sharded state ({type(e).__name__}: {e})"[:2000]) from None
    if optim_state is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": optim_state["param_groups"]})


def save_checkpoint(path, model, write_model, optimizer, scaler, info, rank, train_window,
                    ema=None, raw_model=None):
    """Atomic checkpoint: every rank writes its share of the model and optimizer state, and the
    whole model for eval.py and inference (write_model(folder), called on every rank: under
    FSDP2 each tensor is gathered in its turn and rank 0 writes it, so no rank holds a whole
    copy); rank 0 adds the scaler, every rank's RNG state and unlogged train-metric sums
    (`train_window`), so a resumed run goes on exactly as an uninterrupted one would, its logs
    included. training_info.json (`info`) is written last: it marks the folder complete.
    With an EMA (ema.py): every rank writes its shards of the shadow `ema`, and the EMA model
    goes through write_model into ema/ with the shadow swapped into `raw_model` (the model
    itself, not its DDP wrapper: the shadow's names are its own)."""
    per_rank = all_gather_objects({"rng": rng_state(), "train_metrics": train_window.cpu()})

    def write(tmp):
        save_sharded_state(tmp, model, optimizer)
        write_model(tmp)
        if ema is not None:
            save_ema_state(tmp, ema)
            if rank == 0:  # only rank 0 writes files
                os.makedirs(os.path.join(tmp, EMA_MODEL_DIR))
            with swapped_in(raw_model, ema):
                write_model(os.path.join(tmp, EMA_MODEL_DIR))
        if rank == 0:
            torch.save({"scaler": scaler.state_dict(), "ranks": per_rank},
                       os.path.join(tmp, STATE_FILE))
            injected_fault("kill_in_save", info["step"])
            write_json(os.path.join(tmp, INFO_FILE), info)
    write_atomically(path, write, rank)


def prepare_output_dir(args, rank):
    """Refuse to mix two runs in one folder; --overwrite clears the earlier one's files."""
    existing = list_checkpoints(args.output_dir)
    if existing and not args.resume and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} already holds {len(existing)} "
                         f"checkpoint(s) (newest {os.path.basename(existing[-1])}); pass --resume "
                         f"latest to continue or --overwrite to start over")
    if rank == 0:
        if args.overwrite and not args.resume:
            for path in existing:
                shutil.rmtree(path)
            for name in ("metrics.jsonl", "run_summary.json", "eval_results.jsonl"):
                if os.path.exists(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
        os.makedirs(args.output_dir, exist_ok=True)
    barrier()
