"""Host memory of a command's processes, sampled every 20 ms from /proc/PID/status.

RssAnon is a process's private (anonymous) memory: what N processes on one host really add up
to. VmRSS (resident memory) also counts the pages of memory-mapped files, in every process that
maps them, so it hides whether each rank holds its own copy of a model's weights.

    with ProcessTreeMemory(popen.pid, torchrun=True) as memory:
        popen.wait()
    memory.peaks()  # {rank: (peak RssAnon MB, peak VmRSS MB)} of each rank's main process

A torchrun worker is found by its RANK environment variable (its DataLoader workers, which
inherit RANK, are not counted in its figure); without torchrun the command itself is rank 0.
"""
import os
import threading
import time

INTERVAL = 0.02  # seconds


def status_kb(pid, fields=("RssAnon", "VmRSS")):
    """{field: kB} from /proc/PID/status; {} when the process has gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    found[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return found


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def rank_of(pid):
    """The RANK a torchrun worker was started with, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return None


class ProcessTreeMemory:
    """Samples RssAnon and VmRSS of `root` and its descendants in a background thread (the
    sampled processes run no code of this module). samples: {pid: [(time, RssAnon kB,
    VmRSS kB)]}; label: {pid: rank} of each rank's main process."""

    def __init__(self, root, torchrun, interval=INTERVAL):
        self.root, self.interval = root, interval
        self.samples, self.seen = {}, {}
        self.label = {} if torchrun else {root: 0}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.sample_until_stopped, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()

    def sample_until_stopped(self):
        while not self.stopping.is_set():
            now = time.time()
            for pid in self.tree():
                kb = status_kb(pid)
                if kb:
                    self.samples.setdefault(pid, []).append(
                        (now, kb.get("RssAnon", 0), kb.get("VmRSS", 0)))
            self.stopping.wait(self.interval)

    def tree(self):
        """The root and its descendants now; each rank's main process labelled."""
        children = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                children.setdefault(parent_of(int(name)), []).append(int(name))
        found, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        for pid in found:  # parents before children
            if self.seen.get(pid) is None:  # a child not yet past exec shows its parent's
                self.seen[pid] = rank_of(pid)
                parent = parent_of(pid)
                if (pid != self.root and self.seen[pid] is not None
                        and self.seen.get(parent) != self.seen[pid]):
                    self.label[pid] = self.seen[pid]  # a worker, not a worker's child
        return found

    def peaks(self, start=0.0, end=float("inf")):
        """{rank: (peak RssAnon MB, peak VmRSS MB)} over samples taken in [start, end)."""
        out = {}
        for pid, rank in self.label.items():
            window = [s for s in self.samples.get(pid, []) if start <= s[0] < end]
            if window:
                out[rank] = (max(s[1] for s in window) / 1024, max(s[2] for s in window) / 1024)
        return dict(sorted(out.items()))
