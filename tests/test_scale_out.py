"""One process, N processes with DDP and N processes with FSDP2 (gloo on CPU) give the same
training, the same checkpoints and the same evaluation."""
import os

import pytest
import torch

import train
from conftest import (assert_same_adam_steps, killed_after, load_weights, read_jsonl, run_script,
                      train_args, write_jsonl)

STEPS = [
    "--max_steps", 3, "--skip_evaluation", "--lr", 1e-2, "--warmup_steps", 0, "--logging_steps", 1,
    "--pooling", "mean"
]


def run(data, model, out, processes, *extra):
    argv = train_args(data, model, out, *STEPS, *extra)
    if processes == 1:
        train.main(argv)  # in this process: the same code path, faster than a subprocess
    else:
        result = run_script("train.py", *argv, torchrun=processes)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def train_log(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"]


def assert_same_training(runs):
    """Same weights (and EMA weights, where kept) after the last step, and the same global loss,
    sample count and gradient norm at every step."""
    first, *others = runs
    kept = ["checkpoint-3"] + ["checkpoint-3/ema"] * (first / "checkpoint-3" / "ema").exists()
    for other in others:
        for weights in kept:
            # An EMA entry is a weighted mean of the entry after each step: float-level sign flips
            # move it within the same bound as the weights.
            assert_same_adam_steps(load_weights(first / weights), load_weights(other / weights),
                                   lr=1e-2, steps=3)
        for a, b in zip(train_log(first), train_log(other), strict=True):
            assert a["train_overall_samples"] == b["train_overall_samples"], other.name
            assert a["train_overall_loss"] == pytest.approx(b["train_overall_loss"],
                                                            rel=1e-4), other.name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), other.name


def test_one_process_accumulation_ddp_and_fsdp_take_the_same_steps(small_data, tiny_vit, tmp_path):
    # Global batch 8 for 3 steps: 1 x 8; 1 x 2 x accum 4; 2 processes x 4 (DDP); 2 processes x 2 x
    # accum 2 (FSDP2). Augmented, with an EMA of the weights (sharded like them under FSDP2).
    runs = {"one": (1, "--batch_size", 8), "accum": (1, "--batch_size", 2, "--grad_accum", 4),
            "ddp": (2, "--batch_size", 4, "--dist", "ddp"),
            "fsdp": (2, "--batch_size", 2, "--grad_accum", 2, "--dist", "fsdp")}
    for name, (processes, *extra) in runs.items():
        run(small_data, tiny_vit, tmp_path / name, processes, *extra, "--augment", "crop_flip",
            "--ema_decay", 0.5)
    assert [r["train_overall_samples"] for r in train_log(tmp_path / "fsdp")] == [8, 8, 8]
    assert_same_training([tmp_path / name for name in runs])


def test_uneven_micro_batches_are_normalised_over_the_global_batch(small_data, tiny_vit, tmp_path):
    # 56 samples in global batches of 24: steps of 24, 24 and 8 samples. In the last step one
    # process with micro-batches of 6 sees 6 + 2, and each FSDP2 rank sees 3 + 1: averaging per
    # micro-batch (or per rank) would weight those samples unequally. The FSDP2 run also recomputes
    # activations.
    runs = {
        "one": (1, "--batch_size", 24), "accum": (1, "--batch_size", 6, "--grad_accum", 4),
        "ddp": (2, "--batch_size", 12, "--dist", "ddp"),
        "fsdp": (2, "--batch_size", 3, "--grad_accum", 4, "--dist", "fsdp",
                 "--gradient_checkpointing")
    }
    for name, (processes, *extra) in runs.items():
        run(small_data, tiny_vit, tmp_path / name, processes, *extra)
    assert [r["train_overall_samples"] for r in train_log(tmp_path / "fsdp")] == [24, 24, 8]
    assert_same_training([tmp_path / name for name in runs])


