"""Config files and the flag checks around them: --skip_evaluation overrides the evaluation
settings a config holds (with `override:` notes), a file that is not a mapping, a key given
twice, two keys or two spellings that set one flag, a registry dataset without training samples
(unless eval_only), and --dist hsdp --shard_size in one process."""
import json
import os
import re
from types import SimpleNamespace

import pytest

import eval as eval_script
import train
from checkpoint import changed_run_flags, run_fingerprint
from config import apply_overrides, parse_args
from conftest import ROOT, read_jsonl, train_args, write_jsonl
from dataset import DataError, check_training_samples, load_registry
from distributed import mesh_shape

DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def run_train(argv):
    train.main([str(a) for a in argv])


def refused(capsys, argv, script=train):
    """The one-line error (exit code 2) of a run of `script` with `argv`."""
    with pytest.raises(SystemExit) as e:
        script.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_seed_style_config_with_skip_evaluation_trains_with_override_notes(
        small_data, tiny_vit, tmp_path, capsys):
    # design notes (seed 003): skip_evaluation wins however the file sets the evaluation
    config = write(tmp_path / "no_eval.yaml", f"""
model:
  pretrained_name: {tiny_vit}
  num_labels: 10
loss:
  type: label_smoothing
  smoothing: 0.1
datasets:
  dataset_configs:
    digits: {{num_classes: 10, description: "handwritten digits"}}
    faces: {{num_classes: 2, description: "face / non-face"}}
data:
  train_jsonl: [{small_data['digits_train']}, {small_data['faces_train']}]
  val_jsonl: [{small_data['digits_val']}, {small_data['faces_val']}]
training:
  max_steps: 2
  batch_size: 8
  num_workers: 0
  lr: 5e-6
  weight_decay: 0.01
  warmup_steps: 1
  output_dir: {tmp_path / 'out'}
  logging_steps: 1
  save_steps: 1
  eval_steps: 200  # set, but ignored
  save_total_limit: 1
  skip_evaluation: true
  save_all_checkpoints: false
  best_model_tracking:
    enabled: true
    save_best_only: true
    metric: overall_loss
  evaluation:
    partial_eval_during_training: true
    full_eval_at_end: true
    eval_best_model_only: true
wandb:
  enabled: true
  project: qwen_classify_no_eval
""")
    run_train(["--config", config])
    out = capsys.readouterr().out
    notes = ["save_all_checkpoints: False -> True", "no_best_tracking: False -> True",
             "save_best_only: True -> False", "no_partial_eval: False -> True",
             "no_final_eval: False -> True", "eval_steps: 200 -> unused",
             "best_metric: overall_loss -> unused", "save_total_limit: 1 -> unused"]
    for note in notes:
        assert f"override: {note} (--skip_evaluation)" in out, note
    # every checkpoint kept (save_total_limit 1 overridden), no evaluation of any kind
    assert sorted(n for n in os.listdir(tmp_path / "out")
                  if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    events = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert {r["event"] for r in events} == {"config", "train"}
    assert len(events[0]["overrides"]) == len(notes)
    with open(tmp_path / "out" / "run_summary.json") as f:
        assert json.load(f)["final_eval"] == {}


def test_skip_evaluation_on_the_command_line_overrides_the_demo_config():
    args = parse_args(["--config", DEMO, "--skip_evaluation"])  # eval_steps, save_total_limit
    changes = apply_overrides(args)
    assert "eval_steps: 250 -> unused (--skip_evaluation)" in changes
    assert "save_total_limit: 2 -> unused (--skip_evaluation)" in changes
    assert args.no_partial_eval and args.save_all_checkpoints
    # given on the command line beside it: overridden too
    args = parse_args(["--config", DEMO, "--skip_evaluation", "--eval_cache_mb", "0",
                       "--best_mode", "min"])
    changes = apply_overrides(args)
    assert {"eval_cache_mb: 0.0 -> unused (--skip_evaluation)",
            "best_mode: min -> unused (--skip_evaluation)"} <= set(changes)
    assert apply_overrides(parse_args(["--config", DEMO])) == []  # it evaluates: nothing to say


@pytest.mark.parametrize("extra, message", [
    # no --skip_evaluation: the evaluation settings that cannot act stay errors
    (["--no_partial_eval"], "--eval_steps: no effect without evaluation during training"),
    (["--save_all_checkpoints"], "--save_total_limit: no effect without a keep limit"),
    # a flag that cannot act for another reason stays an error beside --skip_evaluation
    (["--skip_evaluation", "--mix_prob", "0.5"], "--mix_prob: no effect without --mixup"),
    (["--skip_evaluation", "--ema_every", "2"], "--ema_every: no effect without --ema_decay"),
])
def test_flags_that_cannot_act_for_other_reasons_stay_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", DEMO, *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_config_that_is_not_a_mapping_is_an_error_naming_the_file(tmp_path, capsys):
    config = write(tmp_path / "list.yaml", "- lr: 1e-3\n- epochs: 2\n")
    err = refused(capsys, ["--config", config])
    assert err == (f"error: --config {config}: expected a mapping of settings (key: value, as "
                   "in configs/demo.yaml), got a list\n")
    config = write(tmp_path / "text.yaml", "just some words\n")
    with pytest.raises(ValueError, match="text.yaml: expected a mapping .* got a str"):
        parse_args(["--config", config])


@pytest.mark.parametrize("text, message", [
    ("model: a\nlr: 1e-3\nepochs: 2\nlr: 1e-4\n", ":4: key 'lr' is given twice (first on line 2)"),
    ("training:\n  lr: 1e-3\n  epochs: 2\n  lr: 1e-4\n",
     ":4: key 'lr' is given twice (first on line 2)"),
    ("datasets:\n  digits: {num_classes: 10}\n  digits: {num_classes: 2}\n",
     ":3: key 'digits' is given twice (first on line 2)"),
    ('{"lr": 1e-3, "epochs": 2,\n "lr": 1e-4}\n', ":2: key 'lr' is given twice (first on line 1)"),
])
def test_a_key_given_twice_is_an_error_naming_it_and_its_line(tmp_path, text, message):
    config = write(tmp_path / "twice.yaml", text)
    with pytest.raises(ValueError) as e:
        parse_args(["--config", config])
    assert str(e.value) == f"--config {config}{message}: keep one"


def test_a_key_given_twice_in_a_registry_file_is_an_error(tmp_path):
    path = write(tmp_path / "registry.yaml", "digits: {num_classes: 10}\n"
                                             "faces: {num_classes: 2}\n"
                                             "digits: {num_classes: 3}\n")
    with pytest.raises(DataError, match=r"registry.yaml:3: key 'digits' is given twice \(first "
                                        r"on line 1\)"):
        load_registry(path)
    # YAML merge keys may still be overridden: that is what they are for
    path = write(tmp_path / "merge.yaml", "base: &base {num_classes: 10, eval_ratio: 0.5}\n"
                                          "digits: {<<: *base, eval_ratio: 0.2}\n")
    assert load_registry(path)["digits"].eval_ratio == 0.2


@pytest.mark.parametrize("text, message", [
    ("lr: 1e-3\ntraining:\n  epochs: 2\n  lr: 1e-4\n",
     "config keys lr (line 1) and training.lr (line 4) both set --lr"),
    ("no_logits_masking: true\ndatasets:\n  enable_logits_masking: true\n",
     "config keys no_logits_masking (line 1) and datasets.enable_logits_masking (line 3) both set "
     "--no_logits_masking"),
    ("best_metric: overall_loss\ntraining:\n  best_model_tracking: {metric: overall_accuracy}\n",
     "config keys best_metric (line 1) and training.best_model_tracking.metric (line 3) both "
     "set --best_metric"),
    # a flag and its earlier name (an alias), in a file
    ("train_data: [a.jsonl]\ntrain_jsonl: [b.jsonl]\n",
     "config keys train_data (line 1) and train_jsonl (line 2) both set --train_data"),
    ("val_jsonl: a.jsonl\nval_data: b.jsonl\n",
     "config keys val_jsonl (line 1) and val_data (line 2) both set --val_data"),
    ("data:\n  train_jsonl_list: [a.jsonl]\ntrain_data: [b.jsonl]\n",
     "config keys data.train_jsonl_list (line 2) and train_data (line 3) both set --train_data"),
    ("data:\n  val_jsonl_list: [a.jsonl]\n  val_jsonl: b.jsonl\n",
     "config keys data.val_jsonl_list (line 2) and data.val_jsonl (line 3) both set --val_data"),
])
def test_two_keys_that_set_one_flag_are_an_error_naming_both(tmp_path, text, message):
    config = write(tmp_path / "both.yaml", text)
    with pytest.raises(ValueError) as e:
        parse_args(["--config", config])
    assert str(e.value) == f"--config {config}: {message}: keep one"


def test_two_spellings_of_one_flag_on_the_command_line_are_an_error(small_data, tiny_vit,
                                                                    tmp_path, capsys):
    base = ["--model", tiny_vit, "--output_dir", tmp_path, "--datasets", small_data["registry"]]
    a, b = small_data["digits_train"], small_data["faces_train"]
    spelled = "--train_data and --train_jsonl"
    for argv, names in [([*base, "--train_data", a, "--train_jsonl", b], spelled),
                        ([*base, "--train_jsonl", a, "--train_data", b],
                         "--train_jsonl and --train_data"),
                        # argparse takes an unambiguous prefix of a flag, and --flag=value
                        ([*base, f"--train_data={a}", "--train_js", b], spelled),
                        ([*base, "--train_data", a, "--val_data", a, "--val_jsonl", b],
                         "--val_data and --val_jsonl")]:
        err = refused(capsys, argv).splitlines()[-1]
        assert err.endswith(f"error: {names} are one flag, given twice: keep one"), argv
    # one spelling, or the file's value replaced on the command line, is fine
    args = parse_args([str(x) for x in [*base, "--train_jsonl", a, b]])
    assert args.train_data == [a, b]
    config = write(tmp_path / "c.yaml", f"train_data: [{a}]\n")
    assert parse_args(["--config", config, *map(str, base), "--train_jsonl", b]).train_data == [b]
    # eval.py: the same for --val_data / --val_jsonl, before it reads anything
    err = refused(capsys, [tmp_path / "nowhere", "--val_data", a, "--val_jsonl", b], eval_script)
    assert err.splitlines()[-1].endswith(
        "error: --val_data and --val_jsonl are one flag, given twice: keep one")


def with_extra(small_data, tmp_path, model, out, extra, *flags):
    """train.py's arguments with a third registry dataset, `extra` (entry fields `extra`), whose
    validation records are the faces images and which has no training records."""
    registry = {"digits": {"num_classes": 10, "eval_ratio": 0.5},
                "faces": {"num_classes": 2}, "extra": {"num_classes": 2, **extra}}
    data = {**small_data, "registry": write(tmp_path / "registry.json", json.dumps(registry))}
    argv = train_args(data, model, out, *flags)
    rows = [{**r, "dataset_name": "extra"} for r in read_jsonl(small_data["faces_val"])]
    at = argv.index("--val_jsonl") + 1
    argv[at:at] = [write_jsonl(tmp_path / "extra_val.jsonl", rows)]
    return argv


def test_a_registry_dataset_without_training_samples_is_an_error(small_data, tmp_path, capsys):
    # refused before the model loads: there is no model at that path
    err = refused(capsys, with_extra(small_data, tmp_path, tmp_path / "no_model",
                                     tmp_path / "out", {}, "--max_steps", 1))
    assert ("error: dataset 'extra' has no training samples (--train_data holds none of it): "
            "give it some, or mark it `eval_only: true` in the registry") in err
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    # eval_only with training samples is refused too
    data = {**small_data, "registry": write(tmp_path / "faces_eval.json", json.dumps(
        {"digits": {"num_classes": 10}, "faces": {"num_classes": 2, "eval_only": True}}))}
    err = refused(capsys, train_args(data, tmp_path / "no_model", tmp_path / "out",
                                     "--max_steps", 1))
    assert ("error: dataset 'faces' is eval_only in the registry, but --train_data holds 16 of "
            "its samples") in err
    for bad, message in [({"eval_only": "yes"}, "field 'eval_only' must be true or false"),
                         ({"eval_only": True, "sampling_weight": 2, "hflip": False},
                          "field(s) sampling_weight, hflip act on training samples")]:
        with pytest.raises(DataError, match=re.escape(message)):
            load_registry({"extra": {"num_classes": 2, **bad}})


def test_an_eval_only_dataset_is_evaluated_and_a_resume_finds_the_registry_unchanged(
        small_data, tiny_vit, tmp_path):
    out = tmp_path / "out"
    common = ["--eval_steps", 1, "--lr_scheduler", "constant"]  # a longer run: the same lrs
    run_train(with_extra(small_data, tmp_path, tiny_vit, out, {"eval_only": True},
                         "--max_steps", 1, *common))
    final = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "final_eval"][-1]
    assert final["final_eval_extra_samples"] == 10
    # a changed registry would be refused (exit 2) without --allow_changed_flags
    run_train(with_extra(small_data, tmp_path, tiny_vit, out, {"eval_only": True},
                         "--max_steps", 2, *common, "--resume", "latest"))
    events = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in events if r["event"] == "train"][-1] == 2
    assert not [r for r in events if r["event"] == "changed_flags"]


