"""train.py end to end on real images with a tiny ViT loaded from a folder."""
import json
import os
import shutil
import time

import pytest
import torch

import train
from conftest import (assert_same_adam_steps, comparable, killed_after, load_weights, read_jsonl,
                      run_script, train_args, write_jsonl)


def run_train(argv):
    """train.py's main, in this process (same code path as the command line)."""
    train.main([str(a) for a in argv])


def checkpoints(folder):
    return sorted((n for n in os.listdir(folder) if n.startswith("checkpoint-")),
                  key=lambda n: int(n.split("-")[1]))


def summary(folder):
    with open(os.path.join(folder, "run_summary.json")) as f:
        return json.load(f)


def first_step_log(folder):
    return [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl"))
            if r["event"] == "train"][0]


def assert_same_step(a, b):
    """Same loss, same gradient norm (catches a wrong loss scale, to which AdamW itself is blind)
    and
    the same AdamW step (conftest.assert_same_adam_steps)."""
    la, lb = first_step_log(a), first_step_log(b)
    assert la["train_overall_loss"] == pytest.approx(lb["train_overall_loss"], rel=1e-5)
    assert la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-4)
    assert_same_adam_steps(load_weights(os.path.join(a, "checkpoint-1")),
                           load_weights(os.path.join(b, "checkpoint-1")), lr=1e-2, steps=1)


@pytest.mark.parametrize("micro_batch, accum", [(4, 2), (2, 4)])
def test_grad_accum_gives_the_same_step_as_one_big_batch(small_data, tiny_vit, tmp_path,
                                                         micro_batch, accum):
    common = [
        "--max_steps", 1, "--skip_evaluation", "--lr", 1e-2, "--warmup_steps", 0, "--logging_steps",
        1
    ]
    run_train(train_args(small_data, tiny_vit, tmp_path / "big", *common, "--batch_size", 8))
    run_train(
        train_args(small_data, tiny_vit, tmp_path / "acc", *common, "--batch_size", micro_batch,
                   "--grad_accum", accum))
    assert_same_step(tmp_path / "big", tmp_path / "acc")
    big = load_weights(tmp_path / "big" / "checkpoint-1")
    from safetensors.torch import load_file
    init = load_file(os.path.join(tiny_vit, "model.safetensors"))
    # the step really moved the weights
    assert max((big[k] - init[k]).abs().max().item() for k in init) > 1e-3


def test_grad_accum_with_unequal_micro_batches_normalises_over_the_whole_batch(
        small_data, tiny_vit, tmp_path):
    # 56 training samples: one step of batch 56, or micro-batches 24 + 24 + 8. Averaging per
    # micro-batch and dividing by grad_accum would weight the 8 samples of the last micro-batch
    # three times as much.
    common = ["--max_steps", 1, "--skip_evaluation", "--lr", 1e-2, "--logging_steps", 1]
    run_train(train_args(small_data, tiny_vit, tmp_path / "big", *common, "--batch_size", 56))
    run_train(
        train_args(small_data, tiny_vit, tmp_path / "acc", *common, "--batch_size", 24,
                   "--grad_accum", 3))
    assert_same_step(tmp_path / "big", tmp_path / "acc")
    log = [r for r in read_jsonl(tmp_path / "acc" / "metrics.jsonl") if r["event"] == "train"]
    assert log[0]["train_overall_samples"] == 56


