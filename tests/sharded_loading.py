"""Run under torchrun by test_low_memory_loading.py: on every rank, the model that --dist fsdp
builds on the meta device and fills shard by shard equals today's whole-model loading, for
train.py (its --model folder) and eval.py (a checkpoint folder).

    torchrun --nproc_per_node 2 tests/sharded_loading.py CHECKPOINT TRAIN.PY-FLAGS...
"""
import argparse
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distributed  # noqa: E402
import eval as eval_script  # noqa: E402
import train  # noqa: E402
import weights  # noqa: E402
from config import parse_args  # noqa: E402
from tasks import TASKS  # noqa: E402


def file_mappings():
    """[(start, end, path)] of this process's memory-mapped files (/proc/self/maps)."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, fields[5].strip()))
    return found


def assert_same(sharded, reference, where):
    """Each rank's shard of every entry equals the same rows of the whole model; buffers (the
    non-persistent ones too) equal; nothing is left on the meta device. Returns (sharded
    entries, {safetensors file: entries whose memory is that file's pages})."""
    entries, expected = sharded.state_dict(), reference.state_dict()
    assert entries.keys() == expected.keys(), where
    shards, mappings, mapped = 0, file_mappings(), {}
    for key, tensor in entries.items():
        want = expected[key]
        if isinstance(tensor, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                tensor.shape, tensor.device_mesh, tensor.placements)
            want = want[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            tensor, shards = tensor.to_local(), shards + 1
        assert not tensor.is_meta and torch.equal(tensor.cpu(), want), f"{where}: {key}"
        for start, end, path in mappings:
            if tensor.numel() and start <= tensor.data_ptr() < end:
                mapped[os.path.basename(path)] = mapped.get(os.path.basename(path), 0) + 1
    buffers = dict(reference.named_buffers())
    for key, buffer in sharded.named_buffers():
        assert torch.equal(buffer.cpu(), buffers[key]), f"{where}: buffer {key}"
    return shards, mapped


def main():
    checkpoint, train_argv = sys.argv[1], sys.argv[2:]
    rank, world_size, _, device = distributed.setup_distributed()
    reads = []
    read_weights = weights.read_weights
    weights.read_weights = lambda *a, **k: (reads.append(1), read_weights(*a, **k))[1]

    args = parse_args(train_argv)
    run = train.build_run(args, rank, world_size, device)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.param_dtype]
    reference = run.task.build_model(args, run.data, dtype)[0]
    train_shards, train_mapped = assert_same(run.raw_model, reference, "train.py")
    assert reads == [1], "train.py did not read the weights shard by shard"

    eval_args = eval_script.build_parser().parse_args([checkpoint, "--dist", "fsdp"])
    task = TASKS[args.task]
    model, _ = eval_script.load_placed(task, checkpoint, eval_args, device, world_size, print)
    eval_shards, eval_mapped = assert_same(model, task.load_model(checkpoint)[0], "eval.py")
    assert reads == [1, 1], "eval.py did not read the weights shard by shard"
    print(f"rank {rank}: equal ({train_shards} sharded entries in train.py, {eval_shards} in "
          f"eval.py); memory-mapped: train.py {train_mapped}, eval.py {eval_mapped}", flush=True)
    distributed.cleanup()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__)  # the usage line above
    main()
