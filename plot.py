"""Plot a run's curves as PNG files: python plot.py RUN_DIR [--out_dir DIR] [--smoothing 0.9]

Reads RUN_DIR/metrics.jsonl (and RUN_DIR/eval_results.jsonl when eval.py has written it) and
writes into RUN_DIR/plots/:
  classification runs     train_loss.png, train_accuracy.png (per dataset and overall, raw and
                          smoothed), eval_accuracy.png, eval_loss.png (partial evaluations
                          during training, best step marked), checkpoint_accuracy.png (eval.py)
  generation runs         train_generation_loss.png, eval_generation_loss.png (text, image,
                          total), checkpoint_loss.png (eval.py)
  autoencoder runs        train_loss.png, train_psnr.png (per dataset and overall, raw and
                          smoothed), eval_loss.png, eval_psnr.png (best step marked),
                          checkpoint_psnr.png (eval.py)
  every run               lr.png, grad_norm.png, throughput.png
A run still going can be plotted: a line torn by a write in progress is skipped. Each PNG is
written under a temporary name and renamed into place. Needs matplotlib
(`pip install -e '.[plot]'`); each figure is 1000 x 600 pixels.
"""
import argparse
import os
import re
import sys

from files import (METRICS_FILE, RESULTS_FILE, OutputError, read_jsonl_records, reason,
                   write_file)

FIGSIZE, DPI = (10, 6), 100  # 1000 x 600 pixels
GENERATION_LOSSES = ("text_loss", "image_loss", "total_loss")


def smooth(values, weight):
    """Exponential moving average with TensorBoard's bias correction (weight 0: the raw values)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)) if weight else value)
    return out


def series(records, key):
    """(steps, values) of `key` over records that hold a number for it."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def dataset_names(records, prefix, metric="accuracy"):
    """Datasets in records' `{prefix}_{name}_{metric}` keys, in first-seen order, overall last."""
    names = {}
    for r in records:
        for key in r:
            m = re.fullmatch(rf"{prefix}_(.+)_{metric}", key)
            if m and not m.group(1).endswith("_top5"):
                names[m.group(1)] = None
    names = [n for n in names if n != "overall"]
    return names + (["overall"] if any(f"{prefix}_overall_{metric}" in r for r in records)
                    else [])


