"""--streaming: the training samples of Parquet files or WebDataset shards read as a stream, for
data larger than the disk or kept remote (local paths or fsspec URLs), through `datasets`'
iterable datasets (pip install -e '.[streaming]').

Each reader (a DataLoader worker of a rank: world_size x max(1, --num_workers) of them) reads
its own part of every dataset, planned before the first step (StreamSource.plan): whole files
where a dataset has at least as many as there are readers; else, for Parquet, whole row groups
where it has enough of them; else every readers-th sample of all of them (said in a note). A
dataset that runs out starts its next pass (set_epoch: datasets reshuffles the order of the
reader's files). The reader's samples follow a schedule of blocks of SCHEDULE_BLOCK slots in
which dataset d fills round(share_d * SCHEDULE_BLOCK) slots (largest remainder) at seeded
positions (sampling.block_schedule): the shares hold exactly per block, not in expectation.
--shuffle_buffer N reads N samples, yields them in a seeded order, and reads the next N.

Resume is exact: a worker's position is the state of each dataset's stream at the start of its
current block of --shuffle_buffer samples (datasets' state_dict: the shard and the sample in it),
its schedule slot, and how many of the block it has yielded; on resume it reads that block again,
shuffles it the same way and skips what was yielded. torchdata's StatefulDataLoader
(loaders.make_stream_loader) keeps, per worker, the position of the last batch the loop took;
the checkpoint holds it as JSON. The same world size and --num_workers are needed (the split
depends on them).
"""
import copy
import functools
import io
import os
import posixpath

import numpy as np
import torch

from data.hf import class_names, parquet_footer, same_class_names
from data.paths import is_url, spec_files
from data.reading import Reading
from data.sampling import SCHEDULE_BLOCK, block_schedule, stream_shares
from data.specs import kind_named, parse_spec
from data.tar_index import TAR_IMAGE_FIELDS, load_tar_index, no_image_member
from data.types import NO_IMAGE, NO_LABEL, SHOWN, DataError, raise_data_errors
from preprocess import decode_rgb

# How the readers (processes x workers) split a stream (StreamSource.plan); kept in a checkpoint
# beside the stream's position: a position of another split would resume on other samples
SPLIT_VERSION = 2
INDEX_SPAN = 2 ** 40  # a stream sample's key: its worker part * INDEX_SPAN + its position there


def import_streaming():
    try:
        import datasets
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        raise DataError("--streaming needs `datasets` and `torchdata`: "
                        "pip install -e '.[streaming]'") from None
    return datasets, StatefulDataLoader


