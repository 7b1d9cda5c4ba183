"""Throughput and memory of one masked-classifier training step on a random-init Qwen2.5-VL,
or (with --data) images/s of one DataLoader worker on JPEG files, or (--eval_run) eval.py over
one checkpoint against several, or (--fsdp_memory) peak host memory per process under FSDP2.

    python tools/benchmark.py --shape qwen2_5_vl_3b --batch_size 8 --steps 10  # on a GPU
    python tools/benchmark.py --shape tiny --steps 3                           # CPU smoke run
    torchrun --nproc_per_node 8 tools/benchmark.py --shape qwen2_5_vl_3b --fsdp  # FSDP2
    python tools/benchmark.py --data /tmp/jpegs --make_jpegs 256               # the image path
    python tools/benchmark.py --sources /tmp/sources                           # files, tar, Parquet
    python tools/benchmark.py --data_path /tmp/dp --batch_size 32              # train.py vs Pillow
    python tools/benchmark.py --peer /tmp/peer --batch_size 32                 # vs plain PyTorch
    python tools/benchmark.py --record_memory 10000000                         # a 10M record table
    python tools/benchmark.py --eval_run runs/demo --checkpoints 5             # eval.py: 5 vs 1
    python tools/benchmark.py --fsdp_memory /tmp/vit_huge                      # 2, 4 ranks vs 1
    python tools/benchmark.py --fingerprint /tmp/fp --files 10000000           # resume's check

--eval_run: wall time of eval.py processes over the run's first checkpoint, over its first
--checkpoints with the evaluation cache, and without it (--eval_cache_mb 0); the ratio to one.
--fsdp_memory: peak private memory (RssAnon) and resident memory of each process over train.py's
phases (load the folder, one step, write a checkpoint; resume from it) and eval.py on the
checkpoint, one process against 2 and 4 gloo processes with --dist fsdp; an empty or absent
folder first gets a ViT-H/14-shaped model (632M parameters, random init, fp32).

--sources: images/s of one worker on the same 224 px JPEGs as loose files, WebDataset shards and
Parquet, read by index in a shuffled order through the fast path (data/), and the time to
read their records the first time (shard index, Parquet -> Arrow) and again (cached).

--data_path: train.py (a tiny ViT/32 at 224 px, one worker, no evaluation) with --augment none and
crop_flip, each next to a plain Pillow loop on one core doing the same decode and resize and to
train.py's loader alone (no model); the images/s of each and their ratios (benchmark_data_path).

--peer: train.py on a ViT-Ti/16 (random init, 448 JPEGs, one worker, no augmentation, fp32)
against the same training in plain PyTorch and, with --timm_python PYTHON --timm_train FILE,
timm's train.py and train.py itself run by another environment's Python (timm's torch);
alternated, images/s and the ratios (benchmark_peer).

--data: the same JPEG files through the processor path (ViTImageProcessorPil at 224, float32
batches) and through the fast path (uint8 batches, preprocess.py) without and with draft, with
crop_flip and with randaugment; one worker, batches of --batch_size. --make_jpegs N first
writes N photographs of 384-512 px per side (scikit-image's astronaut, coffee and chelsea,
randomly cropped, scaled and flipped, quality 90) into an empty DIR.

Builds the backbone from config values (the 3B shape is Qwen2.5-VL-3B-Instruct's config.json),
so nothing is downloaded, and times the same step train.py takes: bf16 weights and autocast,
activation checkpointing, forward through MaskedClassifier with masked logits, backward, AdamW.
Each sample is one image of --image_size x --image_size pixels plus a chat-style prompt. Prints
tokens/s, images/s, peak memory and MFU (model FLOPs = 6 x parameters x tokens for the language
model and the vision tower, attention excluded; peak from --peak_tflops or the GPU's name).
"""
import argparse
import math
import os
import sys
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
sys.path.insert(0, ROOT)  # the project's modules sit at its top level

from backbone import (ATTN_IMPLEMENTATIONS, check_attn_implementation,  # noqa: E402
                      enable_activation_checkpointing)
from losses import masked_cross_entropy  # noqa: E402
from model import MaskedClassifier, mask_logits  # noqa: E402

SHAPES = {
    "qwen2_5_vl_3b": dict(
        text=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
            tie_word_embeddings=True, rope_parameters={
                "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6
            }), vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31],
                            window_size=112, hidden_act="silu")),
    "tiny": dict(
        text=dict(
            vocab_size=1000, bos_token_id=0, eos_token_id=0, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 1e4}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1], window_size=56),
        tokens=dict(vision_start_token_id=1, vision_end_token_id=2, image_token_id=3,
                    video_token_id=4)),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
PROMPT_TOKENS = 30  # system turn + "Classify this food101 image." + assistant turn, roughly


