"""CUDA checks: bf16 training on one GPU, and nccl DDP vs FSDP2 on two. Skipped on machines without
GPUs."""
import pytest
import torch

from conftest import assert_same_adam_steps, load_weights, read_jsonl, run_script, train_args

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="needs two CUDA GPUs (nccl)")
STEPS = [
    "--max_steps", 3, "--eval_steps", 3, "--save_steps", 3, "--logging_steps", 1, "--lr", 1e-2,
    "--pooling", "mean"
]


@needs_gpu
def test_bf16_training_and_eval_on_one_gpu(small_data, tiny_vit, tmp_path):
    result = run_script("train.py",
                        *train_args(small_data, tiny_vit, tmp_path, *STEPS, "--precision", "bf16"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["train_overall_loss"] < 10 for r in log if r["event"] == "train")  # finite, sane
    final = [r for r in log if r["event"] == "final_eval"][0]
    assert (final["final_eval_digits_samples"], final["final_eval_faces_samples"]) == (21, 10)


@needs_two_gpus
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_over_nccl_matches_ddp(small_data, tiny_vit, tmp_path, precision):
    for dist in ("ddp", "fsdp"):
        result = run_script(
            "train.py",
            *train_args(small_data, tiny_vit, tmp_path / dist, *STEPS, "--batch_size", 4, "--dist",
                        dist, "--precision", precision), torchrun=2)
        assert result.returncode == 0, result.stderr[-3000:]
    logs = [[r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if r["event"] == "train"]
            for d in ("ddp", "fsdp")]
    for a, b in zip(*logs, strict=True):
        assert a["train_overall_loss"] == pytest.approx(b["train_overall_loss"],
                                                        rel=1e-3 if precision == "fp32" else 3e-2)
    # bf16 rounding differs between the two (autocast vs FSDP's mixed precision)
    if precision == "fp32":
        assert_same_adam_steps(load_weights(tmp_path / "ddp" / "checkpoint-3"),
                               load_weights(tmp_path / "fsdp" / "checkpoint-3"), lr=1e-2, steps=3)
