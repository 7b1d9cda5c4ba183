"""What a run logs, on rank 0 only: metrics.jsonl (one JSON object per event: train, eval, best,
final_eval, ...) and the lines it prints (say)."""
import json
import os

import torch

from files import write_text
from reporting import close_reporters, report

TOLD = set()


def say(message):
    """Print once per job: loading happens on every rank, RANK 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        print(message)


def say_once(message):
    """say() a note once per process, however many folders load (eval.py's checkpoints)."""
    if message not in TOLD:
        TOLD.add(message)
        say(message)


def say_for(rank, write=print):
    """The say() a process of `rank` hands down: `write` on rank 0, nothing on the others."""
    return write if rank == 0 else (lambda *a, **k: None)


def readable(line):
    try:
        return line.endswith("\n") and isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class JsonlLog:
    """metrics.jsonl on rank 0, flushed at every record."""

    def __init__(self, path, rank, keep_through_step=None, reporters=()):
        self.file, self.reporters = None, list(reporters)  # reporting.py: TensorBoard, wandb
        if rank != 0:
            return
        if keep_through_step is not None and os.path.isfile(path):
            # Resuming: drop records written after the checkpoint, they will be written again. A
            # record torn by a kill mid-write is dropped with them.
            with open(path) as f:
                kept = [line for line in f
                        if readable(line) and json.loads(line).get("step", 0) <= keep_through_step]
            write_text(path, "".join(kept))  # a kill here leaves the old file or the new one
        self.file = open(path, "a")

    def write(self, event, step, epoch, **values):
        if self.file:
            record = {"event": event, "step": step, "epoch": round(epoch, 4), **values}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            report(self.reporters, event, step, {"epoch": round(epoch, 4), **values})

    def close(self):
        close_reporters(self.reporters)


def memory_mb(device):
    """Peak memory: allocated on a GPU, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