def user_error(message):
    """A user error, as in every script: one line, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_batch(config, batch_size, image_size, num_classes, device):
    """One image per sample: Qwen2-VL image processor output and input_ids with its placeholders."""
    from transformers import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(min_pixels=image_size ** 2, max_pixels=image_size ** 2)
    images = [
        Image.new("RGB", (image_size, image_size), (i * 37 % 256, 90, 160))
        for i in range(batch_size)
    ]
    vision = processor(images=images, return_tensors="pt")
    per_image = int(vision["image_grid_thw"][0].prod()) // processor.merge_size ** 2
    text = torch.randint(10, 1000, (batch_size, PROMPT_TOKENS))
    marker = lambda token_id: torch.full((batch_size, 1), token_id)  # noqa: E731
    input_ids = torch.cat([text[:, :5], marker(config.vision_start_token_id),
                           torch.full((batch_size, per_image), config.image_token_id),
                           marker(config.vision_end_token_id), text[:, 5:]], dim=1)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": (input_ids == config.image_token_id).long(), **vision}
    labels = torch.randint(0, num_classes, (batch_size,))
    return {k: v.to(device) for k, v in batch.items()}, labels.to(device), per_image


def make_jpegs(folder, count, seed=0, side=None):
    """count JPEGs of 384-512 px per side (side: side x side) from scikit-image's bundled
    photographs."""
    import numpy as np
    from skimage import data
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()),
               Image.fromarray(data.chelsea())]
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side, short_side = int(rng.integers(448, 513)), int(rng.integers(384, 513))
        size = (long_side, short_side) if cw >= ch else (short_side, long_side)
        size = (side, side) if side else size
        out = image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def loader_rate(loader):
    """images/s of a loader's batches after its first (which includes the worker's start)."""
    start, seen = None, 0
    for i, batch in enumerate(loader):
        if i == 1:
            start, seen = time.perf_counter(), 0
        seen += len(batch["labels"])
    return seen / (time.perf_counter() - start)


def benchmark_image_path(args):
    """images/s of one worker: processor path vs fast path on the same JPEG files."""
    from transformers import ViTImageProcessorPil

    from augment import augment_config
    from dataset import DatasetSpec, RecordTable, make_loader
    from backbone import ImageInputs
    if not os.path.isdir(args.data) or not os.listdir(args.data):
        make_jpegs(args.data, args.make_jpegs or 256)
    elif args.make_jpegs:
        print(f"--data {args.data} is not empty: using the files there")
    files = sorted(os.path.join(args.data, f) for f in os.listdir(args.data)
                   if f.lower().endswith((".jpg", ".jpeg")))
    if not files:
        user_error(f"--data {args.data}: no JPEG files (add --make_jpegs N)")
    records = RecordTable(files, [0] * len(files), [0] * len(files), ["bench"],
                          [0] * len(files), list(range(1, len(files) + 1)))
    inputs = ImageInputs(ViTImageProcessorPil(size={"height": 224, "width": 224}))
    registry = {"bench": DatasetSpec("bench", 1)}

    def images_per_second(**kwargs):
        return loader_rate(make_loader(records, range(len(files)), inputs, ["bench"],
                                       batch_size=args.batch_size, num_workers=1, **kwargs))

    modes = [("processor path (ViTImageProcessorPil, float32)", dict(fast_path=False)),
             ("fast path, exact (no draft)", dict(fast_path=True, draft=False)),
             ("fast path, draft", dict(fast_path=True, draft=True))]
    for mode in ("crop_flip", "randaugment"):
        config = augment_config(mode, registry, inputs)
        modes.append((f"fast path, {mode} (draft)", dict(fast_path=True, augment=config)))
    print(f"{len(files)} JPEGs in {args.data}, 224 px, batch {args.batch_size}, one worker, "
          f"{os.cpu_count()} CPUs; best of {args.rounds} interleaved rounds")
    rates = [0.0] * len(modes)
    for _ in range(args.rounds):  # interleaved, best of: other load on the machine hits all modes
        for i, (_, kwargs) in enumerate(modes):
            rates[i] = max(rates[i], images_per_second(**kwargs))
    for (name, _), rate in zip(modes, rates):
        print(f"{name:<50} {rate:8.1f} images/s  {rate / rates[0]:5.2f}x")


def benchmark_sources(args):
    """images/s of one worker on the same 224 px JPEGs kept as loose files (an image folder), in
    WebDataset shards and in Parquet, read by index in a shuffled order (as training reads them)
    through the fast image path; and the time of the first read (the shard index, the Parquet
    conversion) and of a later one (from their caches)."""
    import io
    import tarfile

    import numpy as np
    from transformers import ViTImageProcessorPil

    from backbone import ImageInputs
    from dataset import DatasetSpec, make_loader, read_records
    root = args.sources
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(root, "hf_cache"))
    folder = os.path.join(root, "files", "photo")
    if not os.path.isdir(folder):
        make_jpegs(folder, args.make_jpegs or 1024, side=224)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    shards, parquet = os.path.join(root, "shards"), os.path.join(root, "parquet")
    if not os.path.isdir(shards):
        os.makedirs(shards)
        for k in range(0, len(files), 256):
            with tarfile.open(os.path.join(shards, f"{k // 256:03d}.tar"), "w") as tar:
                for path in files[k:k + 256]:
                    key = os.path.splitext(os.path.basename(path))[0]
                    tar.add(path, f"{key}.jpg")
                    info = tarfile.TarInfo(f"{key}.cls")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"0"))
    if not os.path.isdir(parquet):
        import datasets
        os.makedirs(parquet)
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": open(p, "rb").read(), "path": None} for p in files],
             "label": [0] * len(files)},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value(
                "int64")}))
        table.to_parquet(os.path.join(parquet, "data.parquet"))
    kinds = [("loose files (an image folder)", f"bench=folder:{os.path.dirname(folder)}"),
             ("WebDataset shards (index of member offsets)", f"bench=wds:{shards}"),
             ("Parquet (datasets, memory-mapped Arrow)", f"bench=hf:{parquet}")]
    inputs = ImageInputs(ViTImageProcessorPil(size={"height": 224, "width": 224}))
    order = np.random.default_rng(0).permutation(len(files)).tolist()
    tables, reads = [], []
    for _, spec in kinds:
        times = []
        for _ in range(2):  # the first read builds the index / converts; the second reads those
            start = time.perf_counter()
            records = read_records([spec], {"bench": DatasetSpec("bench", 1)}, say=lambda m: None)
            times.append(time.perf_counter() - start)
        tables.append(records)
        reads.append(times)

    def images_per_second(records):
        return loader_rate(make_loader(records, order, inputs, ["bench"],
                                       batch_size=args.batch_size, num_workers=1,
                                       fast_path=True))

    print(f"{len(files)} JPEGs of 224 px, shuffled order, fast path (exact) to 224 px, batch "
          f"{args.batch_size}, one worker, {os.cpu_count()} CPUs; best of {args.rounds} "
          "interleaved rounds")
    rates = [0.0] * len(kinds)
    for _ in range(args.rounds):
        for i, records in enumerate(tables):
            rates[i] = max(rates[i], images_per_second(records))
    for (name, _), rate, (first, later) in zip(kinds, rates, reads):
        print(f"{name:<46} {rate:8.1f} images/s  {rate / rates[0]:5.2f}x   records read in "
              f"{first:6.2f} s first, {later:5.2f} s later")


DATA_PATH_STEPS, DATA_PATH_LOG = 70, 10  # train.py steps per run; samples/s logged every 10
# The stand-in model of --data_path: a ViT at 224 px with 32 px patches, whose step on one core
# (20 ms for 32 images on the 2-core CPU of docs/performance.md) is under half the decode of its
# batch (40-50 ms), so the run is bound by the data path it measures. With 16 px patches the step
# (45 ms) outlasts the decode and the ratio measured the model instead.
DATA_PATH_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=224, patch_size=32)
DATA_BOUND_WAIT = 0.3  # a data-bound run waits for its batches at least this share of its time
DATA_PATH_SEED = 42  # train.py's --seed (its default), which its crops are drawn from


def benchmark_data_path(args):
    """Data-bound training against plain Pillow on one core: images/s of real train.py runs (a
    tiny ViT at 224 px, DATA_PATH_VIT, batch --batch_size, one DataLoader worker, no
    evaluation) with --augment none (full decode + the processor's resize) and crop_flip (draft
    decode of the crop), each next to a single-process Pillow loop doing that decode and resize
    on the same JPEGs in this process (before and after the run; their geometric mean) and to
    train.py's loader alone (its worker's batches, no model), in interleaved rounds; the ratios
    are each round's, their median and range over --rounds. All three decode the same crops,
    train.py's own draws (its --seed, epoch 0), and the folder holds more images than the run
    takes, so that no epoch starts in its timed windows (a user's epoch is thousands of steps:
    at each start the worker waits while its prefetched batches drain). train.py's rate is
    samples_per_second of its metrics.jsonl after the first logged window (the worker's start and
    first batches). A run that waited for its batches less than DATA_BOUND_WAIT of its time is
    said to be bound by the model's step, where its ratio does not measure the data path."""
    import json
    import shutil
    import statistics
    import subprocess
    import tempfile

    import numpy as np
    from transformers import ViTImageProcessorPil

    from augment import augment_config, draw_crop, sample_rng
    from backbone import ImageInputs
    from dataset import DatasetSpec, make_loader, read_records
    root = args.data_path
    photos = os.path.join(root, "train")
    run_images = DATA_PATH_STEPS * args.batch_size
    if not os.path.isdir(photos):  # two classes of --make_jpegs N photographs
        count = args.make_jpegs or run_images + DATA_PATH_LOG * args.batch_size
        for c in range(2):
            make_jpegs(os.path.join(photos, f"class{c}"), count // 2, seed=c)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(photos) for f in names
                   if f.endswith(".jpg"))
    model = vit_folder(os.path.join(root, "tiny_vit_p32"), DATA_PATH_VIT)
    work = tempfile.mkdtemp(prefix="data-path-bench-")

    def train_rate(augment):
        out = os.path.join(work, augment)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--train_data",
               f"bench=folder:{photos}", "--datasets", "bench=2", "--output_dir", out,
               "--overwrite", "--batch_size", str(args.batch_size), "--num_workers", "1",
               "--max_steps", str(DATA_PATH_STEPS), "--logging_steps", str(DATA_PATH_LOG),
               "--skip_evaluation", "--save_steps", str(10 ** 6), "--augment", augment,
               "--seed", str(DATA_PATH_SEED)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            user_error(f"train.py --augment {augment} failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            windows = [r for r in map(json.loads, f)
                       if r["event"] == "train"][1:]  # the first window holds the worker's start
        seconds = [1 / r["samples_per_second"] for r in windows]  # per sample: equal windows
        waited = sum(r["data_wait_share"] * t for r, t in zip(windows, seconds)) / sum(seconds)
        return len(windows) / sum(seconds), waited  # images/s, share of time waiting for data

    registry = {"bench": DatasetSpec("bench", 2)}
    records = read_records([f"bench=folder:{photos}"], registry, say=lambda m: None)
    inputs = ImageInputs(ViTImageProcessorPil.from_pretrained(model))
    order = np.random.default_rng(0).permutation(len(records)).tolist()
    if len(records) < run_images:
        print(f"note: {photos} holds {len(records)} images, under the {run_images} a run takes: "
              "epoch starts fall in train.py's timed windows (remove the folder to make "
              f"{run_images + DATA_PATH_LOG * args.batch_size})")
    samples = []  # (file, crop) of epoch 0, each crop as train.py draws it
    for i in order:
        with Image.open(records[i].image_path) as image:
            crop = draw_crop(sample_rng(DATA_PATH_SEED, 0, i), *image.size)
        samples.append((records[i].image_path, crop))

    def pillow_rate(augment):
        """One process, one core: open, (draft,) decode, convert, resize to 224 x 224."""
        start = time.perf_counter()
        for path, (left, top, w, h) in samples:
            with Image.open(path) as image:
                if augment == "none":
                    image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
                    continue
                width, height = image.size
                drafted = image.draft("RGB", (math.ceil(width * 224 / w),
                                              math.ceil(height * 224 / h)))
                s = drafted[1][2] / width if drafted else 1.0  # decoded pixels per original
                image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR, box=(
                    left * s, top * s, (left + w) * s, (top + h) * s))
        return len(samples) / (time.perf_counter() - start)

    def loader_rate_of(augment):
        """train.py's training loader alone: one worker's batches, the main process idle."""
        config = None if augment == "none" else augment_config(augment, registry, inputs,
                                                                seed=DATA_PATH_SEED)
        return loader_rate(make_loader(records, order, inputs, ["bench"],
                                       batch_size=args.batch_size, num_workers=1,
                                       fast_path=True, augment=config))

    paths = [("exact (--augment none)", "none"), ("augmented (--augment crop_flip)", "crop_flip")]
    print(f"{len(files)} JPEGs of 384-512 px in {photos}, tiny ViT/32 at 224 px, batch "
          f"{args.batch_size}, one worker, {os.cpu_count()} CPUs; train.py samples/s (its "
          f"logged windows after the first), plain Pillow on one core and train.py's loader "
          f"alone (no model), {args.rounds} interleaved rounds")
    rates = {(a, k): [] for _, a in paths for k in ("train", "pillow", "loader")}
    waits = {augment: [] for _, augment in paths}
    try:
        for r in range(args.rounds):
            for _, augment in paths:
                # Pillow before and after train.py: the machine's speed drifts between rounds
                before, (train, waited) = pillow_rate(augment), train_rate(augment)
                pillow = math.sqrt(before * pillow_rate(augment))
                loader = loader_rate_of(augment)
                for kind, rate in (("train", train), ("pillow", pillow), ("loader", loader)):
                    rates[augment, kind].append(rate)
                waits[augment].append(waited)
                print(f"  round {r + 1} {augment:<10} train.py {train:7.1f} (waited for data "
                      f"{waited:4.0%} of its time)  Pillow {pillow:7.1f}  {train / pillow:5.2f}x  "
                      f"loader alone {loader:7.1f}  {loader / pillow:5.2f}x", flush=True)
    finally:
        shutil.rmtree(work)
    for name, augment in paths:
        pillow = rates[augment, "pillow"]
        print(f"{name}: plain Pillow {statistics.median(pillow):.1f} images/s (median)")
        for kind, label in (("train", "train.py"), ("loader", "loader alone")):
            ratios = [a / b for a, b in zip(rates[augment, kind], pillow)]
            print(f"  {label:<12} {statistics.median(rates[augment, kind]):7.1f} images/s, per "
                  f"round {statistics.median(ratios):.2f}x of Pillow (median; "
                  f"{min(ratios):.2f}-{max(ratios):.2f})")
        if statistics.median(waits[augment]) < DATA_BOUND_WAIT:
            print(f"  {name}: train.py waited for data {statistics.median(waits[augment]):.0%} "
                  f"of its time (median), under {DATA_BOUND_WAIT:.0%}: bound by the model's step, "
                  "so its ratio measures the stand-in model, not the data path")