def test_a_registry_without_eval_only_compares_as_it_did_before_the_field():
    registry = load_registry({"digits": {"num_classes": 10}, "faces": {"num_classes": 2}})
    now = run_fingerprint(SimpleNamespace(train_data=None, val_data=None, model=None),
                          SimpleNamespace(registry=registry))
    # the entries a checkpoint written before eval_only existed holds
    before = {name: {"name": name, "num_classes": k, "eval_ratio": 1.0, "sampling_weight": None,
                     "augment": None, "hflip": True, "image_column": None, "label_column": None}
              for name, k in (("digits", 10), ("faces", 2))}
    assert now["registry"] == before
    info = {"args": {}, "fingerprint": {"registry": before}}
    assert changed_run_flags(info, SimpleNamespace(), 1, now) == []
    # marking a dataset that had no training samples changes nothing the run did
    marked = load_registry({"digits": {"num_classes": 10},
                            "faces": {"num_classes": 2, "eval_only": True}})
    later = run_fingerprint(SimpleNamespace(train_data=None, val_data=None, model=None),
                            SimpleNamespace(registry=marked))
    assert changed_run_flags(info, SimpleNamespace(), 1, later) == []


def test_a_streamed_registry_dataset_without_a_source_is_an_error(small_data, tiny_vit, tmp_path,
                                                                  capsys):
    registry = load_registry({"digits": {"num_classes": 10}, "faces": {"num_classes": 2}})
    with pytest.raises(DataError, match=r"dataset 'faces' has no training samples \(--train_data "
                                        r"streams none of it\)"):
        check_training_samples(registry, [1.0, 0.0], stream=True)
    registry["faces"].eval_only = True
    check_training_samples(registry, [1.0, 0.0], stream=True)
    with pytest.raises(DataError, match="'faces' is eval_only in the registry, but --train_data "
                                        "streams it"):
        check_training_samples(registry, [0.5, 0.5], stream=True)
    # the real run: faces has no streamed source
    pytest.importorskip("torchdata")
    from test_sources import write_shard
    rows = read_jsonl(small_data["digits_train"])[:8]
    shard = write_shard(tmp_path / "digits-000.tar", [
        (f"s{i:03d}", {"png": open(r["image_path"], "rb").read(), "cls": str(r["label"]).encode()})
        for i, r in enumerate(rows)])
    err = refused(capsys, ["--model", tmp_path / "no_model", "--output_dir", tmp_path / "out",
                           "--train_data", f"digits={shard}", "--datasets",
                           small_data["registry"], "--streaming", "--max_steps", 1,
                           "--num_workers", 0])
    assert "dataset 'faces' has no training samples (--train_data streams none of it)" in err


