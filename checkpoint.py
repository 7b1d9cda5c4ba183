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
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from data.fingerprint import crc_of_blocks, data_changes, data_fingerprints
from distributed import all_gather_objects, barrier
from ema import MODEL_DIR as EMA_MODEL_DIR, save_ema_state, swapped_in
from faults import injected_fault
from files import (METRICS_FILE, RESULTS_FILE, SUMMARY_FILE, OutputError, read_jsonl_records,
                   reason, recover_folder, swap_in, temporary, write_json, write_text)
from state_files import CheckpointError, load_state_files, save_state_files, sharded_reader

INFO_FILE = "training_info.json"
RUN_FILES = (METRICS_FILE, SUMMARY_FILE, RESULTS_FILE)  # a run's own records
STATE_FILE = "trainer_state.pt"
SHARDED_DIR = "state"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


# Flags a resumed run may change: they schedule logging, evaluation and saving, choose loaders,
# kernels and the placement on processes, or shape what is written at the end, not the steps the
# run takes; a task adds its own (its RESUME_MAY_CHANGE). Every other flag defines the run
# (docs/outputs.md, resuming). The global micro-batch and the schedule's length are compared on
# their own (changed_run_flags).
RESUME_MAY_CHANGE = frozenset({
    "config", "resume", "overwrite", "allow_changed_flags", "output_dir", "batch_size", "epochs",
    "max_steps", "num_workers", "prefetch_factor", "dist", "shard_size", "cpu_offload", "compile",
    "gradient_checkpointing", "attn_implementation", "dist_timeout_minutes", "trust_remote_code",
    "report_to", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "save_best_only", "save_all_checkpoints", "skip_evaluation", "no_partial_eval",
    "no_final_eval", "no_best_tracking", "eval_cache_mb", "max_bad_steps"})
# registry fields that name things rather than change the data or the sampling (eval_only marks a
# dataset without training samples, which a run that trained had already)
REGISTRY_NAMES = ("description", "labels", "eval_only")


def run_fingerprint(args, data, rank=0):
    """What defines a run beside its flags' text, kept in training_info.json: the content
    fingerprint of its data (data/fingerprint.py; computed on rank 0, shared with the others), the
    class names of each dataset in their index order, the registry as loaded (a registry file can
    change under the same name), the --model folder's weight files (model_files_sample) and the
    --vae folder's with its config.json (which holds the latent scaling)."""
    files = ({flag: data_fingerprints(getattr(args, flag)) for flag in ("train_data", "val_data")}
             if rank == 0 else None)
    registry = getattr(data, "registry", None) or None
    return {"data": all_gather_objects(files)[0], "registry": registry and {
        name: {k: v for k, v in vars(spec).items() if k not in REGISTRY_NAMES}
        for name, spec in registry.items()},
        "classes": registry and {name: spec.labels for name, spec in registry.items()},
        "model": model_files_sample(args.model),
        **({"vae": model_files_sample(args.vae, also=("config.json",))}
           if getattr(args, "vae", None) else {})}