def test_resume_mid_epoch_with_the_whole_recipe_continues_exactly(small_data, tiny_vit, tmp_path):
    # 56 samples / batch 8 = 7 steps per epoch; checkpoint-5 is in the middle of epoch 0.
    # Logging every 3 steps: the train-metric window is open at the checkpoint and must be restored.
    # The EMA (updated every 2nd step) is restored too, and picks the best checkpoint. Every
    # random part of the recipe is on: RandAugment, mixup / cutmix, weighted mixing.
    common = [
        "--max_steps", 14, "--save_steps", 5, "--eval_steps", 5, "--logging_steps", 3,
        "--warmup_steps", 3, "--save_all_checkpoints", "--ema_decay", 0.9, "--ema_every", 2,
        "--best_metric", "ema_overall_accuracy", "--augment", "randaugment", "--mixup", 0.8,
        "--cutmix", 1.0, "--mix_prob", 0.7, "--layer_decay", 0.75, "--label_smoothing", 0.1,
        "--mix_temperature", 3
    ]
    run_train(train_args(small_data, tiny_vit, tmp_path / "full", *common))
    killed_after(tmp_path / "full" / "checkpoint-5", tmp_path / "resumed")
    # records written after the checkpoint by a killed run
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "train", "step": 6, "epoch": 0.9}) + "\n")
        f.write('{"event": "train", "step": 7, "ep')  # ... the last one torn by the kill
    run_train(train_args(small_data, tiny_vit, tmp_path / "resumed", *common, "--resume", "latest"))

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for step in (10, 14):
        for weights in (f"checkpoint-{step}", f"checkpoint-{step}/ema"):
            a, b = load_weights(full / weights), load_weights(resumed / weights)
            assert all(torch.equal(a[k], b[k]) for k in a), f"{weights} differs after resume"
    assert comparable(read_jsonl(resumed / "metrics.jsonl")) == comparable(
        read_jsonl(full / "metrics.jsonl"))
    a, b = summary(full), summary(resumed)
    assert (a["best_step"], a["best_value"], a["final_eval"]) == (b["best_step"], b["best_value"],
                                                                  b["final_eval"])