def test_hsdp_shard_size_in_one_process_is_an_error(small_data, tiny_vit, tmp_path, capsys):
    message = "--shard_size 2 does not divide the 1 processes (one process: no torchrun)"
    with pytest.raises(ValueError, match=re.escape(message)):
        mesh_shape("hsdp", 2, 1)
    assert mesh_shape("hsdp", 1, 1) is None and mesh_shape("hsdp", None, 1) is None
    err = refused(capsys, train_args(small_data, tiny_vit, tmp_path / "out", "--max_steps", 1,
                                     "--dist", "hsdp", "--shard_size", 2))
    assert err.endswith(f"error: {message}\n")
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    # eval.py refuses it before it looks for checkpoints
    err = refused(capsys, [tmp_path / "nowhere", "--dist", "hsdp", "--shard_size", 2], eval_script)
    assert err.endswith(f"error: {message}\n")


def test_a_value_that_cannot_be_read_names_its_line(tmp_path):
    config = write(tmp_path / "value.yaml", "model: m\ntraining:\n  batch_size: fast\n")
    with pytest.raises(ValueError) as e:
        parse_args(["--config", config])
    assert str(e.value) == f"--config {config}:3: key 'batch_size': cannot read 'fast' as int"


@pytest.mark.parametrize("task, metric, mode", [
    ("classify", "overall_accuracy", "max"), ("classify", "digits_loss", "min"),
    ("generate", "overall_text_perplexity", "min"), ("autoencoder", "overall_kl", "min"),
    ("autoencoder", "ema_digits_kl", "min"), ("autoencoder", "overall_recon_loss", "min"),
    ("autoencoder", "overall_psnr", "max")])