def draw(plt, path, title, ylabel, curves, smoothing=0.0, best_step=None, markers=False):
    """One figure: curves {label: (steps, values)}; raw values faint and smoothed on top when
    smoothing > 0; a dashed vertical line at best_step. Returns path, or None with no data."""
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for i, (label, (steps, values)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        style = dict(marker="o", markersize=4) if markers else {}
        if smoothing:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            ax.plot(steps, smooth(values, smoothing), color=color, label=label, linewidth=2)
        else:
            ax.plot(steps, values, color=color, label=label, linewidth=2, **style)
    if best_step is not None:
        ax.axvline(best_step, color="black", linestyle="--", linewidth=1,
                   label=f"best (step {best_step})")
    ax.set_title(title + (f" (raw faint, smoothed {smoothing:g})" if smoothing else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, format="png"), "--out_dir")
    finally:
        plt.close(fig)
    return path


def per_checkpoint(records):
    """(eval.py's latest record of each checkpoint, how many records were left out): full
    evaluations (not --partial) on the data of the latest one, the trained weights (not the EMA
    model's): one curve compares checkpoints on one set of samples."""
    trained = [r for r in records if not str(r.get("checkpoint", "")).endswith("/ema")]
    full = [r for r in trained if not r.get("partial")]
    key = full[-1].get("data_key") if full else None
    by_step = {r.get("step"): r for r in full if r.get("data_key") == key}
    kept = [by_step[s] for s in sorted(s for s in by_step if s is not None)]
    return kept, sum(1 for r in trained if r.get("partial") or r.get("data_key") != key)


def plot_run(run_dir, out_dir=None, smoothing=0.9):
    """Write the run's PNGs; returns their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install -e '.[plot]'") from None
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    records = read_jsonl_records(metrics_path)  # a torn last line is skipped
    checkpoints = read_jsonl_records(os.path.join(run_dir, RESULTS_FILE))
    if not records and not checkpoints:
        raise ValueError(f"{run_dir}: no metrics.jsonl or eval_results.jsonl records to plot")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"--out_dir {out_dir}: is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out_dir {out_dir}: cannot create it ({reason(e)})") from None
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    bests = [r for r in records if r.get("event") == "best" and "best_model_step" in r]
    best_step = bests[-1]["best_model_step"] if bests else None
    checkpoints, left_out = per_checkpoint(checkpoints)
    if left_out:
        print(f"note: {left_out} eval.py record(s) of partial evaluations or of other data than "
              "its latest full evaluation are not in the per-checkpoint curves")
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    written = []
    generation = any("train_text_loss" in r or "eval_text_loss" in r for r in records + checkpoints)
    autoencoder = any(k.endswith("_overall_psnr") for r in records + checkpoints for k in r)
    if autoencoder:
        for metric in ("loss", "psnr"):
            names = dataset_names(train, "train", "psnr")
            curves = {n: series(train, f"train_{n}_{metric}") for n in names}
            written.append(draw(plt, path(f"train_{metric}.png"), f"training {metric}",
                                "PSNR (dB)" if metric == "psnr" else metric, curves, smoothing))
            names = dataset_names(evals, "eval", "psnr")
            curves = {n: series(evals, f"eval_{n}_{metric}") for n in names}
            written.append(draw(plt, path(f"eval_{metric}.png"), f"partial evaluation {metric}",
                                "PSNR (dB)" if metric == "psnr" else metric, curves,
                                best_step=best_step, markers=True))
        names = dataset_names(checkpoints, "eval", "psnr")
        curves = {n: series(checkpoints, f"eval_{n}_psnr") for n in names}
        written.append(draw(plt, path("checkpoint_psnr.png"), "PSNR per checkpoint (eval.py)",
                            "PSNR (dB)", curves, markers=True))
    elif generation:
        loss = {k: series(train, f"train_{k}") for k in GENERATION_LOSSES}
        written.append(draw(plt, path("train_generation_loss.png"), "training loss", "loss",
                            loss, smoothing))
        loss = {k: series(evals, f"eval_{k}") for k in GENERATION_LOSSES}
        written.append(draw(plt, path("eval_generation_loss.png"), "evaluation loss during "
                            "training", "loss", loss, best_step=best_step, markers=True))
        loss = {k: series(checkpoints, f"eval_{k}") for k in GENERATION_LOSSES}
        written.append(draw(plt, path("checkpoint_loss.png"), "loss per checkpoint (eval.py)",
                            "loss", loss, markers=True))
    else:
        names = dataset_names(train, "train")
        for metric in ("loss", "accuracy"):
            curves = {n: series(train, f"train_{n}_{metric}") for n in names}
            written.append(draw(plt, path(f"train_{metric}.png"), f"training {metric}", metric,
                                curves, smoothing))
        names = dataset_names(evals, "eval")
        for metric in ("accuracy", "loss"):
            curves = {n: series(evals, f"eval_{n}_{metric}") for n in names}
            written.append(draw(plt, path(f"eval_{metric}.png"), f"partial evaluation {metric}",
                                metric, curves, best_step=best_step, markers=True))
        names = dataset_names(checkpoints, "eval")
        curves = {n: series(checkpoints, f"eval_{n}_accuracy") for n in names}
        written.append(draw(plt, path("checkpoint_accuracy.png"), "accuracy per checkpoint "
                            "(eval.py)", "accuracy", curves, markers=True))
    for key, title in (("lr", "learning rate"), ("grad_norm", "gradient norm"),
                       ("samples_per_second", "throughput (samples per second)")):
        name = "throughput.png" if key == "samples_per_second" else f"{key}.png"
        written.append(draw(plt, path(name), title, key, {key: series(train, key)},
                            smoothing if key != "lr" else 0.0))
    return [p for p in written if p]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    p.add_argument("--out_dir", help="where the PNGs go (default: RUN_DIR/plots)")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="moving-average weight of the smoothed training curves, in [0, 1) "
                   "(default: 0.9)")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.smoothing < 1:
            raise ValueError(f"--smoothing {args.smoothing}: must be in [0, 1)")
        if not os.path.isdir(args.run_dir):
            raise ValueError(f"{args.run_dir}: no such folder")
        written = plot_run(args.run_dir, args.out_dir, args.smoothing)
    except ValueError as e:  # user errors, as in train.py and eval.py: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