def test_resume_refuses_flags_that_change_the_run_naming_each_unless_allowed(
        small_data, tiny_vit, tmp_path, capsys):
    """A resume continues the run its checkpoint belongs to: a changed learning rate, seed,
    global batch, pooling, schedule length, registry, data file or model file (another model of
    the same size under the same path) is refused, each named in one line;
    --allow_changed_flags names them and goes on."""
    from safetensors.torch import load_file, save_file
    registry, digits = tmp_path / "datasets.json", tmp_path / "digits_train.jsonl"
    shutil.copy(small_data["registry"], registry)
    shutil.copy(small_data["digits_train"], digits)
    model = shutil.copytree(tiny_vit, tmp_path / "model")
    data = {**small_data, "registry": str(registry), "digits_train": str(digits)}
    out = tmp_path / "run"
    common = ["--max_steps", 4, "--save_steps", 2, "--skip_evaluation"]
    run_train(train_args(data, model, out, *common))
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 3: resume from checkpoint-2
    capsys.readouterr()
    with open(registry) as f:
        entries = json.load(f)
    entries["digits"]["eval_ratio"] = 0.25
    registry.write_text(json.dumps(entries))
    size = os.path.getsize(digits)
    with open(digits, "a") as f:
        f.write(json.dumps(read_jsonl(digits)[0]) + "\n")
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 1 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    changed = ["--lr", 2e-3, "--seed", 1, "--batch_size", 4, "--pooling", "mean", "--max_steps", 6]
    with pytest.raises(SystemExit) as e:
        run_train(train_args(data, model, out, *common, *changed, "--resume", "latest"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    for change in ["--datasets digits.eval_ratio 0.5 -> 0.25", "--lr 0.001 -> 0.002",
                   '--pooling "auto" -> "mean"', "--seed 42 -> 1",
                   f"--train_data {digits}: 'digits_train.jsonl' {size:,} -> "
                   f"{os.path.getsize(digits):,} bytes",
                   f"--model {model}: model.safetensors differs from the file the run started",
                   "--batch_size x processes 8 x 1 -> 4 x 1 (the global micro-batch)",
                   "--max_steps 4 -> --max_steps 6 (the length of the --lr_scheduler cosine"]:
        assert change in err, change
    assert checkpoints(out) == ["checkpoint-2"]  # refused before anything was written
    # what only schedules logs and saving, or picks loaders, may change
    registry.write_text(json.dumps({**entries, "digits": {**entries["digits"],
                                                          "eval_ratio": 0.5}}))
    shutil.copy(small_data["digits_train"], digits)
    save_file(tensors, weights, metadata={"format": "pt"})
    run_train(train_args(data, model, out, *common, "--logging_steps", 1, "--num_workers", 1,
                         "--resume", "latest"))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(out / "checkpoint-4")
    run_train(train_args(data, model, out, *common, "--lr", 2e-3, "--resume", "latest",
                         "--allow_changed_flags"))
    assert "continues with changed flags: --lr 0.001 -> 0.002" in capsys.readouterr().out
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "changed_flags"]
    assert [(r["step"], r["changes"]) for r in logged][-1] == (2, ["--lr 0.001 -> 0.002"])


def test_frozen_parameters_stay_out_of_the_sharded_state_and_a_resume_may_train_them(
        small_data, tiny_vit, tmp_path, capsys):
    """--train_only_head: the sharded state and the EMA hold what trains (the head), not the
    frozen backbone, which model.safetensors holds as --model gave it. A resume that trains the
    backbone too (--allow_changed_flags) starts it and its EMA from --model's weights and says
    so; the best checkpoint, written while it was frozen, is not the one the final evaluation
    restores, and that is said."""
    from safetensors.torch import load_file

    from state_files import sharded_reader
    out, common = tmp_path / "run", ["--save_steps", 2, "--eval_steps", 2, "--ema_decay", 0.5]
    run_train(train_args(small_data, tiny_vit, out, "--max_steps", 2, "--train_only_head",
                         *common))
    saved = sharded_reader(str(out / "checkpoint-2" / "state"))[1]
    assert sorted(k for k in saved if k.startswith("model.")) == ["model.head.bias",
                                                                  "model.head.weight"]
    saved = sharded_reader(str(out / "checkpoint-2" / "ema_state"))[1]
    assert sorted(saved) == ["ema.head.bias", "ema.head.weight"]
    folder = load_file(os.path.join(tiny_vit, "model.safetensors"))
    written = load_file(out / "checkpoint-2" / "model.safetensors")
    assert written.keys() == folder.keys() and all(torch.equal(folder[k], written[k])
                                                   for k in folder)
    capsys.readouterr()
    # a learning rate of 1 throws the backbone far off: checkpoint-2 stays the best
    run_train(train_args(small_data, tiny_vit, out, "--max_steps", 4, "--lr", 1.0, *common,
                         "--resume", "latest", "--allow_changed_flags"))
    said = capsys.readouterr().out
    assert "were frozen when" in said and "so they start from --model's weights" in said
    assert summary(out)["best_checkpoint"].endswith("checkpoint-2")
    assert (f"the final evaluation is of {out / 'checkpoint-4'}, not of the best "
            f"{out / 'checkpoint-2'}") in said
    trained = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(not torch.equal(folder[k], trained[k]) for k in folder if k.endswith("weight"))
    for part, prefix in (("state", "model.backbone."), ("ema_state", "ema.backbone.")):
        saved = sharded_reader(str(out / "checkpoint-4" / part))[1]
        assert len([k for k in saved if k.startswith(prefix)]) == len(folder), part
    # frozen again on a resume: the backbone keeps what it trained (it was read back as
    # --model's weights, losing steps 3 and 4), and that is said
    capsys.readouterr()
    run_train(train_args(small_data, tiny_vit, out, "--max_steps", 6, "--train_only_head",
                         *common, "--resume", "latest", "--allow_changed_flags"))
    assert "parameter(s) frozen now were trained when" in capsys.readouterr().out
    kept = load_file(out / "checkpoint-6" / "model.safetensors")
    assert all(torch.equal(trained[k], kept[k]) for k in folder)


def test_keep_limit_keeps_the_latest_and_the_best(small_data, tiny_vit, tmp_path):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 8, "--save_steps", 2,
                   "--eval_steps", 2, "--save_total_limit", 1, "--best_metric", "overall_loss"))
    best = os.path.basename(summary(tmp_path)["best_checkpoint"])
    assert set(checkpoints(tmp_path)) == {"checkpoint-8", best}


def test_a_resume_keeps_the_best_of_the_folder_it_resumes_whatever_its_path_is_called(
        small_data, tiny_vit, tmp_path):
    first = tmp_path / "first"
    # lr 0: every evaluation ties, so the best stays the first one, checkpoint-2
    flags = ["--save_steps", 2, "--eval_steps", 2, "--save_total_limit", 1, "--lr", 0]
    run_train(train_args(small_data, tiny_vit, first, "--max_steps", 4, *flags))
    assert checkpoints(first) == ["checkpoint-2", "checkpoint-4"]
    copied = tmp_path / "copied"
    shutil.copytree(first, copied)
    # the copy resumed, named by another spelling of its path: its own best is kept and evaluated
    run_train(train_args(small_data, tiny_vit, os.path.relpath(copied), "--max_steps", 8, *flags,
                         "--resume", "latest", "--allow_changed_flags"))
    s = summary(copied)
    assert os.path.realpath(s["best_checkpoint"]) == str(copied.resolve() / "checkpoint-2")
    assert checkpoints(copied) == ["checkpoint-2", "checkpoint-8"]
    assert s["final_eval_checkpoint"] == s["best_checkpoint"]
    assert checkpoints(first) == ["checkpoint-2", "checkpoint-4"]


