"""Process-group teardown: destroy_process_group must free the gloo group and join its threads."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import os
import distributed
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
distributed.setup_distributed()
import torch.distributed.nn  # what transformers does on the first from_pretrained, after init
distributed.all_gather_objects({"a": 1})
distributed.cleanup()
print(before, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_cleanup_frees_the_gloo_group_and_joins_its_threads():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert after == before, (f"{after - before} thread(s) of the process group outlived "
                             "destroy_process_group")
