"""The evaluation cache and the one model of eval.py: the same metrics with and without them, in
one process and in two (gloo); the partial evaluation of training too."""
import pytest

import eval as eval_script
import train
from conftest import TIMING, read_jsonl, run_script, train_args

CHECKPOINTS = ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
# what two runs log differently beside the metrics: timing, memory, their folder
UNLIKE = ("time", *TIMING, "checkpoint")


@pytest.fixture(scope="module")
def run_dir(small_data, tiny_vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(train_args(small_data, tiny_vit, out, "--max_steps", 6, "--save_steps", 2,
                          "--skip_evaluation"))
    return out


def evaluations(run_dir, argv, torchrun=0, target=None):
    """eval_* metrics per checkpoint of one eval.py call over the run, or over one checkpoint
    `target` of it (all evaluated again)."""
    before = len(results(run_dir))
    target = target or run_dir
    if torchrun:
        result = run_script("eval.py", target, "--force", "--num_workers", 0, *argv,
                            torchrun=torchrun)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        eval_script.main([str(target), "--force", "--num_workers", "0", *map(str, argv)])
    return {r["checkpoint"]: {k: v for k, v in r.items() if k.startswith("eval_")}
            for r in results(run_dir)[before:]}


def results(run_dir):
    path = run_dir / "eval_results.jsonl"
    return read_jsonl(path) if path.exists() else []


def assert_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            if key.endswith(("_samples", "_correct")):
                assert a[name][key] == b[name][key], (name, key)
            else:
                assert a[name][key] == pytest.approx(b[name][key], rel=1e-5), (name, key)


def test_one_process_same_metrics_with_the_cache_without_it_and_over_its_limit(run_dir, capsys):
    cached = evaluations(run_dir, [])
    assert "evaluation cache: 31 samples" in capsys.readouterr().out
    assert list(cached) == CHECKPOINTS
    assert evaluations(run_dir, ["--eval_cache_mb", 0]) == cached
    assert evaluations(run_dir, ["--eval_cache_mb", 0.001]) == cached  # 1 KB: 31 images do not fit
    assert "over --eval_cache_mb 0.001" in capsys.readouterr().out
    # the one model read checkpoint by checkpoint equals a model built for a checkpoint alone
    for name in CHECKPOINTS:
        alone = evaluations(run_dir, [], target=run_dir / name)
        assert alone == {name: cached[name]}


def test_two_processes_same_metrics_with_and_without_the_cache(run_dir):
    one = evaluations(run_dir, ["--eval_cache_mb", 0])
    assert_close(evaluations(run_dir, ["--batch_size", 4], torchrun=2), one)
    # FSDP2: checkpoints after the first are read shard by shard into the sharded model
    assert_close(evaluations(run_dir, ["--dist", "fsdp", "--eval_cache_mb", 0], torchrun=2), one)


def test_partial_evaluation_during_training_same_with_and_without_the_cache(
        small_data, tiny_vit, tmp_path, capsys):
    logs = {}
    for name, limit in [("cached", 2048), ("streamed", 0)]:
        train.main(train_args(small_data, tiny_vit, tmp_path / name, "--max_steps", 4,
                              "--eval_steps", 1, "--save_steps", 4, "--eval_cache_mb", limit))
        logs[name] = [{k: v for k, v in r.items() if k not in UNLIKE}
                      for r in read_jsonl(tmp_path / name / "metrics.jsonl")
                      if r["event"] in ("eval", "train", "final_eval")]
    assert capsys.readouterr().out.count("evaluation cache: 20 samples") == 1  # filled once
    assert [r["event"] for r in logs["cached"]].count("eval") == 4
    assert logs["cached"] == logs["streamed"]
