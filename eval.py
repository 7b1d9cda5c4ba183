"""Evaluate one checkpoint, or every checkpoint-* in a run directory.

    python eval.py RUN_DIR_OR_CHECKPOINT [--val_data a.jsonl food=food/test] [--predictions p.jsonl]
    torchrun --nproc_per_node 4 eval.py RUN_DIR ...   # exact: every sample counted once
    torchrun --nproc_per_node 8 eval.py RUN_DIR --dist fsdp   # a model too large for one device

For generation checkpoints (train.py --task generate) it reports text loss / perplexity and
image MSE at fixed t, and with --judge CLASSIFIER the classifier's accuracy on images generated
for each of its classes, with and without classifier-free guidance:

    python eval.py runs/demo_generate --judge runs/digits/checkpoint-500 \\
        --judge_prompt "a handwritten digit {label}"

The task comes from the checkpoint's files (tasks.task_of_checkpoint). For classifiers, the
dataset registry, head size, label layout and image preprocessing come from the checkpoint; the
flags below override them (the head rows of each dataset always come from the checkpoint's
classifier.json). Results are appended to RUN_DIR/eval_results.jsonl, and a checkpoint already
evaluated on the same data is skipped unless --force is given, or evaluated again without a
second record where --predictions or a missing --per_class file asks for its outputs. Predictions
go to a temporary file renamed over --predictions once complete. `evaluate` is the one
evaluation function that training uses too.

A run trained with --ema_decay holds the EMA model in checkpoint-N/ema: `python eval.py
RUN_DIR/checkpoint-N/ema` evaluates it (recorded as checkpoint "checkpoint-N/ema" in RUN_DIR);
a RUN_DIR evaluates each checkpoint's trained weights only, not the ema/ folders.
"""
import argparse
import datetime
import hashlib
import json
import math
import os

import cpu_threads  # noqa: F401  (before torch: OpenMP reads its settings as it loads)
import torch

from checkpoint import (RESULTS_FILE, checkpoint_folder, checkpoint_step, list_checkpoints,
                        model_signature, read_info)
from config import (HelpFormatter, add_task_flags, flag_errors, given_flags, loader_workers,
                    num_workers, repeated_aliases)
from data.fingerprint import data_fingerprints
from dataset import PREFETCH_FACTOR, DataError, absolute_spec
import distributed
from distributed import (all_gather_objects, check_shard_size, is_sharded, mesh_shape,
                         shard_model)
from backbone import (ATTN_IMPLEMENTATIONS, LOADING, check_attn_implementation, eval_mode,
                      fsdp_units, restore_modes)
from faults import injected_fault
from files import FileWriter, append_line, check_file_path, read_jsonl_records, write_json
from logs import say_for
from precision import autocast
from tasks import TASKS, task_of_checkpoint
from weights import WeightsMismatch, read_weights


class EvalCache:
    """What evaluation keeps between evaluations of the same samples with the same preprocessing
    (the caller keeps one cache per preprocessing): their batches in this process's memory after
    the first pass, up to limit_mb, so later evaluations skip decoding; where they do not fit,
    their loader, whose worker processes then serve every evaluation."""

    def __init__(self, limit_mb, say=lambda message: None):
        self.limit, self.say = limit_mb * 2 ** 20, say
        self.kept, self.streams, self.used = {}, {}, 0

    def batches(self, key, make_loader):
        """The batches of `key`: kept ones, or a pass of make_loader(persistent=True)'s loader."""
        if key in self.kept:
            return self.kept[key]
        if key not in self.streams:
            loader = make_loader(persistent=True)
            if self.limit > 0:
                return self.fill(key, loader)
            self.streams[key] = loader
        return self.streams[key]

    def fill(self, key, loader):
        kept, size = [], 0
        for batch in loader:
            if kept is not None:
                size += sum(v.nbytes for v in batch.values() if torch.is_tensor(v))
                kept.append(batch)
                if self.used + size > self.limit:
                    kept = None
                    self.streams[key] = loader
                    self.say(f"evaluation cache: over --eval_cache_mb {self.limit / 2 ** 20:g}; "
                             "these samples are decoded again at every evaluation")
            yield batch
        if kept is not None:  # a whole pass (an interrupted one keeps nothing)
            self.kept[key] = kept
            self.used += size
            self.say(f"evaluation cache: {sum(len(b['indices']) for b in kept):,} samples "
                     f"({size / 2 ** 20:.1f} MB) kept in memory for the next evaluations")