class StreamSource:
    """One dataset's stream: its files (or URLs), format (parquet | webdataset), columns, and
    how its readers split it (plan)."""

    def __init__(self, name, dataset_id, kind, files, image_column=None, label_column=None):
        self.name, self.dataset_id, self.kind, self.files = name, dataset_id, kind, files
        self.image_column, self.label_column = image_column, label_column
        self.plans = {}  # readers -> (split, units): decided once, carried into the workers

    @functools.cached_property
    def folders(self):
        """The folders of its files (once the run's sources are complete): where an image named
        by a path relative to its file lies."""
        paths = posixpath if is_url(self.files[0]) else os.path
        return sorted({paths.dirname(f) for f in self.files})

    def open(self):
        """The datasets IterableDataset of the files, images left undecoded."""
        datasets, _ = import_streaming()
        builder = "parquet" if self.kind == "hf" else "webdataset"
        try:
            stream = datasets.load_dataset(builder, data_files={"train": self.files},
                                           split="train", streaming=True)
        except Exception as e:  # datasets' errors say what is wrong, not which dataset
            raise DataError(f"--streaming dataset {self.name!r} ({self.where()}): cannot open: "
                            f"{e}") from None
        for column, feature in (stream.features or {}).items():
            if isinstance(feature, datasets.Image):
                stream = stream.cast_column(column, datasets.Image(decode=False))
        return stream

    def where(self):
        return ", ".join(self.files[:3]) + (", ..." if len(self.files) > 3 else "")

    def units(self, stream, split):
        """The stream cut into the units of `split` (its files, or its Parquet row groups)."""
        if split == "row groups":
            try:
                return stream.reshard()  # datasets: one shard per Parquet row group
            except Exception as e:
                raise DataError(f"--streaming dataset {self.name!r} ({self.where()}): cannot "
                                f"read its row groups: {e}") from None
        return stream

    def plan(self, readers):
        """(split, units) for `readers` readers: "files" or "row groups" where there are at
        least as many as readers (each reader reads whole ones), else ("samples", files): every
        readers-th sample of all the files."""
        if readers not in self.plans:
            split, units = "files", len(self.files)  # datasets' shards: one per file
            if units < readers:
                split = "samples"
                if self.kind == "hf":  # only then opened: a Parquet footer per file
                    groups = self.units(self.open(), "row groups").num_shards
                    split, units = ("row groups", groups) if groups >= readers else (split, units)
            self.plans[readers] = split, units
        return self.plans[readers]

    def part(self, readers, part):
        """The datasets IterableDataset of reader `part` of `readers` (see plan)."""
        from datasets.distributed import split_dataset_by_node
        split, units = self.plan(readers)
        stream = self.units(self.open(), split)
        if stream.num_shards != units:
            raise DataError(f"--streaming dataset {self.name!r} ({self.where()}): {units} "
                            f"{'row groups' if split == 'row groups' else 'files'} when the run "
                            f"was planned, {stream.num_shards} now: the files changed")
        if split == "samples":  # fewer units than readers: every readers-th sample
            return split_dataset_by_node(stream, part, readers)
        return stream.shard(readers, part, contiguous=False)

    def describe(self, readers):
        """How the readers split this dataset, for the run's summary; a note when a reader
        reads every file (a split by sample reads the files once per reader), or when the files
        (row groups) do not divide among the readers (each reader takes as many samples, so the
        files of those holding fewer come around more often)."""
        split, units = self.plan(readers)
        files = f"{len(self.files)} {'Parquet file' if self.kind == 'hf' else 'shard'}(s)"
        if split in ("files", "row groups"):
            unit = "files" if split == "files" else "row groups"
            fewer = units // readers
            uneven = None if units % readers == 0 else (
                f"--streaming dataset {self.name!r}: {units} {unit} for {readers} readers "
                f"(processes x DataLoader workers): some read {fewer}, others {fewer + 1}, and "
                f"each takes as many samples, so the {unit} of a reader with {fewer} come around "
                f"about {(fewer + 1) / fewer:.2g}x as often as the others (a multiple of "
                f"{readers} {unit}, or other --num_workers, keeps them even)")
            if split == "files":
                return files, uneven
            return f"{files}, {units} row groups (a reader reads whole row groups)", uneven
        return files, (f"--streaming dataset {self.name!r}: {units} file(s) for {readers} readers "
                       "(processes x DataLoader workers): each reads all of them and takes one "
                       f"sample in {readers} (more files or fewer --num_workers read less)")


def stream_sources(specs, registry, fixed, index_dir=None, skip_missing_images=False):
    """The StreamSource of each dataset of the training specs (Parquet or shards); the registry
    completed from the Parquet files' ClassLabel (or checked against it). Local shards are
    checked through their index first (check_local_shards)."""
    reading = Reading(registry, True, fixed, False, None)
    by_name = {}
    for text in specs:
        spec = parse_spec(text)
        if spec.kind not in ("hf", "wds"):
            raise DataError(f"data spec {text!r}: --streaming reads Parquet files or WebDataset "
                            f"shards, not a {spec.kind} source")
        dataset_id = reading.dataset_id(spec.name, f"data spec {text!r}")
        # a folder's compressed shards too, as read_shards lists them (streamed as they are read)
        files = spec_files(spec, kind_named(spec.kind).files)
        known = by_name.get(spec.name)
        if known and known.kind != spec.kind:
            raise DataError(f"data spec {text!r}: dataset {spec.name!r} is streamed from one "
                            "kind of source only")
        if known:
            known.files += files
        else:
            entry = registry[spec.name]
            by_name[spec.name] = StreamSource(spec.name, dataset_id, spec.kind, files,
                                              entry.image_column or "image",
                                              entry.label_column or "label")
    errors = []
    for source in by_name.values():
        if source.kind == "wds":
            errors += check_local_shards(source.files, index_dir, skip_missing_images)
    raise_data_errors(errors, 1, [])
    datasets, _ = import_streaming()
    for source in by_name.values():
        local = [f for f in source.files if not is_url(f)]
        if source.kind == "hf" and len(local) > 1:  # remote files: their first one's names
            same_class_names(local, [class_names(parquet_footer(f)[1], source.label_column)
                                     for f in local], source.label_column,
                             f"--streaming dataset {source.name!r}",
                             "a stream reads every file of a dataset by one ClassLabel: "
                             "write them with the same one")
        if source.kind == "hf":
            feature = (source.open().features or {}).get(source.label_column)
            if isinstance(feature, datasets.ClassLabel):
                reading.classes(source.name, feature.names, None,
                                f"{source.files[0]} (ClassLabel {source.label_column!r})")
    return list(by_name.values())


