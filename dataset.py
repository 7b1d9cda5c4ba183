"""Mixed multi-dataset image classification data: the registry, sampling (mixture, partial
evaluation subsets), loaders, demo data. Records are read in data/ (data/reading.py).

    python dataset.py --make-demo DIR   # writes the built-in demo (digits + faces PNGs, JSONL,
    registry)
    python dataset.py --make-demo DIR --format folder|parquet|wds   # the same in another layout
"""
import argparse
import io
import json
import math
import os
import random
import tarfile
import zlib

import numpy as np
import torch
from PIL import Image

from augment import AUGMENTS, decode_augmented, sample_rng
from data.types import DataError, DatasetSpec, dataset_name_problem
from preprocess import Pixels, decode_pixels, to_rgb


REGISTRY_FIELDS = ("num_classes", "eval_ratio", "description", "sampling_weight", "augment",
                   "hflip", "labels", "image_column", "label_column", "eval_only")
# fields that act on training samples only, which an eval_only dataset has none of
TRAINING_FIELDS = ("sampling_weight", "augment", "hflip")


def check_dataset_names(names, where):
    """A DataError for the first name of the registry that cannot name a dataset."""
    names = list(names)
    for name in names:
        problem = dataset_name_problem(name, names)
        if problem:
            raise DataError(f"{where}: dataset {name!r}: {problem}")


