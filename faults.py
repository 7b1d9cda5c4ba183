"""What stops a run from outside: stop signals (preemption), non-finite training, and the fault
injection hook the reliability tests use."""
import os
import signal


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. gradients stay non-finite); the last good checkpoint is kept."""


def injected_fault(point, step):
    """MIXTRAIN_FAULT="nan_loss:3,kill_in_save:4" makes the loss of step 3 NaN and SIGKILLs the
    process while checkpoint-4 is being written. Off when unset. Other kill points:
    kill_before_save:STEP (train.py), kill_after_record:STEP (eval.py, after a record),
    kill_in_export:1 (export.py, the new export written), kill_in_swap:1 / :2 (after the old
    folder is moved aside / the new one moved in), kill_before_rename:1 (a file written whole,
    not yet renamed into place)."""
    wanted = f"{point}:{step}"
    if wanted not in os.environ.get("MIXTRAIN_FAULT", "").split(","):
        return False
    if point.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def with_loss_fault(step_loss, step):
    """A task's step_loss for optimizer step `step` (counted from 1): itself, or under
    MIXTRAIN_FAULT="nan_loss:STEP" one whose loss is NaN for every micro-batch of that step."""
    if not injected_fault("nan_loss", step):
        return step_loss
    return lambda *args: step_loss(*args) * float("nan")


def catch_stop_signals():
    """SIGTERM and SIGUSR1 (Slurm's warning before a time limit) only record their name: the loop
    finishes the current step on every rank, writes a checkpoint and ends with exit code 0.
    Returns (the names received, a function that puts the previous handlers back)."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(
        signal.Signals(signum).name)) for s in (signal.SIGTERM, signal.SIGUSR1)}
    return received, lambda: [signal.signal(s, handler) for s, handler in previous.items()]
