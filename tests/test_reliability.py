"""Fault injection with real processes: SIGKILL at several points, SIGTERM under torchrun, NaN
losses,
a full disk, corrupt checkpoints and images. Each test carries the class of fault it tries; the
summary at the end of the run prints, per class, how many were tried and survived with nothing
lost."""
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import (ROOT, comparable, load_weights, read_jsonl, run_script, save_tiny_vit,
                      train_args, write_jsonl)

COMMON = [
    "--max_steps", 14, "--save_steps", 3, "--eval_steps", 3, "--logging_steps", 1, "--warmup_steps",
    3, "--save_all_checkpoints", "--num_workers", 1
]


@pytest.fixture(scope="module")
def two_steps(small_data, tiny_vit, tmp_path_factory):
    """copy(to, ema): the output folder of a run of 2 steps (--skip_evaluation, with or without an
    EMA) copied to `to`; each kind trained once per test process, by train.py in its own process."""
    made = {}

    def copy(to, ema=False):
        if ema not in made:
            out = tmp_path_factory.mktemp("two_steps")
            flags = ["--max_steps", 2, "--skip_evaluation", *(["--ema_decay", 0.5] if ema else [])]
            result = run_script("train.py", *train_args(small_data, tiny_vit, out, *flags))
            assert result.returncode == 0, result.stderr[-2000:]
            made[ema] = out
        shutil.copytree(made[ema], to, dirs_exist_ok=True)
    return copy


@pytest.fixture(scope="module")
def reference(small_data, tiny_vit, tmp_path_factory):
    """The uninterrupted run every interrupted one must match."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script("train.py", *train_args(small_data, tiny_vit, out, *COMMON))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def assert_same_as_reference(out, reference):
    """Same final weights (bitwise), same metrics.jsonl (no missing or repeated record), same final
    evaluation."""
    a, b = load_weights(reference / "checkpoint-14"), load_weights(out / "checkpoint-14")
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"
    assert comparable(read_jsonl(out / "metrics.jsonl")) == comparable(
        read_jsonl(reference / "metrics.jsonl"))
    with open(reference / "run_summary.json") as f, open(out / "run_summary.json") as g:
        assert json.load(f)["final_eval"] == json.load(g)["final_eval"]


def start(argv, env=None):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})})


def wait_for_step(out, step, process, timeout=120):
    path, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(r.get("step", 0) >= step for r in read_jsonl_safe(path)):
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def read_jsonl_safe(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def resume(data, model, out):
    result = run_script("train.py", *train_args(data, model, out, *COMMON, "--resume", "latest"))
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.fault("sigkill")
def test_sigkill_mid_epoch_then_resume_latest(small_data, tiny_vit, tmp_path, reference):
    # 7 steps per epoch: killed in the second epoch, between checkpoints (after step 10; a kill
    # sent from here once step 10 was logged could arrive after the run had ended on a busy
    # machine: a tiny model's steps take milliseconds)
    process = start(train_args(small_data, tiny_vit, tmp_path, *COMMON),
                    env={"MIXTRAIN_FAULT": "kill_before_save:10"})
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err[-2000:]
    assert not os.path.exists(tmp_path / "checkpoint-12")
    resume(small_data, tiny_vit, tmp_path)
    assert_same_as_reference(tmp_path, reference)


@pytest.mark.fault("sigkill")
@pytest.mark.parametrize("point", ["kill_in_save:6", "kill_before_save:9"])
def test_sigkill_while_writing_a_checkpoint_or_between_evaluation_and_save(
        small_data, tiny_vit, tmp_path, reference, point):
    process = start(train_args(small_data, tiny_vit, tmp_path, *COMMON),
                    env={"MIXTRAIN_FAULT": point})
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err[-2000:]
    step = int(point.split(":")[1])
    # never a checkpoint-N that is not whole
    assert not os.path.exists(tmp_path / f"checkpoint-{step}")
    if point.startswith("kill_in_save"):
        # the partial write, under its temporary name
        assert os.path.isdir(tmp_path / f".tmp-checkpoint-{step}")
    events = [(r["event"], r["step"]) for r in read_jsonl_safe(tmp_path / "metrics.jsonl")]
    assert ("eval", step) in events  # evaluated, then killed before the checkpoint was complete
    # eval.py sees only complete checkpoints
    evaluated = run_script("eval.py", tmp_path, "--num_workers", 0)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert {r["checkpoint"] for r in read_jsonl(tmp_path / "eval_results.jsonl")} == {
        f"checkpoint-{s}" for s in range(3, step, 3)}
    resume(small_data, tiny_vit, tmp_path)
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
    os.remove(tmp_path / "eval_results.jsonl")
    assert_same_as_reference(tmp_path, reference)


@pytest.mark.fault("sigterm")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_to_a_launch_sh_run_checkpoints_exits_0_and_resumes(
        small_data, tiny_vit, tmp_path, signum):
    """As Slurm does, the signal goes to every process of the job: launch.sh, torchrun, tee and both
    ranks."""
    env = {
        **{k: v
           for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
        "MODEL": tiny_vit,
        "TRAIN_DATA": f"{small_data['digits_train']} {small_data['faces_train']}", "VAL_DATA": "",
        "DATASETS": small_data["registry"], "CONFIG": "", "SAVE_CKPT_PATH": str(tmp_path),
        "MAKE_DEMO_DATA": "0", "GPUS_PER_NODE": "2", "MBS": "4", "GBS": "8", "NSTEP": "60",
        "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": "--num_workers 1 --logging_steps 1 --save_steps 1000"
    }
    # noqa: E731
    launch = lambda: subprocess.Popen([
        "bash", os.path.join(ROOT, "launch.sh")
    ], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    process = launch()
    wait_for_step(tmp_path, 3, process)
    sent = time.time()
    for pid in [process.pid, *descendants(process.pid)]:
        os.kill(pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0 and time.time() - sent < 30, out[-2000:] + err[-2000:]
    stopped = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.Signals(signum).name
    step = stopped[0]["step"]
    assert os.path.isfile(tmp_path / f"checkpoint-{step}" / "training_info.json")
    assert f"stopped by {signal.Signals(signum).name} after step {step}" in out
    assert "[rank0]" not in out + err and "[rank1]" not in out + err  # both ranks ended cleanly

    again = launch()  # the same command resumes from the checkpoint and finishes
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "--resume latest" in out, err[-2000:]
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 61))  # nothing lost, nothing repeated


def descendants(pid):
    """Every process below `pid` (from /proc), e.g. torchrun's ranks in their own session."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fault("non-finite")