def _check_spec(name, entry, where, folder="."):
    """One registry entry -> DatasetSpec; `folder` resolves a relative `labels` file."""
    if not isinstance(entry, dict):
        raise DataError(
            f"{where}: dataset {name!r}: expected a mapping with num_classes, got {entry!r}")
    unknown = set(entry) - set(REGISTRY_FIELDS)
    if unknown:
        raise DataError(f"{where}: dataset {name!r}: unknown field(s) {sorted(unknown)} "
                        f"(known: {', '.join(REGISTRY_FIELDS)})")
    k = entry.get("num_classes")  # may be left to the source: reading.read_records fills it
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise DataError(
            f"{where}: dataset {name!r}: field 'num_classes' must be a positive integer, got {k!r}")
    ratio = entry.get("eval_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise DataError(
            f"{where}: dataset {name!r}: field 'eval_ratio' must be in (0, 1], got {ratio!r}")
    weight = entry.get("sampling_weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not 0 < weight < float("inf")):
        raise DataError(f"{where}: dataset {name!r}: field 'sampling_weight' must be a positive "
                        f"number, got {weight!r}")
    augment = entry.get("augment")
    if augment is not None and augment not in AUGMENTS:
        raise DataError(f"{where}: dataset {name!r}: field 'augment' must be one of "
                        f"{', '.join(AUGMENTS)}, got {augment!r}")
    hflip = entry.get("hflip", True)
    if not isinstance(hflip, bool):
        raise DataError(f"{where}: dataset {name!r}: field 'hflip' must be true or false, "
                        f"got {hflip!r}")
    for column in ("image_column", "label_column"):
        value = entry.get(column)
        if value is not None and (not isinstance(value, str) or not value):
            raise DataError(f"{where}: dataset {name!r}: field {column!r} must be a column name, "
                            f"got {value!r}")
    eval_only = entry.get("eval_only", False)
    if not isinstance(eval_only, bool):
        raise DataError(f"{where}: dataset {name!r}: field 'eval_only' must be true or false, "
                        f"got {eval_only!r}")
    unused = [f for f in TRAINING_FIELDS if f in entry] if eval_only else []
    if unused:
        raise DataError(f"{where}: dataset {name!r}: field(s) {', '.join(unused)} act on training "
                        "samples, which an eval_only dataset has none of")
    labels = _read_labels(name, entry.get("labels"), k, where, folder)
    spec = DatasetSpec(name, k if k is not None or labels is None else len(labels), float(ratio),
                       str(entry.get("description", "")),
                       None if weight is None else float(weight), augment, hflip, labels,
                       entry.get("image_column"), entry.get("label_column"))
    if eval_only:
        spec.eval_only = True
    return spec


def _read_labels(name, labels, num_classes, where, folder):
    """Class names from a list, or from a text file of one name per line (relative to `folder`)."""
    if labels is None:
        return None
    source = f"{where}: dataset {name!r}: field 'labels'"
    if isinstance(labels, str):
        path = os.path.join(folder, labels)
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no name
                lines = [line.strip() for line in f.read().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{source}: cannot read {path} ({getattr(e, 'strerror', None) or e})"
                            ) from None
        source += f" ({path})"
        while lines and not lines[-1]:
            lines.pop()
        if "" in lines:  # a blank line would shift every later name by one class
            raise DataError(f"{source}: line {lines.index('') + 1} is empty; one name per line")
        labels = lines
    # YAML reads yes / no / on / off as booleans: a class named "no" must be quoted
    if not isinstance(labels, list) or not all(
            isinstance(n, (str, int)) and not isinstance(n, bool) for n in labels):
        raise DataError(f"{source}: expected a list of names (text; quote yes / no / true in "
                        f"YAML) or a text file, got {labels!r}")
    if num_classes is not None and len(labels) != num_classes:
        raise DataError(f"{source}: {len(labels)} names for {num_classes} classes")
    labels = [str(n).strip() for n in labels]
    if "" in labels:
        raise DataError(f"{source}: name {labels.index('')} is empty")
    repeated = sorted({n for n in labels if labels.count(n) > 1})
    if repeated:
        raise DataError(f"{source}: each class needs its own name, repeated: {repeated[:5]}")
    return labels


def read_yaml(text, where):
    """(document, its node tree) of YAML / JSON text. A key given twice in one mapping, which
    PyYAML resolves silently (the last wins), is an error naming `where` (the file), its line and
    the key."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise DataError(f"{where}:{line}: key {key!r} is given twice (first on "
                                        f"line {lines[key]}): keep one")
                    lines[key] = line
                except TypeError:  # not hashable: SafeLoader's own error names it
                    continue
            return super().construct_mapping(node, deep)

    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def load_registry(value, where="config 'datasets'"):
    """The dataset registry, in order: name -> DatasetSpec.

    `value` is a mapping (from a config file, or `where` says which file), a YAML/JSON file path,
    or a list of `name=num_classes[:eval_ratio]` items given on the command line.
    """
    if value is None or value == []:
        raise DataError(
            "no dataset registry: give --datasets FILE.yaml (name: {num_classes, eval_ratio}) "
            "or --datasets name=num_classes[:eval_ratio] ...")
    if isinstance(value, dict):
        check_dataset_names(value, where)
        return {name: _check_spec(name, entry, where) for name, entry in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    if len(items) == 1 and "=" not in items[0]:
        path = items[0]
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--datasets {path}: cannot read the registry file "
                            f"({getattr(e, 'strerror', None) or e})") from None
        try:
            data = read_yaml(text, path)[0]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: not valid YAML/JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("datasets"), dict):
            data = data["datasets"]
        if isinstance(data, dict) and isinstance(data.get("dataset_configs"), dict):
            data = data["dataset_configs"]
        if not isinstance(data, dict) or not data:
            raise DataError(
                f"{path}: expected a mapping of dataset name to "
                f"{{num_classes, eval_ratio, description}}"
            )
        folder = os.path.dirname(os.path.abspath(path))
        check_dataset_names(data, path)
        return {name: _check_spec(name, entry, path, folder) for name, entry in data.items()}
    registry = {}
    for item in items:
        name, _, rest = item.partition("=")
        parts = rest.split(":")
        try:
            entry = {"num_classes": int(parts[0])}
            if len(parts) > 1:
                entry["eval_ratio"] = float(parts[1])
        except ValueError:
            raise DataError(
                f"--datasets {item!r}: expected name=num_classes[:eval_ratio], e.g. food101=101:0.2"
            ) from None
        if name in registry:
            raise DataError(f"--datasets {item}: dataset {name!r} is given twice")
        registry[name] = _check_spec(name, entry, f"--datasets {item}")
    check_dataset_names(registry, "--datasets")
    return registry


def partial_eval_indices(records, registry, seed):
    """A fixed, seeded subset of eval_ratio of each dataset's records (at least one sample each)."""
    chosen = []
    for dataset_id, spec in enumerate(registry.values()):
        members = np.flatnonzero(records.dataset_ids == dataset_id).tolist()
        if not members:
            continue
        keep = max(1, round(len(members) * spec.eval_ratio))
        # Seed per dataset name so that adding a dataset leaves the others' subsets unchanged.
        rng = random.Random(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
        chosen += rng.sample(members, keep)
    return sorted(chosen)


def train_indices(num_samples, epoch, seed, shuffle, rank=0, world_size=1):
    """This rank's sample order for one epoch.

    Global order is one seeded permutation per epoch; rank r takes positions r, r+W, ...
    so that global micro-batch j is the same set of samples for any world size.
    The last num_samples % world_size samples of the permutation are dropped so every
    rank runs the same number of steps.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = list(range(num_samples))
    usable = num_samples // world_size * world_size
    return order[rank:usable:world_size]


def mixture_shares(registry, counts, temperature=None):
    """Each dataset's target share of the training samples, or None for the natural mixture
    (in proportion to size: train_indices's order, unchanged).

    From the registry's `sampling_weight` (relative; all datasets with training samples must
    give one, or none) or from --mix_temperature T (share proportional to n^(1/T); T = 1 is by
    size, large T nearly uniform). `counts`: training samples per dataset, registry order.
    """
    weights = {name: spec.sampling_weight for name, spec in registry.items()}
    given = [n for n, w in weights.items() if w is not None]
    if temperature is not None and not 0 < temperature < float("inf"):
        raise DataError(f"--mix_temperature must be a positive number, got {temperature}")
    if given and temperature is not None:
        raise DataError(f"--mix_temperature {temperature} and the registry's sampling_weight "
                        f"(given for {', '.join(given)}) both set the mixture: keep one")
    if given:
        present = [n for n, c in zip(weights, counts) if c > 0]
        missing = [n for n in present if weights[n] is None]
        if missing:
            raise DataError(f"sampling_weight is given for {', '.join(given)} but not for "
                            f"{', '.join(missing)}: weights are relative, give every dataset one")
        empty = [n for n, c in zip(weights, counts) if c == 0 and weights[n] is not None]
        if empty:
            raise DataError(f"dataset(s) {', '.join(empty)} have a sampling_weight but no "
                            "training samples")
        raw = [weights[n] if c > 0 else 0.0 for n, c in zip(weights, counts)]
    elif temperature is None or temperature == 1:
        return None
    else:
        raw = [c ** (1 / temperature) if c > 0 else 0.0 for c in counts]
    total = sum(raw)
    return [w / total for w in raw]


def mixture_indices(dataset_ids, shares, epoch, seed, *, shuffle=True, rank=0, world_size=1):
    """This rank's sample order for one epoch of a weighted mixture (train_indices when
    `shares` is None).

    An epoch has as many samples as the training set (so --epochs counts passes over the
    mixture's size); dataset d fills round(N * share_d) of them (largest remainder), the same
    number every epoch, at seeded random positions. Its samples come from an endless stream of
    seeded permutations of its members: one that runs out reshuffles and continues, and epoch e
    takes up where epoch e - 1 left off, so an undersampled dataset still cycles through all of
    its samples. Global order depends on (seed, epoch) only; rank r takes positions r, r+W, ...
    """
    num_samples = len(dataset_ids)
    if shares is None:
        return train_indices(num_samples, epoch, seed, shuffle, rank, world_size)
    if not shuffle:
        raise DataError("--no_shuffle keeps the files' order: it cannot be combined with a "
                        "weighted mixture (sampling_weight or --mix_temperature)")
    dataset_ids = np.asarray(dataset_ids, dtype=np.int64)
    quotas = np.asarray(shares, dtype=np.float64) * num_samples
    taken = np.floor(quotas).astype(np.int64)
    remainder_order = np.argsort(-(quotas - taken), kind="stable")
    taken[remainder_order[:num_samples - taken.sum()]] += 1
    slots = np.repeat(np.arange(len(shares)), taken)
    rng = np.random.default_rng([seed, epoch, 0x6D6978])
    slots = slots[rng.permutation(num_samples)]
    order = np.empty(num_samples, dtype=np.int64)
    for d, count in enumerate(taken.tolist()):
        if count == 0:
            continue
        members = np.flatnonzero(dataset_ids == d)
        start = epoch * count  # where this epoch starts in the dataset's stream
        cycles = range(start // len(members), (start + count - 1) // len(members) + 1)
        stream = np.concatenate([members[np.random.default_rng([seed, d, k, 0x737472]).permutation(
            len(members))] for k in cycles])
        first = start - cycles[0] * len(members)
        order[slots == d] = stream[first:first + count]
    usable = num_samples // world_size * world_size
    return order[rank:usable:world_size].tolist()


def summarize_mixture(counts, registry, shares):
    """Load-time summary: each dataset's samples, natural share and target share per epoch."""
    n = max(1, sum(counts))
    lines = ["training mixture (share of each epoch's samples):"]
    for dataset_id, spec in enumerate(registry.values()):
        natural = counts[dataset_id] / n
        target = natural if shares is None else shares[dataset_id]
        passes = target * n / counts[dataset_id] if counts[dataset_id] else 0.0
        lines.append(f"  {spec.name}: {counts[dataset_id]:,} samples, natural {100 * natural:.1f}%"
                     f", target {100 * target:.1f}% ({passes:.2f} passes over it per epoch)")
    return "\n".join(lines)


def count_per_dataset(records, num_datasets, indices=None):
    """Samples per dataset in records (or in records[indices])."""
    ids = records.dataset_ids if indices is None else records.dataset_ids[np.asarray(
        indices, dtype=np.int64)]
    return np.bincount(ids, minlength=num_datasets).tolist()


def summarize(counts, registry, title, total=None):
    """Samples per dataset and share of the total; with `total` (counts before a subset), N -> M
    (ratio)."""
    n = max(1, sum(counts))
    lines = [f"{title}:"]
    for dataset_id, spec in enumerate(registry.values()):
        share = f"{counts[dataset_id]:,} samples ({100 * counts[dataset_id] / n:.1f}%)"
        if total is not None:
            subset = f"{total[dataset_id]:,} -> {counts[dataset_id]:,}"
            share = f"{subset} ({100 * spec.eval_ratio:.0f}%), " + share
        lines.append(f"  {spec.name}: {share}")
    lines.append(f"  total: {sum(counts):,} samples")
    return "\n".join(lines)


def check_training_samples(registry, counts, stream=False):
    """Every dataset of the registry has training samples (`counts`, registry order; under
    --streaming whether --train_data streams it), except those the registry marks eval_only,
    which have none: a dataset left out of the training data by mistake is not trained silently
    (its head rows would stay at their initialisation)."""
    for spec, count in zip(registry.values(), counts):
        if count and spec.eval_only:
            raise DataError(f"dataset {spec.name!r} is eval_only in the registry, but --train_data "
                            + ("streams it" if stream else f"holds {count:,} of its samples"))
        if not count and not spec.eval_only:
            raise DataError(f"dataset {spec.name!r} has no training samples (--train_data "
                            f"{'streams none' if stream else 'holds none'} of it): give it some, "
                            "or mark it `eval_only: true` in the registry (--datasets) if it is "
                            "for evaluation only")


def plan_epochs(registry, train, val, args, say, noun="data"):
    """(partial evaluation subset, mixture shares or None) of a run, with their summary printed:
    samples per dataset, the target shares beside the natural ones, the partial subset."""
    partial = partial_eval_indices(val, registry, args.seed) if val else []
    counts = count_per_dataset(train, len(registry))
    check_training_samples(registry, counts)
    shares = mixture_shares(registry, counts, args.mix_temperature)
    if shares is not None and args.no_shuffle:
        raise ValueError("--no_shuffle keeps the files' order; a weighted mixture "
                         "(sampling_weight, --mix_temperature) draws a seeded schedule")
    say(summarize(counts, registry, f"training {noun}"))
    if shares is not None:
        say(summarize_mixture(counts, registry, shares))
    if val:
        say(summarize(count_per_dataset(val, len(registry), partial), registry,
                      "partial evaluation subset", total=count_per_dataset(val, len(registry))))
    return partial, shares


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one image: a PIL RGB image for the processor path (preprocessing happens per batch
    in `collate`), or with `pixels` (a FastPixels) a preprocess.Pixels, already resized and
    augmented, which Collate writes into its batch.

    A key is an index, or (index, epoch[, repeat]) from EpochSampler: the fast path seeds a
    sample's augmentation with it. An image that fails to decode is an error naming it, or with
    skip_bad_images an item whose image is None and whose label is that message (the batch
    drops and reports it)."""

    def __init__(self, records, skip_bad_images=False, pixels=None):
        self.records, self.skip_bad_images, self.pixels = records, skip_bad_images, pixels

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index, epoch, repeat = (key, 0, 0) if not isinstance(key, tuple) else (*key, 0)[:3]
        records = self.records
        dataset_id = int(records.dataset_ids[index])
        try:
            image_file = records.open(index)  # a path, or the bytes of a shard's member
            if self.pixels is not None:
                image = self.pixels(image_file, dataset_id, index, epoch, repeat)
            else:
                with Image.open(image_file) as im:
                    image = to_rgb(im)  # loaded: usable once the file is closed
        except Exception as e:
            r = records[index]  # its names, for the message only
            named = "" if r.image_path == r.source else f" {r.image_path}"
            message = f"{r.source}: cannot decode image{named}: {e}"
            if self.skip_bad_images:
                return None, message, dataset_id, index
            raise DataError(message) from None
        return image, int(records.labels[index]), dataset_id, index


class FastPixels:
    """The fast image path of one loader: file -> preprocess.Pixels (preprocess.py,
    augment.py)."""

    def __init__(self, recipe, augment=None, draft=True):
        self.recipe, self.augment, self.draft = recipe, augment, draft

    def __call__(self, path, dataset_id, index, epoch, repeat):
        if self.augment is None or self.augment.modes[dataset_id] == "none":
            return decode_pixels(path, self.recipe, self.draft)
        rng = sample_rng(self.augment.seed, epoch, index, repeat)
        return decode_augmented(path, self.recipe, self.augment, dataset_id, rng, self.draft)


def batch_tensor(shape, dtype):
    """An empty batch tensor; in a DataLoader worker, in shared memory (as torch's
    default_collate allocates): sending it to the main process then passes a handle, where a
    batch in private memory is first copied into shared memory whole."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    storage = empty._typed_storage()._new_shared(math.prod(shape), device=empty.device)
    return empty.new(storage).view(shape)


class Collate:
    """Turns (image, label, dataset_id, index) items into a batch.

    `inputs` (model.ImageInputs / ImageTextInputs) builds the backbone's forward arguments from
    the images and their dataset names (a vision-language prompt may name the dataset); the fast
    path's preprocess.Pixels are written each straight into its slot of pixel_values, a
    contiguous (B, 3, H, W) uint8 tensor (in shared memory in a worker), instead.
    """

    def __init__(self, inputs, dataset_names):
        self.inputs, self.dataset_names = inputs, dataset_names

    def __call__(self, items):
        skipped = [(message, dataset_id) for image, message, dataset_id, _ in items
                   if image is None]
        items = [item for item in items if item[0] is not None]
        if not items:
            raise DataError(f"no image of a batch could be decoded, e.g. {skipped[0][0]}")
        images, labels, dataset_ids, indices = zip(*items)
        if isinstance(images[0], Pixels):
            pixels = batch_tensor((len(images), 3, *images[0].size), torch.uint8)
            slots = pixels.numpy()
            for image, slot in zip(images, slots):
                image.write(slot)
            batch = {"pixel_values": pixels}
        else:
            batch = self.inputs(list(images), [self.dataset_names[i] for i in dataset_ids])
        batch = {**batch, "labels": torch.tensor(labels), "dataset_ids": torch.tensor(dataset_ids),
                 "indices": torch.tensor(indices)}
        return {**batch, "skipped": skipped} if skipped else batch


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) keys; `set(indices, epoch)` re-aims a loader with persistent workers
    (workers hold no per-epoch state: the epoch travels with each key)."""

    def __init__(self, indices, epoch=0):
        self.set(indices, epoch)

    def set(self, indices, epoch):
        self.indices, self.epoch = list(indices), int(epoch)

    def __iter__(self):
        return iter([(int(i), self.epoch) for i in self.indices])

    def __len__(self):
        return len(self.indices)


PREFETCH_FACTOR = 4  # batches each worker prepares ahead (--prefetch_factor)


def worker_options(num_workers, persistent=False, prefetch_factor=None):
    """DataLoader keywords of the worker processes. Each iterator draws its workers' base seed
    from the loader's own generator, not the global RNG: building or iterating a loader (once per
    run with persistent workers, or per epoch; evaluation's, from the cache or not) leaves the
    training's random stream as it was, so a resumed run draws what an uninterrupted one does."""
    options = {"generator": torch.Generator().manual_seed(0)}
    if num_workers:
        options.update(persistent_workers=persistent,
                       prefetch_factor=prefetch_factor or PREFETCH_FACTOR)
    return options


def make_loader(records, indices, inputs, dataset_names, *, batch_size, num_workers,
                pin_memory=False, skip_bad_images=False, fast_path=False, augment=None, epoch=0,
                draft=None, persistent_workers=False, prefetch_factor=None):
    """The DataLoader of a classification run: batches of the backbone's inputs + labels,
    dataset_ids, indices (and "skipped" with skip_bad_images).

    fast_path: vision backbones whose processor has a preprocess.pixel_recipe (inputs.recipe)
    get uint8 pixel_values, which MaskedClassifier(..., inputs=inputs) (inputs.pixel_normalize)
    normalises on the device; other inputs keep the processor path. augment: an
    augment.AugmentConfig for training (None: the processor's deterministic resize/crop, as
    for evaluation); epoch seeds its draws. draft: let JPEGs decode at reduced scale
    (preprocess.py states the difference); default: with augmentation only, so evaluation
    equals the processor's output within float rounding. persistent_workers keeps the workers for
    the next `iter()`; re-aim the same loader with `loader.sampler.set(indices, epoch)` (the
    workers hold no state of an epoch: exact resume is unchanged).
    """
    pixels = pixel_path(inputs, fast_path, augment, draft)
    return torch.utils.data.DataLoader(
        ImageDataset(records, skip_bad_images, pixels), batch_size=batch_size,
        sampler=EpochSampler(indices, epoch), collate_fn=Collate(inputs, dataset_names),
        num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
        **worker_options(num_workers, persistent_workers, prefetch_factor))


def pixel_path(inputs, fast_path, augment=None, draft=None):
    """The FastPixels of a loader (make_loader states the options), or None for the processor
    path."""
    recipe = getattr(inputs, "recipe", None) if fast_path else None
    if augment is not None and recipe is None:
        raise ValueError(f"augmentation needs the fast image path; {type(inputs).__name__} has "
                         "none (see augment.augment_config)")
    draft = augment is not None if draft is None else draft
    return FastPixels(recipe, augment, draft) if recipe is not None else None


def auto_num_workers(cap=16):
    """DataLoader workers per rank for --num_workers auto: the CPUs this process may use
    (os.sched_getaffinity) divided among the local processes (LOCAL_WORLD_SIZE), one left for
    the process itself, at most `cap`, at least 0."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cap, usable_cpus() // local - 1))


def usable_cpus():
    """The CPUs this process may use (os.sched_getaffinity; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def ignore_stop_signals(_worker_id):
    """DataLoader workers leave SIGTERM / SIGUSR1 to the training process, which stops them itself.
    """
    import signal
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


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
        from sklearn.datasets import load_digits
        from skimage.data import lfw_subset
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-demo", metavar="DIR", required=True,
                        help="write the demo data into DIR")
    parser.add_argument("--format", choices=DEMO_FORMATS, default="jsonl",
                        help="jsonl: PNG files and JSONL records; folder: an image folder per "
                             "split; parquet: a Parquet file per split (needs datasets); wds: "
                             "WebDataset shards")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        make_demo(args.make_demo, args.seed, layout=args.format)
    except OSError as e:  # a user-given folder that cannot be written: one line, exit code 2
        import sys
        from files import reason
        print(f"error: --make-demo {args.make_demo}: cannot write the demo ({reason(e)})",
              file=sys.stderr)
        sys.exit(2)