# ViT-Ti/16's shape (5.7M parameters): what --peer trains, from a random init
VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                intermediate_size=768, patch_size=16, image_size=224)
PEER_IMAGES, PEER_WARMUP = 448, 2  # JPEGs (two classes); steps left out of the rate


class PlainImages(torch.utils.data.Dataset):
    """The plain PyTorch peer's dataset: Pillow decode, bilinear resize to 224, normalised to
    [-1, 1] in numpy (what ViTImageProcessorPil does), CHW float32."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import numpy as np
        path, label = self.samples[i]
        with Image.open(path) as image:
            image = image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
        pixels = (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels)), label


def plain_training(model_dir, photos, batch_size, steps):
    """The peer of train.py in plain PyTorch, in a process of its own with torch's default
    threads: the backbone's pooled output and a linear head, cross-entropy, AdamW, a DataLoader
    with one worker over the same JPEGs. Prints the seconds of each step (data wait included),
    as train.py's samples_per_second counts them."""
    import json

    from transformers import ViTModel
    classes = sorted(os.listdir(photos))
    samples = [(os.path.join(photos, c, f), k) for k, c in enumerate(classes)
               for f in sorted(os.listdir(os.path.join(photos, c)))]
    torch.manual_seed(0)
    backbone = ViTModel.from_pretrained(model_dir)
    head = torch.nn.Linear(backbone.config.hidden_size, len(classes))
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(PlainImages(samples), batch_size=batch_size,
                                         shuffle=True, num_workers=1, drop_last=True)
    batches, seconds = iter(loader), []
    for _ in range(steps):
        start = time.perf_counter()
        pixels, labels = next(batches)
        logits = head(backbone(pixel_values=pixels).pooler_output)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds))


