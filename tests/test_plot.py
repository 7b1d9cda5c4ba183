"""plot.py: PNG curves of a classification and a generation run, read back with Pillow."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, run_script

pytest.importorskip("matplotlib")


def write_records(path, records, torn=None):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write(torn)  # a record half-written by a run still going


def classify_run(folder):
    train = [{"event": "train", "step": s, "epoch": s / 40, "train_digits_loss": 2 / s,
              "train_digits_accuracy": 1 - 1 / s, "train_faces_loss": 1 / s,
              "train_faces_accuracy": 1 - 0.5 / s, "train_overall_loss": 1.8 / s,
              "train_overall_accuracy": 1 - 0.9 / s, "train_digits_top5_accuracy": 1.0,
              "lr": 1e-3 * s / 100, "grad_norm": 3 / s, "samples_per_second": 500.0 + s}
             for s in range(10, 101, 10)]
    evals = [{"event": "eval", "step": s, "epoch": s / 40, "eval_digits_accuracy": a,
              "eval_faces_accuracy": a - 0.1, "eval_overall_accuracy": a - 0.05,
              "eval_digits_loss": 1 - a, "eval_faces_loss": 1.1 - a, "eval_overall_loss": 1 - a}
             for s, a in [(50, 0.8), (100, 0.9)]]
    best = {"event": "best", "step": 100, "epoch": 2.5, "best_model_step": 100,
            "best_overall_accuracy": 0.85, "best_checkpoint": "x/checkpoint-100"}
    write_records(folder / "metrics.jsonl",
                  [{"event": "config", "step": 0, "epoch": 0.0, "overrides": []}] + train[:5]
                  + evals[:1] + train[5:] + evals[1:] + [best], torn='{"event": "train", "st')
    write_records(folder / "eval_results.jsonl",
                  [{"checkpoint": f"checkpoint-{s}", "step": s, "eval_digits_accuracy": a,
                    "eval_faces_accuracy": a, "eval_overall_accuracy": a}
                   for s, a in [(50, 0.85), (100, 0.95)]])


def generate_run(folder):
    train = [{"event": "train", "step": s, "epoch": s / 40, "train_text_loss": 5 / s,
              "train_image_loss": 1 / s, "train_total_loss": 6 / s, "lr": 1e-4,
              "grad_norm": 1.0, "samples_per_second": 50.0} for s in range(5, 51, 5)]
    evals = [{"event": "eval", "step": 50, "epoch": 1.0, "eval_text_loss": 0.5,
              "eval_image_loss": 0.2, "eval_total_loss": 0.7}]
    write_records(folder / "metrics.jsonl", train + evals)


def autoencoder_run(folder):
    """Records as --task autoencoder writes them: loss, recon_loss, kl, psnr per dataset."""
    def values(prefix, s):
        return {f"{prefix}_{n}_{m}": v for n in ("digits", "faces", "overall")
                for m, v in (("loss", 1 / s), ("recon_loss", 0.9 / s), ("kl", 2.0),
                             ("psnr", 10 + s / 5), ("samples", 8))}
    train = [{"event": "train", "step": s, "epoch": s / 40, **values("train", s), "lr": 1e-3,
              "grad_norm": 1.0, "samples_per_second": 100.0} for s in range(10, 101, 10)]
    evals = [{"event": "eval", "step": s, "epoch": s / 40, **values("eval", s)} for s in (50, 100)]
    write_records(folder / "metrics.jsonl", train + evals)
    write_records(folder / "eval_results.jsonl", [{"checkpoint": f"checkpoint-{s}", "step": s,
                                                    **values("eval", s)} for s in (50, 100)])


def check_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 600)
        low, high = image.convert("L").getextrema()
        assert high - low > 100  # something drawn on the white background


def assert_plotted(run_dir, names):
    """plot.py on `run_dir` writes exactly these curves, each a PNG with something drawn."""
    result = run_script("plot.py", run_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(
        n + ".png" for n in names)
    for name in names:
        check_png(run_dir / "plots" / f"{name}.png")


def test_classification_run(tmp_path):
    classify_run(tmp_path)
    assert_plotted(tmp_path, ["train_loss", "train_accuracy", "eval_accuracy", "eval_loss",
                              "checkpoint_accuracy", "lr", "grad_norm", "throughput"])


def test_generation_run(tmp_path):
    from plot import plot_run
    generate_run(tmp_path)
    written = plot_run(str(tmp_path), smoothing=0.5)
    assert sorted(p.rsplit("/", 1)[1] for p in written) == sorted([
        "train_generation_loss.png", "eval_generation_loss.png", "lr.png", "grad_norm.png",
        "throughput.png"])
    for path in written:
        check_png(path)


def test_smoothing_is_a_debiased_moving_average():
    from plot import smooth
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_missing_matplotlib_is_a_clear_message(tmp_path):
    classify_run(tmp_path)
    code = ("import sys; sys.modules['matplotlib'] = None; import plot; "
            f"plot.main([{str(tmp_path)!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode != 0
    assert "pip install -e '.[plot]'" in result.stderr


def test_autoencoder_run_draws_its_loss_and_psnr_curves(tmp_path):
    autoencoder_run(tmp_path)
    assert_plotted(tmp_path, ["train_loss", "train_psnr", "eval_loss", "eval_psnr",
                              "checkpoint_psnr", "lr", "grad_norm", "throughput"])


def test_an_out_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    classify_run(tmp_path)
    (tmp_path / "taken").write_text("mine")
    result = run_script("plot.py", tmp_path, "--out_dir", tmp_path / "taken")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --out_dir {tmp_path / 'taken'}: is a file, not a "
                                     "folder")
    assert (tmp_path / "taken").read_text() == "mine"


def test_the_per_checkpoint_curve_is_of_full_evaluations_on_one_data():
    from plot import per_checkpoint
    records = [{"checkpoint": f"checkpoint-{s}", "step": s, "data_key": "val", "partial": False,
                "eval_overall_accuracy": a} for s, a in [(2, 0.4), (4, 0.5), (6, 0.6)]]
    records += [{"checkpoint": "checkpoint-4", "step": 4, "data_key": "subset", "partial": True,
                 "eval_overall_accuracy": 0.9},  # a later --partial evaluation of checkpoint-4
                {"checkpoint": "checkpoint-6/ema", "step": 6, "data_key": "val",
                 "partial": False, "eval_overall_accuracy": 0.7}]
    kept, left_out = per_checkpoint(records)
    assert [r["eval_overall_accuracy"] for r in kept] == [0.4, 0.5, 0.6] and left_out == 1
    other = {"checkpoint": "checkpoint-6", "step": 6, "data_key": "test", "partial": False,
             "eval_overall_accuracy": 0.3}  # the latest full evaluation, on other data
    kept, left_out = per_checkpoint(records + [other])
    assert kept == [other] and left_out == 4
