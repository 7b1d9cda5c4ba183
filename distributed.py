"""torchrun process-group set-up shared by train.py and eval.py.

Without torchrun (no RANK in the environment) everything runs in one process and the
collectives below are no-ops.
"""
import datetime
import multiprocessing
import os
import sys
import traceback

import torch
import torch.distributed as dist

import host_allocator

if dist.is_available():
    # Must be imported before init_process_group: torch.distributed.nn binds `group=group.WORLD` as
    # default arguments at import time, and transformers imports it lazily (via
    # torch.distributed.fsdp) on the first from_pretrained. Imported after init, those defaults keep
    # the default group alive, so destroy_process_group() never frees ProcessGroupGloo nor joins its
    # worker threads; a worker still releasing the last collective's tensors then races interpreter
    # shutdown and the rank aborts with "terminate called without an active exception".
    import torch.distributed.nn  # noqa: F401


def setup_distributed(timeout_minutes=30):
    """Return (rank, world_size, local_rank, device); gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # A bounded timeout: a rank that dies must not leave the others waiting for half an hour.
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if backend == "nccl" else None)
    return rank, world_size, local_rank, device


SHARDED = ("fsdp", "hsdp")  # the --dist values that shard the model with FSDP2


def check_shard_size(shard_size):
    """--shard_size (for --dist hsdp: the flags' FLAG_NEEDS) is at least 1."""
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}")


