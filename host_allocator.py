"""glibc's allocator in a training or evaluation process: what it keeps of the host memory a step
frees. A GPU's tensors have torch's caching allocator; host tensors (a CPU run's activations and
gradients, a loader's batches) go to malloc and back at every step. By default glibc maps each
block over its threshold (128 KB, raised up to 32 MB as such blocks are freed) and gives the
free top of its heap back past a trim threshold, so a step's memory returns as new pages, a page
fault each: ViT-Ti/16 on 2 CPUs took about 100,000 faults a step (docs/performance.md).
GLIBC_TUNABLES naming a glibc.malloc setting leaves these to the user.
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
LARGEST_HEAP_BLOCK = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit (HEAP_MAX / 2)
KEPT_FREE = 1 << 30  # free memory at the heap's top kept for the next step, not given back


def _mallopt(*settings):
    """Set glibc malloc parameters; nothing where malloc is not glibc's or the user tuned it."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator has no such settings
        return
    for parameter, value in settings:
        libc.mallopt(parameter, value)


def keep_freed_memory():
    """Blocks under 32 MB come from the heap and the heap keeps up to 1 GB free at its top, so
    the next step reuses the pages of the last (a caching allocator's behaviour): the process
    holds its peak, which it reaches at every step anyway. Blocks of 32 MB and more are still
    mapped and given back."""
    _mallopt((M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK), (M_TRIM_THRESHOLD, KEPT_FREE))


def return_freed_memory(threshold=1 << 20):
    """Host allocations of `threshold` bytes and more are mapped and given back when freed. glibc
    raises its own threshold (up to 32 MB) as such blocks are freed and keeps freed blocks below
    it in the heap, which the gathers of sharded weights (a block at a time, on the CPU) fragment:
    measured, each of 2 FSDP2 ranks of a 200 MB model kept about 300 MB more after one step.
    Only for sharded weights in host memory: every activation above the threshold then costs
    its page faults again at each step (a ViT-Ti/16 on the CPU stepped 1.45x slower with it)."""
    _mallopt((M_MMAP_THRESHOLD, threshold))
