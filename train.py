"""Train one masked classifier over several mixed image datasets (--task classify), or one
unified text + image generation model with a joint loss (--task generate, see tasks/generate/).

    python train.py --config configs/demo.yaml
    python train.py --config configs/demo_generate.yaml
    torchrun --nproc_per_node 8 train.py --config my.yaml --batch_size 32 --grad_accum 2
    torchrun --nnodes 4 --nproc_per_node 8 ... train.py --config my.yaml --dist fsdp --precision
    bf16

Every flag can also be a key of the --config file (YAML/JSON); flags on the command line
win over the file. One optimizer step, top to bottom:
  fetch grad_accum micro-batches -> count their targets on all ranks -> forward -> summed loss /
  global count -> backward (gradient sync on the last micro-batch only) -> clip -> AdamW step ->
  EMA update (--ema_decay) -> log / evaluate / track best / save.
Under torchrun the model is replicated (--dist ddp) or sharded per transformer block with
FSDP2 (--dist fsdp); the loop is the same for every task (tasks/base.py): the classifier divides the
sum of per-sample losses by the global sample count, the generator its text CE and image MSE by
the global counts of target text tokens and noised image tokens.
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import islice

import cpu_threads  # noqa: F401  (before torch: OpenMP reads its settings as it loads)
import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (METRICS_FILE, SUMMARY_FILE, changed_run_flags, check_output_dir,
                        load_sharded_state, load_trainer_state, prepare_output_dir,
                        prune_checkpoints, read_info, resolve_resume, run_fingerprint,
                        save_checkpoint, set_aside_later, set_rng_state)
from config import apply_overrides, check_args, loader_workers, parse_args
from dataset import SPLIT_VERSION, DataError
import distributed
from distributed import all_gather_objects, all_reduce_sum, barrier
import ema
from eval import EvalCache, evaluate
from faults import TrainingError, catch_stop_signals, injected_fault, with_loss_fault
from files import write_json
from logs import JsonlLog, memory_mb, say_for
from model import CLASSIFIER_FILE, read_classifier_info
from backbone import LOADING, enable_activation_checkpointing, fsdp_units, train_mode
from optimizer import format_groups, lr_at, make_optimizer, set_lr
from precision import autocast
from reporting import build_reporters
from state_files import CheckpointError
from tasks import TASKS
from tasks.base import Task
from weights import WeightsMismatch


@dataclass
class Run:
    """What the loop reads, built once before the first step."""
    args: object
    task: Task  # tasks/base.py
    data: object  # the task's records and options
    model: object  # what the step runs: the DDP wrapper, or the FSDP2-sharded model
    raw_model: object  # the model itself (under FSDP2 the same module): evaluation runs it
    inputs: object  # the task's batch builder: image processor wrapper, or tokenizer
    optimizer: object
    scaler: object
    device: object
    rank: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    overrides: list
    eval_cache: object  # eval.EvalCache of the partial evaluation's batches
    ema: dict = None  # --ema_decay: the EMA shadow of raw_model's parameters (ema.py)
    fingerprint: dict = None  # data file sizes and registry, for resume checks (checkpoint.py)
    changed_flags: list = None  # --resume --allow_changed_flags: what differs from the checkpoint
    resumed: tuple = None  # --resume: (the checkpoint folder, its training_info.json)

    @property
    def main_process(self):
        return self.rank == 0

    def say(self, message):
        say_for(self.rank, tqdm.write)(message)

    def epoch_of(self, step):
        return step / self.steps_per_epoch


@dataclass
class LoopState:
    """What the loop changes, in one record."""
    step: int
    best: dict  # metric, mode, value, step, checkpoint
    train_metrics: object  # the window of train metrics not yet logged
    skipped_images: list  # --on_bad_image skip, per dataset, this rank
    last_saved: str = None
    bad_steps: int = 0  # non-finite steps in a row
    window_time: float = 0.0  # training time of the window: evaluation and saving not counted
    window_data_time: float = 0.0  # of which waiting for the step's batches
    window_samples: int = 0
    lr: float = 0.0  # of the last step
    grad_norm: object = None  # of the last step, a tensor on the device (read when logged)
    # steps a fused AdamW skipped or took on the device: (step, finite, grad_norm, samples),
    # counted when the loop next reads the device anyway (settle_steps)
    unsettled: list = field(default_factory=list)
    stop_signals: list = field(default_factory=list)  # SIGTERM / SIGUSR1 received
    stopped: bool = False  # by a signal: a checkpoint is written, no final evaluation
    # The training loader; one with state_dict() (a stream's) has its position saved with each
    # checkpoint, and --resume gives it back (loader_state: this rank's).
    loader: object = None
    loader_state: dict = None


def main(argv=None):
    try:
        args = parse_args(argv, description=__doc__)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    distributed.run(train, args, (DataError, FileNotFoundError, ValueError, TrainingError),
                    args.dist_timeout_minutes)


def train(args, rank, world_size, device):
    run = build_run(args, rank, world_size, device)
    train_mode(run.model)
    state = start_state(run)
    reporters = build_reporters(args.report_to, args.output_dir, run.data.names, rank,
                                os.path.basename(os.path.normpath(args.output_dir)), vars(args),
                                resume_step=state.step if args.resume else None)
    log = JsonlLog(os.path.join(args.output_dir, METRICS_FILE), rank,
                   keep_through_step=state.step if args.resume else None, reporters=reporters)
    if run.overrides and not args.resume:
        log.write("config", 0, 0.0, overrides=run.overrides)
    if run.changed_flags:
        log.write("changed_flags", state.step, run.epoch_of(state.step), changes=run.changed_flags)
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not run.main_process,
                    desc="train", dynamic_ncols=True)
    state.stop_signals, restore_signals = catch_stop_signals()
    loader = None  # one for the whole run: its worker processes serve every epoch
    try:
        while state.step < run.total_steps:
            epoch, first_micro = divmod(state.step, run.steps_per_epoch)
            order = run.task.epoch_order(run.data, epoch, args, rank, world_size)
            start = first_micro * args.grad_accum * args.batch_size
            if loader is None:
                loader = run.task.loader(run.data, run.inputs, order[start:], train=True,
                                         batch_size=args.batch_size, seed=args.seed, epoch=epoch,
                                         num_workers=args.num_workers, persistent=True,
                                         prefetch_factor=args.prefetch_factor,
                                         pin_memory=device.type == "cuda")
                if state.loader_state is not None:  # a stream's loader: its position
                    loader.load_state_dict(state.loader_state)
                state.loader = loader
            else:  # the epoch travels with each sample's key: workers hold no state of their own
                loader.sampler.set(order[start:], epoch)
            batches = iter(loader)
            for _ in range(state.step % run.steps_per_epoch, run.steps_per_epoch):
                stop = train_step(run, state, batches, log)
                progress.update(1)
                if after_step(run, state, log, progress, stop) or state.step >= run.total_steps:
                    break
            if state.stopped:
                return
        finish(run, state, log)
    finally:
        progress.close()
        restore_signals()
        log.close()


def build_run(args, rank, world_size, device):
    """Data (every record checked), the model on its devices, the optimizer and the schedule."""
    say = say_for(rank)
    task = TASKS[args.task]
    overrides = apply_overrides(args)
    for change in overrides:
        say(f"override: {change}")
    check_args(args)
    distributed.mesh_shape(args.dist, args.shard_size, world_size)  # refused before loading
    LOADING.trust_remote_code = args.trust_remote_code
    LOADING.attn_implementation = args.attn_implementation
    loader_workers(args, say, "epochs (and evaluations the evaluation cache cannot hold)", device)
    check_output_dir(args)
    data = task.load_data(args, say)
    fingerprint = run_fingerprint(args, data, rank)
    size = task.train_size(data)
    steps_per_epoch, total_steps = plan_steps(args, size, world_size, say)
    resumed = None  # --resume: (the checkpoint folder, its training_info.json), read once
    if args.resume:
        folder = resolve_resume(args.resume, args.output_dir)
        resumed = (folder, read_info(folder))
    changed = (check_resume_flags(args, *resumed, world_size, fingerprint, say, size,
                                  steps_per_epoch) if resumed else [])
    if resumed:
        data = task.resumed_data(data, resumed[0], args, say)

    param_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.param_dtype]
    raw_model, backbone, inputs, sources = build_model(args, task, data, param_dtype, world_size,
                                                       say)
    params = list(raw_model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params
                                                           if p.requires_grad)
    say(f"{type(backbone).__name__}: {total:,} parameters, {trainable:,} trainable "
        f"({100 * trainable / total:.1f}%)")
    if args.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    model = place_model(args, task, raw_model, backbone, device, world_size, say, sources)
    optimizer = make_optimizer(raw_model, args, device)  # after sharding: FSDP2 swaps parameters
    say(format_groups(optimizer.param_groups, args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    prepare_output_dir(args, rank)  # every check has passed: only now is anything written
    # After placing: the shadow lives where the weights do (FSDP2: sharded like them).
    shadow = ema.make_ema(raw_model) if args.ema_decay else None
    return Run(args=args, task=task, data=data, model=model, raw_model=raw_model, inputs=inputs,
               optimizer=optimizer, scaler=scaler, device=device, rank=rank,
               world_size=world_size, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               overrides=overrides, ema=shadow, fingerprint=fingerprint, changed_flags=changed,
               resumed=resumed,
               eval_cache=EvalCache(args.eval_cache_mb, say_for(rank, tqdm.write)))


def plan_steps(args, size, world_size, say):
    """(steps per epoch, steps of the run). One epoch is this rank's share of the data in
    micro-batches, grouped by grad_accum; a stream (size None) has no epochs: the run is one
    pass of --max_steps."""
    if size is None:
        steps_per_epoch = total_steps = args.max_steps
    else:
        per_rank = size // world_size
        if per_rank == 0:
            raise ValueError(f"{size} training samples cannot be split over {world_size} "
                             f"processes")
        if args.no_shuffle and size % world_size:  # the same order every epoch: the same tail
            say(f"note: --no_shuffle keeps one order, and each epoch leaves out its last "
                f"{size % world_size} sample(s) so that the {world_size} processes take equal "
                "steps: those are never trained")
        micro_batches = math.ceil(per_rank / args.batch_size)
        if micro_batches < args.grad_accum:  # every step would be the whole epoch, not GBS
            raise ValueError(f"--grad_accum {args.grad_accum}: an epoch holds {micro_batches} "
                             f"micro-batch(es) of {args.batch_size} per process ({size} samples "
                             f"over {world_size}), fewer than one step takes: lower --grad_accum "
                             "or --batch_size")
        steps_per_epoch = math.ceil(micro_batches / args.grad_accum)
        total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    check_run_length(args, total_steps, say)
    say(f"global batch {args.batch_size * world_size * args.grad_accum} = micro batch "
        f"{args.batch_size} x {world_size} process(es) x grad_accum {args.grad_accum}; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps")
    return steps_per_epoch, total_steps


def check_resume_flags(args, folder, info, world_size, fingerprint, say, size, steps_per_epoch):
    """--resume continues the run a checkpoint belongs to: an EMA on exactly when it kept one, a
    stream's position (size None: the training data is read as a stream) exactly when it kept
    one, from as many processes and DataLoader workers, and the flags that define the run as its
    training_info.json records them, epochs of as many steps (steps_per_epoch) among them. A
    changed flag is refused, each named, unless --allow_changed_flags (then they are named and
    returned). `folder`, `info`: the checkpoint and its training_info.json."""
    kept_ema = os.path.isdir(os.path.join(folder, ema.EMA_DIR))
    if kept_ema and not args.ema_decay:
        raise ValueError(f"--resume {folder}: that run kept an EMA of the weights (--ema_decay "
                         f"{info.get('args', {}).get('ema_decay')}); resume it with "
                         "--ema_decay too")
    if args.ema_decay and not kept_ema:
        raise FileNotFoundError(f"{os.path.join(folder, ema.EMA_DIR)} is missing: this "
                                "checkpoint was written without --ema_decay, so its EMA cannot "
                                "be resumed")
    before = info["fingerprint"] = info.get("fingerprint") or {}
    if "classes" not in before and os.path.isfile(os.path.join(folder, CLASSIFIER_FILE)):
        # written before the class order was kept there: the head's file names its rows
        before["classes"] = {name: entry.get("labels") for name, entry in
                             read_classifier_info(folder)["datasets"].items()}
    changes = changed_run_flags(info, args, world_size, fingerprint,
                                TASKS[args.task].RESUME_MAY_CHANGE,
                                steps_per_epoch if size is not None else None)
    if changes and not args.allow_changed_flags:
        raise ValueError(f"--resume {folder}: the data or the flags that define the run "
                         f"differ from its {os.path.basename(folder)}/training_info.json, so "
                         f"this would not continue it exactly: {'; '.join(changes)}. Give the "
                         "checkpoint's values and data, or --allow_changed_flags to continue "
                         "with the new ones")
    if changes:
        say(f"note: --allow_changed_flags: {folder} continues with changed flags: "
            f"{'; '.join(changes)}")
    remote = [unit for specs in fingerprint["data"].values() for spec in specs
              for unit, (_, nbytes, _) in spec["units"].items() if nbytes is None]
    if remote:  # a URL's content is not read to fingerprint it
        say(f"note: {len(remote)} remote data file(s) (e.g. {remote[0]}) are compared with the "
            "checkpoint's by their URL alone: one rewritten under the same URL since would not "
            "be seen")
    saved = info.get("loader_states")  # a stream's position, per rank and DataLoader worker
    if (size is None) != (saved is not None):
        raise ValueError(f"--resume {folder}: a run resumes with --streaming exactly when it was "
                         "trained with it (the checkpoint holds the stream's position)")
    if saved is not None and info.get("stream_split") != SPLIT_VERSION:
        raise ValueError(f"--resume {folder}: its stream position (--streaming) was written when "
                         "the stream's files were split over processes and DataLoader workers "
                         "another way, so it cannot be continued exactly: start the run again")
    workers = info["args"].get("num_workers")
    if saved is not None and (len(saved), workers) != (world_size, args.num_workers):
        raise ValueError(f"--resume {folder}: its stream position (--streaming) is one per "
                         f"process and DataLoader worker; it was written by {len(saved)} "
                         f"process(es) with --num_workers {workers}: resume with the same")
    return changes


def build_model(args, task, data, dtype, world_size, say):
    """(model, backbone, inputs, sources). Under --dist fsdp / hsdp the backbone of a model folder
    is built with its parameters on the meta device, and sources says where each rank reads its
    shards after sharding (a preset, or a folder whose weights need more than renaming, is built
    whole on every rank: sources None)."""
    if (distributed.mesh_shape(args.dist, args.shard_size, world_size)
            and not args.model.startswith("preset:")):
        torch.manual_seed(args.seed)  # identical init of what the folder lacks (the head)
        model, backbone, inputs = task.build_model(args, data, dtype, meta=True)
        try:
            return model, backbone, inputs, task.weight_sources(model, args.model,
                                                                checkpoint=False)
        except WeightsMismatch as e:
            say(f"note: {e}; every process reads the whole model")
    # Identical init on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(args.seed)
    return (*task.build_model(args, data, dtype), None)


def check_run_length(args, total_steps, say):
    """Schedules longer than the run: a warmup whose learning rate never reaches --lr (said: a
    short trial run of a long recipe), an EMA never updated (refused: its evaluations and
    checkpoints would be of the initial weights)."""
    if args.warmup_steps > total_steps:
        say(f"note: --warmup_steps {args.warmup_steps} is longer than the run's {total_steps} "
            f"steps: its learning rate reaches {total_steps / args.warmup_steps:.0%} of --lr "
            f"{args.lr:g} at most")
    if args.ema_decay and args.ema_every > total_steps:
        raise ValueError(f"--ema_every {args.ema_every}: the run has {total_steps} steps, so the "
                         "EMA would never be updated from the initial weights")


def place_model(args, task, raw_model, backbone, device, world_size, say, sources=None):
    """The model the step runs: FSDP2-sharded in place (each rank then reads its shards of the
    meta-device backbone from `sources`), wrapped in DDP, or just moved."""
    if args.sync_batchnorm:
        if args.dist != "ddp" or world_size == 1:
            raise ValueError("--sync_batchnorm needs several processes (torchrun) with --dist ddp")
        replaced = distributed.convert_sync_batchnorm(raw_model)
        if not replaced:
            raise ValueError(f"--sync_batchnorm: {type(backbone).__name__} has no BatchNorm layer")
        say(f"SyncBatchNorm: {replaced} BatchNorm layer(s) normalise over all processes")
    units = fsdp_units(backbone)  # transformer blocks (and a VLM's vision tower), in order
    if args.compile:
        for unit in units:
            unit.compile()
    mesh = distributed.mesh_shape(args.dist, args.shard_size, world_size)
    if mesh:
        # raw_model is now the sharded model, each shard on the device (or in CPU memory with
        # --cpu_offload); the optimizer holds the shards.
        say(f"{distributed.describe_mesh(mesh)}: {len(units)} block(s) + the root sharded" +
            ("; each process reads only its shards of the weights" if sources else ""))
        return distributed.shard_model(
            raw_model, units, device, mesh, cpu_offload=args.cpu_offload,
            param_dtype=torch.bfloat16 if args.precision == "bf16" else None, sources=sources)
    if world_size > 1:
        return DDP(raw_model.to(device), device_ids=[device.index] if device.type == "cuda" else
                   None, find_unused_parameters=task.has_unused_parameters(args, raw_model))
    return raw_model.to(device)


def start_state(run):
    """A fresh loop state, or the one a checkpoint holds (--resume): weights, optimizer, scaler,
    RNG, the unlogged train-metric window, best so far and skipped-image counts."""
    args = run.args
    state = LoopState(0, {"metric": args.best_metric, "mode": args.best_mode, "value": None,
                          "step": None, "checkpoint": None},
                      run.task.new_metrics(run.data, args, run.device),
                      [0] * len(run.data.names))
    if not args.resume:
        torch.manual_seed(args.seed + run.rank)
        return state
    folder, info = run.resumed
    trainer_state = load_trainer_state(folder)
    if run.ema is not None:  # an EMA on exactly when the checkpoint has one: check_resume_flags
        ema.load_ema_state(folder, run.ema, trained_now(run))
    # Any world size and --dist the checkpoint was written with.
    load_sharded_state(folder, run.model, run.optimizer, trained_now(run), run.say)
    run.scaler.load_state_dict(trainer_state["scaler"])
    ranks = trainer_state["ranks"]
    if run.rank < len(ranks):  # another world size starts with fresh RNG and an empty window
        set_rng_state(ranks[run.rank]["rng"])
        window = ranks[run.rank]["train_metrics"]
        if window.shape == state.train_metrics.sums.shape:
            state.train_metrics.sums.copy_(window)
    saved = info.get("loader_states")  # its shape checked by check_resume_flags
    state.loader_state = saved[run.rank] if saved is not None else None
    state.step, state.last_saved = info["step"], folder
    if run.main_process:  # once the checkpoint has loaded: a failed load moves nothing
        set_aside_later(run.args.output_dir, state.step, run.say)
    barrier()
    state.best = resumed_best(run, info, folder, state.best)
    skipped = info.get("skipped_images", [])
    if run.main_process and len(skipped) == len(state.skipped_images):
        state.skipped_images = skipped  # the totals of all ranks so far
    run.say(f"resumed from {folder} at step {state.step}")
    return state


def resumed_best(run, info, folder, fresh):
    """The best so far as the checkpoint `folder` (its `info`) saved it, its folder found beside
    `folder` (the run's folder may be named otherwise now, or copied); `fresh`, with a note,
    where that best is of another --best_metric / --best_mode or its folder is gone."""
    saved = info["best"]
    if saved["value"] is None:
        return fresh
    was = (f"the best {saved['metric']} ({saved['mode']}) = {saved['value']:.4f} at step "
           f"{saved['step']}")
    if (saved["metric"], saved["mode"]) != (fresh["metric"], fresh["mode"]):
        run.say(f"note: {was} is of other flags than --best_metric {fresh['metric']} "
                f"--best_mode {fresh['mode']}: the best is tracked anew from step "
                f"{info['step']}, and the keep limit no longer keeps that checkpoint for it")
        return fresh
    beside = os.path.join(os.path.dirname(os.path.normpath(folder)),
                          os.path.basename(os.path.normpath(saved["checkpoint"])))
    # beside the checkpoint resumed from, else where it was saved (a run resumed from another
    # run's folder keeps that run's best)
    for path in (beside, saved["checkpoint"]):
        if checkpoint_of_step(path, saved["step"]):
            return {**saved, "checkpoint": path}
    run.say(f"note: {was} was in {saved['checkpoint']}, which is gone: the best is tracked anew "
            f"from step {info['step']}")
    return fresh


def checkpoint_of_step(path, step):
    """Whether `path` holds the complete checkpoint of `step`."""
    try:
        return read_info(path).get("step") == step
    except CheckpointError:  # no training_info.json there, or not readable: not that checkpoint
        return False


def trained_now(run):
    """Parameters this run trains that a checkpoint of its earlier part may lack (left out while
    frozen: save_sharded_state), where it was resumed with changed flags; else none."""
    if not run.changed_flags:
        return ()
    return [n for n, p in run.raw_model.named_parameters(remove_duplicate=False)
            if p.requires_grad]


def train_step(run, state, batches, log):
    """One optimizer step. Returns whether any rank was asked to stop (SIGTERM / SIGUSR1)."""
    args, task, step = run.args, run.task, state.step
    step_start = time.time()
    # The whole accumulated batch first: the loss is normalised by its global target counts. The
    # same all-reduce tells every rank whether any rank was asked to stop or could not read.
    # A stream's position before the step's batches: what a checkpoint of the step before keeps
    # should a batch fail to read (its micro-batches taken so far are not trained).
    position = (copy.deepcopy(state.loader.state_dict()) if hasattr(state.loader, "state_dict")
                else None)  # a copy: the loader may update the dict it returned in place
    try:
        micro_batches, data_error = list(islice(batches, args.grad_accum)), None
    except DataError as e:
        micro_batches, data_error = [], e
    state.window_data_time += time.time() - step_start
    for batch in micro_batches:
        for message, dataset_id in batch.pop("skipped", []):
            state.skipped_images[dataset_id] += 1
            tqdm.write(f"skipped (--on_bad_image skip): {message}")
    counts = [task.count_targets(b) for b in micro_batches]
    local = [sum(c[name] for c in counts) for name in task.COUNTS]
    *reduced, stop, failed = all_reduce_sum(
        [*local, len(state.stop_signals), data_error is not None], run.device)
    totals = dict(zip(task.COUNTS, reduced))
    settle_steps(run, state, log)  # the all-reduce has just waited for the device
    if failed:
        stop_on_data_error(run, state, data_error, position)

    lr = lr_at(step, args, run.total_steps)
    set_lr(run.optimizer, lr)
    window_before = state.train_metrics.sums.clone()  # a skipped step leaves the window as it was
    step_loss = with_loss_fault(task.step_loss, step + 1)  # the reliability tests' NaN loss
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        batch = task.prepare(batch, run.data, step, i)
        set_gradient_sync(run, last=i == len(micro_batches) - 1)
        with autocast(run.device, args.precision):
            outputs = task.forward(run.model, batch, run.data, train=True)
            loss = step_loss(outputs, totals, args)
        # DDP and FSDP average gradients over ranks; times world_size it is a global sum / count.
        run.scaler.scale(loss * run.world_size).backward()
        state.train_metrics.update(**{k: v.detach() if torch.is_tensor(v) else v
                                      for k, v in outputs.items()})
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                               args.max_grad_norm or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    # Taken after the gradient all-reduce, so every rank decides alike. Under fp16 the scaler skips
    # overflowing steps itself (and lowers its scale): that is not a bad step.
    state.window_samples += totals["samples"]
    taken = None  # whether the step updated the weights: True, or a device tensor (no host sync)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
        state.bad_steps = 0
        taken = torch.isfinite(grad_norm)  # where it is not, the scaler skipped the step
    elif run.optimizer.defaults.get("fused"):
        # No host sync: a fused AdamW takes found_inf and skips the whole update on the device
        # (weights, moments, step count); the window of train metrics is restored there too.
        taken = torch.isfinite(grad_norm)
        run.optimizer.found_inf = (~taken).float()
        run.optimizer.step()
        del run.optimizer.found_inf
        state.train_metrics.sums.copy_(torch.where(taken, state.train_metrics.sums,
                                                   window_before))
        state.unsettled.append((step + 1, taken, grad_norm, totals["samples"]))
    elif math.isfinite(grad_norm.item()):
        run.optimizer.step()
        state.bad_steps = 0
        taken = True
    else:
        state.train_metrics.sums.copy_(window_before)
        count_bad_step(run, state, log, step + 1, grad_norm, totals["samples"])
    if taken is not None and run.ema is not None and ema.ema_due(step + 1, args.ema_every):
        ema.update_ema(run.ema, run.raw_model, args.ema_decay, taken)  # not after a skipped step
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.window_time += time.time() - step_start
    state.lr, state.grad_norm = lr, grad_norm
    return bool(stop)


def settle_steps(run, state, log):
    """Count the steps a fused AdamW decided on the device, as the synchronous path counts them:
    a finite one ends a run of bad steps, a skipped one is logged and counted."""
    for step, finite, grad_norm, samples in state.unsettled:
        if finite.item():
            state.bad_steps = 0
        else:
            count_bad_step(run, state, log, step, grad_norm, samples)
    state.unsettled.clear()


def set_gradient_sync(run, last):
    """Gradients are all-reduced on the last micro-batch of a step only."""
    if distributed.is_sharded(run.model):
        run.model.set_requires_gradient_sync(last)
    elif run.world_size > 1:
        run.model.require_backward_grad_sync = last  # what DDP's no_sync() sets


def stop_on_data_error(run, state, data_error, position=None):
    """Some rank could not read its batch: every rank checkpoints the last step and stops. A
    stream's checkpoint keeps `position`, where the failed step's batches began."""
    if state.step > 0:
        save(run, state, {}, position)
    kept = (f"{state.last_saved} holds the last completed step" if state.last_saved
            else "no checkpoint was written")
    raise DataError(f"{data_error}\n({kept})" if data_error else
                    f"another process could not read its data (its error names the file); {kept}")


def count_bad_step(run, state, log, step, grad_norm, samples):
    """A skipped step (its train metrics already taken out of the window): logged, counted."""
    state.bad_steps += 1
    state.window_samples -= samples
    log.write("skipped_step", step, run.epoch_of(step), consecutive=state.bad_steps,
              reason=f"non-finite gradient norm ({grad_norm.item()})")
    if run.main_process:
        tqdm.write(f"step {step} skipped: non-finite gradients ({state.bad_steps} in a row)")
    if state.bad_steps > run.args.max_bad_steps:
        raise TrainingError(f"{state.bad_steps} optimizer steps in a row had non-finite gradients "
                            f"(up to step {step}; --max_bad_steps {run.args.max_bad_steps}); the "
                            f"last good checkpoint is {state.last_saved or 'none'}")


def after_step(run, state, log, progress, stop):
    """Log, evaluate, track the best, save; on a stop signal write a checkpoint and end."""
    args, step = run.args, state.step
    log_due = step % args.logging_steps == 0 or step == run.total_steps
    eval_due = not args.no_partial_eval and (step % args.eval_steps == 0
                                             or step == run.total_steps)
    save_due = step % args.save_steps == 0 or step == run.total_steps
    if log_due or eval_due or save_due or stop:  # records follow the skipped steps before them
        settle_steps(run, state, log)
    if log_due and state.window_samples:
        metrics = state.train_metrics.all_reduce().compute("train")
        state.train_metrics.reset()
        log.write("train", step, run.epoch_of(step), **metrics, lr=state.lr,
                  grad_norm=state.grad_norm.item(),
                  samples_per_second=state.window_samples / state.window_time,
                  data_wait_share=state.window_data_time / state.window_time,
                  max_memory_mb=memory_mb(run.device))
        progress.set_postfix(**run.task.progress(metrics, "train"), lr=f"{state.lr:.2e}")
        state.window_time, state.window_data_time, state.window_samples = 0.0, 0.0, 0

    eval_metrics, new_best = {}, False
    if eval_due:
        eval_metrics = run_evaluation(run, run.data.partial_indices, "eval", run.eval_cache)
        if run.ema is not None:  # the same evaluation of the EMA weights: eval_ema_*
            with ema.swapped_in(run.raw_model, run.ema):
                eval_metrics.update(run_evaluation(run, run.data.partial_indices, "eval_ema",
                                                   run.eval_cache))
        log.write("eval", step, run.epoch_of(step), **eval_metrics)
        run.say(run.task.report(eval_metrics, "eval", f"partial evaluation at step {step}",
                                run.data))
        if run.ema is not None:
            run.say(run.task.report(eval_metrics, "eval_ema", f"partial evaluation at step {step}"
                                    " of the EMA weights", run.data))
        new_best = not args.no_best_tracking and track_best(run, state, log, eval_metrics)
    injected_fault("kill_before_save", step)
    if new_best or (save_due and not args.save_best_only):
        save(run, state, eval_metrics)
    if not stop:
        return False
    save(run, state, eval_metrics)
    names = ",".join(dict.fromkeys(state.stop_signals)) or "a signal to another process"
    log.write("stopped", step, run.epoch_of(step), signal=names, checkpoint=state.last_saved)
    run.say(f"stopped by {names} after step {step}: {state.last_saved} written; continue with "
            f"--resume latest")
    state.stopped = True
    return True


def best_model_checkpoint(run, checkpoint):
    """The folder of the weights that scored the best: an ema_* metric's are checkpoint-N/ema
    (checkpoint-N itself holds the raw weights)."""
    if checkpoint and run.args.best_metric.startswith(ema.METRIC_PREFIX):
        return os.path.join(checkpoint, ema.MODEL_DIR)
    return checkpoint


def track_best(run, state, log, eval_metrics):
    """Whether this evaluation is a new best of --best_metric."""
    metric, best, step = run.args.best_metric, state.best, state.step
    value = eval_metrics[f"eval_{metric}"]
    if best["value"] is not None and not (value > best["value"] if run.args.best_mode == "max"
                                          else value < best["value"]):
        return False
    best.update(value=value, step=step, checkpoint=checkpoint_path(run, step))
    log.write("best", step, run.epoch_of(step), best_model_step=step,
              **{f"best_{metric}": value}, best_checkpoint=best["checkpoint"],
              best_model_checkpoint=best_model_checkpoint(run, best["checkpoint"]))
    run.say(f"new best {metric} = {value:.4f} at step {step}")
    return True


def checkpoint_path(run, step):
    return os.path.join(run.args.output_dir, f"checkpoint-{step}")


def save(run, state, metrics, position=None):
    """checkpoint-{step} (once per step), then the keep limit (the best is always kept). A
    stream's loader position: its own, or `position` (taken before batches not trained)."""
    args, path = run.args, checkpoint_path(run, state.step)
    if state.last_saved == path:
        return
    info = {"step": state.step, "epoch": run.epoch_of(state.step), "args": vars(args),
            "fingerprint": run.fingerprint, "steps_per_epoch": run.steps_per_epoch,
            "metrics": metrics, "best": state.best, "world_size": run.world_size,
            "skipped_images": [int(n) for n in all_reduce_sum(state.skipped_images, run.device)]}
    if hasattr(state.loader, "state_dict"):  # JSON, as the rest of training_info.json
        info["loader_states"] = all_gather_objects(
            state.loader.state_dict() if position is None else position)
        info["stream_split"] = SPLIT_VERSION

    def write_model(folder):
        run.task.save_model(folder, run.raw_model, run.inputs, run.data, args, rank=run.rank)

    save_checkpoint(path, model=run.model, write_model=write_model, optimizer=run.optimizer,
                    scaler=run.scaler, info=info, rank=run.rank,
                    train_window=state.train_metrics.sums, ema=run.ema, raw_model=run.raw_model)
    state.last_saved = path
    if run.main_process and not args.save_all_checkpoints:
        keep = 0 if args.save_best_only else args.save_total_limit
        for removed in prune_checkpoints(args.output_dir, keep, protect=[state.best["checkpoint"]]):
            tqdm.write(f"removed {removed} (keep limit)")
    barrier()


def run_evaluation(run, indices, prefix, cache=None):
    """cache: the partial evaluation's subset is the same every time; the final one runs once."""
    return evaluate(run.task, run.raw_model, run.data, indices, run.inputs,
                    batch_size=run.args.batch_size, device=run.device,
                    precision=run.args.precision, num_workers=run.args.num_workers,
                    prefetch_factor=run.args.prefetch_factor, prefix=prefix, rank=run.rank,
                    world_size=run.world_size, cache=cache)[0]


def finish(run, state, log):
    """Full evaluation of the best (else the last) checkpoint, the task's end products, and
    run_summary.json."""
    args, step = run.args, state.step
    final_metrics, evaluated = {}, None
    if not args.no_final_eval:
        evaluated = state.best["checkpoint"] or state.last_saved
        if state.best["checkpoint"] and load_sharded_state(state.best["checkpoint"], run.model,
                                                           may_lack=trained_now(run)):
            # written before a resume that trains more: its frozen parameters are not in it
            run.say(f"note: the final evaluation is of {state.last_saved}, not of the best "
                    f"{evaluated}, which left out parameters this run has trained since it")
            load_sharded_state(state.last_saved, run.model, may_lack=trained_now(run))
            evaluated = state.last_saved
        elif state.best["checkpoint"]:
            if args.best_metric.startswith(ema.METRIC_PREFIX):  # the EMA weights won
                ema.load_ema_state(state.best["checkpoint"], run.ema)
                ema.copy_into(run.raw_model, run.ema)  # for good: training is over
                evaluated = best_model_checkpoint(run, evaluated)
        run.say(f"full evaluation of {evaluated} on all {len(run.data.val):,} validation samples")
        final_metrics = run_evaluation(run, list(range(len(run.data.val))), "final_eval")
        log.write("final_eval", step, run.epoch_of(step), checkpoint=evaluated, **final_metrics)
        run.say(run.task.report(final_metrics, "final_eval", f"final evaluation of {evaluated}",
                                run.data))
    if run.main_process or distributed.is_sharded(run.raw_model):
        run.task.finish(args, run.raw_model, run.inputs, run.data, device=run.device,
                        main_process=run.main_process)
    skipped = dict(zip(run.data.names,
                       map(int, all_reduce_sum(state.skipped_images, run.device))))
    if any(skipped.values()):
        log.write("skipped_images", step, run.epoch_of(step), **skipped)
        run.say("images skipped because they could not be decoded: " +
                ", ".join(f"{n} {c}" for n, c in skipped.items()))
    if run.main_process:
        best = state.best
        summary = {"best_metric": args.best_metric if not args.no_best_tracking else None,
                   "best_value": best["value"], "best_step": best["step"],
                   "best_checkpoint": best["checkpoint"],
                   "best_model_checkpoint": best_model_checkpoint(run, best["checkpoint"]),
                   "final_eval_checkpoint": evaluated,
                   "final_eval": final_metrics, "last_checkpoint": state.last_saved,
                   "steps": step, "world_size": run.world_size,
                   "global_batch_size": args.batch_size * run.world_size * args.grad_accum,
                   "skipped_images": skipped, "overrides": run.overrides, "config": vars(args)}
        write_json(os.path.join(args.output_dir, SUMMARY_FILE), summary)
        print(f"run summary written to {os.path.join(args.output_dir, SUMMARY_FILE)}")


if __name__ == "__main__":
    main()