def mesh_shape(dist, shard_size, world_size):
    """The FSDP2 device mesh of --dist over `world_size` processes: (world_size,) for fsdp,
    (replicas, shard_size) for hsdp (shard_size: default the processes of one node,
    LOCAL_WORLD_SIZE); None where nothing is sharded (ddp, or one process)."""
    if dist not in SHARDED:
        return None
    # checked in one process too (no torchrun), where nothing is sharded: a --shard_size that
    # cannot hold there is refused as it is under torchrun, not dropped
    if dist == "hsdp" and shard_size and world_size % shard_size:
        raise ValueError(f"--shard_size {shard_size} does not divide the {world_size} processes"
                         + (" (one process: no torchrun)" if "RANK" not in os.environ else ""))
    if world_size == 1:
        return None
    if dist == "fsdp":
        return (world_size,)
    shard_size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % shard_size:
        raise ValueError(f"--shard_size {shard_size} does not divide the {world_size} processes")
    return (world_size // shard_size, shard_size)


def describe_mesh(shape):
    if len(shape) == 1:
        return f"FSDP2 over {shape[0]} processes"
    return (f"HSDP over {shape[0] * shape[1]} processes: {shape[0]} replica(s) x {shape[1]} "
            "shard(s)")


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value, device):
    """Sum a Python number, or each number of a list, over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj):
    """List of `obj` from every rank, in rank order (small Python objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_model(model, units, device, mesh, param_dtype=None, cpu_offload=False,
                sources=None):
    """FSDP2: `fully_shard` each unit (a transformer block, a VLM's vision tower), then the root,
    over a device mesh of shape `mesh` (mesh_shape): one dimension shards over every process; two
    (HSDP) replicate over the first and shard over the second, so the weight gathers and gradient
    reduce-scatters stay within a group of processes (a node) and only an all-reduce of each
    group's gradient shard crosses groups.

    param_dtype: compute dtype of the gathered weights (bf16), gradients reduced in fp32.
    cpu_offload: sharded weights, gradients and optimizer state live in CPU memory.
    sources: where the weights of the model's meta-device entries are stored
    (weights.read_weights): after sharding each rank reads only its shards of them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    names = ("shard",) if len(mesh) == 1 else ("replicate", "shard")
    options = {"mesh": init_device_mesh(device.type, tuple(mesh), mesh_dim_names=names)}
    if param_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                    reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)  # the root: what no unit holds (embeddings, final norm, head)
    keep_recorded_outputs([*units, model])
    if sources is not None:
        from weights import read_weights
        read_weights(model, sources, torch.device("cpu") if cpu_offload else device)
    return model


def keep_recorded_outputs(modules):
    """fully_shard gives each module a class of its own (SiglipVisionModel becomes
    FSDPSiglipVisionModel). transformers looks up the outputs a model can record (the hidden
    states LLaVA's or Aya Vision's projector reads from the vision tower) by the name of its
    class, and would find none for the new class: each sharded transformers model is registered
    under it as its __init__ registered it under the old one."""
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    for module in modules:
        if isinstance(module, PreTrainedModel):
            # the class fully_shard derived it from (after FSDPModule in its bases)
            unsharded = str(next(c for c in type(module).__mro__[1:]
                                 if issubclass(c, PreTrainedModel)))
            if not dict.__contains__(_CAN_RECORD_REGISTRY, unsharded):
                raise RuntimeError(f"transformers' registry of recordable outputs holds no "
                                   f"{unsharded}: its layout changed, the sharded model would "
                                   "record nothing")
            # keyed on the class's name underneath: 5.21-5.24 keep a plain dict that their own
            # __init__ fills by str(class); from 5.25 a dict subclass whose setter takes the model
            dict.__setitem__(_CAN_RECORD_REGISTRY, str(type(module)), module._can_record_outputs)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def run(fn, args, user_errors, timeout_minutes=30):
    """Call fn(args, rank, world_size, device) in this (torchrun) process.

    A user error (bad data, a missing file, a wrong flag) ends the process with its message
    and exit code 2. No collective on that way out: other ranks may be inside one, and
    torchrun stops them when this one exits (without torchrun, a collective that waits on a
    dead rank fails after `timeout_minutes`).
    """
    rank, world_size, _, device = setup_distributed(timeout_minutes)
    # before anything is loaded: the gathers (on the CPU) or the shards (offloaded) in host memory
    if getattr(args, "dist", None) in SHARDED and world_size > 1 and (
            device.type == "cpu" or getattr(args, "cpu_offload", False)):
        host_allocator.return_freed_memory()
    else:
        host_allocator.keep_freed_memory()
    try:
        fn(args, rank, world_size, device)
        failure = None
    except user_errors as e:
        failure, code = f"error: {e}", 2
    except Exception:
        failure, code = traceback.format_exc(), 1
    # DataLoader workers ignore SIGTERM (dataset.start_worker: preemption is the training
    # loop's to handle), and a loader abandoned by an exception leaves them running: the
    # interpreter's exit handler, which stops child processes with SIGTERM and waits for them, would
    # wait forever.
    for child in multiprocessing.active_children():
        child.kill()
    if failure is None:
        cleanup()
        return
    print(failure, file=sys.stderr)
    sys.exit(code)


def cleanup():
    """End a torchrun process after its work is done: tear the process group down together.

    destroy_process_group() frees ProcessGroupGloo and joins its worker threads (with the GIL
    released) only because torch.distributed.nn is imported before init_process_group (see the
    top of this file); otherwise a worker can still be releasing the last collective's tensors
    when the interpreter shuts down, and the rank aborts (exit -6).
    """
    if is_distributed():
        dist.barrier()  # tear down together: gloo aborts a rank whose peer has already left
        dist.destroy_process_group()
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: its work is done and saved
            # Skip the interpreter's teardown: a C++ thread of the communication stack destroyed
            # there while still joinable aborts the rank now and then ("terminate called without
            # an active exception", exit -6) after every file has been written.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global micro-batch: per-channel
    sums, sums of squares and counts are all-reduced (differentiably) over every process, so N
    processes of batch B normalise like one of batch N x B. Unlike torch.nn.SyncBatchNorm it runs
    on any device (gloo on CPU too). Evaluation uses the running statistics, as BatchNorm does."""

    def forward(self, x):
        if not (self.training and is_distributed() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        channels, n = x.shape[1], stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1 / self.num_batches_tracked.item() if self.momentum is None
                            else self.momentum)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model):
    """Replace every BatchNorm layer of `model` by SyncBatchNorm (weights and statistics kept);
    returns how many were replaced."""
    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                    child, SyncBatchNorm):
                sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device=child.weight.device
                                     if child.affine else None)
                sync.load_state_dict(child.state_dict())
                setattr(parent, name, sync)
                replaced += 1
    return replaced
