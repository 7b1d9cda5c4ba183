"""eval.py over run directories, and exact metrics under 2-process torchrun (gloo)."""
import json
import os

import pytest

import eval as eval_script
import train
from conftest import assert_same_adam_steps, load_weights, read_jsonl, run_script, train_args


@pytest.fixture(scope="module")
def run_dir(small_data, tiny_vit, tmp_path_factory):
    """A finished run with three checkpoints."""
    out = tmp_path_factory.mktemp("run")
    train.main(
        train_args(small_data, tiny_vit, out, "--max_steps", 6, "--save_steps", 2, "--eval_steps",
                   2, "--save_all_checkpoints"))
    return out


def results(run_dir):
    path = run_dir / "eval_results.jsonl"
    return read_jsonl(path) if path.exists() else []


def test_eval_over_a_run_directory_skips_done_checkpoints_and_writes_predictions(
        run_dir, tmp_path, capsys):
    before = len(results(run_dir))
    preds = tmp_path / "preds.jsonl"
    eval_script.main([str(run_dir), "--num_workers", "0", "--predictions", str(preds)])
    out = capsys.readouterr().out
    assert "checkpoint-2 (full evaluation)" in out and "checkpoint-6 (full evaluation)" in out
    new = results(run_dir)[before:]
    assert [r["checkpoint"] for r in new] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert all(r["eval_overall_samples"] == 31 and r["eval_digits_samples"] == 21 for r in new)

    # the same evaluation function as training: the final evaluation of the best checkpoint matches
    with open(run_dir / "run_summary.json") as f:
        summary = json.load(f)
    best = [r for r in new if r["checkpoint"] == os.path.basename(summary["best_checkpoint"])][0]
    assert best["eval_overall_accuracy"] == summary["final_eval"]["final_eval_overall_accuracy"]
    assert best["eval_digits_loss"] == pytest.approx(
        summary["final_eval"]["final_eval_digits_loss"], rel=1e-6)

    lines = read_jsonl(preds)
    assert len(lines) == 3 * 31
    assert set(lines[0]) == {"checkpoint", "image_path", "dataset_name", "label", "label_name",
                             "prediction", "prediction_name", "probability"}
    assert lines[0]["label_name"] == str(lines[0]["label"])  # no names in the registry
    for line in lines:
        k = 10 if line["dataset_name"] == "digits" else 2
        assert 0 <= line["prediction"] < k and 0 < line["probability"] <= 1 and os.path.isfile(
            line["image_path"])
    ckpt6 = [p for p in lines if p["checkpoint"] == "checkpoint-6"]
    r6 = new[2]
    assert sum(p["prediction"] == p["label"] for p in ckpt6) == r6["eval_overall_correct"]

    # already evaluated on the same data: skipped; --force evaluates again
    eval_script.main([str(run_dir), "--num_workers", "0"])
    assert "already evaluated" in capsys.readouterr().out
    assert len(results(run_dir)) == before + 3
    eval_script.main([str(run_dir / "checkpoint-4"), "--num_workers", "0", "--force"])
    assert [r["checkpoint"] for r in results(run_dir)[before + 3:]] == ["checkpoint-4"]
    # other data (the partial subset) is a different evaluation
    eval_script.main([str(run_dir / "checkpoint-4"), "--num_workers", "0", "--partial"])
    last = results(run_dir)[-1]
    assert last["partial"] and last["eval_digits_samples"] == round(21 * 0.5)


def test_eval_flags_override_the_checkpoint(run_dir, small_data, capsys):
    with pytest.raises(SystemExit) as e:
        eval_script.main([str(run_dir / "checkpoint-2"), "--num_labels", "12"])
    assert e.value.code == 2 and "does not match the saved head" in capsys.readouterr().err
    eval_script.main([
        str(run_dir / "checkpoint-2"), "--val_jsonl", small_data["faces_val"], "--num_workers", "0"
    ])
    assert results(run_dir)[-1][
        "eval_overall_samples"] == 10 and "eval_digits_samples" not in results(run_dir)[-1]


def test_eval_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_script.main([str(tmp_path)])
    assert "neither a checkpoint" in capsys.readouterr().err


def test_two_process_eval_counts_every_sample_once(run_dir, tmp_path):
    # 21 + 10 validation samples: not divisible by 2, a padding sampler would count one twice.
    one = run_script("eval.py", run_dir / "checkpoint-6", "--force", "--num_workers", 0,
                     "--predictions", tmp_path / "p1.jsonl")
    two = run_script("eval.py", run_dir / "checkpoint-6", "--force", "--num_workers", 0,
                     "--predictions", tmp_path / "p2.jsonl", torchrun=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = results(run_dir)[-2:]
    for name in ("digits", "faces", "overall"):
        assert a[f"eval_{name}_samples"] == b[f"eval_{name}_samples"]
        assert a[f"eval_{name}_correct"] == b[f"eval_{name}_correct"]
        assert a[f"eval_{name}_loss"] == pytest.approx(b[f"eval_{name}_loss"], rel=1e-5)
    assert (b["eval_digits_samples"], b["eval_faces_samples"]) == (21, 10)
    p1, p2 = read_jsonl(tmp_path / "p1.jsonl"), read_jsonl(tmp_path / "p2.jsonl")
    assert [(p["image_path"], p["prediction"]) for p in p1] == [(p["image_path"], p["prediction"])
                                                                for p in p2]


def test_two_process_ddp_training_matches_one_process(small_data, tiny_vit, tmp_path):
    # 2 processes x batch 4 (global 8) vs 1 process x batch 8: the same first three steps, same
    # exact eval. Mean pooling leaves the ViT's own pooler without gradients, which DDP must be told
    # about.
    common = [
        "--max_steps", 3, "--eval_steps", 3, "--save_steps", 3, "--lr", 1e-2, "--logging_steps", 1,
        "--pooling", "mean"
    ]
    one = run_script(
        "train.py", *train_args(small_data, tiny_vit, tmp_path / "one", *common, "--batch_size", 8))
    two = run_script(
        "train.py", *train_args(small_data, tiny_vit, tmp_path / "two", *common, "--batch_size", 4),
        torchrun=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 = micro batch 4 x 2 process(es)" in two.stdout
    assert_same_adam_steps(load_weights(tmp_path / "one" / "checkpoint-3"),
                           load_weights(tmp_path / "two" / "checkpoint-3"), lr=1e-2, steps=3)
    log1, log2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" /
                                                                            "metrics.jsonl")
    for r1, r2 in zip(log1, log2):
        assert r1["event"] == r2["event"]
        if r1["event"] == "train":
            assert r1["train_overall_samples"] == r2["train_overall_samples"] == 8
            assert r1["train_overall_loss"] == pytest.approx(r2["train_overall_loss"], rel=1e-4)
            assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-3)
    final = [r for r in log2 if r["event"] == "final_eval"][0]
    assert (final["final_eval_digits_samples"], final["final_eval_faces_samples"]) == (21, 10)


@pytest.mark.parametrize("flags, message", [
    (["--judge", "x", "--cfg_scale", "2"],
     "--cfg_scale, --judge: for --task generate, not classify (checkpoint-6 is a classify "
     "checkpoint)"),
    (["--seed", "3"], "--seed: no effect without --partial"),
])
def test_eval_flags_that_cannot_act_on_the_checkpoint_are_refused(run_dir, flags, message,
                                                                  capsys):
    before = len(results(run_dir))
    with pytest.raises(SystemExit) as e:
        eval_script.main([str(run_dir / "checkpoint-6"), "--num_workers", "0", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert len(results(run_dir)) == before  # nothing recorded
