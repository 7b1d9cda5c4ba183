"""A train.py / eval.py process keeps the host memory a step frees for the next step
(host_allocator.keep_freed_memory, in force from distributed.run): a step that allocates and
frees the same blocks again takes no new page faults (with glibc's defaults, 5,000 to 33,000 of
the step's 32,768 pages in fresh processes: how many depends on where the heap's top lies, so it
is not asserted). A user's GLIBC_TUNABLES malloc settings are left alone. A DataLoader worker
keeps its own freed memory, whatever its parent set. Each case a fresh process, counting its own
minor page faults (a count, not a timing): the fewest of several rounds, since a busy machine's
kernel adds faults of its own (a CI run once counted 2,868 a step in the worker), never fewer."""
import os
import subprocess
import sys

from conftest import ROOT

STEPS = """
import argparse, resource, sys
import torch
import distributed

def step():  # a step's activations: 16 blocks of 8 MB written, then all freed
    blocks = [torch.ones(2 << 20) for _ in range(16)]
    del blocks

def faults_per_step(*_):  # the fewest of 4 rounds: the kernel can fault pages in on its own
    step(), step()          # (NUMA balancing, compaction) on a busy machine, never fewer
    rounds = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            step()
        rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
    print("faults", min(rounds))

if sys.argv[1] == "run":  # as train.py and eval.py run
    distributed.run(faults_per_step, argparse.Namespace(), ())
elif sys.argv[1] == "worker":  # a DataLoader worker of a process sharding host-memory weights
    import host_allocator
    from dataset import start_worker

    class Steps(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            faults_per_step()
            return 0

    host_allocator.return_freed_memory()  # every block over 1 MB mapped, in the parent
    list(torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=1,
                                     worker_init_fn=start_worker))
else:
    faults_per_step()
"""


def faults_per_step(how, **env):
    done = subprocess.run([sys.executable, "-c", STEPS, how], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT, **env}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split("faults")[-1])


def test_a_process_keeps_a_steps_freed_memory_for_the_next_step():
    pages = 16 * (8 << 20) // 4096  # what one step writes: 32,768 pages
    assert faults_per_step("run") < pages // 20
    # the user's malloc settings win: here glibc's starting threshold, fixed (every block mapped)
    assert faults_per_step("run", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072") > pages // 2


def test_a_loader_worker_keeps_its_freed_memory_whatever_its_parent_set():
    """A worker forked from a process sharding weights in host memory would inherit its 1 MB
    mmap threshold: every 8 MB block mapped and faulted in again, at every batch."""
    pages = 16 * (8 << 20) // 4096
    assert faults_per_step("worker") < pages // 20
