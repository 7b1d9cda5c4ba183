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
    # so is another precision: bf16 autocast gives other metrics than fp32
    count = len(results(run_dir))
    eval_script.main([str(run_dir / "checkpoint-4"), "--num_workers", "0", "--precision",
                      "bf16"])
    assert "already evaluated" not in capsys.readouterr().out
    last = results(run_dir)[-1]
    assert len(results(run_dir)) == count + 1 and not last["partial"]
    assert last["data_key"] not in {r["data_key"] for r in results(run_dir)[:-1]}


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


def fresh_run(run_dir, tmp_path):
    """A copy of the module's run with no evaluation recorded yet."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval_results.jsonl",
                                                                "per_class"))
    return run


def run_eval(*args, fault=None, file_limit=None):
    """eval.py as a user runs it; fault: MIXTRAIN_FAULT (a SIGKILL at that point); file_limit:
    no file this process writes may grow past that many bytes (EFBIG, as a full disk)."""
    import resource
    import subprocess
    import sys
    from conftest import ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           **({"MIXTRAIN_FAULT": fault} if fault else {})}
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
             ) if file_limit else None
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, args),
                           "--num_workers", "0"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT, preexec_fn=limit)


def test_a_second_run_with_predictions_rewrites_them_instead_of_emptying_the_file(
        run_dir, tmp_path, capsys):
    run, preds = fresh_run(run_dir, tmp_path), tmp_path / "preds.jsonl"
    eval_script.main([str(run), "--num_workers", "0", "--predictions", str(preds)])
    first = read_jsonl(preds)
    assert len(first) == 3 * 31
    eval_script.main([str(run), "--num_workers", "0", "--predictions", str(preds)])
    assert "evaluated again for --predictions / --per_class" in capsys.readouterr().out
    again = read_jsonl(preds)
    assert [(p["checkpoint"], p["image_path"], p["prediction"]) for p in again] == [
        (p["checkpoint"], p["image_path"], p["prediction"]) for p in first]
    assert [r["checkpoint"] for r in results(run)] == ["checkpoint-2", "checkpoint-4",
                                                       "checkpoint-6"]  # no second records


@pytest.mark.fault("sigkill")
@pytest.mark.parametrize("point", ["kill_after_record:2", "kill_before_rename:1"])
def test_a_kill_during_eval_leaves_the_predictions_file_whole_and_a_rerun_completes_it(
        run_dir, tmp_path, point):
    run, preds = fresh_run(run_dir, tmp_path), tmp_path / "preds.jsonl"
    preds.write_text('{"checkpoint": "an earlier evaluation"}\n')
    killed = run_eval(run, "--predictions", preds, fault=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert preds.read_text() == '{"checkpoint": "an earlier evaluation"}\n'
    recorded = [r["checkpoint"] for r in results(run)]
    assert recorded == (["checkpoint-2"] if point.startswith("kill_after") else
                        ["checkpoint-2", "checkpoint-4", "checkpoint-6"])
    rerun = run_eval(run, "--predictions", preds)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    lines = read_jsonl(preds)
    assert len(lines) == 3 * 31 and {p["checkpoint"] for p in lines} == {
        "checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert [r["checkpoint"] for r in results(run)] == ["checkpoint-2", "checkpoint-4",
                                                       "checkpoint-6"]
    assert sorted(os.listdir(tmp_path)) == ["preds.jsonl", "run"]  # no temporary file left


def test_predictions_that_name_a_folder_are_a_one_line_error(run_dir, tmp_path):
    run = fresh_run(run_dir, tmp_path)
    result = run_eval(run, "--predictions", tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: --predictions {tmp_path}: is a folder; give a file name\n"
    assert results(run) == []


@pytest.mark.fault("disk full")
def test_a_full_disk_while_writing_predictions_keeps_the_file_and_adds_no_record(
        run_dir, tmp_path):
    run, preds = fresh_run(run_dir, tmp_path), tmp_path / "preds.jsonl"
    preds.write_text('{"checkpoint": "an earlier evaluation"}\n')
    result = run_eval(run / "checkpoint-2", "--predictions", preds, file_limit=2000)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: cannot write --predictions {preds} (File too large")
    assert result.stderr.endswith("it is left as it was\n")
    assert preds.read_text() == '{"checkpoint": "an earlier evaluation"}\n'
    assert results(run) == []  # a rerun evaluates it: no record stands for missing predictions
    assert sorted(os.listdir(tmp_path)) == ["preds.jsonl", "run"]


def test_a_torn_last_line_of_eval_results_does_not_swallow_the_next_record(
        run_dir, tmp_path, capsys):
    run = fresh_run(run_dir, tmp_path)
    (run / "eval_results.jsonl").write_text('{"checkpoint": "checkpoint-4", "data_k')  # killed
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0"])
    assert [r["checkpoint"] for r in results_readable(run)] == ["checkpoint-2"]
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0"])
    assert "already evaluated on this data" in capsys.readouterr().out
    assert len(results_readable(run)) == 1


def results_readable(run):
    """The records of eval_results.jsonl that parse (a line torn by a kill does not)."""
    records = []
    with open(run / "eval_results.jsonl") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def test_per_class_on_an_already_evaluated_checkpoint_still_writes_its_file(
        run_dir, tmp_path, capsys):
    run = fresh_run(run_dir, tmp_path)
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0"])
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0", "--per_class"])
    with open(run / "per_class" / "checkpoint-2.json") as f:
        assert sum(d["samples"] for d in json.load(f)["datasets"].values()) == 31
    assert len(results(run)) == 1
    capsys.readouterr()
    eval_script.main([str(run / "checkpoint-2"), "--num_workers", "0", "--per_class"])
    assert "--force to redo" in capsys.readouterr().out  # its file is there: nothing to do
    assert len(results(run)) == 1


def test_datasets_in_another_order_score_the_rows_the_checkpoint_gave_them(
        small_data, tiny_vit, tmp_path, capsys):
    run = tmp_path / "disjoint"
    train.main(train_args(small_data, tiny_vit, run, "--max_steps", 2, "--skip_evaluation",
                          "--label_space", "disjoint", "--lr", 1e-2))
    checkpoint = str(run / "checkpoint-2")
    eval_script.main([checkpoint, "--num_workers", "0"])
    eval_script.main([checkpoint, "--num_workers", "0", "--datasets", "faces=2", "digits=10"])
    trained, reordered = results(run)
    assert reordered["data_key"] != trained["data_key"]
    for name in ("digits", "faces", "overall"):
        assert reordered[f"eval_{name}_correct"] == trained[f"eval_{name}_correct"]
        assert reordered[f"eval_{name}_loss"] == pytest.approx(trained[f"eval_{name}_loss"],
                                                               rel=1e-6)
    capsys.readouterr()
    for flags, message in [
            (["--datasets", "digits=10", "faces=3"],
             "dataset 'faces' has 3 classes, the checkpoint's head 2 rows for it"),
            (["--datasets", "cats=2"], "dataset 'cats' has no rows in the checkpoint's disjoint"),
            (["--label_space", "shared"], "--label_space shared does not match the saved head"),
            (["--datasets", "overall=2"], "'overall' names the aggregate")]:
        with pytest.raises(SystemExit) as e:
            eval_script.main([checkpoint, "--num_workers", "0", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert len(results(run)) == 2


def test_a_resume_with_its_datasets_reordered_keeps_their_head_rows_and_eval_checks_them(
        small_data, tiny_vit, tmp_path, capsys):
    """A disjoint head's rows were handed out anew in the order a resume's --datasets listed the
    datasets: digits trained on faces' rows, and eval.py read every checkpoint of the run with
    the newest one's rows. A resume keeps each dataset's rows by name; eval.py refuses
    checkpoints whose rows differ."""
    run = tmp_path / "run"
    flags = ["--save_steps", 2, "--skip_evaluation", "--label_space", "disjoint", "--lr", 1e-2]
    train.main(train_args(small_data, tiny_vit, run, "--max_steps", 2, *flags))
    reordered = tmp_path / "datasets.json"
    with open(small_data["registry"]) as f:
        reordered.write_text(json.dumps(dict(reversed(json.load(f).items()))))
    capsys.readouterr()
    train.main(train_args({**small_data, "registry": str(reordered)}, tiny_vit, run,
                          "--max_steps", 4, *flags, "--resume", "latest",
                          "--allow_changed_flags"))
    assert "each dataset keeps the head rows" in capsys.readouterr().out

    def rows(checkpoint):
        with open(run / checkpoint / "classifier.json") as f:
            return {n: d["offset"] for n, d in json.load(f)["datasets"].items()}
    assert rows("checkpoint-4") == rows("checkpoint-2") == {"digits": 0, "faces": 10}
    eval_script.main([str(run), "--num_workers", "0"])
    assert [r["checkpoint"] for r in results(run)] == ["checkpoint-2", "checkpoint-4"]
    # checkpoint-4 as a resume before this kept rows wrote it: faces first
    info = json.loads((run / "checkpoint-4" / "classifier.json").read_text())
    info["datasets"]["faces"]["offset"], info["datasets"]["digits"]["offset"] = 0, 2
    (run / "checkpoint-4" / "classifier.json").write_text(json.dumps(info))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_script.main([str(run), "--num_workers", "0", "--force"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "checkpoint-2/classifier.json puts the datasets' classes in " \
        "other head rows than" in err and "evaluate each checkpoint on its own" in err, err
    assert len(results(run)) == 2


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_and_their_records_aside(
        run_dir, small_data, tiny_vit, tmp_path, capsys):
    run = fresh_run(run_dir, tmp_path)
    eval_script.main([str(run), "--num_workers", "0", "--per_class"])
    before = {n: (run / n / "training_info.json").read_text() for n in ("checkpoint-4",
                                                                          "checkpoint-6")}
    capsys.readouterr()
    train.main(train_args(small_data, tiny_vit, run, "--max_steps", 6, "--save_steps", 2,
                          "--eval_steps", 2, "--save_all_checkpoints", "--resume",
                          run / "checkpoint-2"))
    out = capsys.readouterr().out
    assert "before 2 checkpoint(s)" in out and "checkpoint-4, checkpoint-6" in out
    aside, = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    for name, info in before.items():  # kept whole, not overwritten by the resumed run
        assert (aside / name / "training_info.json").read_text() == info
        assert (aside / "per_class" / f"{name}.json").is_file()
    assert [r["checkpoint"] for r in results(aside)] == ["checkpoint-2", "checkpoint-4",
                                                         "checkpoint-6"]
    assert [r["checkpoint"] for r in results(run)] == ["checkpoint-2"]
    assert [r["step"] for r in read_jsonl(aside / "metrics.jsonl") if r["event"] == "eval"] == [
        2, 4, 6]
    # the resumed run's own checkpoints are evaluated, not taken for those set aside
    eval_script.main([str(run), "--num_workers", "0"])
    assert [r["checkpoint"] for r in results(run)] == ["checkpoint-2", "checkpoint-4",
                                                       "checkpoint-6"]