def check_local_shards(files, index_dir, skip_missing_images):
    """The problems of the local uncompressed shards among `files`, found by their index (built
    once and cached, as read_records builds it): a damaged or cut shard, a repeated key, a sample
    without an image (unless skipped) or without a label. datasets' tar reader would stop at a
    damaged header without a word, and a sample without a label among the first ones fails
    there without naming it. Remote and compressed shards are checked as they are read."""
    errors = []
    for shard in files:
        if is_url(shard) or not shard.endswith(".tar"):
            continue
        try:
            index = load_tar_index(shard, index_dir)
        except DataError as e:
            errors.append(str(e))
            continue
        names = [f"{shard}:{m.decode()}" for m in index["members"]]
        lost = [] if skip_missing_images else np.flatnonzero(index["offsets"] == NO_IMAGE)
        unlabelled = np.flatnonzero(index["labels"] == NO_LABEL)
        errors += [no_image_member(names[i]) for i in lost[:SHOWN]]
        # datasets' tar reader takes .cls for an integer: a class name there stops its stream
        errors += [f"{names[i]}: its label is the class name {index['names'][i].decode()!r}: "
                   "--streaming reads class indices only; without --streaming class names map "
                   "through the registry's labels" if index["names"][i] else
                   f"{names[i]}: no label (a .cls member or the 'label' of a .json member)"
                   for i in unlabelled[:SHOWN]]
        if len(lost) > SHOWN or len(unlabelled) > SHOWN:
            errors.append(f"{shard}: {len(lost)} samples without an image and "
                          f"{len(unlabelled)} without a label in all")
    return errors


class ImageStream(torch.utils.data.IterableDataset):
    """(image, label, dataset_id, key) items of the training stream, as loaders.ImageDataset
    gives them (the same Collate batches them). State: see the module's docstring. num_classes
    (per registry position) and pixels (a loaders.FastPixels) are set once the run knows them,
    alpha_on_white (the processor path's compositing, ImageDataset's) by make_stream_loader."""

    def __init__(self, sources, shares, names, *, seed, rank, world_size, buffer,
                 skip_bad_images=False):
        self.sources = {s.dataset_id: s for s in sources}
        self.shares, self.names, self.num_classes, self.pixels = shares, names, None, None
        self.alpha_on_white = False
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.buffer, self.skip_bad_images = max(1, buffer), skip_bad_images
        self.position, self.resume_from = None, None

    def state_dict(self):
        return copy.deepcopy(self.position)

    def load_state_dict(self, state):
        self.resume_from = state

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.rank * workers + worker, self.world_size * workers
        import_streaming()
        if info:  # as datasets does in a worker: fsspec's event loop is not the parent's
            import fsspec.asyn
            fsspec.asyn.reset_lock()
        start = self.resume_from or {"block": 0, "slot": 0, "taken": 0,
                                     "passes": {str(d): 0 for d in self.sources},
                                     "streams": {str(d): None for d in self.sources}}
        self.resume_from = None
        readers = {d: StreamReader(source.part(parts, part), start["passes"][str(d)],
                                   start["streams"][str(d)])
                   for d, source in self.sources.items()}
        block, slot, skip = start["block"], start["slot"], start["taken"]
        scheduled, schedule = None, None
        while True:
            self.position = {"block": block, "slot": slot, "taken": 0,
                             "passes": {str(d): r.passes for d, r in readers.items()},
                             "streams": {str(d): r.state() for d, r in readers.items()}}
            items = []
            for _ in range(self.buffer):
                if slot // SCHEDULE_BLOCK != scheduled:
                    scheduled = slot // SCHEDULE_BLOCK
                    schedule = block_schedule(self.shares, self.seed, part, scheduled)
                d = int(schedule[slot % SCHEDULE_BLOCK])
                example = readers[d].next()
                if example is None:
                    source = self.sources[d]
                    raise DataError(
                        f"--streaming dataset {source.name!r}: no samples for data-loader "
                        f"worker {worker} of {workers} on rank {self.rank} in its "
                        f"{len(source.files)} file(s): it holds fewer samples than the "
                        f"{parts} readers (processes x workers); lower --num_workers")
                items.append((d, *raw_sample(self.sources[d], example, readers[d].passes)))
                slot += 1
            order = np.random.default_rng([self.seed, part, block, 0x627566]).permutation(
                len(items))
            for taken, i in enumerate(order.tolist()):
                self.position["taken"] = taken + 1
                if taken >= skip:
                    yield self.decode(*items[i], part * INDEX_SPAN + block * self.buffer + i)
            block, skip = block + 1, 0

    def decode(self, dataset_id, data, label, where, key):
        """A streamed sample as ImageDataset gives one; its label checked here (a stream cannot
        be checked before the first step)."""
        name, k = self.names[dataset_id], self.num_classes[dataset_id]
        if label == NO_LABEL:
            raise DataError(f"{where}: no label (.cls, the 'label' of .json, or the label column; "
                            "a stream has the fields of its first samples)")
        if not 0 <= label < k:
            raise DataError(f"{where}: field 'label': {label} is outside [0, {k}) for dataset "
                            f"{name!r}")
        try:
            if data is None:
                raise DataError("no image")
            if isinstance(data, str):  # a path the Parquet file gives: read here, in the worker
                where = f"{where} ({data})"
                data = read_file(data)
            if self.pixels is not None:
                image = self.pixels(io.BytesIO(data), dataset_id, key, 0, 0)
            else:
                image = decode_rgb(io.BytesIO(data), self.alpha_on_white)
        except Exception as e:
            message = f"{where}: cannot decode image: {e}"
            if self.skip_bad_images:
                return None, message, dataset_id, key
            raise DataError(message) from None
        return image, label, dataset_id, key