def benchmark_peer(args):
    """Compute-bound training against its peers: images/s of train.py on a ViT-Ti/16 (random
    init, 224 px, fp32, batch --batch_size, one DataLoader worker, no augmentation, no
    evaluation) on PEER_IMAGES JPEGs of 384-512 px as an image folder, next to the same training
    in plain PyTorch (plain_training) and, with --timm_python, timm's train.py (--timm_train) on
    its vit_tiny_patch16_224, run by that Python: timm never enters this environment. Each run a
    fresh process with its own default threads; --steps steps after PEER_WARMUP left out, runs
    alternated over --rounds rounds; the median of each and the ratios to train.py."""
    import json
    import shutil
    import statistics
    import subprocess
    import tempfile

    root = args.peer
    photos = os.path.join(root, "train")
    if not os.path.isdir(photos):  # two classes of PEER_IMAGES / 2 photographs each
        for c in range(2):
            make_jpegs(os.path.join(photos, f"class{c}"), PEER_IMAGES // 2, seed=c)
    model = os.path.join(root, "vit_tiny")
    vit_folder(model, VIT_TINY)
    steps = PEER_WARMUP + args.steps
    if steps * args.batch_size > PEER_IMAGES:
        user_error(f"--steps {args.steps}: more than one pass over {PEER_IMAGES} images")
    work = tempfile.mkdtemp(prefix="peer-bench-")

    def rate(seconds):  # images/s of the steps after the warm-up
        return args.batch_size * args.steps / sum(seconds[PEER_WARMUP:steps])

    def train_py(python=sys.executable):
        out = os.path.join(work, "train")
        cmd = [python, os.path.join(ROOT, "train.py"), "--model", model, "--train_data",
               f"bench=folder:{photos}", "--datasets", "bench=2", "--output_dir", out,
               "--overwrite", "--batch_size", str(args.batch_size), "--num_workers", "1",
               "--max_steps", str(steps), "--logging_steps", "1", "--skip_evaluation",
               "--save_steps", str(10 ** 6), "--augment", "none", "--precision", "fp32"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            user_error(f"train.py failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return rate([args.batch_size / r["samples_per_second"] for r in map(json.loads, f)
                         if r["event"] == "train"])

    def plain():
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import benchmark; "
                f"benchmark.plain_training({model!r}, {photos!r}, {args.batch_size}, {steps})")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode:
            user_error(f"plain PyTorch failed:\n{done.stderr[-2000:]}")
        return rate(json.loads(done.stdout.strip().splitlines()[-1]))

    def timm():  # timm's own per-step log: "Time: 2.301s, 13.91/s"
        import re
        cmd = [args.timm_python, args.timm_train, root, "--train-split", "train", "--val-split",
               "", "--model", "vit_tiny_patch16_224", "--num-classes", "2", "-b",
               str(args.batch_size), "-j", "1", "--no-aug", "--epochs", "1", "--opt", "adamw",
               "--lr", "1e-4", "--log-interval", "1", "--output", work, "--device", "cpu"]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        seconds = [float(s) for s in re.findall(r"Time: +([\d.]+)s", done.stdout + done.stderr)]
        if done.returncode or len(seconds) < steps:
            user_error(f"timm's train.py failed:\n{(done.stdout + done.stderr)[-2000:]}")
        return rate(seconds)

    peers = [("train.py", train_py), ("plain PyTorch", plain)]
    if args.timm_python:
        if not args.timm_train:
            user_error("--timm_python needs --timm_train (timm's train.py)")
        # train.py on timm's torch as well: the two environments' torch builds differ
        peers += [("train.py, timm's torch", lambda: train_py(args.timm_python)),
                  ("timm train.py", timm)]
    print(f"{PEER_IMAGES} JPEGs of 384-512 px in {photos}, ViT-Ti/16 at 224 px, fp32, batch "
          f"{args.batch_size}, one worker, no augmentation, {os.cpu_count()} CPUs; images/s of "
          f"steps {PEER_WARMUP + 1}-{steps} of fresh runs, alternated, {args.rounds} rounds")
    rates = {name: [] for name, _ in peers}
    try:
        for r in range(args.rounds):
            for name, run in peers if r % 2 == 0 else peers[::-1]:  # neither always first
                rates[name].append(run())
            print(f"  round {r + 1}  " + "  ".join(f"{name} {rates[name][-1]:6.1f}"
                                                    for name, _ in peers), flush=True)
    finally:
        shutil.rmtree(work)
    ours = statistics.median(rates["train.py"])
    for name, _ in peers:
        mid = statistics.median(rates[name])
        print(f"{name:<22} {mid:7.1f} images/s (median; {min(rates[name]):.1f}-"
              f"{max(rates[name]):.1f})   train.py / {name} {ours / mid:5.2f}x")
    if args.timm_python:
        same = statistics.median(rates["train.py, timm's torch"])
        print(f"on timm's torch: train.py / timm train.py "
              f"{same / statistics.median(rates['timm train.py']):5.2f}x")


