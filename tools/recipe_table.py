"""Final accuracy per dataset for each recipe setting, over several seeds: the README's table.

    python tools/recipe_table.py --data recipe_data --make_data          # demo + textures, once
    python tools/recipe_table.py --data recipe_data --suite demo --seeds 0 1 2
    python tools/recipe_table.py --data recipe_data --suite hard --seeds 0 1 2

Each (setting, seed) is one `python train.py --config configs/demo.yaml ...` run from scratch
(preset:resnet-tiny) into OUT/SUITE/SETTING/seedN; runs that already wrote run_summary.json are
read, not repeated, so an interrupted table resumes. The figure is the final evaluation (all
validation samples) of the checkpoint the best metric chose, as a user gets it.

Suites: `demo` is the built-in demo (digits + faces); `hard` adds `textures`, a third dataset
with its own label space: 96x96 crops, at random scales, of 12 scikit-image photographs and
textures (class = source image), training crops from the left 70 % of each image and
validation crops from the right 30 %, so nothing a validation crop shows was seen in training.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
TEXTURE_SOURCES = ["astronaut", "brick", "camera", "coffee", "coins", "grass", "gravel",
                   "hubble_deep_field", "immunohistochemistry", "moon", "rocket", "retina"]
# EMA decay for runs of a few hundred steps (0.9998 averages over ~5,000 steps).
SETTINGS = {
    "none": ["--augment", "none"],
    "crop_flip": ["--augment", "crop_flip"],
    "randaugment": ["--augment", "randaugment"],
    "crop_flip + EMA": ["--augment", "crop_flip", "--ema_decay", "0.99",
                        "--best_metric", "ema_overall_accuracy"],
    "crop_flip + mixup/cutmix": ["--augment", "crop_flip", "--mixup", "0.8", "--cutmix", "1.0",
                                 "--mix_prob", "1.0"],
}


def make_textures(folder, per_class_train=60, per_class_val=25, size=96, seed=0):
    """Crops of the sources at random scales; train from the left 70 %, val from the right 30 %."""
    import skimage.data
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = {"train": [], "val": []}
    for label, name in enumerate(TEXTURE_SOURCES):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = image.size
        split_x = int(width * 0.7)
        for split, count, (x0, x1) in [("train", per_class_train, (0, split_x)),
                                       ("val", per_class_val, (split_x, width))]:
            for i in range(count):
                side = rng.randint(min(64, x1 - x0, height), min(x1 - x0, height, 256))
                x = rng.randint(x0, x1 - side)
                y = rng.randint(0, height - side)
                crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
                path = f"images/{name}_{split}_{i:03d}.jpg"
                crop.save(os.path.join(folder, path), quality=90)
                rows[split].append({"image_path": path, "label": label,
                                    "dataset_name": "textures"})
    for split, records in rows.items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def make_data(out):
    from demo import make_demo
    make_demo(out)
    make_textures(os.path.join(out, "textures"))
    with open(os.path.join(out, "datasets.json")) as f:
        registry = json.load(f)
    registry["textures"] = {"num_classes": len(TEXTURE_SOURCES), "eval_ratio": 1.0,
                            "description": "crops of 12 scikit-image photographs and textures"}
    with open(os.path.join(out, "datasets_hard.json"), "w") as f:
        json.dump(registry, f, indent=2)
    print(f"textures written to {out}/textures ({len(TEXTURE_SOURCES)} classes)")


def suite_flags(data, suite):
    names = ["digits", "faces"] + (["textures"] if suite == "hard" else [])
    registry = "datasets_hard.json" if suite == "hard" else "datasets.json"
    return ["--datasets", os.path.join(data, registry),
            "--train_jsonl", *[os.path.join(data, n, "train.jsonl") for n in names],
            "--val_jsonl", *[os.path.join(data, n, "val.jsonl") for n in names]], names


def run_one(folder, flags, seed, extra):
    summary = os.path.join(folder, "run_summary.json")
    if not os.path.isfile(summary):
        command = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
                   os.path.join(ROOT, "configs", "demo.yaml"), *flags, "--seed", str(seed),
                   "--output_dir", folder, "--overwrite", *extra]
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        print(f"  {folder}: {time.time() - start:.0f} s", flush=True)
    with open(summary) as f:
        return json.load(f)["final_eval"]


def spread(values):
    mean = statistics.mean(values)
    return f"{100 * mean:.1f} ± {100 * statistics.pstdev(values):.1f}" if len(values) > 1 else \
        f"{100 * mean:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="recipe_data", help="demo + textures data folder")
    p.add_argument("--make_data", action="store_true", help="write --data first")
    p.add_argument("--suite", choices=["demo", "hard"], default="demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--epochs", type=int, default=10)
    args, extra = p.parse_known_args()
    if args.make_data:
        make_data(args.data)
    flags, names = suite_flags(args.data, args.suite)
    flags += ["--epochs", str(args.epochs), "--num_workers", "0", "--logging_steps", "1000"]
    table = {}
    for setting in args.settings:
        results = [run_one(os.path.join(args.out, args.suite, setting.replace(" ", ""),
                                        f"seed{seed}"), flags + SETTINGS[setting], seed, extra)
                   for seed in args.seeds]
        table[setting] = {n: [r[f"final_eval_{n}_accuracy"] for r in results]
                          for n in names + ["overall"]}
    print(f"\nsuite {args.suite}: final accuracy (%), mean ± std over seeds {args.seeds}, "
          f"{args.epochs} epochs from scratch, preset:resnet-tiny")
    print("| setting | " + " | ".join(names + ["overall"]) + " |")
    print("|---" * (len(names) + 2) + "|")
    for setting, columns in table.items():
        print(f"| {setting} | " + " | ".join(spread(v) for v in columns.values()) + " |")


if __name__ == "__main__":
    main()
