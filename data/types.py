"""The bottom of the data layer: its error, a registry entry (DatasetSpec), a parsed data spec
(Spec), and the RecordTable every task's records live in, with the Source each record names.
Nothing here imports another module of the layer; every other module may import from here."""
import os
from dataclasses import dataclass

import numpy as np

NO_IMAGE = -1  # the offset of a shard's sample without an image member
NO_LABEL = np.iinfo(np.int64).min  # the label of a record without one


class DataError(ValueError):
    """Bad user data: the message names the file, line and field."""


@dataclass
class DatasetSpec:
    """One dataset of the registry (registry.py checks each field)."""
    name: str
    num_classes: int  # None until its records' source says (an image folder, a ClassLabel)
    eval_ratio: float = 1.0
    description: str = ""
    sampling_weight: float = None  # relative share of training batches (None: by size)
    augment: str = None  # none | crop_flip | randaugment: overrides --augment for this dataset
    hflip: bool = True  # False: digits, text, laterality: a mirror image changes the class
    labels: list = None  # class names, index i = class i (None: the index is the name)
    image_column: str = None  # of a Hugging Face dataset (None: "image")
    label_column: str = None  # (None: "label")
    # True: for evaluation only, no training samples (check_training_samples). Not a field: set on
    # the instance only when true, so vars(spec), the registry resume compares with a checkpoint's
    # (checkpoint.run_fingerprint), is unchanged for every registry written before it existed.
    eval_only = False


def dataset_name_problem(name, others=()):
    """Why `name` cannot name a dataset (None: it can). Metrics are named
    {prefix}_{dataset}_{metric}: a name must not be empty nor collide with the aggregate's
    (overall), another dataset's top-5 or EMA metrics."""
    if not isinstance(name, str):
        return f"a dataset name must be text, got {name!r} (quote it in YAML)"
    if not name.strip():
        return "a dataset name must not be empty"
    if name == "overall":
        return ("'overall' names the aggregate over all datasets in every metric "
                "(eval_overall_accuracy, ...); rename the dataset")
    for other in [*others, "overall"]:
        for longer, shorter in ((name, other), (other, name)):
            if other != name and longer in (f"ema_{shorter}", f"{shorter}_top5"):
                return (f"the metrics of {longer!r} (eval_{longer}_accuracy) collide with the "
                        f"{'EMA' if longer.startswith('ema_') else 'top-5'} metrics of "
                        f"{shorter!r}; rename one of them")
    return None


@dataclass(frozen=True)
class Spec:
    """One data spec: `text` as given, its kind, the path read (a split's folder where a split
    is named), the dataset name (NAME=); `root` the PATH given, `split` the split named
    (PATH:SPLIT), `files` the split's files where its files are named by split (None: the
    files of `path`), `prefix` the kind forced (KIND:)."""
    text: str
    kind: str
    path: str
    name: str = None
    root: str = None
    split: str = None
    files: tuple = None
    prefix: str = None


class Source:
    """One file or folder records come from: names a record for messages and opens its image.
    A record is (row, member, offset, size); what those mean is the kind's."""

    member_is_path = False  # a record's member is its image file's path (a JSONL record's)

    def __init__(self, path):
        self.path = path

    def where(self, row, member):
        return f"{self.path}:{row}"

    def image_name(self, row, member):
        """What predictions call the record's image."""
        return self.where(row, member)

    def image_files(self, rows):
        """([file paths], the path's index of each of `rows`, its row in that file): with the
        member, which image a record reads (data.reading.image_files, which names a record whose
        member is its image's path by that path instead); a source of several files names each
        row's own."""
        return [os.path.abspath(self.path)], np.zeros(len(rows), dtype=np.int64), rows

    def open(self, row, member, offset, size):
        """The image: a path, or a file object over its bytes (Pillow opens either)."""
        raise NotImplementedError

    def what(self):
        """What the source is, for a message about what it does not give (check_classes)."""
        return type(self).__name__