def test_the_best_mode_by_default_is_the_direction_of_the_metric(task, metric, mode):
    args = parse_args(["--task", task, "--best_metric", metric, "--model", "m", "--train_data",
                       "d.jsonl", "--val_data", "v.jsonl", "--output_dir", "out"])
    apply_overrides(args)
    assert args.best_mode == mode


@pytest.mark.parametrize("text, message", [
    ("grad_accum: 2.7\n", ":1: key 'grad_accum': cannot read 2.7 as int"),  # was cut to 2
    ("batch_size: true\n", ":1: key 'batch_size': cannot read True as int"),  # was 1
    ("no_shuffle: 'false'\n", ":1: key 'no_shuffle': expected true or false, got 'false'"),
    ("loss: {type: cross_entropy, smoothing: 0.1}\n",
     ": loss.type cross_entropy beside a label smoothing of 0.1"),
    ("loss: {type: cross_entropy}\nlabel_smoothing: 0.2\n",
     ": loss.type cross_entropy beside a label smoothing of 0.2"),
    ("loss: {type: label_smoothing}\n", ": config key loss.type label_smoothing needs a "
     "smoothing"),
    ("datasets: {shuffle_datasets: 'false'}\n", ":1: config key datasets.shuffle_datasets: "
     "expected true or false, got 'false'"),  # not 'false' would have turned shuffling on
])
def test_config_values_are_read_as_the_command_line_reads_them_or_refused(tmp_path, text,
                                                                           message):
    config = write(tmp_path / "c.yaml", text)
    with pytest.raises(ValueError) as e:
        parse_args(["--config", config, "--model", "m", "--train_data", "d.jsonl",
                    "--output_dir", "out"])
    assert str(e.value).startswith(f"--config {config}{message}")