def test_a_run_resumed_from_another_runs_folder_keeps_that_runs_best(small_data, tiny_vit,
                                                                     tmp_path, capsys):
    flags = ["--save_steps", 2, "--eval_steps", 2, "--save_total_limit", 1, "--lr", 0,
             "--allow_changed_flags"]  # lr 0: the first evaluation stays the best
    run_train(train_args(small_data, tiny_vit, tmp_path / "a", "--max_steps", 4, *flags))
    run_train(train_args(small_data, tiny_vit, tmp_path / "b", "--max_steps", 6, *flags,
                         "--resume", tmp_path / "a" / "checkpoint-4"))
    run_train(train_args(small_data, tiny_vit, tmp_path / "b", "--max_steps", 8, *flags,
                         "--resume", "latest"))
    assert "which is gone" not in capsys.readouterr().out
    assert summary(tmp_path / "b")["final_eval_checkpoint"] == str(tmp_path / "a" /
                                                                  "checkpoint-2")


def test_a_resume_with_another_best_metric_tracks_the_best_anew_and_says_so(
        small_data, tiny_vit, tmp_path, capsys):
    flags = ["--save_steps", 2, "--eval_steps", 2, "--save_all_checkpoints"]
    run_train(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 4, *flags))
    run_train(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 8, *flags, "--resume",
                         tmp_path / "checkpoint-2", "--allow_changed_flags", "--best_metric",
                         "overall_loss", "--best_mode", "min"))
    assert "the best is tracked anew from step 2" in capsys.readouterr().out
    s = summary(tmp_path)
    losses = {r["step"]: r["eval_overall_loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")
              if r["event"] == "eval"}
    assert sorted(losses) == [2, 4, 6, 8]  # the records of the first run to step 4 superseded
    assert s["best_metric"] == "overall_loss" and s["best_value"] == min(
        losses[k] for k in (4, 6, 8))  # evaluated after the resume


def test_an_output_dir_with_the_log_of_a_run_that_saved_nothing_needs_overwrite(
        small_data, tiny_vit, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 2}) + "\n")
    args = train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--skip_evaluation")
    with pytest.raises(SystemExit) as e:
        run_train(args)
    assert e.value.code == 2
    assert "holds metrics.jsonl of an earlier run (no checkpoint)" in capsys.readouterr().err
    run_train(args + ["--overwrite"])
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")
            if r["event"] == "train"] == [2]
    assert "lr" in first_step_log(tmp_path)


def test_a_trained_dataset_without_validation_samples_is_said_and_left_out_of_overall(
        small_data, tiny_vit, tmp_path, capsys):
    args = train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--eval_steps", 2,
                      "--best_metric", "overall_top5_accuracy")
    at = args.index("--val_jsonl")
    args[at + 1:at + 3] = [small_data["digits_val"]]  # faces' validation file left out
    run_train(args)
    assert ("note: dataset(s) faces have training samples but none in --val_data: they are not "
            "evaluated, and the overall metrics leave them out") in capsys.readouterr().out
    final = summary(tmp_path)["final_eval"]
    assert final["final_eval_overall_samples"] == 21  # digits' alone
    assert 0 <= final["final_eval_overall_top5_accuracy"] <= 1  # was a KeyError at step 2


def test_validation_records_of_training_images_are_said(small_data, tiny_vit, tmp_path,
                                                         capsys):
    leaky = write_jsonl(tmp_path / "faces_val.jsonl", read_jsonl(small_data["faces_train"])[:3] +
                        read_jsonl(small_data["faces_val"]))
    args = train_args(small_data, tiny_vit, tmp_path / "run", "--max_steps", 1,
                      "--skip_evaluation")
    at = args.index("--val_jsonl")
    args[at + 2] = leaky
    run_train(args)
    assert (f"note: dataset 'faces': 3 of its 13 validation records read a training image (e.g. "
            f"{leaky}:1): its evaluations score images the model trains on (leave them out of "
            "--val_data") in capsys.readouterr().out


