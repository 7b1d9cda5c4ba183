"""torchrun process-group set-up shared by train.py and eval.py.

Without torchrun (no RANK in the environment) everything runs in one process and the
collectives below are no-ops.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist


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
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), device_id=device if backend == "nccl" else None)
    return rank, world_size, local_rank, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value, device):
    """Sum a Python number over ranks."""
    if not is_distributed():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_gather_objects(obj):
    """List of `obj` from every rank, in rank order (small Python objects only)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(fn, args, user_errors):
    """Call fn(args, rank, world_size, device) in this (torchrun) process.

    A user error (bad data, a missing file, a wrong flag) ends the process with its message
    and exit code 2. No collective on that way out: other ranks may be inside one, and
    torchrun stops them when this one exits.
    """
    rank, world_size, _, device = setup_distributed()
    try:
        fn(args, rank, world_size, device)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cleanup()


def cleanup():
    """End a torchrun process after its work is done: tear the process group down together, then exit.

    With gloo (torch 2.13) a process group can outlive destroy_process_group and be freed by the
    garbage collector during interpreter shutdown, which aborts the process ("terminate called
    without an active exception", exit -6) after all its work is done: in about 1 of 10 two-process
    runs here. Leaving with os._exit skips that teardown; every file this code writes is already
    closed or flushed by then.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