def rss_anon_mb():
    """This process's private resident memory (RssAnon of /proc/self/status), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def private_mb():
    """Pages only this process maps (Private_Clean + Private_Dirty of smaps_rollup), in MB: after
    fork, what a worker has copied; RssAnon also counts the pages it still shares."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_")) / 1024


class TouchRecords(torch.utils.data.Dataset):
    """Item i: look up `per_item` random records of a table, as a worker's __getitem__ does;
    returns the worker's (RssAnon, private memory) after."""

    def __init__(self, records, per_item):
        self.records, self.per_item = records, per_item

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import numpy as np
        rng = np.random.default_rng(i)
        for j in rng.integers(0, len(self.records), self.per_item).tolist():
            self.records[j]
        return rss_anon_mb(), private_mb()


def benchmark_record_memory(args):
    """The record table of --record_memory N shard samples: its bytes, the main process's
    RssAnon, and a DataLoader worker's RssAnon and private pages (what it copied from the main
    process) at its start and after looking up 8 x 200,000 random records."""
    import numpy as np

    from data.wds import TarShard
    from dataset import RecordTable
    n = args.record_memory
    before = rss_anon_mb()
    shards = [TarShard(f"/data/shards/{k:06d}.tar") for k in range(n // 10_000 + 1)]
    ids = np.arange(n)
    records = RecordTable(np.char.add(np.char.zfill(ids.astype("U9"), 9), ".jpg").astype("S13"),
                          ids % 1000, ids % 3, shards, ids // 10_000, ids % 10_000,
                          offsets=ids * 4096 + 512, sizes=np.full(n, 3000))
    size = sum(getattr(records, k).nbytes for k in ("members", "labels", "dataset_ids",
                                                    "source_ids", "rows", "offsets", "sizes"))
    main = rss_anon_mb() - before
    loader = torch.utils.data.DataLoader(TouchRecords(records, 200_000), batch_size=None,
                                         num_workers=1)
    start = torch.utils.data.DataLoader(TouchRecords(records, 0), batch_size=None, num_workers=1)
    (anon_start, private_start), (anon_after, private_after) = max(start), max(loader)
    print(f"{n:,} records: table {size / 2 ** 20:.0f} MB of arrays; main process RssAnon "
          f"+{main:.0f} MB; a DataLoader worker: RssAnon {anon_start:.0f} MB -> {anon_after:.0f} "
          f"MB, private (copied) {private_start:.0f} MB -> {private_after:.0f} MB after "
          "1,600,000 random lookups")


def benchmark_fingerprint(args):
    """Seconds and peak private memory (RssAnon) of the content fingerprint of an image folder of
    --files N images in 1,000 class folders (empty files, written into DIR when absent: a stat
    costs the same), beside reading the folder's records, the listing every run makes anyway."""
    from data.fingerprint import data_fingerprint
    from host_memory import ProcessTreeMemory
    from dataset import read_records
    folder, n = os.path.join(args.fingerprint, f"images-{args.files}"), args.files
    if not os.path.isdir(folder):
        print(f"writing {n:,} files into {folder} ...", flush=True)
        for c in range(1000):
            os.makedirs(os.path.join(folder, f"class{c:04d}"))
        for i in range(n):
            open(os.path.join(folder, f"class{i % 1000:04d}", f"{i:09d}.jpg"), "wb").close()
    spec = f"images={folder}"
    for what, work in (("fingerprint", lambda: data_fingerprint(spec)),
                       ("records", lambda: read_records([spec], {}, fixed=False))):
        with ProcessTreeMemory(os.getpid(), torchrun=False) as memory:
            base = rss_anon_mb()
            start = time.perf_counter()
            result = work()
            seconds = time.perf_counter() - start
        peak = memory.peaks()[0][0]
        print(f"{what:>11}: {n:,} files, {seconds:.1f} s ({n / seconds:,.0f} files/s), peak "
              f"RssAnon +{peak - base:.0f} MB", flush=True)
        del result


def benchmark_eval(args):
    """Wall time of eval.py (a fresh process, as a user runs it) over the first checkpoint of a
    run, and over its first --checkpoints checkpoints with and without the evaluation cache."""
    import shutil
    import subprocess
    import tempfile

    from checkpoint import list_checkpoints
    found = list_checkpoints(args.eval_run)
    if len(found) < args.checkpoints:
        user_error(f"--eval_run {args.eval_run}: {len(found)} checkpoint(s), "
                   f"--checkpoints {args.checkpoints} asked for")
    work = tempfile.mkdtemp(prefix="eval-bench-")
    runs = {}
    for name, count in (("one", 1), ("many", args.checkpoints)):
        os.makedirs(os.path.join(work, name))
        for folder in found[:count]:  # links: eval.py writes its results beside them
            os.symlink(os.path.abspath(folder),
                       os.path.join(work, name, os.path.basename(folder)))
        runs[name] = os.path.join(work, name)
    cases = [("1 checkpoint", runs["one"], []),
             (f"{args.checkpoints} checkpoints", runs["many"], []),
             (f"{args.checkpoints} checkpoints, --eval_cache_mb 0", runs["many"],
              ["--eval_cache_mb", "0"])]
    extra = ["--num_workers", str(args.num_workers)] if args.num_workers is not None else []
    print(f"eval.py over {args.eval_run} ({os.cpu_count()} CPUs, best of {args.rounds} "
          "interleaved rounds, each a fresh process)")
    seconds = [float("inf")] * len(cases)
    try:
        for _ in range(args.rounds):
            for i, (_, run_dir, flags) in enumerate(cases):
                start = time.perf_counter()
                subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), run_dir, "--force",
                                *extra, *flags], check=True, cwd=ROOT, capture_output=True)
                seconds[i] = min(seconds[i], time.perf_counter() - start)
    finally:
        shutil.rmtree(work)
    for (name, _, _), value in zip(cases, seconds):
        print(f"{name:<40} {value:7.2f} s  {value / seconds[0]:5.2f}x the time of one")