def test_keep_limit_never_removes_checkpoints_below_the_limit(tmp_path):
    from checkpoint import prune_checkpoints
    for step in (2, 4):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "training_info.json").write_text("{}")
    assert prune_checkpoints(str(tmp_path),
                             3) == [] and checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert prune_checkpoints(str(tmp_path), 1) == [str(tmp_path / "checkpoint-2")]


def test_save_all_checkpoints_keeps_every_one(small_data, tiny_vit, tmp_path):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 7, "--save_steps", 2,
                   "--eval_steps", 3, "--save_all_checkpoints"))
    # saves, bests and the final one
    assert checkpoints(tmp_path) == [f"checkpoint-{s}" for s in (2, 3, 4, 6, 7)]


def test_save_best_only_keeps_just_the_best(small_data, tiny_vit, tmp_path):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 8, "--save_steps", 1,
                   "--eval_steps", 2, "--save_best_only", "--best_metric", "digits_loss"))
    s = summary(tmp_path)
    assert checkpoints(tmp_path) == [os.path.basename(s["best_checkpoint"])]
    events = read_jsonl(tmp_path / "metrics.jsonl")
    bests = [r for r in events if r["event"] == "best"]
    evals = [r for r in events if r["event"] == "eval"]
    assert bests[-1]["best_digits_loss"] == min(r["eval_digits_loss"]
                                                for r in evals) == s["best_value"]
    assert bests[-1]["best_model_step"] == s["best_step"]
    final = [r for r in events if r["event"] == "final_eval"][0]
    assert final["checkpoint"] == s["best_checkpoint"]
    assert final["final_eval_overall_samples"] == 21 + 10  # the full validation set
    partial = evals[0]
    assert (partial["eval_digits_samples"], partial["eval_faces_samples"]) == (round(21 * 0.5), 10)


def test_skip_evaluation_overrides_everything_that_evaluates(small_data, tiny_vit, tmp_path,
                                                             capsys):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 6, "--save_steps", 2,
                   "--skip_evaluation", "--save_best_only"))
    out = capsys.readouterr().out
    for line in [
            "save_all_checkpoints: False -> True", "no_best_tracking: False -> True",
            "save_best_only: True -> False", "no_partial_eval: False -> True",
            "no_final_eval: False -> True"
    ]:
        assert f"override: {line} (--skip_evaluation)" in out
    assert checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert {r["event"] for r in events} == {"config", "train"}
    assert len(events[0]["overrides"]) == 5
    s = summary(tmp_path)
    assert s["final_eval"] == {} and s["best_checkpoint"] is None and len(s["overrides"]) == 5
    assert s["config"]["save_all_checkpoints"] is True


def test_train_records_give_the_share_of_time_spent_waiting_for_batches(
        small_data, tiny_vit, tmp_path, monkeypatch):
    """data_wait_share: a run whose images take 50 ms each to decode (the main process decodes:
    --num_workers 0) spends most of each step waiting for its batch of 8."""
    from data.loaders import FastPixels
    decode = FastPixels.__call__

    def slow_decode(*args):
        time.sleep(0.05)
        return decode(*args)
    monkeypatch.setattr(FastPixels, "__call__", slow_decode)
    run_train(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 4, "--skip_evaluation"))
    shares = [r["data_wait_share"] for r in read_jsonl(tmp_path / "metrics.jsonl")
              if r["event"] == "train"]
    assert len(shares) == 2 and all(0.7 < s < 1 for s in shares), shares


def test_metrics_log_names_and_per_dataset_counts(small_data, tiny_vit, tmp_path):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 7, "--logging_steps", 7,
                   "--eval_steps", 7))
    events = read_jsonl(tmp_path / "metrics.jsonl")
    train_log = [r for r in events if r["event"] == "train"][0]
    # one epoch: every training sample once
    assert (train_log["train_digits_samples"], train_log["train_faces_samples"],
            train_log["train_overall_samples"]) == (40, 16, 56)
    for key in [
            "train_digits_loss", "train_digits_accuracy", "train_digits_top5_accuracy",
            "train_faces_accuracy", "train_overall_accuracy", "lr", "grad_norm",
            "samples_per_second", "epoch", "step"
    ]:
        assert key in train_log, key
    assert "train_faces_top5_accuracy" not in train_log  # 2 classes: top-5 says nothing
    assert 0 <= train_log["data_wait_share"] < 1
    final = [r for r in events if r["event"] == "final_eval"][0]
    assert {
        "final_eval_digits_accuracy", "final_eval_faces_accuracy", "final_eval_overall_accuracy",
        "final_eval_overall_samples"
    } <= set(final)
    assert [r["event"] for r in events] == ["train", "eval", "best", "final_eval"]


