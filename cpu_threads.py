"""How a process computing on the CPU shares the cores with its DataLoader workers. train.py and
eval.py import this module before torch: OpenMP reads its settings when torch loads it.

The process keeps torch's default intra-op threads (every core it may use) and its workers
compete for the cores, but an OpenMP thread with no work waits asleep (OMP_WAIT_POLICY=PASSIVE)
instead of spinning. A spinning thread holds a core while it waits for the next operation:
on a run bound by its data it takes the core a worker decodes on, and on a machine with other
load it holds a core the thread with work needs. Asleep, the threads cost the step a wake-up per
operation and leave idle cores to whoever has work: a model whose step outlasts its batch's
decode gets every core, and a run bound by its decode keeps pace with giving the workers their
cores (measured in docs/performance.md). OMP_WAIT_POLICY and OMP_NUM_THREADS given in the
environment win.
"""
import os
import sys

WAIT_POLICY = "PASSIVE"
GIVEN = "OMP_WAIT_POLICY" in os.environ  # the user's choice stays
# torch imported before this module has read OpenMP's settings already: then the policy is not in
# force in this process (a test or a notebook importing train.py), and wait_policy() says so
IN_FORCE = GIVEN or "torch" not in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def wait_policy():
    """OpenMP's wait policy in this process, as text: its value, or why it is not in force."""
    value = os.environ["OMP_WAIT_POLICY"]
    if not IN_FORCE:
        return f"{value}, set after torch was loaded: not in force"
    return value + (" from the environment" if GIVEN else "")
