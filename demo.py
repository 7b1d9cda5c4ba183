"""The built-in demo data: scikit-learn's digits and scikit-image's faces written as PNG files
with JSONL records, an image folder, Parquet files or WebDataset shards, with their registry.

    python dataset.py --make-demo DIR   # writes the built-in demo (digits + faces PNGs, JSONL,
    registry)
    python dataset.py --make-demo DIR --format folder|parquet|wds   # the same in another layout
"""
import argparse
import io
import json
import os
import random
import sys
import tarfile

import numpy as np
from PIL import Image

from files import reason

DEMO_FORMATS = ("jsonl", "folder", "parquet", "wds")
# Class names of the demo's folder, Parquet and WebDataset layouts; sorted, as an image folder's
# classes are, so that class i is the same in every layout.
DEMO_CLASSES = {"digits": [str(d) for d in range(10)], "faces": ["background", "face"]}
DEMO_SHARD_SIZE = 500  # samples per WebDataset shard


def make_demo(out_dir, seed=0, val_fraction=0.2, layout="jsonl"):
    """Write the built-in demo: scikit-learn's digits (10 classes) and scikit-image's lfw_subset
    (face / non-face), in one layout: PNG files with JSONL records (and the generator's records),
    an image folder per split, a Parquet file per split (an Image and a ClassLabel column,
    written by `datasets`) or WebDataset shards (KEY.png + KEY.cls). The same images, labels and
    split in each; a datasets.json registry beside them.

    Both ship inside their wheels, so nothing is downloaded.
    """
    try:
        from skimage.data import lfw_subset
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit(
            f"the demo needs scikit-learn and scikit-image: pip install -e '.[demo]' ({e})")
    if layout not in DEMO_FORMATS:
        raise SystemExit(f"--format must be one of {', '.join(DEMO_FORMATS)}, got {layout!r}")
    digits = load_digits()
    sources = {
        "digits": ((digits.images / 16.0 * 255).round().astype(np.uint8), digits.target.tolist(),
                   "scikit-learn handwritten digits, 8x8, 10 classes"),
        # lfw_subset: the first 100 images are faces, the next 100 are not.
        "faces": ((lfw_subset() * 255).round().astype(np.uint8), [1] * 100 + [0] * 100,
                  "scikit-image lfw_subset, 25x25, face (1) / non-face (0)"),
    }
    rng = random.Random(seed)
    registry, specs = {}, {"train": [], "val": []}
    for name, (images, labels, description) in sources.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        by_class = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        val = set()
        for members in by_class.values():  # stratified split
            val.update(rng.sample(members, round(len(members) * val_fraction)))
        splits = {split: [i for i in range(len(labels)) if (i in val) == (split == "val")]
                  for split in ("train", "val")}
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            pngs.append(buffer.getvalue())
        classes = DEMO_CLASSES[name]
        for split, members in splits.items():
            specs[split].append(write_demo_split(folder, split, members, pngs, labels, classes,
                                                 name, layout))
        if layout == "jsonl" and name == "digits":
            write_demo_generation(folder, splits, labels)
        # a folder or a ClassLabel gives the number of classes itself
        registry[name] = ({"num_classes": len(by_class)} if layout in ("jsonl", "wds") else {})
        registry[name]["description"] = description
        if layout == "wds":
            registry[name]["labels"] = classes
    registry["digits"]["eval_ratio"] = 0.5
    registry["digits"]["hflip"] = False  # a mirrored digit is another shape
    registry["faces"]["eval_ratio"] = 1.0
    with open(os.path.join(out_dir, "datasets.json"), "w") as f:
        json.dump(registry, f, indent=2)
    print(f"demo data ({layout}) written to {out_dir}: " +
          ", ".join(f"{n} ({len(s[1])} images)" for n, s in sources.items()) +
          f"\n  --train_data {' '.join(specs['train'])}\n  --val_data {' '.join(specs['val'])}"
          f"\n  --datasets {os.path.join(out_dir, 'datasets.json')}")


def write_demo_split(folder, split, members, pngs, labels, classes, name, layout):
    """One split of one demo dataset in `layout`; returns its data spec."""
    if layout == "jsonl":
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for i in members:
                rel = f"images/{i:05d}.png"
                with open(os.path.join(folder, rel), "wb") as image:
                    image.write(pngs[i])
                f.write(json.dumps({"image_path": rel, "label": int(labels[i]),
                                    "dataset_name": name}) + "\n")
        return os.path.join(folder, f"{split}.jsonl")
    if layout == "folder":
        for label in classes:
            os.makedirs(os.path.join(folder, split, label), exist_ok=True)
        for i in members:
            with open(os.path.join(folder, split, classes[labels[i]], f"{i:05d}.png"), "wb") as f:
                f.write(pngs[i])
        return f"{name}={os.path.join(folder, split)}"
    if layout == "parquet":
        import datasets
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=classes)})
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": pngs[i], "path": None} for i in members],
             "label": [int(labels[i]) for i in members]}, features=features)
        table.to_parquet(os.path.join(folder, f"{split}.parquet"))
        return f"{name}={os.path.join(folder, f'{split}.parquet')}"
    shards = range(0, len(members), DEMO_SHARD_SIZE)
    for k, start in enumerate(shards):
        with tarfile.open(os.path.join(folder, f"{split}-{k:03d}.tar"), "w") as tar:
            for i in members[start:start + DEMO_SHARD_SIZE]:
                for field, data in (("png", pngs[i]), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = len(shards) - 1
    return f"{name}={os.path.join(folder, split)}-" + (f"{{000..{last:03d}}}.tar" if last else
                                                       "000.tar")


def write_demo_generation(folder, splits, labels):
    """--task generate's records: each digit as text -> image and as image -> text."""
    for split, members in splits.items():
        with open(os.path.join(folder, f"generate_{split}.jsonl"), "w") as f:
            for i in members:
                text = f"a handwritten digit {labels[i]}"
                f.write(json.dumps({"text_prompt": text, "image_path": f"images/{i:05d}.png"}) +
                        "\n")
                f.write(json.dumps({"image_path": f"images/{i:05d}.png", "caption": text}) + "\n")


def main(argv=None):
    """`python dataset.py --make-demo DIR [--format F] [--seed S]`."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-demo", metavar="DIR", required=True,
                        help="write the demo data into DIR")
    parser.add_argument("--format", choices=DEMO_FORMATS, default="jsonl",
                        help="jsonl: PNG files and JSONL records; folder: an image folder per "
                             "split; parquet: a Parquet file per split (needs datasets); wds: "
                             "WebDataset shards")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        make_demo(args.make_demo, args.seed, layout=args.format)
    except OSError as e:  # a user-given folder that cannot be written: one line, exit code 2
        print(f"error: --make-demo {args.make_demo}: cannot write the demo ({reason(e)})",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