def test_disjoint_layout_end_to_end(small_data, tiny_vit, tmp_path):
    import eval as eval_script
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 3, "--eval_steps", 3,
                   "--label_space", "disjoint"))
    with open(tmp_path / "checkpoint-3" / "classifier.json") as f:
        info = json.load(f)
    assert info["num_labels"] == 12 and info["datasets"]["faces"]["offset"] == 10
    eval_script.main([
        str(tmp_path / "checkpoint-3"), "--num_workers", "0", "--predictions",
        str(tmp_path / "p.jsonl")
    ])
    preds = read_jsonl(tmp_path / "p.jsonl")
    assert {p["dataset_name"] for p in preds} == {"digits", "faces"}
    assert all(0 <= p["prediction"] < (10 if p["dataset_name"] == "digits" else 2) for p in preds)
    assert summary(tmp_path)["final_eval"]["final_eval_overall_samples"] == 31


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(small_data, tiny_vit, tmp_path, precision):
    run_train(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--precision", precision,
                   "--eval_steps", 2))
    s = summary(tmp_path)
    assert s["final_eval"]["final_eval_overall_samples"] == 31
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "checkpoint-2").values())


def test_output_dir_with_checkpoints_needs_resume_or_overwrite(small_data, tiny_vit, tmp_path,
                                                               capsys):
    args = train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--skip_evaluation",
                      "--save_steps", 2)
    run_train(args)
    with pytest.raises(SystemExit) as e:
        run_train(args)
    assert e.value.code == 2
    assert "already holds 1 checkpoint(s)" in capsys.readouterr().err
    run_train(args + ["--overwrite"])
    assert checkpoints(tmp_path) == ["checkpoint-2"]
    assert len([r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["event"] == "train"]) == 1


def test_an_output_dir_that_is_a_file_is_a_one_line_error(small_data, tiny_vit, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(SystemExit) as e:
        run_train(train_args(small_data, tiny_vit, tmp_path / "taken", "--max_steps", 1))
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"error: --output_dir {tmp_path / 'taken'}: is a file, not a folder\n")
    assert (tmp_path / "taken").read_text() == "mine"


FLAGS_WITHOUT_EFFECT = {
    "mix_prob": ["--mix_prob", 0.5],
    "crop_scale": ["--augment", "none", "--crop_scale", 0.5, 1.0],
    "randaugment": ["--augment", "crop_flip", "--randaugment_n", 3, "--randaugment_m", 5],
    "prompt": ["--prompt", "Which {dataset} is it?"],
    "keep_limit": ["--save_all_checkpoints", "--save_total_limit", 2],
    "eval_steps": ["--no_partial_eval", "--eval_steps", 5],
    "best_mode": ["--no_best_tracking", "--best_metric", "digits_loss", "--best_mode", "min"],
    "overwrite": ["--resume", "latest", "--overwrite"],
}