def model_files_sample(folder, blocks=16, block_bytes=1 << 16, also=()):
    """{weight file: [size, CRC-32 of `blocks` evenly spaced blocks]} of a model folder (and of
    the files named in `also`). A resumed run reads what it does not train (a frozen backbone, a
    VAE) from the folder again, so another model under the same path (another revision or
    fine-tune, the same size) must not pass unnoticed; 16 x 64 KB of each file tell them apart
    without reading gigabytes."""
    if not folder or not os.path.isdir(folder):
        return None  # a preset: nothing read from disk
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        wanted = name.endswith((".safetensors", ".bin")) or name in also
        if not wanted or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        found[name] = [size, crc_of_blocks(path, [size * i // blocks for i in range(blocks)],
                                           block_bytes)]
    return found


def changed_run_flags(info, args, world_size, fingerprint, may_change=frozenset(),
                      steps_per_epoch=None):
    """Each difference between the run a checkpoint's training_info.json (`info`) describes and
    the one these flags define, as "--lr 0.001 -> 0.002"; flags the checkpoint does not record
    (older versions) are not compared, nor the steps of an epoch without `steps_per_epoch`."""
    saved, now = info.get("args", {}), vars(args)
    changes, skip = [], set(RESUME_MAY_CHANGE) | set(may_change)
    before = info.get("fingerprint") or {}
    if before.get("registry") and fingerprint.get("registry"):
        skip.add("datasets")  # compared as loaded: the same registry may be written two ways
        old, new = plain(before["registry"]), plain(fingerprint["registry"])
        if list(old) != list(new):
            changes.append(f"--datasets {short(list(old))} -> {short(list(new))}")
        else:
            changes += [f"--datasets {name}.{key} {short(old[name].get(key))} -> "
                        f"{short(new[name].get(key))}" for name in old
                        for key in sorted(set(old[name]) | set(new[name]))
                        if old[name].get(key) != new[name].get(key)]
    for name in sorted(now):
        if name not in skip and name in saved and plain(saved[name]) != plain(now[name]):
            changes.append(f"--{name} {short(saved[name])} -> {short(now[name])}")
    for flag in ("model", "vae"):  # the same folder, other files
        was, now_files = before.get(flag), fingerprint.get(flag) or {}
        if was is not None and saved.get(flag) == getattr(args, flag, None):
            changes += [f"--{flag} {saved[flag]}: {name} differs from the file the run started "
                        "from" for name in sorted(set(was) | set(now_files))
                        if was.get(name) != now_files.get(name)]
    for flag, specs in (before.get("data") or {}).items():  # same specs, other contents
        changes += data_changes(specs, fingerprint["data"].get(flag), flag)
    for name, labels in (before.get("classes") or {}).items():
        moved = class_moves(labels, (fingerprint.get("classes") or {}).get(name))
        if moved:
            changes.append(f"dataset {name!r}: classes moved to other indices: {moved}")
    if "batch_size" in saved:  # a split of the same global micro-batch may take another
        was = (saved["batch_size"], info.get("world_size", 1))
        if was[0] * was[1] != args.batch_size * world_size:
            changes.append(f"--batch_size x processes {was[0]} x {was[1]} -> {args.batch_size} x "
                           f"{world_size} (the global micro-batch)")
    # epochs of other steps (57 samples: 28 a process of 2): the resumed steps would not continue
    # the epoch's order, some samples taken twice, the run longer
    if info.get("steps_per_epoch") not in (None, steps_per_epoch) and steps_per_epoch:
        changes.append(f"steps per epoch {info['steps_per_epoch']} -> {steps_per_epoch} (the "
                       "resumed steps would not continue the epoch's order)")
    # the schedule's length sets every step's learning rate, unless it is constant
    was, will = schedule_length(saved), schedule_length(now)
    if "epochs" in saved and args.lr_scheduler != "constant" and was != will:
        changes.append(f"--{was[0]} {was[1]} -> --{will[0]} {will[1]} (the length of the "
                       f"--lr_scheduler {args.lr_scheduler} schedule)")
    return changes


def class_moves(before, after):
    """The class names that two lists of one dataset's class names put at other indices, as
    "'cat' 0 -> 1, 'dog' 1 -> 0" (renamed or added names move nothing); "" when none moved."""
    if not before or not after:
        return ""
    now = {name: i for i, name in enumerate(after)}
    moved = [f"{name!r} {i} -> {now[name]}" for i, name in enumerate(before)
             if name in now and now[name] != i]
    return ", ".join(moved[:10]) + (f", ... {len(moved) - 10} more" if len(moved) > 10 else "")


def schedule_length(args):
    """The flag that sets a run's length, and its value: --max_steps wins over --epochs."""
    return ("max_steps", args["max_steps"]) if args.get("max_steps") else ("epochs",
                                                                           args.get("epochs"))


def plain(value):
    """A value as JSON holds it (tuples as lists), so saved and current values compare."""
    return json.loads(json.dumps(value, default=str))


def short(value, width=60):
    text = json.dumps(plain(value))
    return text if len(text) <= width else text[:width - 3] + "..."


def write_atomically(final_path, write_fn, rank=0):
    """Every rank calls write_fn(tmp_folder); then rank 0 renames it to final_path in one step."""
    tmp = temporary(final_path)
    # a full disk or an unwritable folder: remove the partial folder, keep every earlier checkpoint
    try:
        if rank == 0:
            recover_folder(final_path)  # what a process killed while writing it left
            os.makedirs(tmp)
        barrier()
        write_fn(tmp)
        barrier()
        if rank == 0:  # re-saving the same step replaces the old folder whole
            swap_in(tmp, final_path)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write {final_path} ({reason(e)}); nothing of it was kept, earlier "
            f"checkpoints are intact") from None
    barrier()


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
    # real paths: the best may be named from another spelling of the folder (relative, a link)
    keep = {os.path.realpath(p) for p in found[max(0, len(found) - keep_last):] if keep_last > 0}
    keep |= {os.path.realpath(p) for p in protect if p}
    removed = [p for p in found if os.path.realpath(p) not in keep]
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