def test_a_nan_loss_skips_the_step_and_training_goes_on(small_data, tiny_vit, tmp_path):
    process = start(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 6, "--skip_evaluation",
                   "--logging_steps", 1), env={"MIXTRAIN_FAULT": "nan_loss:3"})
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    log = read_jsonl(tmp_path / "metrics.jsonl")
    skipped = [r for r in log if r["event"] == "skipped_step"]
    assert [(r["step"], r["consecutive"])
            for r in skipped] == [(3, 1)] and "non-finite" in skipped[0]["reason"]
    weights = load_weights(tmp_path / "checkpoint-6")
    assert all(torch.isfinite(w).all() for w in weights.values())
    train_log = [r for r in log if r["event"] == "train"]
    # no NaN in the logged window
    assert all(r["train_overall_loss"] == r["train_overall_loss"] for r in train_log)


@pytest.mark.fault("non-finite")
def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(small_data, tiny_vit, tmp_path):
    process = start(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 10, "--skip_evaluation",
                   "--save_steps", 2, "--max_bad_steps", 2, "--ema_decay", 0.5),
        env={"MIXTRAIN_FAULT": "nan_loss:5,nan_loss:6,nan_loss:7"})
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert ("3 optimizer steps in a row had non-finite gradients (up to step 7; "
            "--max_bad_steps 2)") in err
    assert "the last good checkpoint is" in err and "checkpoint-6" in err
    # checkpoint-6 holds the weights of step 4 (steps 5 and 6 were skipped): whole and loadable;
    # a skipped step does not update the EMA either
    for weights in ("", "ema"):
        a, b = (load_weights(tmp_path / f"checkpoint-{n}" / weights) for n in (4, 6))
        assert all(torch.equal(a[k], b[k]) for k in a), weights