@pytest.mark.parametrize("case, message", [
    ("label", "digits_train.jsonl:3: field 'label': 12 is outside [0, 10) for dataset 'digits'"),
    ("name",
     "digits_train.jsonl:3: field 'dataset_name': 'food101' is not in the dataset registry"),
    ("image", "digits_train.jsonl:3: field 'image_path': image file not found"),
    ("num_labels", "--num_labels 5 is smaller than the 10 head rows"),
    ("eval_ratio", "dataset 'faces': field 'eval_ratio' must be in (0, 1], got 2"),
    ("missing_file", "nowhere.jsonl: cannot read the data file"),
    ("best_metric",
     "--best_metric 'faces_top5_accuracy' is not one of overall_loss, overall_accuracy, "
     "digits_loss, digits_accuracy, digits_top5_accuracy, faces_loss, faces_accuracy"),
    ("ema_decay", "--ema_decay must be in [0, 1) (0 = off), got 1.0"),
    ("ema_every", "--ema_every: no effect without --ema_decay > 0"),
    ("ema_metric", "--best_metric ema_overall_accuracy: the ema_ metrics are of the EMA weights"),
    ("other_task",
     "--kl_weight: for --task autoencoder, not classify; --vae: for --task generate, not classify"),
    # a flag that cannot act under the others is an error, never a no-op
    ("mix_prob", "--mix_prob: no effect without --mixup or --cutmix"),
    ("crop_scale", "--crop_scale: no dataset is augmented with it (augmentation: digits none, "
                   "faces none"),
    ("randaugment", "--randaugment_n, --randaugment_m: no dataset is augmented with it"),
    ("prompt", "--prompt is for vision-language backbones; ViTModel takes images only"),
    ("keep_limit", "--save_total_limit: no effect without a keep limit"),
    ("eval_steps", "--eval_steps: no effect without evaluation during training"),
    ("best_mode", "--best_metric, --best_mode: no effect without best-model tracking"),
    ("overwrite", "--overwrite: no effect without a new run"),
    ("overall", "dataset 'overall': 'overall' names the aggregate over all datasets"),
])
def test_bad_input_stops_before_the_first_step(small_data, tiny_vit, tmp_path, capsys, case,
                                               message):
    rows = read_jsonl(small_data["digits_train"])
    data = dict(small_data)
    extra = []
    if case in ("label", "name", "image"):
        rows[2] = {**rows[2], **{"label": {"label": 12}, "name": {"dataset_name": "food101"},
                                  "image": {"image_path": "gone.png"}}[case]}
        data["digits_train"] = write_jsonl(tmp_path / "digits_train.jsonl", rows)
    elif case == "num_labels":
        extra = ["--num_labels", 5]
    elif case == "eval_ratio":
        extra = ["--datasets", "digits=10", "faces=2:2"]
    elif case == "missing_file":
        data["faces_val"] = str(tmp_path / "nowhere.jsonl")
    elif case == "best_metric":  # two classes: no top-5 is reported for faces
        extra = ["--best_metric", "faces_top5_accuracy"]
    elif case == "other_task":
        extra = ["--vae", tmp_path, "--kl_weight", 0.1]
    elif case in FLAGS_WITHOUT_EFFECT:
        extra = FLAGS_WITHOUT_EFFECT[case]
    elif case == "overall":  # its metrics would be overwritten by the aggregate's
        for split in ("train", "val"):
            rows = [{**r, "dataset_name": "overall"}
                    for r in read_jsonl(small_data[f"faces_{split}"])]
            data[f"faces_{split}"] = write_jsonl(tmp_path / f"faces_{split}.jsonl", rows)
        extra = ["--datasets", "digits=10", "overall=2"]
    elif case.startswith("ema_"):
        extra = {"ema_decay": ["--ema_decay", 1], "ema_every": ["--ema_every", 2],
                 "ema_metric": ["--best_metric", "ema_overall_accuracy"]}[case]
    with pytest.raises(SystemExit) as e:
        run_train(train_args(data, tiny_vit, tmp_path / "out", "--max_steps", 2, *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # nothing was trained or written


@pytest.mark.parametrize("processes, dist", [(0, "ddp"), (2, "ddp"), (2, "fsdp")])
def test_undecodable_image_during_training_names_the_file(small_data, tiny_vit, tmp_path, processes,
                                                          dist):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = read_jsonl(small_data["digits_train"])
    # met by rank 0 only under torchrun (positions 0, 2, ...)
    rows[2]["image_path"] = str(tmp_path / "broken.png")
    data = {**small_data, "digits_train": write_jsonl(tmp_path / "digits_train.jsonl", rows)}
    # Under torchrun only one rank meets the image while the other waits in a collective (FSDP2: the
    # next all-gather): the whole job must still end, with that rank's error, within a minute.
    start = time.time()
    result = run_script(
        "train.py",
        *train_args(data, tiny_vit, tmp_path / "out", "--max_steps", 8, "--num_workers", 1,
                    "--no_shuffle", "--batch_size", 2, "--dist", dist), torchrun=processes,
        timeout=120)
    assert time.time() - start < 60
    assert result.returncode == (2 if processes == 0 else 1), result.stderr[-2000:]
    assert "digits_train.jsonl:3: cannot decode image" in result.stderr
    assert "broken.png" in result.stderr


def test_config_file_supplies_defaults_and_flags_win(small_data, tiny_vit, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"""
model: {{pretrained_name: {tiny_vit}}}
datasets:
  dataset_configs:
    digits: {{num_classes: 10, eval_ratio: 0.5}}
    faces: {{num_classes: 2}}
  shuffle_datasets: false
data:
  train_jsonl_list: [{small_data['digits_train']}, {small_data['faces_train']}]
  val_jsonl: {small_data['digits_val']}
training:
  lr: 1e-5
  epochs: 2
  output_dir: {tmp_path / 'out'}
  best_model_tracking: {{metric: overall_loss, save_best_only: true}}
  evaluation: {{full_eval_at_end: false}}
loss: {{type: label_smoothing, smoothing: 0.1}}
wandb: {{enabled: true}}
""")
    args = train.parse_args(["--config", str(config), "--epochs", "3"])
    assert args.model == tiny_vit and args.lr == 1e-5 and args.epochs == 3  # the flag wins
    assert args.no_shuffle and args.save_best_only and args.no_final_eval
    assert args.label_smoothing == 0.1
    assert args.best_metric == "overall_loss" and args.val_data == [small_data["digits_val"]]
    assert list(args.datasets) == ["digits", "faces"]
    for bad, key in [("training2: {lr: 1}", "training2"), ("evaluation: {lr: 1}", "evaluation"),
                     ("batch_size: fast", None)]:
        (tmp_path / "bad.yaml").write_text(config.read_text().replace("wandb:", bad + "\nwandb:"))
        match = (f"config key {key} is not a known setting" if key
                 else "key 'batch_size': cannot read 'fast' as int")
        with pytest.raises(ValueError, match=match):
            train.parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_demo_command_trains_on_real_images(demo_dir, tmp_path):
    data = [str(demo_dir / d / f"{s}.jsonl") for s in ("train", "val") for d in ("digits", "faces")]
    result = run_script("train.py", "--config", "configs/demo.yaml", "--train_jsonl", *data[:2],
                        "--val_jsonl", *data[2:], "--output_dir", tmp_path, "--epochs", 3,
                        "--eval_steps", 50, "--save_steps", 50)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final evaluation of" in result.stdout and "digits: 359 -> 180 (50%)" in result.stdout
    final = summary(tmp_path)["final_eval"]
    assert final["final_eval_digits_samples"] == 359 and final["final_eval_faces_samples"] == 40
    assert final["final_eval_digits_accuracy"] > 0.9


@pytest.mark.parametrize(
    "name",
    ["demo.yaml", "multi_datasets_example.yaml", "qwen2_5_vl_food.yaml", "demo_generate.yaml"])
def test_shipped_configs_parse(name):
    args = train.parse_args(["--config", os.path.join("configs", name)])
    assert args.model and args.train_data and args.output_dir
    if name == "qwen2_5_vl_food.yaml":
        assert (args.param_dtype, args.precision, args.gradient_checkpointing) == ("bf16", "bf16",
                                                                                   True)
        assert (args.max_pixels, args.lr,
                list(args.datasets)) == (200704, 1e-5, ["food101", "food2k", "imagenet"])
    if name == "demo_generate.yaml":
        assert (args.task, args.image_size, args.image_channels, args.patch_size) == ("generate", 8,
                                                                                      1, 2)
        assert len(args.sample_prompts) == 10 and args.cfg_scale == 4.0


@pytest.mark.parametrize("task, flags", [
    ("generate", ["--pooling", "cls", "--prompt", "x", "--label_smoothing", 0.1,
                  "--label_space", "disjoint", "--num_labels", 20, "--no_logits_masking",
                  "--max_pixels", 1000]),
    ("autoencoder", ["--pooling", "cls", "--label_smoothing", 0.1, "--no_logits_masking",
                     "--freeze", "vision", "--on_bad_image", "skip", "--mixup", 0.2]),
])
def test_classifier_flags_are_refused_under_other_tasks(demo_dir, tmp_path, capsys, task, flags):
    data = str(demo_dir / "digits" / "generate_train.jsonl")
    with pytest.raises(SystemExit) as e:
        run_train(["--task", task, "--model", "preset:qwen2-tiny", "--train_jsonl", data,
                   "--output_dir", str(tmp_path), *map(str, flags)])
    assert e.value.code == 2
    names = sorted(f.lstrip("-") for f in flags if str(f).startswith("--"))
    assert (f"{', '.join('--' + n for n in names)}: for --task classify, not {task}"
            in capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "metrics.jsonl")