class JsonlFile(Source):
    """A JSONL (or JSON) file: row is the line (the record's index in a JSON array); member the
    image's resolved path. Here, not in jsonl.py: a plain path in a RecordTable stands for one."""
    member_is_path = True

    def image_name(self, row, member):
        return member

    def open(self, row, member, offset, size):
        return member

    def what(self):
        return "JSONL records"


@dataclass
class Record:
    image_path: str   # the image's path, or where in a shard / table it is
    label: int        # class index inside its own dataset
    dataset_id: int   # position of its dataset in the registry
    source: str       # "file.jsonl:line", "shard.tar:member", "file.parquet:row" or the image


class RecordTable:
    """All records of some sources, held in numpy arrays.

    DataLoader workers share these pages with the main process; a list of millions of Python
    objects would be copied into every worker as reference counts touch it. `sources` are Source
    objects (a plain path stands for a JSONL file); each record has its source's id, its row
    there, its member (an image path, a tar member's name), and a tar member's offset and size.
    """

    def __init__(self, members, labels, dataset_ids, sources, source_ids, rows, offsets=None,
                 sizes=None):
        self.members = as_bytes(members)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.dataset_ids = np.asarray(dataset_ids, dtype=np.int64).reshape(-1)
        self.sources = [s if isinstance(s, Source) else JsonlFile(s) for s in sources]
        self.source_ids = np.asarray(source_ids, dtype=np.int32).reshape(-1)
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self.labels)
        self.offsets = (np.full(n, NO_IMAGE, dtype=np.int64) if offsets is None else
                        np.asarray(offsets, dtype=np.int64))
        self.sizes = np.zeros(n, dtype=np.int64) if sizes is None else np.asarray(sizes,
                                                                                  dtype=np.int64)

    @classmethod
    def concatenate(cls, parts, sources):
        """One table of parts (dicts of arrays, each with its source_ids)."""
        if not parts:
            return cls([], [], [], sources, [], [])
        column = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return cls(**column, sources=sources)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        source, row, member = self.sources[self.source_ids[i]], int(self.rows[i]), self.member(i)
        return Record(source.image_name(row, member), int(self.labels[i]),
                      int(self.dataset_ids[i]), source.where(row, member))

    def member(self, i):
        return self.members[i].decode()

    def open(self, i):
        """Record i's image: a path or a file object (Pillow opens either)."""
        return self.sources[self.source_ids[i]].open(int(self.rows[i]), self.member(i),
                                                     int(self.offsets[i]), int(self.sizes[i]))


def as_bytes(values):
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return values
    return np.array([v.encode() for v in values], dtype=np.bytes_) if len(values) else np.array(
        [], dtype="S1")


def part(source_id, dataset_ids, rows, labels, members, offsets=None, sizes=None):
    """One source's records as arrays (RecordTable.concatenate's parts)."""
    n = len(rows)
    return {"members": as_bytes(members), "labels": np.asarray(labels, dtype=np.int64),
            "dataset_ids": np.broadcast_to(np.asarray(dataset_ids, dtype=np.int64), (n,)),
            "source_ids": np.full(n, source_id, dtype=np.int32),
            "rows": np.asarray(rows, dtype=np.int64),
            "offsets": (np.full(n, NO_IMAGE, dtype=np.int64) if offsets is None else
                        np.asarray(offsets, dtype=np.int64)),
            "sizes": np.zeros(n, dtype=np.int64) if sizes is None else np.asarray(sizes,
                                                                                  dtype=np.int64)}


SHOWN = 20  # problems an error lists in full; the rest it counts


def first_problems(problems, where=""):
    """The first SHOWN problems, then how many more there are (`where`: e.g. " in FILE")."""
    more = len(problems) - SHOWN
    return problems[:SHOWN] + ([f"... and {more} more{where}"] if more > 0 else [])


def raise_data_errors(errors, num_samples, paths):
    """One DataError listing every problem found (the first SHOWN in full), or for files without
    samples."""
    if errors:
        shown = "\n  ".join(first_problems(errors))
        raise DataError(f"{len(errors)} problem(s) in the data files:\n  {shown}")
    if not num_samples and paths:
        raise DataError(f"no samples in {', '.join(paths)}")