def test_fsdp_checkpoint_resumes_on_one_process_and_evaluates_exactly(small_data, tiny_vit,
                                                                      tmp_path):
    """2 FSDP2 processes write checkpoint-3; one process resumes from it and ends where the
    2-process run ends, its EMA included (eval_ema_* and checkpoint-6/ema). The evaluation under
    FSDP counts every validation sample once (21 + 10: odd sizes)."""
    common = [
        "--max_steps", 6, "--save_steps", 3, "--eval_steps", 3, "--logging_steps", 1, "--lr", 1e-2,
        "--pooling", "mean", "--save_all_checkpoints", "--ema_decay", 0.5
    ]
    sharded, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    result = run_script(
        "train.py",
        *train_args(small_data, tiny_vit, sharded, *common, "--batch_size", 4, "--dist", "fsdp"),
        torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 over 2 processes: 2 block(s) + the root sharded" in result.stdout
    shards = sorted(os.listdir(sharded / "checkpoint-3" / "state"))
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one file per rank
    assert len(os.listdir(sharded / "checkpoint-3" / "ema_state")) == len(os.listdir(
        sharded / "checkpoint-3" / "state"))  # the EMA is sharded like the model

    killed_after(sharded / "checkpoint-3", resumed)
    train.main(
        train_args(small_data, tiny_vit, resumed, *common, "--batch_size", 8, "--resume", "latest"))
    for weights in ("checkpoint-6", "checkpoint-6/ema"):
        assert_same_adam_steps(load_weights(sharded / weights), load_weights(resumed / weights),
                               lr=1e-2, steps=3)
    a, b = read_jsonl(sharded / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["event"] for r in a] == [r["event"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.endswith(("_loss", "_samples", "_correct")):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4), (ra["event"], ra["step"], key)

    final = [r for r in a if r["event"] == "final_eval"][0]
    assert (final["final_eval_digits_samples"], final["final_eval_faces_samples"]) == (21, 10)
    partial = [r for r in a if r["event"] == "eval"][0]
    # digits: eval_ratio 0.5 of 21
    assert (partial["eval_digits_samples"], partial["eval_faces_samples"]) == (10, 10)


def test_fsdp_checkpoint_written_a_tensor_at_a_time_equals_the_sharded_state(small_data, tiny_vit,
                                                                            tmp_path):
    """model.safetensors + head.safetensors, each tensor gathered in its turn and written by rank 0,
    hold exactly what the ranks' shards hold, under the names save_pretrained writes (those of the
    model folder), and load in from_pretrained and export.py."""
    from checkpoint import load_sharded_state
    from model import load_classifier
    from weights import file_keys
    result = run_script(
        "train.py", *train_args(small_data, tiny_vit, tmp_path, *STEPS, "--batch_size", 4,
                                "--dist", "fsdp", "--pooling", "cls"), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "checkpoint-3"
    assert sorted(file_keys(str(folder / "model.safetensors"))) == sorted(
        file_keys(os.path.join(tiny_vit, "model.safetensors")))
    model, _, _ = load_classifier(str(folder))
    consolidated = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data.zero_()
    load_sharded_state(str(folder), model)
    loaded = model.state_dict()
    assert consolidated.keys() == loaded.keys()
    assert all(torch.equal(consolidated[k], loaded[k]) for k in loaded)
    assert loaded["head.weight"].abs().sum() > 0
    exported = run_script("export.py", folder, "--dataset", "digits", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr[-3000:]


def test_eval_script_under_fsdp_counts_every_sample_once(small_data, tiny_vit, tmp_path):
    run(small_data, tiny_vit, tmp_path, 1, "--batch_size", 8)
    one = run_script("eval.py", tmp_path / "checkpoint-3", "--num_workers", 0, "--batch_size", 4)
    two = run_script("eval.py", tmp_path / "checkpoint-3", "--num_workers", 0, "--batch_size", 4,
                     "--force", "--dist", "fsdp", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = read_jsonl(tmp_path / "eval_results.jsonl")
    assert (b["eval_digits_samples"], b["eval_faces_samples"]) == (21, 10)
    for key in a:
        if key.endswith(("_samples", "_correct")):
            assert a[key] == b[key], key
        elif key.endswith("_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_fsdp_with_cpu_offload_and_compiled_blocks_takes_the_same_steps(
        small_data, tiny_vit, tmp_path):
    run(small_data, tiny_vit, tmp_path / "one", 1, "--batch_size", 8)
    run(small_data, tiny_vit, tmp_path / "fsdp", 2, "--batch_size", 4, "--dist", "fsdp",
        "--cpu_offload", "--compile")
    assert_same_training([tmp_path / "one", tmp_path / "fsdp"])


def test_a_resume_whose_split_gives_epochs_of_other_steps_is_refused(small_data, tiny_vit,
                                                                     tmp_path, capsys):
    """57 samples: 2 processes x 4 take 28 each, 7 steps an epoch; 1 x 8 would take 8 steps, so
    its steps would not continue the checkpoint's order (a batch taken twice)."""
    odd = tmp_path / "digits_train.jsonl"
    lines = read_jsonl(small_data["digits_train"])
    write_jsonl(odd, lines + lines[:1])  # one repeated line: 41 + 16 samples
    args = train_args({**small_data, "digits_train": str(odd)}, tiny_vit, tmp_path / "run",
                      "--max_steps", 3, "--save_steps", 3, "--skip_evaluation")
    result = run_script("train.py", *args, "--batch_size", 4, torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 steps per epoch" in result.stdout
    with pytest.raises(SystemExit):
        train.main(args + ["--batch_size", "8", "--resume", "latest"])
    assert ("steps per epoch 7 -> 8 (the resumed steps would not continue the epoch's order)"
            in capsys.readouterr().err)


def test_hsdp_2x2_takes_the_same_steps_as_one_process_and_resumes_under_fsdp(small_data, tiny_vit,
                                                                             tmp_path):
    """4 processes as 2 replicas x 2 shards (a ViT: LayerNorm) take the steps of one process, EMA
    included, reading only their shards of the folder; their checkpoint resumes on 2 FSDP2
    processes and ends where one process ends; eval.py evaluates it under --dist hsdp."""
    common = ["--skip_evaluation", "--lr", 1e-2, "--warmup_steps", 0, "--logging_steps", 1,
              "--pooling", "mean", "--max_steps", 6, "--save_steps", 3, "--ema_decay", 0.5]
    one, hsdp, resumed = tmp_path / "one", tmp_path / "hsdp", tmp_path / "resumed"
    train.main(train_args(small_data, tiny_vit, one, *common, "--batch_size", 8))
    result = run_script("train.py", *train_args(small_data, tiny_vit, hsdp, *common, "--batch_size",
                                                2, "--dist", "hsdp", "--shard_size", 2),
                        torchrun=4, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert ("HSDP over 4 processes: 2 replica(s) x 2 shard(s): 2 block(s) + the root sharded; "
            "each process reads only its shards of the weights") in result.stdout
    killed_after(hsdp / "checkpoint-3", resumed)
    result = run_script("train.py", *train_args(small_data, tiny_vit, resumed, *common,
                                                "--batch_size", 4, "--dist", "fsdp", "--resume",
                                                "latest"), torchrun=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for run in (hsdp, resumed):
        for weights in ("checkpoint-6", "checkpoint-6/ema"):
            assert_same_adam_steps(load_weights(one / weights), load_weights(run / weights),
                                   lr=1e-2, steps=6)
        for a, b in zip(train_log(one), train_log(run), strict=True):
            assert a["train_overall_samples"] == b["train_overall_samples"] == 8
            assert a["train_overall_loss"] == pytest.approx(b["train_overall_loss"], rel=1e-4)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    single = run_script("eval.py", one / "checkpoint-6", "--num_workers", 0, "--batch_size", 4)
    sharded = run_script("eval.py", hsdp / "checkpoint-6", "--num_workers", 0, "--batch_size", 4,
                         "--dist", "hsdp", "--shard_size", 1, torchrun=2)
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = read_jsonl(one / "eval_results.jsonl")[0], read_jsonl(hsdp / "eval_results.jsonl")[0]
    assert (b["eval_digits_samples"], b["eval_faces_samples"]) == (21, 10)
    assert a["eval_overall_loss"] == pytest.approx(b["eval_overall_loss"], rel=1e-3)


def test_hsdp_mesh_is_replicas_by_the_processes_of_one_node(monkeypatch):
    from distributed import mesh_shape
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert mesh_shape("hsdp", None, 32) == (4, 8)  # 4 nodes of 8: shard within a node
    assert mesh_shape("hsdp", 4, 32) == (8, 4)
    assert mesh_shape("fsdp", None, 32) == (32,)
    assert mesh_shape("hsdp", None, 1) is None and mesh_shape("ddp", None, 8) is None
    with pytest.raises(ValueError, match="--shard_size 3 does not divide the 32 processes"):
        mesh_shape("hsdp", 3, 32)


@pytest.mark.parametrize("extra, message", [
    (["--dist", "fsdp", "--precision", "fp16"], "--dist fsdp takes --precision bf16 or fp32"),
    (["--dist", "hsdp", "--precision", "fp16"], "--dist hsdp takes --precision bf16 or fp32"),
    (["--cpu_offload"], "--cpu_offload: no effect without --dist fsdp or hsdp"),
    (["--shard_size", 2], "--shard_size: no effect without --dist hsdp"),
    (["--dist", "hsdp", "--shard_size", 0], "--shard_size must be at least 1"),
])
def test_bad_distributed_options_are_clear_errors(small_data, tiny_vit, tmp_path, extra, message,
                                                  capsys):
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 1, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sync_batchnorm_makes_two_ddp_processes_normalise_like_one(small_data, tmp_path):
    # preset:resnet-tiny has BatchNorm: 2 processes x 4 normalise each half with its own statistics,
    # so their first step differs from 1 x 8; with --sync_batchnorm the statistics are global and
    # the first-step loss and gradient norm agree.
    def args(out, *extra):
        return train_args(small_data, "preset:resnet-tiny", out, "--max_steps", 1,
                          "--skip_evaluation", "--logging_steps", 1, *extra)

    train.main(args(tmp_path / "one", "--batch_size", 8))
    for name, extra in [("own", []), ("sync", ["--sync_batchnorm"])]:
        result = run_script("train.py", *args(tmp_path / name, "--batch_size", 4, *extra),
                            torchrun=2)
        assert result.returncode == 0, result.stderr[-3000:]
    one, own, sync = (train_log(tmp_path / n)[0] for n in ("one", "own", "sync"))
    assert sync["train_overall_loss"] == pytest.approx(one["train_overall_loss"], rel=1e-5)
    assert sync["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert own["grad_norm"] != pytest.approx(one["grad_norm"], rel=1e-3)


def test_sync_batchnorm_is_refused_where_it_cannot_act(small_data, tmp_path, capsys):
    for model, extra, message in [
            ("preset:resnet-tiny", [], "needs several processes"),
            ("preset:resnet-tiny", ["--dist", "fsdp"], "needs several processes")]:
        with pytest.raises(SystemExit):
            train.main(train_args(small_data, model, tmp_path / "out", "--max_steps", 1,
                                  "--sync_batchnorm", *extra))
        assert message in capsys.readouterr().err