@torch.no_grad()
def evaluate(task, model, data, indices, inputs, *, batch_size, device, precision="fp32",
             num_workers=0, prefetch_factor=None, prefix="eval", rank=0, world_size=1,
             with_predictions=False, cache=None):
    """The task's metrics over its validation records at `indices`, exact under torchrun: rank r
    takes indices[r::world_size] (no padding, no duplicates) and the sums are all-reduced. An
    FSDP2-sharded model gathers its weights in every forward, so there a rank with fewer batches
    runs throw-away forwards until every rank has run as many. cache: an EvalCache for inputs
    that preprocess alike every time (the batches of evaluation are deterministic).

    Returns (metrics dict, predictions); predictions (complete on rank 0, in `indices` order)
    only with `with_predictions`."""
    modes = eval_mode(model)
    metrics = task.new_metrics(data, None, device)
    predictions = []
    options = dict(train=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    share = indices[rank::world_size]

    def make_loader(persistent=False):
        return task.loader(data, inputs, share, batch_size=batch_size, persistent=persistent,
                           prefetch_factor=prefetch_factor, **options)

    batches = make_loader() if cache is None else cache.batches((tuple(share), batch_size),
                                                                 make_loader)
    filler = task.loader(data, inputs, indices[:1], batch_size=1, **{**options, "num_workers": 0})
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            outputs = task.forward(model, batch, data, train=False)
        metrics.update(**outputs)
        if with_predictions:
            predictions += task.predictions(outputs, batch, data)
    for batch in missing_forwards(model, math.ceil(len(share) / batch_size), filler,
                                  len(indices), world_size, batch_size):
        with autocast(device, precision):
            task.forward(model, {k: v.to(device) for k, v in batch.items()}, data, train=False)
    restore_modes(modes)
    result = metrics.all_reduce().compute(prefix)
    if with_predictions and world_size > 1:
        order = {index: position for position, index in enumerate(indices)}
        predictions = sorted((p for part in all_gather_objects(predictions) for p in part),
                             key=lambda p: order[p["index"]])
    return result, predictions


def missing_forwards(model, num_batches, filler, num_indices, world_size, batch_size):
    """Under FSDP2 every forward gathers weights with all ranks: a rank with fewer batches than
    rank 0 (which holds the largest share) runs the filler batch that many more times."""
    if not is_sharded(model) or not num_indices:
        return []
    most = math.ceil(math.ceil(num_indices / world_size) / batch_size)
    return [next(iter(filler))] * (most - num_batches)


def load_placed(task, folder, args, device, world_size, say):
    """(model, inputs) of a checkpoint on its devices. Under --dist fsdp / hsdp the backbone is
    built with its parameters on the meta device, sharded, and each process reads only its
    shards."""
    mesh = mesh_shape(args.dist, args.shard_size, world_size)
    param_dtype = torch.bfloat16 if args.precision == "bf16" else None
    if mesh:
        model, inputs, _ = task.load_model(folder, meta=True)
        try:
            sources = task.weight_sources(model, folder, checkpoint=True)
        except WeightsMismatch as e:
            say(f"note: {e}; every process reads the whole model")
        else:
            shard_model(model, fsdp_units(model.backbone), device, mesh, param_dtype,
                        sources=sources)
            return model, inputs
    model, inputs, _ = task.load_model(folder)
    if mesh:
        shard_model(model, fsdp_units(model.backbone), device, mesh, param_dtype)
    else:
        model.to(device)
    return model, inputs


def read_checkpoint(task, model, folder, device):
    """Read a checkpoint's weights into a model built for another checkpoint of the same
    signature (sharded or not); False where they do not map one to one (build it anew)."""
    try:
        read_weights(model, task.weight_sources(model, folder, checkpoint=True), device)
    except WeightsMismatch:
        return False
    return True


def data_key(val_specs, options):
    """What a checkpoint was evaluated on: the content fingerprint of the data (fingerprint.py:
    every image of a folder at any depth, each file's bytes) and the options."""
    blob = json.dumps([data_fingerprints(val_specs), options], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def find_targets(path):
    """(run_dir, [checkpoint folders]) for a checkpoint folder (or its ema/ model) or a run
    directory."""
    path = os.path.normpath(path)
    if task_of_checkpoint(path):
        return os.path.dirname(checkpoint_folder(path)) or ".", [path]
    found = [p for p in list_checkpoints(path) if task_of_checkpoint(p)]
    if not found:
        files = " or ".join(task.MODEL_FILE for task in TASKS.values())
        raise FileNotFoundError(f"{path}: neither a checkpoint (no {files}) nor a run directory "
                                f"with checkpoint-* folders")
    return path, found


def still_to_evaluate(run_dir, targets, key, args, rank):
    """[(checkpoint folder, whether to append its record)] on every rank: those not yet
    evaluated on this data (all with --force), and those already evaluated whose outputs asked
    for here are not there: --predictions (a new file each time), a missing --per_class file.
    These are evaluated again without a second record."""
    todo = []
    if rank == 0:  # decided by rank 0 alone, so every rank evaluates the same checkpoints
        done = already_evaluated(run_dir)
        for i, target in enumerate(targets):
            name = os.path.relpath(target, run_dir)
            if args.force or (name, key) not in done:
                todo.append((i, True))
            elif args.predictions or (args.per_class and not has_per_class(run_dir, name, key)):
                todo.append((i, False))
                print(f"{name}: already evaluated on this data (see {RESULTS_FILE}); evaluated "
                      "again for --predictions / --per_class, without a second record")
            else:
                print(f"{name}: already evaluated on this data (see {RESULTS_FILE}); --force to "
                      "redo")
    return [(targets[i], record) for i, record in all_gather_objects(todo)[0]]


def already_evaluated(run_dir):
    """(checkpoint, data key) of every record; a line torn by a kill is skipped."""
    return {(r["checkpoint"], r["data_key"]) for r in read_jsonl_records(
        os.path.join(run_dir, RESULTS_FILE)) if "checkpoint" in r and "data_key" in r}


def per_class_path(run_dir, name):
    return os.path.join(run_dir, "per_class", f"{name}.json")


def has_per_class(run_dir, name, key):
    """Whether --per_class already wrote this checkpoint's file for this data."""
    try:
        with open(per_class_path(run_dir, name)) as f:
            return json.load(f).get("data_key") == key
    except (OSError, ValueError, AttributeError):
        return False


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("path", help="a checkpoint-* folder or a run directory holding them")
    a("--val_data", "--val_jsonl", nargs="+", metavar="SPEC",
      help="validation data, the specs train.py takes: FILE.jsonl or NAME=PATH (an image folder, "
           "Parquet, WebDataset shards) (default: the run's)")
    a("--batch_size", type=int, default=64, help="per process")
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    a("--num_workers", type=num_workers, default="auto",
      help="DataLoader processes per rank (auto: as train.py)")
    a("--prefetch_factor", type=int,
      help=f"batches each DataLoader worker prepares ahead (default: {PREFETCH_FACTOR})")
    a("--seed", type=int, help="seed of the --partial subset (default: the run's)")
    a("--eval_cache_mb", type=float, default=2048,
      help="per process: keep the preprocessed evaluation batches in memory up to this size, "
           "for the next checkpoints that preprocess alike; 0: decode for every checkpoint")
    a("--force", action="store_true",
      help="evaluate again checkpoints already evaluated on this data")
    a("--attn_implementation", choices=ATTN_IMPLEMENTATIONS,
      help="attention kernels of the backbone (default: sdpa; eager for a model without sdpa); "
           "flash_attention_2 needs flash-attn and a GPU")
    a("--dist", choices=["ddp", "fsdp", "hsdp"], default="ddp",
      help="under torchrun: a full model per process, FSDP2-sharded per block over all processes, "
           "or (hsdp) over groups of --shard_size processes, replicated across groups (default: "
           "ddp)")
    a("--shard_size", type=int,
      help="--dist hsdp: processes each model copy is sharded over; must divide the number of "
           "processes (default: the processes of one node, LOCAL_WORLD_SIZE)")
    # flags several kinds of checkpoint take (each task names them in SHARED_FLAGS)
    shared = p.add_argument_group("flags of several kinds of checkpoint").add_argument
    shared("--datasets", nargs="+",
           help="registry override: FILE.yaml/json or name=num_classes[:eval_ratio] ...")
    shared("--partial", action="store_true",
           help="evaluate only each dataset's eval_ratio subset")
    add_task_flags(p, "add_eval_flags", "{} checkpoints")
    return p


# eval.py's flags that cannot act under the others (config.flag_errors; each task adds its own).
FLAG_NEEDS = {"seed": ("--partial", lambda a: a.partial),
              "shard_size": ("--dist hsdp", lambda a: a.dist == "hsdp")}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    error = repeated_aliases(parser, argv)  # --val_data A --val_jsonl B
    if error:
        parser.error(error)
    args.given = given_flags(args, parser)  # the task, which decides what is allowed, comes later
    distributed.run(run, args, (DataError, FileNotFoundError, ValueError))


def run(args, rank, world_size, device):
    check_attn_implementation(args.attn_implementation)
    LOADING.attn_implementation = args.attn_implementation
    if args.eval_cache_mb < 0:
        raise ValueError(f"--eval_cache_mb must be 0 (off) or more, got {args.eval_cache_mb}")
    if args.predictions:
        check_file_path(args.predictions, "--predictions")  # before any work, on every rank
    check_shard_size(args.shard_size)
    mesh_shape(args.dist, args.shard_size, world_size)  # refused before loading
    run_dir, targets = find_targets(args.path)
    task = task_of_checkpoint(targets[-1])
    error = flag_errors(args, build_parser(), task, args.given,
                        {**FLAG_NEEDS, **task.EVAL_FLAG_NEEDS})
    if error:
        raise ValueError(f"{error} ({os.path.basename(targets[-1])} is a {task.NAME} "
                         "checkpoint)")
    trained_args = read_info(checkpoint_folder(targets[-1])).get("args", {})
    # val_jsonl: the name in checkpoints written before --val_data
    args.val_files = args.val_data or trained_args.get("val_data") or trained_args.get("val_jsonl")
    if not args.val_files:
        raise ValueError("no validation data: give --val_data (the run was trained without any)")
    task.check_evaluated_together(targets)
    data, indices, options, summary = task.eval_data(args, targets[-1], trained_args, world_size)
    say = say_for(rank)
    say(summary)
    loader_workers(args, say, "checkpoints (where the evaluation cache cannot hold the batches)",
                   device)
    # metrics under autocast differ from fp32's: another evaluation (fp32 keys stay as they were)
    options = options if args.precision == "fp32" else [options, args.precision]
    key = data_key(args.val_files, options) if rank == 0 else None  # rank 0 keeps the records
    todo = still_to_evaluate(run_dir, targets, key, args, rank)
    if not todo:
        say("nothing to evaluate" + (f"; {args.predictions} is left as it was"
                                     if args.predictions else ""))
        return
    extras = task.eval_extras(args, device)  # e.g. the judge, loaded once for every checkpoint
    # predictions go to a temporary file renamed over --predictions once complete: the file there
    # stays whole whatever happens before
    writer = FileWriter(args.predictions, "--predictions") if args.predictions and rank == 0 \
        else None
    try:
        evaluate_checkpoints(args, task, run_dir, todo, data, indices, key, extras, writer, rank,
                             world_size, device, say)
        if writer:
            writer.publish()
    finally:
        if writer:
            writer.discard()


def evaluate_checkpoints(args, task, run_dir, todo, data, indices, key, extras, writer, rank,
                         world_size, device, say):
    """Evaluate each checkpoint; rank 0 writes its predictions and per-class file, then appends
    its record: a record is never there before the outputs it stands for."""
    built = None  # (signature, model, inputs, cache) of the checkpoints that share them
    for folder, new_record in todo:
        name = os.path.relpath(folder, run_dir)  # checkpoint-N, or checkpoint-N/ema
        signature = model_signature(folder)
        if built is None or built[0] != signature or not read_checkpoint(task, built[1], folder,
                                                                         device):
            model, inputs = load_placed(task, folder, args, device, world_size, say)
            built = (signature, model, inputs, EvalCache(args.eval_cache_mb, say))
        _, model, inputs, cache = built
        metrics, predictions = evaluate(
            task, model, data, indices, inputs, batch_size=args.batch_size, device=device,
            precision=args.precision, num_workers=args.num_workers,
            prefetch_factor=args.prefetch_factor, rank=rank,
            world_size=world_size, with_predictions=bool(args.predictions or args.per_class),
            cache=cache)
        metrics.update(task.extra_metrics(model, inputs, data, args, extras=extras, rank=rank,
                                          world_size=world_size, device=device))
        if rank != 0:
            continue
        scope = " (partial evaluation)" if args.partial else " (full evaluation)"
        print(task.report(metrics, "eval", name + scope, data))
        step = checkpoint_step(checkpoint_folder(folder))
        record = {"checkpoint": name, "step": step, "data_key": key,
                  "val_data": [absolute_spec(p) for p in args.val_files],
                  "partial": args.partial,
                  "time": datetime.datetime.now().isoformat(timespec="seconds"), **metrics}
        if writer:
            writer.write("".join(json.dumps({"checkpoint": name, **{
                k: v for k, v in p.items() if k != "index"}}) + "\n" for p in predictions))
        if args.per_class:  # the predictions of every sample: exact counts under torchrun
            result, text = task.per_class(predictions, data)
            write_json(per_class_path(run_dir, name),
                       {"checkpoint": name, "step": step, "data_key": key,
                        "partial": args.partial, "datasets": result})
            print(text)
        if new_record:
            append_line(os.path.join(run_dir, RESULTS_FILE), json.dumps(record))
        injected_fault("kill_after_record", step)


if __name__ == "__main__":
    main()