# Parameters that do not train (a frozen backbone, LoRA's base weights) are left out of the
# sharded state: they keep what --model gave them, which a resumed run reads again, and
# model.safetensors holds them for eval.py and export.py. A frozen 7B backbone is 15 GB less per
# checkpoint, and on the CPU its memory-mapped pages are not rewritten (made private) on resume.
TRAINED = StateDictOptions(ignore_frozen_params=True)
TRAINED_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded_state(folder, model, optimizer):
    """Every rank writes the state it holds of the model's trained parameters and buffers and of
    the optimizer (FSDP2: its shards; DDP: rank 0 writes the replicated tensors once) to
    folder/state as safetensors."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    save_state_files(os.path.join(folder, SHARDED_DIR),
                     {"model": model_state, "optim": optim_state["state"]})


def load_sharded_state(folder, model, optimizer=None, may_lack=(), say=None):
    """Load what save_sharded_state wrote into `model` (and `optimizer`), on any world size and
    wrapping. Parameters that do not train here are not read (save_sharded_state).

    Every other model tensor must be in the checkpoint, but for the parameters named in
    `may_lack`: one of them missing was frozen when the checkpoint was written (a run resumed
    with --allow_changed_flags that trains more), so it keeps --model's weights, as it did in
    that run; `say` says so. Returns those names. An optimizer entry may be missing: AdamW keeps
    no state for a parameter that never had a gradient (e.g. a pooler the chosen pooling
    skips)."""
    path = os.path.join(folder, SHARDED_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint cannot be resumed from")
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model, options=TRAINED), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED)
    # Parameters frozen now that trained when the checkpoint was written (a resume with
    # --allow_changed_flags that freezes more): they keep the checkpoint's values, not --model's.
    opened = sharded_reader(path)
    held = {k[len("model."):] for k in opened[1] if k.startswith("model.")}
    every = get_model_state_dict(model)
    frozen_now = {k: v for k, v in every.items() if k not in model_state and k in held}
    state = {"model": {**model_state, **frozen_now}}
    if optim_state is not None:
        state["optim"] = optim_state["state"]
    lacking = load_state_files(path, state, {"model": "this model"}, "the sharded state",
                               may_lack, opened,
                               planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    if lacking and say:
        say(f"note: {len(lacking)} parameter(s) that train now were frozen when {folder} was "
            f"written, so they start from --model's weights, e.g. {lacking[:3]}")
    homeless = sorted(held - set(every))
    if say and frozen_now:
        say(f"note: {len(frozen_now)} parameter(s) frozen now were trained when {folder} was "
            f"written: they keep its values, e.g. {sorted(frozen_now)[:3]}")
    if say and homeless:
        say(f"note: {len(homeless)} parameter(s) trained in {folder} have no place in this model "
            f"(e.g. {homeless[:3]}; LoRA renames the layers it wraps): they start from --model's "
            "weights, not the checkpoint's")
    if optim_state is None:
        set_model_state_dict(model, state["model"], options=TRAINED_LOAD)
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": optim_state["param_groups"]},
            options=TRAINED_LOAD)
    return lacking


def save_checkpoint(path, *, model, write_model, optimizer, scaler, info, rank, train_window,
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
            if rank == 0:  # the folder first: a model writer may add its own files
                os.makedirs(os.path.join(tmp, EMA_MODEL_DIR), exist_ok=True)
            with swapped_in(raw_model, ema):
                write_model(os.path.join(tmp, EMA_MODEL_DIR))
        if rank == 0:
            torch.save({"scaler": scaler.state_dict(), "ranks": per_rank},
                       os.path.join(tmp, STATE_FILE))
            injected_fault("kill_in_save", info["step"])
            write_json(os.path.join(tmp, INFO_FILE), info)
    write_atomically(path, write, rank)


def check_output_dir(args):
    """Refuse to mix two runs in one folder, or a file as the folder (before anything is loaded).
    """
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise OutputError(f"--output_dir {args.output_dir}: is a file, not a folder")
    existing = list_checkpoints(args.output_dir)
    if existing and not args.resume and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} already holds {len(existing)} "
                         f"checkpoint(s) (newest {os.path.basename(existing[-1])}); pass --resume "
                         f"latest to continue or --overwrite to start over")
    # a run that ended before its first checkpoint: a new one would append to its log
    logs = [n for n in RUN_FILES if os.path.isfile(os.path.join(args.output_dir, n))]
    if logs and not existing and not args.resume and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} holds {', '.join(logs)} of an earlier "
                         "run (no checkpoint): pass --overwrite to start over there, or choose "
                         "another --output_dir")


def set_aside_later(output_dir, step, say):
    """Move the checkpoints of output_dir after `step` (a run resumed from an earlier point
    would write its own under their names, and until then --resume latest and eval.py would
    take them for its own) into superseded-TIME/, with a copy of the run's records and, moved
    there, the records and per-class files eval.py wrote of them."""
    later = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    if not later:
        return
    aside = os.path.join(output_dir, "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    while os.path.exists(aside):  # a second rewind within the same second
        aside += "+"
    os.makedirs(aside)
    for path in later:
        os.rename(path, os.path.join(aside, os.path.basename(path)))
        per_class = os.path.join(output_dir, "per_class", os.path.basename(path))
        for written in (per_class + ".json", per_class):  # checkpoint-N.json, checkpoint-N/ema
            if os.path.exists(written):
                os.renames(written, os.path.join(aside, os.path.relpath(written, output_dir)))
    for name in RUN_FILES:  # metrics.jsonl loses its records after `step` as the run resumes
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy2(os.path.join(output_dir, name), aside)
    if os.path.isfile(os.path.join(output_dir, SUMMARY_FILE)):  # of the run set aside
        os.remove(os.path.join(output_dir, SUMMARY_FILE))
    names = {os.path.basename(p) for p in later}
    results = os.path.join(output_dir, RESULTS_FILE)
    records = read_jsonl_records(results)
    kept = [r for r in records if str(r.get("checkpoint", "")).split("/")[0] not in names]
    if len(kept) < len(records):
        write_text(results, "".join(json.dumps(r) + "\n" for r in kept))
    say(f"note: resuming from step {step}, before {len(later)} checkpoint(s) of "
        f"{output_dir} ({', '.join(sorted(names, key=checkpoint_step))}): they are moved to "
        f"{aside} with their evaluation records, as this run writes its own")


def prepare_output_dir(args, rank):
    """The output folder, once every check has passed; --overwrite clears the earlier run's
    files."""
    existing = list_checkpoints(args.output_dir)
    if rank == 0:
        if args.overwrite and not args.resume:
            for path in existing:
                shutil.rmtree(path)
            for name in RUN_FILES:
                if os.path.exists(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--output_dir {args.output_dir}: cannot create it ({reason(e)})"
                              ) from None
    barrier()
