"""reporting.py: metrics.jsonl records to TensorBoard (read back with its own reader) and wandb."""
import os

import pytest

from reporting import build_reporters, check_report_to, close_reporters, report, scalar_tags

RECORDS = [
    ("config", 0, {"overrides": ["lr"]}),
    ("train", 10, {"train_digits_accuracy": 0.5, "train_my_set_loss": 1.5,
                   "train_overall_accuracy": 0.25, "lr": 1e-3, "grad_norm": 2.0}),
    ("train", 20, {"train_digits_accuracy": 0.75, "train_my_set_loss": 1.0,
                   "train_overall_accuracy": 0.5, "lr": 5e-4, "grad_norm": 1.0}),
    ("eval", 20, {"eval_digits_accuracy": 0.8, "eval_overall_accuracy": 0.7}),
    ("stopped", 20, {"signal": "SIGTERM", "checkpoint": "/x/checkpoint-20"}),
]


def test_tags_grouped_by_event_and_dataset():
    tags = scalar_tags("train", RECORDS[1][2], ["digits", "my_set"])
    assert tags == {"train/digits/accuracy": 0.5, "train/my_set/loss": 1.5,
                    "train/overall/accuracy": 0.25, "train/lr": 1e-3, "train/grad_norm": 2.0}
    assert scalar_tags("final_eval", {"final_eval_digits_accuracy": 1.0, "checkpoint": "c"},
                       ["digits"]) == {"final_eval/digits/accuracy": 1.0}
    assert scalar_tags("train", {"train_text_loss": 2.0, "ok": True}, []) == {
        "train/text_loss": 2.0}


def test_bad_flag_and_missing_package_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="--report_to mlflow: choose from"):
        check_report_to(["mlflow"])
    with pytest.raises(ValueError, match="none cannot be combined"):
        check_report_to(["none", "tensorboard"])
    assert check_report_to(["none"]) == [] and build_reporters(["none"], ".", []) == []
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"wandb package is not installed .*'\.\[wandb\]'"):
        check_report_to(["wandb"])


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    reporters = build_reporters(["tensorboard"], str(tmp_path), ["digits", "my_set"])
    assert build_reporters(["tensorboard"], str(tmp_path / "r1"), [], rank=1) == []
    for event, step, values in RECORDS:
        report(reporters, event, step, values)
    close_reporters(reporters)
    assert not os.path.exists(tmp_path / "r1")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == sorted(["train/digits/accuracy", "train/my_set/loss",
                                   "train/overall/accuracy", "train/lr", "train/grad_norm",
                                   "eval/digits/accuracy", "eval/overall/accuracy"])
    read = [(s.step, s.value) for s in events.Scalars("train/digits/accuracy")]
    assert read == [(10, 0.5), (20, 0.75)]
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("eval/overall/accuracy")] == [
        (20, 0.7)]


def test_wandb_offline_writes_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (the '.[wandb]' extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reporters = build_reporters(["wandb"], str(tmp_path), ["digits", "my_set"],
                                run_name="test", config={"lr": 1e-3})
    for event, step, values in RECORDS:
        report(reporters, event, step, values)
    close_reporters(reporters)
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert any(f.endswith(".wandb") for f in os.listdir(tmp_path / "wandb" / runs[0]))


def test_a_resumed_run_continues_its_tensorboard_curves_and_its_wandb_run(small_data, tiny_vit,
                                                                          tmp_path):
    """Killed after logging steps 3 and 4 but before checkpoint-4, the run resumes from
    checkpoint-2 and logs them again: TensorBoard holds each step once, and W&B gets the same
    run id (offline mode: a second offline-run folder of that id, which `wandb sync` merges)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb", reason="wandb is not installed (the '.[wandb]' extra)")
    import subprocess
    import sys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from conftest import ROOT, train_args
    argv = train_args(small_data, tiny_vit, tmp_path, "--max_steps", 4, "--save_steps", 2,
                      "--skip_evaluation", "--logging_steps", 1, "--report_to", "tensorboard",
                      "wandb")
    # each process starts its own W&B service (not one an earlier test left in this process)
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    train = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    killed = subprocess.run(train, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**env, "MIXTRAIN_FAULT": "kill_before_save:4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run(train + ["--resume", "latest"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/overall/loss")] == [1, 2, 3, 4]
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    runs = sorted(d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-"))
    assert len(runs) == 2 and all(d.endswith(f"-{run_id}") for d in runs)
