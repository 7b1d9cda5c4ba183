"""Host memory under --dist fsdp: no rank holds a whole copy of the model at any point of a run
(load, step, checkpoint). Private memory (RssAnon) is sampled from outside every 20 ms
(tools/host_memory.py); resident memory would count a memory-mapped file in every process."""
import os
import subprocess
import sys

from conftest import ROOT, _free_port, train_args

sys.path.insert(0, os.path.join(ROOT, "tools"))
from host_memory import ProcessTreeMemory  # noqa: E402

ALLOCATE = """
import mmap, sys, time
with open(sys.argv[1], "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page of the file resident
private = bytearray(100 << 20)
private[::4096] = b"x" * len(private[::4096])  # 100 MB of private pages
time.sleep(0.5)
"""


def peaks_of(command, processes=0, timeout=600):
    """{rank: (peak RssAnon MB, peak VmRSS MB)} of a real process (under torchrun: its ranks)."""
    cmd = [sys.executable, *map(str, command)]
    if processes:
        cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with ProcessTreeMemory(popen.pid, torchrun=bool(processes)) as memory:
        out, err = popen.communicate(timeout=timeout)
    assert popen.returncode == 0, out[-2000:] + err[-3000:]
    return memory.peaks()


def test_private_memory_counts_what_a_process_owns_not_a_file_it_maps(tmp_path):
    path = tmp_path / "mapped.bin"
    with open(path, "wb") as f:
        f.write(b"\1" * (200 << 20))
    anon, rss = peaks_of(["-c", ALLOCATE, path])[0]
    assert 100 <= anon < 200, anon  # the 100 MB it wrote, not the 200 MB file it read
    assert rss >= anon + 200, rss  # resident: the mapped file's pages too


def save_vit_200mb(folder):
    """A ViT of 194 MB of fp32 weights (16 blocks of 512), 32 px inputs: large next to the process
    itself (about 300 MB of private memory), quick to step on a CPU."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=512, num_hidden_layers=16, num_attention_heads=8,
                       intermediate_size=2048, image_size=32, patch_size=4)).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_fsdp_ranks_hold_no_whole_copy_over_load_step_checkpoint_and_eval(small_data, tmp_path):
    # All parameters train: one process holds the weights, gradients and AdamW moments (4 x 194
    # MB) beside the process itself; each of 2 FSDP2 ranks half of that. A whole copy of the
    # weights on a rank (a gather for the checkpoint, freed gather buffers kept in the heap,
    # DCP serialising all it holds at once) costs 194 MB more and crosses the bound.
    folder = save_vit_200mb(tmp_path / "vit")
    flags = ["--max_steps", 1, "--skip_evaluation", "--batch_size", 2]
    one = peaks_of(["train.py", *train_args(small_data, folder, tmp_path / "one", *flags)])[0][0]
    ranks = peaks_of(["train.py", *train_args(small_data, folder, tmp_path / "two", *flags,
                                              "--dist", "fsdp")], processes=2)
    assert sorted(ranks) == [0, 1]
    checkpoint = tmp_path / "two" / "checkpoint-1"
    assert os.path.isfile(checkpoint / "model.safetensors")
    for rank, (anon, _) in ranks.items():
        assert anon < 0.75 * one, f"rank {rank}: {anon:.0f} MB, one process {one:.0f} MB"

    # eval.py: one process keeps the checkpoint's weights memory-mapped (from_pretrained), and so
    # do the ranks with their shards; beside that a rank holds FSDP2's gather buffers (about 3
    # of the 16 blocks: 36 MB) and a batch. Its own copy of its shards (half the weights, 97 MB)
    # would cross the bound.
    weights_mb = os.path.getsize(checkpoint / "model.safetensors") / 2 ** 20
    evaluate = ["eval.py", checkpoint, "--val_data", small_data["digits_val"],
                small_data["faces_val"], "--batch_size", 2, "--num_workers", 0, "--force"]
    one = peaks_of(evaluate)[0][0]
    ranks = peaks_of([*evaluate, "--dist", "fsdp"], processes=2)
    assert sorted(ranks) == [0, 1]
    for rank, (anon, _) in ranks.items():
        assert anon < one + 0.5 * weights_mb, (f"eval.py rank {rank}: {anon:.0f} MB, one process "
                                               f"{one:.0f} MB, weights {weights_mb:.0f} MB")