# ViT-H/14's shape (632M parameters, 2.5 GB of fp32 weights): what --fsdp_memory makes in an
# empty folder
VIT_HUGE = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                intermediate_size=5120, patch_size=14, image_size=224)
PHASES = ("load", "resume", "step", "save")  # what run_phases marks, in order


def benchmark_fsdp_memory(args):
    """Peak private memory (RssAnon) and resident memory (VmRSS) of each process, sampled every
    20 ms from outside (tools/host_memory.py), over train.py's phases and eval.py: one process,
    then --processes gloo processes with --dist fsdp. Each case is a fresh run: load the folder,
    one step, a checkpoint (train.py's own functions, run_phases); the same again resumed from
    that checkpoint; eval.py on it."""
    import json
    import re
    import shutil
    import subprocess

    from host_memory import ProcessTreeMemory
    folder = args.fsdp_memory
    if not os.path.isdir(folder) or not os.listdir(folder):
        vit_folder(folder, VIT_HUGE)
    data = write_bench_images(os.path.join(folder, "bench_data"))
    weights_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 2 ** 20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    port = 29500 + os.getpid() % 1000

    def measured(processes, command):
        """({rank: {phase: (RssAnon MB, VmRSS MB)}}, whole-run peaks) of one command."""
        cmd = [sys.executable, *command]
        if processes > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_port", str(port)]
        popen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        with ProcessTreeMemory(popen.pid, torchrun=processes > 1) as memory:
            out, err = popen.communicate()
        if popen.returncode:
            raise SystemExit(out[-2000:] + err[-4000:])
        marks = {}
        for rank, name, when in re.findall(r"phase (\d+) (\w+) (\d+\.\d+)\n", out):
            marks.setdefault(int(rank), []).append((name, float(when)))
        phases = {rank: {name: memory.peaks(start, end).get(rank, (0.0, 0.0))
                         for (name, start), (_, end) in zip(found, found[1:])}
                  for rank, found in marks.items()}
        return phases, memory.peaks()

    flags = ["--train_jsonl", data["train"], "--val_jsonl", data["val"], "--datasets",
             data["registry"], "--model", folder, "--batch_size", "1", "--num_workers", "0",
             "--skip_evaluation", "--logging_steps", "1"] + ([] if args.full_finetune
                                                             else ["--train_only_head"])
    me = os.path.abspath(__file__)
    rows = {}  # (what, processes) -> [(RssAnon, VmRSS) of each rank]
    for processes in [1, *args.processes]:
        out = os.path.join(folder, f"bench_run_{processes}")
        shutil.rmtree(out, ignore_errors=True)
        dist = ["--dist", "fsdp"] if processes > 1 else []
        # both runs are one schedule of 2 steps (resume refuses another --max_steps): run_phases
        # writes checkpoint-1 after the first, checkpoint-2 after the resumed one
        fresh, _ = measured(processes, [me, "--run_phases", *flags, *dist, "--max_steps", "2",
                                        "--output_dir", out])
        resumed, _ = measured(processes, [me, "--run_phases", *flags, *dist, "--max_steps", "2",
                                          "--output_dir", out, "--resume", "latest"])
        _, evaluated = measured(processes, [os.path.join(ROOT, "eval.py"),
                                            os.path.join(out, "checkpoint-2"), "--batch_size",
                                            "1", "--num_workers", "0", "--force", *dist])
        ranks = sorted(fresh)
        rows["train.py: load the model folder", processes] = [fresh[r]["load"] for r in ranks]
        rows["train.py: one step", processes] = [fresh[r]["step"] for r in ranks]
        rows["train.py: write checkpoint-1", processes] = [fresh[r]["save"] for r in ranks]
        rows["train.py: load, one step, checkpoint (whole run)", processes] = [
            tuple(max(fresh[r][p][i] for p in PHASES) for i in (0, 1)) for r in ranks]
        rows["train.py --resume: load the folder + checkpoint-1's state", processes] = [
            tuple(max(resumed[r][p][i] for p in ("load", "resume")) for i in (0, 1))
            for r in ranks]
        rows["eval.py on checkpoint-2", processes] = [evaluated[r] for r in sorted(evaluated)]
        shutil.rmtree(out)
    print(f"{folder}: {weights_mb:,.0f} MB of fp32 weights; "
          f"{'all parameters trained' if args.full_finetune else '--train_only_head'}; peak "
          f"private memory (RssAnon) per process, MB, and resident memory (VmRSS) in brackets; "
          f"several processes: the largest rank, and its ratio to one process "
          f"({os.cpu_count()} CPUs, gloo)")
    header = ["", "1 process"] + [f"{n} processes, per rank" for n in args.processes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for what in dict.fromkeys(w for w, _ in rows):
        one = rows[what, 1][0][0]
        cells = [f"{one:,.0f} ({rows[what, 1][0][1]:,.0f})"]
        for n in args.processes:
            anon, rss = max(rows[what, n])
            cells.append(f"{anon:,.0f} ({rss:,.0f}), {anon / one:.2f}x")
        print(f"| {what} | " + " | ".join(cells) + " |")
    for n in args.processes:
        anon = max(a for a, _ in rows["eval.py on checkpoint-2", n])
        print(f"eval.py, {n} processes: the largest rank holds {anon / weights_mb:.2f}x the "
              "checkpoint's model.safetensors")
    print(json.dumps({f"{what} | {n}": values for (what, n), values in rows.items()}))


def vit_folder(folder, shape):
    """A ViT folder of `shape` (ViTConfig keywords; random init, fp32) with its image processor,
    made where absent or empty; one made before with another shape is refused, not measured."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    if os.path.isdir(folder) and os.listdir(folder):
        saved = ViTConfig.from_pretrained(folder).to_dict()
        other = {k: saved.get(k) for k, v in shape.items() if saved.get(k) != v}
        if other:
            user_error(f"{folder} holds a ViT of another shape ({other}, not {shape}): remove "
                       "it and it is made again")
        return folder
    torch.manual_seed(0)
    ViTModel(ViTConfig(**shape)).save_pretrained(folder)
    size = shape["image_size"]
    ViTImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def write_bench_images(folder, count=16):
    """16 random 32 px PNG images in one 10-class dataset: training and validation files and
    the registry, for train.py and eval.py."""
    import json

    import numpy as np
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        path = os.path.join(folder, f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(json.dumps({"image_path": path, "label": i % 10, "dataset_name": "bench"}))
    files = {"train": rows, "val": rows[:count // 2]}
    out = {}
    for name, lines in files.items():
        out[name] = os.path.join(folder, f"{name}.jsonl")
        with open(out[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    out["registry"] = os.path.join(folder, "datasets.json")
    with open(out["registry"], "w") as f:
        json.dump({"bench": {"num_classes": 10}}, f)
    return out


def run_phases(train_argv):
    """One process of benchmark_fsdp_memory: train.py's own functions in the order train.py calls
    them (build the run, its start state, one step, a checkpoint), a line `phase RANK NAME TIME`
    before each and at the end."""
    import distributed
    import train
    from config import parse_args
    from logs import JsonlLog
    args = parse_args(train_argv)
    rank, world_size, _, device = distributed.setup_distributed(args.dist_timeout_minutes)

    def mark(name):  # one write: the lines of several ranks share a pipe
        sys.stdout.write(f"phase {rank} {name} {time.time():.3f}\n")
        sys.stdout.flush()

    mark("load")
    run = train.build_run(args, rank, world_size, device)
    train.train_mode(run.model)
    mark("resume")
    state = train.start_state(run)
    mark("step")
    order = run.task.epoch_order(run.data, 0, args, rank, world_size)
    loader = run.task.loader(run.data, run.inputs, order, train=True,
                             batch_size=args.batch_size, num_workers=0, pin_memory=False)
    log = JsonlLog(os.path.join(args.output_dir, "metrics.jsonl"), rank)
    train.train_step(run, state, iter(loader), log)
    mark("save")
    train.save(run, state, {})
    mark("end")
    log.close()
    distributed.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", help="benchmark the image path on the JPEGs in DIR")
    p.add_argument("--make_jpegs", type=int, metavar="N",
                   help="with --data: first write N JPEGs into DIR (when it is empty or absent); "
                        "with --sources: N of 224 px (default 1024)")
    p.add_argument("--record_memory", type=int, metavar="N",
                   help="memory of a record table of N shard samples, in the main process and in "
                        "a DataLoader worker that reads it")
    p.add_argument("--sources", metavar="DIR",
                   help="images/s of the same JPEGs as loose files, WebDataset shards and Parquet "
                        "(written into DIR when absent)")
    p.add_argument("--data_path", metavar="DIR",
                   help="train.py on JPEGs (a tiny ViT, one worker) against plain Pillow doing "
                        "the same decode and resize, exact and augmented (written into DIR "
                        "when absent)")
    p.add_argument("--peer", metavar="DIR",
                   help="train.py on a ViT-Ti/16 (one worker) against plain PyTorch and, with "
                        "--timm_python, timm's train.py (model and JPEGs written into DIR when "
                        "absent)")
    p.add_argument("--timm_python", metavar="PYTHON",
                   help="with --peer: the Python of an environment where timm imports")
    p.add_argument("--timm_train", metavar="FILE", help="with --timm_python: timm's train.py")
    p.add_argument("--rounds", type=int, default=3,
                   help="with --data or --eval_run: rounds per mode (best of)")
    p.add_argument("--shape", choices=SHAPES, default="qwen2_5_vl_3b")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=448,
                   help="pixels per side (448: 256 image tokens)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    p.add_argument("--num_labels", type=int, default=2000)
    p.add_argument("--no_checkpointing", action="store_true")
    p.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default="sdpa",
                   help="attention kernels (default: sdpa)")
    p.add_argument("--peak_tflops", type=float,
                   help="device peak for MFU (default: from the GPU's name)")
    p.add_argument("--fsdp", action="store_true",
                   help="with --shape: shard the model with FSDP2 as train.py --dist fsdp does "
                        "(under torchrun: over its processes)")
    p.add_argument("--eval_run", metavar="DIR",
                   help="time eval.py over the first checkpoint of the run in DIR and over its "
                        "first --checkpoints")
    p.add_argument("--checkpoints", type=int, default=5, help="with --eval_run (default: 5)")
    p.add_argument("--num_workers", help="with --eval_run: eval.py's --num_workers")
    p.add_argument("--fsdp_memory", metavar="DIR",
                   help="peak private memory per process over train.py's load, step, checkpoint "
                        "and resume, and eval.py, on the model folder DIR: one process against "
                        "--processes FSDP2 processes; an empty DIR gets a ViT-H/14 shape")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4],
                   help="with --fsdp_memory: gloo process counts (default: 2 4)")
    p.add_argument("--full_finetune", action="store_true",
                   help="with --fsdp_memory: train every parameter (default: --train_only_head)")
    p.add_argument("--fingerprint", metavar="DIR",
                   help="seconds and memory of the data fingerprint of an image folder of --files "
                        "images (written into DIR when absent) beside reading its records")
    p.add_argument("--files", type=int, default=1_000_000, help="with --fingerprint")
    if sys.argv[1:2] == ["--run_phases"]:  # one process of --fsdp_memory: the rest is train.py's
        return run_phases(sys.argv[2:])
    args = p.parse_args()
    for mode, run in (("fsdp_memory", benchmark_fsdp_memory), ("data", benchmark_image_path),
                      ("sources", benchmark_sources), ("data_path", benchmark_data_path),
                      ("peer", benchmark_peer),
                      ("record_memory", benchmark_record_memory), ("eval_run", benchmark_eval),
                      ("fingerprint", benchmark_fingerprint)):
        if getattr(args, mode):
            return run(args)
    if args.make_jpegs:
        p.error("--make_jpegs needs --data DIR or --sources DIR")

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    import distributed
    from backbone import fsdp_units
    rank, world_size, _, device = distributed.setup_distributed()
    shape = SHAPES[args.shape]
    config = Qwen2_5_VLConfig(text_config=shape["text"], vision_config=shape["vision"],
                              **shape.get("tokens", {}))
    torch.manual_seed(0)
    check_attn_implementation(args.attn_implementation)
    with torch.device(device):
        backbone = Qwen2_5_VLModel._from_config(
            config, attn_implementation=args.attn_implementation).to(torch.bfloat16)
    # a vision-language model's feature width is its language model's: no inputs needed
    model = MaskedClassifier(backbone, args.num_labels, inputs=None).to(device,
                                                                       torch.bfloat16).train()
    if not args.no_checkpointing:
        enable_activation_checkpointing(backbone)
    if args.fsdp:  # as train.py --dist fsdp shards it
        distributed.shard_model(model, fsdp_units(backbone), device, (world_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch, labels, per_image = build_batch(config, args.batch_size, args.image_size,
                                           args.num_labels, device)
    num_classes = torch.full_like(labels, args.num_labels)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = mask_logits(model(**batch), num_classes)
        masked_cross_entropy(logits, labels).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    tokens = batch["input_ids"].numel()
    patches = int(batch["image_grid_thw"].prod(-1).sum())
    vision_params = sum(p.numel() for p in backbone.visual.parameters())
    language_params = sum(p.numel() for p in backbone.language_model.parameters())
    embedding = backbone.language_model.embed_tokens.weight.numel()
    flops = 6 * ((language_params - embedding) * tokens + vision_params * patches)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if rank != 0:  # every rank steps alike: rank 0 reports, per device
        return distributed.cleanup()
    print(
        f"device: {name}; shape {args.shape}: {language_params / 1e6:,.1f}M language + "
        f"{vision_params / 1e6:,.1f}M vision parameters, bf16, activation checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}, attention "
        f"{backbone.config._attn_implementation}"
        + (f"; FSDP2 over {world_size} process(es), figures per device" if args.fsdp else ""))
    print(
        f"batch {args.batch_size} images of {args.image_size}x{args.image_size} ({per_image} image "
        f"tokens each), {tokens // args.batch_size} tokens per sample")
    print(f"step time      {seconds * 1000:.1f} ms")
    print(f"tokens/s       {tokens / seconds:,.0f}")
    print(f"images/s       {args.batch_size / seconds:,.1f}")
    if device.type == "cuda":
        print(f"peak memory    {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"model TFLOP/s  {flops / seconds / 1e12:.1f}" +
          (f"   MFU {100 * flops / seconds / 1e12 / peak:.1f}% of "
           f"{peak:.0f}" if peak else ""))
    distributed.cleanup()


if __name__ == "__main__":
    main()