@pytest.mark.fault("disk full")
def test_a_full_disk_while_saving_leaves_earlier_checkpoints_and_nothing_partial(
        small_data, tiny_vit, tmp_path, two_steps):
    two_steps(tmp_path)
    before = load_weights(tmp_path / "checkpoint-2")
    limit = os.path.getsize(tmp_path / "checkpoint-2" / "model.safetensors") // 2

    # every file this process writes is cut at `limit` bytes: EFBIG, like a full disk
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"), *train_args(small_data, tiny_vit, tmp_path, "--max_steps",
                                                    4, "--skip_evaluation", "--resume", "latest",
                                                    "--allow_changed_flags")
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                            preexec_fn=small_files,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr[result.stderr.index("error: "):]  # one line: no torch exception text
    assert error.count("\n") == 1 and "CheckpointException" not in error, error
    assert f"cannot write {tmp_path / 'checkpoint-4'}" in error
    assert "earlier checkpoints are intact" in error
    assert sorted(n for n in os.listdir(tmp_path) if "checkpoint" in n) == ["checkpoint-2"]
    after = load_weights(tmp_path / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.fault("corrupt checkpoint")
@pytest.mark.parametrize("victim",
                         ["model.safetensors", "state", "trainer_state.pt", "training_info.json"])
def test_a_truncated_checkpoint_is_a_clear_error(small_data, tiny_vit, tmp_path, two_steps,
                                                victim):
    two_steps(tmp_path)
    folder = tmp_path / "checkpoint-2"
    path = folder / victim
    if victim == "state":
        path = path / sorted(os.listdir(path))[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    if victim == "model.safetensors":
        result = run_script("eval.py", folder, "--num_workers", 0)
        expected = f"{folder}: cannot load the model weights"
    else:
        result = run_script(
            "train.py",
            *train_args(small_data, tiny_vit, tmp_path, "--max_steps", 4, "--resume", "latest",
                        "--allow_changed_flags"))
        expected = str(path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.fault("corrupt checkpoint")
@pytest.mark.parametrize("case", ["truncated EMA shard", "another model with EMA", "label space"])
def test_a_resume_that_cannot_load_is_one_line_naming_the_file(small_data, tiny_vit, tmp_path,
                                                               two_steps, case):
    ema = ["--ema_decay", 0.5] if "EMA" in case else []
    common = ["--max_steps", 2, "--skip_evaluation", *ema]
    two_steps(tmp_path, ema=bool(ema))
    folder = tmp_path / "checkpoint-2"
    if case == "truncated EMA shard":
        shard = next(folder / "ema_state" / n for n in sorted(os.listdir(folder / "ema_state"))
                     if n.endswith(".safetensors"))
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 100)
        extra, expected = [], f"{shard}: truncated"
    elif case == "another model with EMA":  # 32 px: position embeddings of another shape
        other = save_tiny_vit(tmp_path / "vit_32px", image_size=32)
        extra = ["--model", other, "--allow_changed_flags"]
        expected = f"{folder / 'ema_state'} does not fit"
    else:  # a head of 12 rows instead of 10: refused before the saved state would not fit it
        extra = ["--label_space", "disjoint", "--allow_changed_flags"]
        expected = (f"--label_space disjoint does not match the saved head ("
                    f"{folder / 'classifier.json'}: label_space shared)")
    result = run_script("train.py", *train_args(small_data, tiny_vit, tmp_path, *common, *extra,
                                                "--resume", "latest"))
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr[result.stderr.index("error: "):]
    assert error.count("\n") == 1 and expected in error and "Traceback" not in result.stderr, error


@pytest.mark.fault("corrupt image")
def test_a_corrupt_image_stops_with_a_checkpoint_or_is_skipped_and_counted(
        small_data, tiny_vit, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = read_jsonl(small_data["digits_train"])
    rows[20]["image_path"] = str(tmp_path / "broken.png")  # in the third batch of 8, --no_shuffle
    data = {**small_data, "digits_train": write_jsonl(tmp_path / "digits_train.jsonl", rows)}
    common = [
        "--max_steps", 5, "--skip_evaluation", "--no_shuffle", "--num_workers", 1,
        "--logging_steps", 1
    ]
    stop = run_script("train.py", *train_args(data, tiny_vit, tmp_path / "stop", *common))
    assert stop.returncode == 2 and "digits_train.jsonl:21: cannot decode image" in stop.stderr
    assert "checkpoint-2 holds the last completed step" in stop.stderr
    assert os.path.isfile(tmp_path / "stop" / "checkpoint-2" / "training_info.json")

    skip = run_script(
        "train.py", *train_args(data, tiny_vit, tmp_path / "skip", *common, "--on_bad_image",
                                "skip"))
    assert skip.returncode == 0, skip.stderr[-2000:]
    with open(tmp_path / "skip" / "run_summary.json") as f:
        assert json.load(f)["skipped_images"] == {"digits": 1, "faces": 0}
    log = read_jsonl(tmp_path / "skip" / "metrics.jsonl")
    # the batch went on without it
    assert [r["train_overall_samples"] for r in log if r["event"] == "train"][2] == 7


@pytest.mark.fault("unpickling")
def test_resume_and_eval_never_unpickle(small_data, tiny_vit, tmp_path, monkeypatch):
    train.main(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--skip_evaluation",
                   "--num_workers", 0))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used to read a file")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    train.main(
        train_args(small_data, tiny_vit, tmp_path, "--max_steps", 4, "--resume", "latest",
                   "--num_workers", 0, "--allow_changed_flags"))
    import eval as eval_script
    eval_script.main([str(tmp_path), "--num_workers", "0"])
    assert {r["checkpoint"]
            for r in read_jsonl(tmp_path / "eval_results.jsonl")
            } == {"checkpoint-2", "checkpoint-4"}


@pytest.mark.fault("remote code")
def test_a_model_folder_with_its_own_code_is_refused_unless_trusted(small_data, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "config.json").write_text(json.dumps({"model_type": "my-vit", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModel": "modeling_my.MyModel"}}))
    (folder / "configuration_my.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'my-vit'\n")
    result = run_script("train.py",
                        *train_args(small_data, str(folder), tmp_path / "out", "--max_steps", 1))
    assert result.returncode == 2 and "trust_remote_code" in result.stderr
    assert not marker.exists()


@pytest.mark.fault("non-finite")
def test_a_fused_optimizer_skips_bad_steps_on_the_device_and_counts_them_alike(
        small_data, tiny_vit, tmp_path, monkeypatch, capsys):
    """A fused AdamW (what GPUs and CPUs get) is told of a non-finite gradient norm on the device,
    with no host sync in the step; the steps are counted later, as the synchronous path (an AdamW
    that is not fused) counts them: the same skipped_step records, train records and stop."""
    monkeypatch.setenv("MIXTRAIN_FAULT", "nan_loss:2,nan_loss:5,nan_loss:6,nan_loss:7")
    argv = ["--max_steps", 10, "--skip_evaluation", "--logging_steps", 3, "--save_steps", 4,
            "--max_bad_steps", 2]
    errors, logs = {}, {}
    adamw, asked = torch.optim.AdamW, []
    for name in ("synced", "fused"):
        monkeypatch.setattr(torch.optim, "AdamW", lambda params, fused, **kw: asked.append(
            fused) or adamw(params, **kw, fused=fused and name == "fused"))
        with pytest.raises(SystemExit) as e:
            train.main(train_args(small_data, tiny_vit, tmp_path / name, *argv))
        assert e.value.code == 2
        errors[name] = capsys.readouterr().err.strip().splitlines()[-1]
        logs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    assert asked == [True, True]  # train.py asks for a fused AdamW on the CPU as on a GPU
    assert errors["fused"] == errors["synced"].replace("/synced/", "/fused/")
    assert "(up to step 7; --max_bad_steps 2)" in errors["fused"] and "checkpoint-4" in errors[
        "fused"]
    for a, b in zip(logs["synced"], logs["fused"], strict=True):
        assert (a["event"], a["step"]) == (b["event"], b["step"])
        for key in ("consecutive", "train_overall_samples"):
            assert a.get(key) == b.get(key), (a["event"], a["step"], key)
        for key in ("train_overall_loss", "grad_norm"):  # fused and foreach AdamW round apart
            assert (key in a) == (key in b), (a["event"], a["step"], key)
            if key in a:  # a number on both sides (pytest.approx takes no None)
                assert a[key] == pytest.approx(b[key], rel=1e-3, nan_ok=True), key
    assert [(r["step"], r["consecutive"]) for r in logs["fused"] if r["event"] == "skipped_step"
            ] == [(2, 1), (5, 1), (6, 2), (7, 3)]