def read_file(path):
    if is_url(path):
        import fsspec
        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


class StreamReader:
    """One dataset's stream in one worker, pass after pass; state() is where its next sample
    comes from (None: the start of the pass)."""

    def __init__(self, stream, passes, state):
        self.stream, self.passes = stream, passes
        self.start(state)

    def start(self, state):
        self.stream.set_epoch(self.passes)
        if state is not None:
            self.stream.load_state_dict(state)
        self.iterator, self.origin, self.started = examples(self.stream), state, False

    def state(self):
        return self.stream.state_dict() if self.started else copy.deepcopy(self.origin)

    def next(self):
        """The next example; a stream that runs out starts its next pass (None: a pass without
        any sample)."""
        try:
            example = next(self.iterator)
        except StopIteration:
            self.passes += 1
            self.start(None)
            example = next(self.iterator, None)
        self.started = example is not None or self.started
        return example


def examples(stream):
    """The examples of a datasets IterableDataset, read in this process: iterating it in a
    DataLoader worker would split it again among the workers (this reader's part is its own)."""
    for batch in stream.iter(batch_size=1):
        yield {k: v[0] for k, v in batch.items()}


def raw_sample(source, example, passes):
    """(image bytes, its path (str), or None; label or NO_LABEL; where) of one streamed
    example."""
    if source.kind == "wds":
        field = next((f for f in TAR_IMAGE_FIELDS if example.get(f) is not None), None)
        where = f"{example.get('__url__')}:{example.get('__key__')}" + (f".{field}" if field
                                                                        else "")
        image = example[field]["bytes"] if field else None
        label = example.get("cls")
        if label is None and isinstance(example.get("json"), dict):
            label = example["json"].get("label")
    else:
        where = f"--streaming dataset {source.name!r} (pass {passes} over its Parquet files)"
        value = example.get(source.image_column)
        image = value.get("bytes") if isinstance(value, dict) else value
        if image is None and isinstance(value, dict) and value.get("path"):
            # an Image of a path (not embedded): beside its file, as hf.ArrowTable; a stream's
            # row does not say its file, so files in several folders cannot resolve it
            paths = posixpath if is_url(source.files[0]) else os.path
            relative = not (is_url(value["path"]) or paths.isabs(value["path"]))
            if relative and len(source.folders) > 1:
                raise DataError(
                    f"{where}: image {value['path']!r} is a path relative to its Parquet file, "
                    f"whose folder a streamed row does not tell: the dataset's files sit in "
                    f"{len(source.folders)} folders ({', '.join(source.folders[:2])}, ...). Give "
                    "each folder's files as a dataset of their own, or read them without "
                    "--streaming")
            image = paths.join(source.folders[0], value["path"]) if relative else value["path"]
        label = example.get(source.label_column)
    if isinstance(label, bool) or not isinstance(label, int):
        label = NO_LABEL
    return image, label, where


def build_stream(specs, registry, fixed, *, seed, rank, world_size, buffer, skip_bad_images,
                 index_dir=None, num_workers=0):
    """(ImageStream, shares, summary) of the training specs; the stream's num_classes and pixels
    are set once the registry is complete and the model known. index_dir: where the indexes of
    local shards go when their folder is read-only. num_workers: the loader's, whose readers
    (world_size x max(1, num_workers)) split each dataset as planned here."""
    sources = stream_sources(specs, registry, fixed, index_dir, skip_bad_images)
    shares = stream_shares(sources, registry)
    names = list(registry)
    readers = world_size * max(1, num_workers)
    described = [(s, *s.describe(readers)) for s in sources]
    summary = "training stream (--streaming, share of the samples):\n" + "\n".join(
        f"  {s.name}: {files}, {100 * shares[s.dataset_id]:.1f}%" for s, files, _ in described)
    summary += "".join(f"\nnote: {note}" for *_, note in described if note)
    stream = ImageStream(sources, shares, names, seed=seed, rank=rank, world_size=world_size,
                         buffer=buffer, skip_bad_images=skip_bad_images)
    return stream, shares, summary