def test_a_smoothing_on_the_command_line_serves_the_configs_loss_type(tmp_path):
    config = write(tmp_path / "c.yaml", "loss: {type: label_smoothing}\ngradient_checkpointing: "
                                        "null\ndatasets: r.json\n")
    args = parse_args(["--config", config, "--model", "m", "--train_data", "d.jsonl",
                       "--output_dir", "out", "--label_smoothing", "0.1", "--datasets", "r.json"])
    assert args.label_smoothing == 0.1 and args.gradient_checkpointing is False
    assert args.command_line_over_config == []  # the same registry file: nothing replaced


def test_the_command_line_over_the_config_and_max_steps_over_epochs_are_said(tmp_path):
    config = write(tmp_path / "c.yaml", "lr: 5.0e-5\nbatch_size: 4\nepochs: 3\n")
    # launch.sh's own defaults beside a user's config
    args = parse_args(["--config", config, "--model", "m", "--train_data", "d.jsonl",
                       "--output_dir", "out", "--lr", "2e-3", "--batch_size", "4",
                       "--max_steps", "1500", "--val_data", "v.jsonl"])
    changes = apply_overrides(args)
    assert changes == [f"lr: 5e-05 in --config {config} -> 0.002 on the command line",
                       "epochs: 3 -> unused (--max_steps 1500 sets the run's length)"]
    assert "command_line_over_config" not in vars(args)  # not a flag of the run


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", 0], "--max_steps must be at least 1, got 0"),  # was: not given, 3 epochs
    (["--epochs", 0], "--epochs must be positive, got 0.0"),
    (["--max_steps", 4, "--ema_decay", 0.5, "--ema_every", 50],
     "--ema_every 50: the run has 4 steps, so the EMA would never be updated"),
    (["--max_steps", 4, "--grad_accum", 10],
     "--grad_accum 10: an epoch holds 7 micro-batch(es) of 8 per process (56 samples over 1)"),
    (["--max_steps", 4, "--layer_decay", 0.5, "--train_only_head"],
     "--layer_decay 0.5 scales the learning rates of the backbone's layers, which "
     "--train_only_head keeps frozen"),
])
def test_run_lengths_and_schedules_that_cannot_act_are_refused(small_data, tiny_vit, tmp_path,
                                                               capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, tiny_vit, tmp_path, *flags))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_warmup_longer_than_the_run_is_said(small_data, tiny_vit, tmp_path, capsys):
    train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 3, "--warmup_steps", 100,
                          "--skip_evaluation"))
    assert ("note: --warmup_steps 100 is longer than the run's 3 steps: its learning rate "
            "reaches 3% of --lr 0.001 at most") in capsys.readouterr().out
