"""Where records are read: the data specs of --train_data / --val_data, one reader per kind of
source, and the RecordTable every task's records live in.

A SPEC is FILE.jsonl (each line names its dataset; --task generate and autoencoder: .json too) or
NAME=PATH, where PATH is
  folder  an image folder: one subfolder per class, sorted by name (the names are the class
          names; where every name is an integer, it is the label); the image files under each,
          at any depth. Or the hub's imagefolder: metadata.csv / metadata.jsonl listing each
          image's file_name and label
  hf      a Hugging Face dataset: .parquet files (a file, a folder of them, a glob) or a folder
          written by datasets' save_to_disk, read with `datasets` (pip install -e '.[hf]');
          columns `image` and `label` (registry image_column / label_column); class names
          from a ClassLabel label column
  wds     WebDataset shards: .tar files (a file, a folder of them, a glob, a {000..099} range);
          sample KEY is KEY.jpg|jpeg|png|webp with KEY.cls, the `label` of KEY.json or KEY.txt
A label may be a class name: mapped through the dataset's labels, else the sorted names of the
training data (Reading.map_names); a ClassLabel maps by name onto labels known already.
Any other file is JSONL; a prefix folder:, hf:, wds: or jsonl: before PATH forces the kind.
A folder holding splits (the hub's data/{split}-00000-of-00001.parquet, split folders such as
train/ and val/, a DatasetDict) is read one split at a time: NAME=PATH:SPLIT (split_layout); a
PATH that holds several is refused, naming them.

Every kind serves a record by index, without unpacking anything: image files by path, Arrow
tables memory-mapped by `datasets` (Parquet is converted once into datasets' cache), tar members
by their byte offset, from an index of each shard built once and kept beside it (or under the
run's folder where the shards' folder is read-only). So the keyed sampler of dataset.py works the
same over every kind. Every record is checked before the first step; a problem names its
`file:line`, `file.parquet:row`, `shard.tar:member` or image file.
"""
import bisect
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dataset import DataError, DatasetSpec, dataset_name_problem

KINDS = ("jsonl", "folder", "hf", "wds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm")
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # the first a sample has is its image
INDEX_SUFFIX = ".index.npz"
INDEX_DIR = "tar_index"  # in a run's folder: the indexes of shards whose folder is read-only
INDEX_VERSION = 3  # 2: damaged headers, cut shards and repeated keys are errors; 3: class names
TAR_LABEL_FIELDS = ("cls", "json", "txt")  # the first a sample has gives its label
NO_IMAGE = -1  # the offset of a shard's sample without an image member
NO_LABEL = np.iinfo(np.int64).min  # the label of a record without one


# Split names as `datasets` finds them in a repository's file and folder names
# (datasets/data_files.py: SPLIT_KEYWORDS, NON_WORDS_CHARS, SPLIT_PATTERN_SHARDED; the split name
# rule of datasets/naming.py), copied: folders and shards are read without `datasets` installed
# (tests/test_layouts.py checks them against the installed package).
SPLIT_KEYWORDS = {"train": ["train", "training"],
                  "validation": ["validation", "valid", "dev", "val"],
                  "test": ["test", "testing", "eval", "evaluation"]}
NON_WORDS_CHARS = "-._ 0-9"
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # datasets' _split_re
# datasets' data/{split}-[0-9]{5}-of-[0-9]{5}*.*
SHARDED_NAME = re.compile(r"(\w+(?:\.\w+)*)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # the hub's imagefolder
COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SHARD_FILES = (".tar",) + COMPRESSED_SHARDS


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


def parse_spec(text):
    """[NAME=][KIND:]PATH[:SPLIT] -> Spec; the kind is detected from PATH unless a prefix forces
    it. A PATH holding splits is read as the split named, or refused (split_layout)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name or os.sep in name:
        name, rest = None, text
    prefix, colon, path = rest.partition(":")
    forced = prefix if colon and prefix in KINDS and not path.startswith("//") else None
    path = path if forced else rest
    path, split = split_suffix(path, text)
    if not path:
        raise DataError(f"data spec {text!r}: no path")
    root = path
    path, files, kind = split_layout(path, split, text, name, forced)
    kind = forced or kind or detect_kind(path, text)
    if forced and kind != forced:  # files named by split whose kind is not the prefix's
        raise DataError(f"data spec {text!r}: the files read from {root} ({files[0]}"
                        f"{', ...' if len(files) > 1 else ''}) are {kind} files, not {forced}: "
                        f"drop the prefix {forced}:")
    if kind == "jsonl" and name:
        raise DataError(f"data spec {text!r}: a JSONL file names each record's dataset "
                        "(dataset_name); give it without NAME=")
    if kind != "jsonl" and not name:
        raise DataError(f"data spec {text!r}: name its dataset: NAME={text} (a {kind} source "
                        "holds the records of one dataset)")
    return Spec(text, kind, path, name, root, split, files, forced)


def is_url(path):
    return "://" in path


# A URL is streamed: training specs only (validation and eval.py read their data whole).
URL_READ = ("a URL is read only as a training stream (train.py --streaming, --train_data); to "
            "validate or evaluate on remote data, download its files first (for example `hf "
            "download REPO --repo-type dataset --local-dir DIR`, or curl) and give the local path")


def absolute_spec(text):
    """The spec with an absolute local path, so that eval.py finds it again from a checkpoint."""
    spec = parse_spec(text)
    if is_url(spec.root):
        return text
    return spec_text(spec.name, spec.prefix, os.path.abspath(spec.root), spec.split)


def spec_text(name, prefix, path, split=None):
    """A spec written back from its parts (absolute_spec, the spec a message tells to give)."""
    return (f"{name}=" if name else "") + (f"{prefix}:" if prefix else "") + path + (
        f":{split}" if split else "")


def split_suffix(path, text):
    """(PATH, SPLIT) of PATH:SPLIT, or (path, None). A local path that exists with its colon is
    that path (a file named a:b); a URL is not listed, so a split of it is refused."""
    head, colon, tail = path.rpartition(":")
    if not colon or not head or not SPLIT_NAME.fullmatch(tail) or head.endswith(":"):
        return path, None
    if is_url(path):
        if tail.isdigit():  # a port: http://host:8000
            return path, None
        raise DataError(f"data spec {text!r}: the splits of a URL are not looked up: give the "
                        f"split's files (a glob or a {{000..099}} range) instead of :{tail}")
    if os.path.exists(path):
        if os.path.exists(head):
            raise DataError(f"data spec {text!r}: both {path} and {head} exist, so it may name "
                            f"either, or split {tail!r} of {head}: rename one of them")
        return path, None
    return head, tail


def split_layout(path, split, text, name, forced):
    """(path to read, its files or None, kind or None) of a spec's PATH and SPLIT: the split's
    folder or files where PATH holds splits (find_splits), else PATH itself. A PATH holding
    several splits without SPLIT, a SPLIT it does not hold, or a SPLIT of a path without splits
    is a DataError naming the splits found and the spec to give."""
    found = find_splits(path, text) if not is_url(path) and os.path.isdir(path) else None
    if found is None:
        if split is None:
            if not is_url(path) and (any(c in path for c in "*?[") or expand_ranges(path) != [
                    path]):
                check_pattern_splits(path, text)
            return path, None, None
        what = (f"{path} not found (read as split {split!r} of {path})"
                if not os.path.exists(path) else
                f"{path} is a file" if not os.path.isdir(path) else
                f"{path} holds no splits (no split folders such as train/ and val/, no "
                "{split}-00000-of-00001 files, no DatasetDict)")
        raise DataError(f"data spec {text!r}: {what} (PATH:SPLIT reads split SPLIT of the "
                        f"folder PATH): give it as {spec_text(name, forced, path)}"
                        if os.path.exists(path) else f"data spec {text!r}: {what}")
    layout, splits, rest = found
    if not layout.startswith("a DatasetDict"):  # datasets' order: train, validation, test, others
        splits = dict(sorted(splits.items(), key=lambda item: split_rank(item[0])))
    if split is None and len(splits) == 1 and not rest and not isinstance(
            next(iter(splits.values())), str):
        files = next(iter(splits.values()))  # one split's files: nothing else to mix in
        return path, tuple(files), files_kind(files, text)
    example = " or ".join(spec_text(name or "NAME", forced, path, s) for s in splits)
    listed = ", ".join(f"{s} ({split_shown(path, t)})" for s, t in splits.items())
    if split is None:
        others = (f"; also files of no split: "
                  f"{', '.join(os.path.relpath(r, path) for r in rest[:3])}"
                  f"{', ...' if len(rest) > 3 else ''}" if rest else "")
        raise DataError(f"data spec {text!r}: {path} holds the splits {listed} ({layout}"
                        f"{others}); a path is read as one split, never as several mixed: "
                        f"name one, e.g. {example} (NAME=PATH:SPLIT in train.py, eval.py "
                        "and config files)")
    if split not in splits:
        raise DataError(f"data spec {text!r}: {path} has no split {split!r}; it holds the "
                        f"splits {listed} ({layout}): give {example}")
    target = splits[split]
    if isinstance(target, str):
        return target, None, None
    return path, tuple(target), files_kind(target, text)


def check_pattern_splits(pattern, text):
    """A glob or range whose files carry the names of several splits (train-*, test-*) is
    refused: the spec would mix them."""
    files = [f for f in expand_paths(pattern, text) if file_kind(f)]
    splits = {}
    for f in files:
        base = os.path.basename(f)
        match = SHARDED_NAME.fullmatch(base)
        keyword = match.group(1) if match else split_of(base, False, text)
        if keyword:
            splits.setdefault(keyword, base)
    if len(splits) > 1:
        splits = dict(sorted(splits.items(), key=lambda item: split_rank(item[0])))
        raise DataError(f"data spec {text!r}: {pattern} matches files of the splits "
                        f"{', '.join(f'{s} ({f})' for s, f in splits.items())}; a spec is read "
                        "as one split, never as several mixed: narrow the pattern to one split "
                        "(to train on several, give each as its own spec of the same NAME)")


def split_of(name, folder, text=None):
    """The split keyword (datasets' SPLIT_KEYWORDS) in a file name or, folder True, a folder
    name, as datasets' patterns find it; None without one. A folder name holding two is no
    split (a class such as dev-test); a file's is an error naming the spec (text)."""
    sep = re.escape(NON_WORDS_CHARS).replace(r"0\-9", "0-9")
    found = {k for keywords in SPLIT_KEYWORDS.values() for k in keywords
             if re.fullmatch(f"(.*[{sep}])?{k}([{sep}].*){'?' if folder else ''}", name)}
    if len(found) > 1 and not folder:
        raise DataError(f"data spec {text!r}: {name}: its name holds the split names "
                        f"{', '.join(sorted(found))}; rename it so that it names one split")
    return found.pop() if len(found) == 1 else None


def find_splits(root, text):
    """(what the layout is, {split: folder or [files]}, files of no split) of a local folder
    that holds splits as the hub and `datasets` lay them out, or None for a folder of one
    dataset. Looked for in `root` and then `root/data`, in datasets' order: a DatasetDict
    (dataset_dict.json), {split}-00000-of-00001 file names, split folders (every subfolder a
    split name, or two splits of different kinds such as train/ and val/), split names in the
    data files' names (train.parquet beside test.parquet)."""
    dict_file = os.path.join(root, "dataset_dict.json")
    if os.path.isfile(dict_file):
        try:
            with open(dict_file, encoding="utf-8") as f:
                names = json.load(f)["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"data spec {text!r}: {dict_file}: cannot read its splits ({e})"
                            ) from None
        return ("a DatasetDict written by save_to_disk",
                {s: os.path.join(root, s) for s in names}, [])
    if os.path.isfile(os.path.join(root, "state.json")):  # one save_to_disk Dataset
        return None
    for folder in (root, os.path.join(root, "data")):
        if not os.path.isdir(folder):
            continue
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                         key=lambda e: e.name)
        files = [e for e in entries if e.is_file() and file_kind(e.name)]
        where = "" if folder == root else "data/"
        sharded = {e.path: SHARDED_NAME.fullmatch(e.name) for e in files}
        if any(sharded.values()):
            splits = {}
            for path, match in sharded.items():
                if match:
                    splits.setdefault(match.group(1), []).append(path)
            return (f"the hub's {where}{{split}}-00000-of-00001 files",
                    splits, [p for p, m in sharded.items() if not m])
        folders = [e for e in entries if e.is_dir()]
        named = {e.name: split_of(e.name, True) for e in folders}
        kinds = {canonical_split(k) for k in named.values() if k}
        if folders and (all(named.values()) or len(kinds) > 1):
            splits = {}
            for e in folders:
                if named[e.name]:
                    splits.setdefault(e.name, e.path)
            return (f"split folders {', '.join(f'{where}{s}/' for s in splits)}", splits, [])
        named = {e.path: split_of(e.name, False, text) for e in files}
        if any(named.values()):
            splits = {}
            for path, keyword in named.items():
                if keyword:
                    splits.setdefault(keyword, []).append(path)
            return ("the split names in its files' names, as datasets reads them", splits,
                    [p for p, k in named.items() if not k])
        if files or folder != root:
            return None
    return None


def split_shown(root, target):
    """A split's folder or files as a message names them, relative to the folder of splits."""
    if isinstance(target, str):
        return os.path.relpath(target, root) + "/"
    more = f" and {len(target) - 1} more" if len(target) > 1 else ""
    return os.path.relpath(target[0], root) + more


def split_rank(name):
    keyword = split_of(name, True)
    return (list(SPLIT_KEYWORDS).index(canonical_split(keyword)) if keyword else 3, name)


def canonical_split(keyword):
    return next(s for s, keywords in SPLIT_KEYWORDS.items() if keyword in keywords)


def file_kind(name):
    """hf for a Parquet file, wds for a shard (compressed too), None for other files."""
    if name.endswith(".parquet"):
        return "hf"
    if name.endswith(SHARD_FILES):
        return "wds"
    return None


def files_kind(files, text):
    kinds = {file_kind(f) for f in files}
    if len(kinds) != 1:
        raise DataError(f"data spec {text!r}: {files[0]} ... hold both .parquet and .tar files; "
                        "give the files of one kind (a glob)")
    return kinds.pop()


def spec_files(spec, extension):
    """The files of a spec: its split's files, or those of its path (expand_paths)."""
    return list(spec.files) if spec.files else expand_paths(spec.path, spec.text, extension)


def detect_kind(path, text):
    if is_url(path):
        if path.endswith(".parquet"):
            return "hf"
        if path.endswith(".tar"):
            return "wds"
        raise DataError(f"data spec {text!r}: cannot tell the kind of this URL; prefix it with "
                        "hf: or wds:")
    if path.endswith((".jsonl", ".json")) or (os.path.isfile(path) and not file_kind(path)):
        return "jsonl"  # as --train_jsonl took any file
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json",
                                                                "state.json")):
            return "hf"
        entries = list(os.scandir(path))
        if any(e.name in METADATA_FILES and e.is_file() for e in entries):
            return "folder"  # the hub's imagefolder: images listed with their labels
        found = {file_kind(e.name) for e in entries if e.is_file()} - {None}
        if not found and any(e.is_dir() and not e.name.startswith(".") for e in entries):
            found = {"folder"}
        if len(found) == 1:
            return found.pop()
        raise DataError(f"data spec {text!r}: {path} holds " + (
            "both .parquet and .tar files" if found else
            "no class subfolders, .parquet or .tar files") +
            "; prefix PATH with folder:, hf: or wds:")
    files = expand_paths(path, text)
    kinds = {file_kind(f) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    extensions = {os.path.splitext(f)[1] for f in files}
    raise DataError(f"data spec {text!r}: cannot tell the kind of {path} (files ending in "
                    f"{', '.join(sorted(extensions))}); prefix it with folder:, hf:, wds: or "
                    "jsonl:")


def expand_paths(path, text, extension=None):
    """The files of a path: {000..099} ranges and globs expanded, a folder's files ending in
    `extension`; sorted within each pattern. A pattern that matches nothing is an error."""
    if is_url(path):
        return expand_ranges(path)
    out = []
    for pattern in expand_ranges(path):
        if os.path.isdir(pattern) and extension:
            files = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.endswith(extension))
            if not files:
                what = extension if isinstance(extension, str) else "/".join(extension)
                raise DataError(f"data spec {text!r}: no {what} files in {pattern}")
            out += files
        elif any(c in pattern for c in "*?["):
            files = sorted(glob.glob(pattern))
            if not files:
                raise DataError(f"data spec {text!r}: no file matches {pattern}")
            out += files
        elif os.path.isfile(pattern):
            out.append(pattern)
        else:
            raise DataError(f"data spec {text!r}: {pattern} not found")
    return out


def expand_ranges(path):
    """shard-{000..002}.tar -> shard-000.tar, shard-001.tar, shard-002.tar (zero-padded as the
    first bound is written); several ranges multiply."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", path)
    if not match:
        return [path]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = path[:match.start()], path[match.end():]
    return [p for i in range(int(first), int(last) + 1)
            for p in expand_ranges(f"{head}{i:0{width}d}{tail}")]


# ----------------------------------------------------------------------------- sources

class Source:
    """One file or folder records come from: names a record for messages and opens its image.
    A record is (row, member, offset, size); what those mean is the kind's."""

    def __init__(self, path):
        self.path = path

    def where(self, row, member):
        return f"{self.path}:{row}"

    def image_name(self, row, member):
        """What predictions call the record's image."""
        return self.where(row, member)

    def open(self, row, member, offset, size):
        """The image: a path, or a file object over its bytes (Pillow opens either)."""
        raise NotImplementedError


class JsonlFile(Source):
    """A JSONL (or JSON) file: row is the line (the record's index in a JSON array); member the
    image's resolved path."""

    def image_name(self, row, member):
        return member

    def open(self, row, member, offset, size):
        return member


class ImageFolder(Source):
    """An image folder: member is the image's path, which also names the record."""

    def where(self, row, member):
        return member

    def open(self, row, member, offset, size):
        return member


class TarShard(Source):
    """A WebDataset shard: member is the image member's name, offset and size its bytes in the
    shard (read_member)."""

    def where(self, row, member):
        return f"{self.path}:{member}"

    def open(self, row, member, offset, size):
        if offset == NO_IMAGE:
            raise DataError("the sample has no image member")
        data = read_member(self.path, offset, size)
        if len(data) != size:
            raise DataError(f"the shard ends inside member {member}")
        return io.BytesIO(data)


OPEN_SHARDS = 64  # shards a process keeps open; a shuffled order over thousands stays under the
# open-file limit (the least recently read is closed)
_descriptors = OrderedDict()  # shard path -> descriptor, of process _owner[0]
_owner = [None]


def read_member(path, offset, size):
    """`size` bytes at `offset` of a shard, with pread on a descriptor this process keeps open (a
    DataLoader worker opens its own after it starts)."""
    if _owner[0] != os.getpid():  # a forked worker: the descriptors it inherited are its parent's
        for fd in _descriptors.values():
            os.close(fd)
        _descriptors.clear()
        _owner[0] = os.getpid()
    fd = _descriptors.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_descriptors) >= OPEN_SHARDS:
            os.close(_descriptors.popitem(last=False)[1])
    _descriptors[path] = fd
    return os.pread(fd, size, offset)


class ArrowTable(Source):
    """A Hugging Face dataset, memory-mapped: row is the row of the whole table; `files` and
    `starts` name a row by its Parquet file and its row there."""

    def __init__(self, path, table, column, files=(), counts=()):
        super().__init__(path)
        self.table, self.column = table, column
        self.files, self.starts = list(files), np.cumsum([0, *counts])[:-1].tolist()

    def value(self, row):
        """The image cell of a row, from the Arrow column itself: a row of the `datasets` table
        costs its formatting machinery, about 5 times the column's lookup."""
        if getattr(self.table, "_indices", None) is not None:  # a selection of the rows
            return self.table[row][self.column]
        return self.table.data.column(self.column)[row].as_py()

    def where(self, row, member):
        if not self.files:
            return f"{self.path}:{row}"
        i = bisect.bisect_right(self.starts, row) - 1
        return f"{self.files[i]}:{row - self.starts[i]}"

    def open(self, row, member, offset, size):
        value = self.value(int(row))
        if isinstance(value, dict):  # an Image feature: {"bytes", "path"}
            if value.get("bytes") is not None:
                return io.BytesIO(value["bytes"])
            if value.get("path"):
                return os.path.join(os.path.dirname(self.files[0]) if self.files else self.path,
                                    value["path"])
            raise DataError(f"column {self.column!r} holds no image in this row")
        if value is None:
            raise DataError(f"column {self.column!r} is empty in this row")
        return io.BytesIO(value)


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


# ----------------------------------------------------------------------------- JSON records

def read_data_file(path, errors):
    """The text of a data file, or None with the reason added to `errors`."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        errors.append(f"{path}: cannot read the data file ({getattr(e, 'strerror', None) or e})")
        return None


def json_items(path, errors):
    """(row, where, item) of a JSONL file (row: the line) or of a JSON file (one array or one
    object; row: the index), one at a time (a file of millions of lines is not held as parsed
    objects); problems are added to `errors`."""
    text = read_data_file(path, errors)
    if text is None:
        return
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})")
            return
        data = data if isinstance(data, list) else [data]
        items = ((i, f"{path}: record {i}", item) for i, item in enumerate(data))
    else:
        items = jsonl_lines(path, text, errors)
    for row, where, item in items:
        if isinstance(item, dict):
            yield row, where, item
        else:
            errors.append(f"{where}: expected a JSON object, got {type(item).__name__}")


def jsonl_lines(path, text, errors):
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 in strings
        if line.strip():
            try:
                yield lineno, f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})")


def classifier_line(item):
    """(dataset name, [(image path, field)], label) of a classifier's record: {"image_path",
    "label", "dataset_name"}; ValueError names what is wrong."""
    missing = [k for k in ("image_path", "label", "dataset_name") if k not in item]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(repr(k) for k in missing)}")
    label, image = item["label"], item["image_path"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"field 'label': expected an integer, got {label!r}")
    if not isinstance(image, str) or not image:
        raise ValueError(f"field 'image_path': expected a non-empty string, got {image!r}")
    return item["dataset_name"], [(image, "image_path")], label


def raise_data_errors(errors, num_samples, paths):
    """One DataError listing every problem found (the first 20 in full), or for files without
    samples."""
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{len(errors)} problem(s) in the data files:\n  {shown}{more}")
    if not num_samples and paths:
        raise DataError(f"no samples in {', '.join(paths)}")


# ----------------------------------------------------------------------------- the readers

class Reading:
    """What one read_records call builds: the sources, the parts of the table, the problems and
    notes found, and each dataset's class names as its sources give them."""

    def __init__(self, registry, labelled, fixed, skip_missing_images, index_dir,
                 training=False):
        self.registry, self.labelled, self.fixed = registry, labelled, fixed
        self.training = training
        self.skip_missing_images, self.index_dir = skip_missing_images, index_dir
        self.sources, self.parts, self.errors, self.notes = [], [], [], []
        self.named = []  # (dataset, part index, positions, class names, where) to map

    def add_names(self, name, names, where, record):
        """The last part's records whose label is a class name (names: bytes, empty where the
        label is an index): mapped onto the dataset's classes once every source is read
        (map_names). A source mixing indices and names is an error: which index is which name
        would be a guess. where: the source, record(i): record i of the part, for messages."""
        names = np.asarray(names)
        positions = np.flatnonzero(names != b"")
        if not len(positions):
            return
        labels = self.parts[-1]["labels"]
        indexed = np.flatnonzero((names == b"") & (labels != NO_LABEL))
        if len(indexed):
            self.errors.append(f"{where}: both class indices ({record(indexed[0])}: "
                               f"{labels[indexed[0]]}) and class names ({record(positions[0])}: "
                               f"{names[positions[0]].decode()!r}) as labels: which index is "
                               "which name is not known: give one kind")
            return
        self.named.append((name, len(self.parts) - 1, positions,
                           [n.decode() for n in names[positions]], where, record))

    def map_names(self):
        """Class names as labels -> class indices: through the registry's labels (or those an
        image folder or a ClassLabel gave), else the sorted names seen, which become the
        dataset's labels, so validation data (read after) maps onto the same classes. A name
        that is not a class is an error naming it and where it is."""
        for name in dict.fromkeys(n for n, *_ in self.named):
            entries = [e for e in self.named if e[0] == name]
            seen = sorted({n for e in entries for n in e[3]})
            spec = self.registry[name]
            wheres = ", ".join(dict.fromkeys(e[4] for e in entries))
            if spec.labels is None:
                if spec.num_classes is not None and spec.num_classes != len(seen):
                    raise DataError(
                        f"dataset {name!r}: its records name {len(seen)} classes ("
                        f"{', '.join(seen[:10])}{', ...' if len(seen) > 10 else ''}) in "
                        f"{wheres}; the registry says num_classes {spec.num_classes}: give "
                        "the class names, in label order, as the dataset's labels")
                self.classes(name, seen, None, f"the class names of {wheres}")
            index = {n: i for i, n in enumerate(spec.labels)}
            unknown = [n for n in seen if n not in index]
            if unknown:
                first = next(e[5](e[2][i]) for e in entries for i, n in enumerate(e[3])
                             if n == unknown[0])
                self.errors.append(
                    f"{first}: class name(s) {', '.join(repr(n) for n in unknown[:10])}"
                    f"{', ...' if len(unknown) > 10 else ''} are not classes of dataset "
                    f"{name!r} (its classes: {', '.join(spec.labels[:10])}"
                    f"{', ...' if len(spec.labels) > 10 else ''})")
                continue
            for _, k, positions, names, _, _ in entries:
                labels = self.parts[k]["labels"].copy()
                labels[positions] = [index[n] for n in names]
                self.parts[k]["labels"] = labels

    def add_source(self, source):
        self.sources.append(source)
        return len(self.sources) - 1

    def dataset_id(self, name, where):
        """The registry position of dataset `name`; an open registry (fixed False) adds it."""
        if name not in self.registry:
            if self.fixed:
                raise DataError(f"{where}: dataset {name!r} is not in the dataset registry "
                                f"(known: {', '.join(self.registry)})")
            problem = dataset_name_problem(name, [*self.registry, name])
            if problem:
                raise DataError(f"{where}: dataset {name!r}: {problem}")
            self.registry[name] = DatasetSpec(name, None if self.labelled else 1)
        return list(self.registry).index(name)

    def classes(self, name, names, count, where):
        """A source of dataset `name` knows its classes (names, or only their count): fill the
        registry entry, or check that it agrees."""
        spec = self.registry[name]
        if names is not None:
            names = [str(n) for n in names]
            count = len(names)
        if spec.num_classes is not None and count is not None and spec.num_classes != count:
            raise DataError(f"dataset {name!r}: the registry says num_classes {spec.num_classes}"
                            f", {where} has {count} classes")
        if names is not None and spec.labels is not None and spec.labels != names:
            raise DataError(f"dataset {name!r}: the class names of {where} "
                            f"({', '.join(names[:5])}{', ...' if count > 5 else ''}) differ from "
                            f"the registry's labels ({', '.join(spec.labels[:5])}"
                            f"{', ...' if len(spec.labels) > 5 else ''})")
        spec.num_classes = spec.num_classes or count
        spec.labels = spec.labels or names


def read_records(specs, registry, *, labelled=True, fixed=True, jsonl_record=classifier_line,
                 skip_missing_images=False, index_dir=None, training=False, say=print):
    """Read and check every record of every spec into one RecordTable; raise one DataError
    listing what is wrong. labelled: records need a class (the classifier); fixed: a dataset
    outside `registry` is an error, else it is added (an entry the sources complete).
    jsonl_record(item) -> (dataset name, [(image, field)], label) reads a JSON record.
    skip_missing_images: a shard's sample without an image is left out (and said), not an
    error. index_dir: where tar indexes go when a shard's folder is read-only. training: the
    training split (an image folder's class without images is an error, not a note)."""
    reading = Reading(registry, labelled, fixed, skip_missing_images, index_dir, training)
    parsed = [parse_spec(s) for s in specs]
    for spec in parsed:  # NAME= datasets first: the registry's order follows the specs
        if spec.name is not None:
            reading.dataset_id(spec.name, f"data spec {spec.text!r}")
    for spec in parsed:
        {"jsonl": read_json_source, "folder": read_image_folder, "hf": read_hf_dataset,
         "wds": read_shards}[spec.kind](spec, reading, jsonl_record)
    reading.map_names()
    records = RecordTable.concatenate(reading.parts, reading.sources)
    if labelled:
        check_labels(records, registry, reading.errors)
    for note in reading.notes:
        say(f"note: {note}")
    raise_data_errors(reading.errors, len(records), [s.text for s in parsed])
    return records


def read_json_source(spec, reading, jsonl_record):
    source = JsonlFile(spec.path)
    source_id = reading.add_source(source)
    folder = os.path.dirname(os.path.abspath(spec.path))
    rows, labels, dataset_ids, members, fields = [], [], [], [], {}
    for row, where, item in json_items(spec.path, reading.errors):
        try:
            name, images, label = jsonl_record(item)
            if not isinstance(name, str) or not name or (reading.fixed and
                                                         name not in reading.registry):
                raise ValueError(f"field 'dataset_name': {name!r} is not in the dataset registry "
                                 f"(known: {', '.join(reading.registry)})")
            problem = name not in reading.registry and dataset_name_problem(
                name, [*reading.registry, name])
            if problem:
                raise ValueError(f"field 'dataset_name': {problem}")
            dataset_id = reading.dataset_id(name, where)
        except ValueError as e:
            reading.errors.append(f"{where}: {e}")
            continue
        for image, field in images:
            if field != "image_path":  # a conversation's turn: named as such if it is missing
                fields[len(members)] = field
            rows.append(row)
            labels.append(label)
            dataset_ids.append(dataset_id)
            members.append(os.path.join(folder, image))
    with ThreadPoolExecutor(16) as pool:  # stat calls: slow on network filesystems one by one
        found = list(pool.map(os.path.isfile, members))
    reading.errors += [f"{source.where(rows[k], members[k])}: field "
                       f"'{fields.get(k, 'image_path')}': image file not found: {members[k]}"
                       for k, ok in enumerate(found) if not ok]
    reading.parts.append(part(source_id, dataset_ids, rows, labels, members))


def read_image_folder(spec, reading, jsonl_record):
    """Subfolders are the classes (folder_classes: by name, or by integer where every name is
    one; mapped by name onto class names the dataset already has, from the registry's labels or
    an earlier source), the image files under each at any depth are their samples, in sorted
    order (folder_images: links followed, each folder once). Other files are named in a note;
    images directly in the folder belong to no class (an error for the classifier). A class
    without any image is named in a note, and is an error in training data."""
    root, name = spec.path, spec.name
    if not os.path.isdir(root):
        raise DataError(f"data spec {spec.text!r}: {root} is not a folder")
    metadata = [f for f in METADATA_FILES if os.path.isfile(os.path.join(root, f))]
    if metadata:
        return read_metadata_folder(spec, reading, metadata)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    reading.errors += [dangling_link(e.path) for e in entries
                       if not e.name.startswith(".") and is_dangling(e)]
    class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.path for e in entries if not e.is_dir()
             and (e.name.startswith(".") or not is_dangling(e))]
    other = [e.path for e in entries if e.is_dir() and e.name.startswith(".")]
    dataset_id = reading.dataset_id(name, f"data spec {spec.text!r}")
    known = reading.registry[name].labels
    without_folder = []  # classes this folder gives that have no folder (integer names)
    if reading.labelled and known is None:
        names = folder_classes(root, class_dirs, reading.errors)
        reading.classes(name, names, None, root)
        known = names
        without_folder = [c for c in names if c not in class_dirs]
    source_id = reading.add_source(ImageFolder(root))
    members, labels = [], []
    images = [p for p in loose if p.lower().endswith(IMAGE_EXTENSIONS)]
    if images and reading.labelled:
        reading.errors.append(f"{images[0]}: an image directly in {root} belongs to no class "
                              f"({len(images)} such): move it into a class subfolder")
    elif images:
        members += images
        labels += [0] * len(images)
    other += [p for p in loose if not p.lower().endswith(IMAGE_EXTENSIONS)]
    stat = os.stat(root)
    seen = {(stat.st_dev, stat.st_ino): root}  # every folder read (device, inode) -> its path
    empty = []
    for class_dir in class_dirs:
        if reading.labelled and class_dir not in known:
            reading.errors.append(f"{os.path.join(root, class_dir)}: class folder {class_dir!r} "
                                  f"is not a class of dataset {name!r} (its classes: "
                                  f"{', '.join(known[:10])}{', ...' if len(known) > 10 else ''})")
            continue
        label = known.index(class_dir) if reading.labelled else 0
        found = folder_images(os.path.join(root, class_dir), seen, reading.errors, other)
        empty += [] if found else [os.path.join(root, class_dir)]
        members += found
        labels += [label] * len(found)
    if other:
        reading.notes.append(f"{root}: {len(other)} file(s) or hidden folder(s) that are not "
                             f"images were not read, e.g. {other[0]}")
    note_empty_classes(root, name, empty, without_folder, reading)
    reading.parts.append(part(source_id, dataset_id, range(len(members)), labels, members))


class MetadataFile(JsonlFile):
    """The metadata.csv / metadata.jsonl of the hub's imagefolder: row is its line; member the
    image's path."""


def metadata_items(path, errors):
    """(line, where, {column: value}) of a metadata.csv (csv's reading of it: every value text)
    or metadata.jsonl."""
    if path.endswith(".jsonl"):
        yield from json_items(path, errors)
        return
    import csv
    text = read_data_file(path, errors)
    if text is None:
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for item in reader:
        where = f"{path}:{reader.line_num}"
        if None in item:  # more cells than the header names
            errors.append(f"{where}: more values than the header has columns")
            continue
        yield reader.line_num, where, item


def read_metadata_folder(spec, reading, found):
    """The hub's imagefolder with a metadata file (what datasets' imagefolder builder reads):
    `file_name` is each image's path inside the folder, the label column (the registry's
    label_column, else `label`) its class: an index (an integer, or its digits in a CSV) or a
    class name (mapped as a shard's names are, Reading.map_names)."""
    root, name = spec.path, spec.name
    if len(found) > 1:
        raise DataError(f"data spec {spec.text!r}: {root} holds both {' and '.join(found)}: "
                        "keep one (which one lists the images would be a guess)")
    path = os.path.join(root, found[0])
    column = reading.registry[name].label_column or "label"
    dataset_id = reading.dataset_id(name, f"data spec {spec.text!r}")
    source = MetadataFile(path)
    source_id = reading.add_source(source)
    rows, members, values, wheres = [], [], [], []
    for row, where, item in metadata_items(path, reading.errors):
        needed = ["file_name"] + ([column] if reading.labelled else [])
        missing = [c for c in needed if c not in item]
        if missing:
            reading.errors.append(f"{where}: no column {', '.join(repr(c) for c in missing)} "
                                  f"(columns: {', '.join(item)}); the registry's label_column "
                                  "names another label column")
            continue
        value = item[column] if reading.labelled else 0
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            reading.errors.append(f"{where}: column {column!r}: expected a class index or a "
                                  f"class name, got {value!r}")
            continue
        rows.append(row)
        members.append(os.path.join(root, str(item["file_name"])))
        values.append(value)
        wheres.append(where)
    with ThreadPoolExecutor(16) as pool:  # stat calls: slow on network filesystems one by one
        found = list(pool.map(os.path.isfile, members))
    reading.errors += [f"{wheres[k]}: column 'file_name': image file not found: {members[k]}"
                       for k, ok in enumerate(found) if not ok]
    labels = [v if isinstance(v, int) else NO_LABEL for v in values]
    reading.parts.append(part(source_id, dataset_id, rows, labels, members))
    if reading.labelled:
        reading.add_names(name, as_bytes([v if isinstance(v, str) else "" for v in values]),
                          f"{path} (column {column!r})", lambda i: wheres[i])


def folder_classes(root, class_dirs, errors):
    """The class names of an image folder's class folders, in label order: sorted by name, or
    where every name is a decimal integer, the integer is the label (the same class as label N
    of JSONL, Parquet or shards): classes 0 to the largest, a missing integer named as a
    folder of it would be (zero-padded to the shortest name's width)."""
    if not class_dirs or not all(re.fullmatch(r"[0-9]+", d) for d in class_dirs):
        return class_dirs
    by_value = {}
    for d in class_dirs:
        by_value.setdefault(int(d), []).append(d)
    same = next((v for v in by_value.values() if len(v) > 1), None)
    if same:  # two folders, one label: no order of the two would be right
        errors.append(f"{root}: class folders {' and '.join(repr(d) for d in same)} are the same "
                      f"integer, {int(same[0])}, the label of each: rename one")
        return class_dirs
    width = min(len(d) for d in class_dirs)
    return [by_value[i][0] if i in by_value else str(i).zfill(width)
            for i in range(max(by_value) + 1)]


def note_empty_classes(root, name, empty, without_folder, reading):
    """Class folders without any image, and integer classes without a folder: their classes
    have no samples here. A note, as a validation split may lack a class; for training data
    (reading.training) an error, as it is most likely a mistake."""
    if not empty and not without_folder:
        return
    if not reading.labelled:
        reading.notes.append(f"{root}: {len(empty)} folder(s) without any image: "
                             f"{', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}")
        return
    said = []
    if empty:
        said.append(f"{len(empty)} class folder(s) without any image ("
                    f"{', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''})")
    if without_folder:
        said.append(f"{len(without_folder)} class(es) without a folder (the class folders are "
                    f"integers, each the label, so {', '.join(without_folder[:10])}"
                    f"{', ...' if len(without_folder) > 10 else ''} are classes too)")
    what = f"{root}: {' and '.join(said)}: their class has no samples in dataset {name!r}"
    if reading.training:  # one is most likely a mistake; its class would never be learned
        reading.errors.append(f"{what}; training data needs samples of every class: add them"
                              + (", or remove the empty folder(s)" if empty else "")
                              + (", or give the dataset's `labels` in the registry (folders "
                                 "are then mapped onto them by name)" if without_folder else ""))
    else:
        reading.notes.append(what)


def folder_images(top, seen, errors, other):
    """The image files under folder `top` at any depth, sorted, a folder's own before its
    subfolders' (os.walk's order). Links are followed, each folder once: a folder reached again
    (a link to a folder above it, a loop, or a second link to one) and a link to nothing are
    errors naming the link; hidden entries and other files go to `other`."""
    images, stack = [], [top]
    while stack:
        folder = stack.pop()
        try:
            stat = os.stat(folder)
            key = (stat.st_dev, stat.st_ino)
            if key in seen:
                errors.append(f"{link_named(folder)}: the same folder as {link_named(seen[key])}"
                              ", read already: each folder is read once (a link to a folder "
                              "above it is a loop): remove the link")
                continue
            seen[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            errors.append(f"{folder}: cannot be read ({e.strerror})")
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                other.append(e.path)
            elif e.is_dir():
                subfolders.append(e.path)
            elif is_dangling(e):
                errors.append(dangling_link(e.path))
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(e.path)
            else:
                other.append(e.path)
        stack += reversed(subfolders)
    return images


def is_dangling(entry):
    """A link to nothing (is_dir / is_file follow links; a plain entry costs no system call)."""
    return (entry.is_symlink() and not entry.is_dir() and not entry.is_file()
            and not os.path.exists(entry.path))


def dangling_link(path):
    try:
        os.stat(path)
        problem = "not found"
    except OSError as e:
        problem = e.strerror
    return f"{path}: a link to {os.readlink(path)}, which cannot be read ({problem})"


def link_named(path):
    return f"{path} (a link to {os.path.realpath(path)})" if os.path.islink(path) else path


def import_datasets(what):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the `datasets` library: pip install -e '.[hf]'") from None
    return datasets


def read_hf_dataset(spec, reading, jsonl_record):
    """Parquet files (converted once into datasets' cache, then memory-mapped) or a save_to_disk
    folder. Only the label column is read to check labels; the image column is checked for empty
    rows without decoding anything."""
    datasets = import_datasets(f"data spec {spec.text!r}")
    name, path = spec.name, spec.path
    if is_url(path):
        raise DataError(f"data spec {spec.text!r}: {URL_READ}")
    image_column = reading.registry[name].image_column or "image"
    label_column = reading.registry[name].label_column or "label"
    files, counts = [], []
    if not spec.files and os.path.isdir(path) and not any(f.endswith(".parquet")
                                                          for f in os.listdir(path)):
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"data spec {spec.text!r}: {path} holds the splits "
                            f"{', '.join(table)}: give one of them, e.g. {name}="
                            f"{os.path.join(path, next(iter(table)))}")
    else:
        import pyarrow.parquet as pq
        files = spec_files(spec, ".parquet")
        try:
            counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
            table = datasets.Dataset.from_parquet(files)
        except Exception as e:  # pyarrow's errors say what is wrong, not which file
            raise DataError(f"data spec {spec.text!r}: cannot read the Parquet files "
                            f"{', '.join(files)}: {e}") from None
    where = files[0] if len(files) == 1 else path
    columns = table.column_names
    for column, needed in ((image_column, True), (label_column, reading.labelled)):
        if needed and column not in columns:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(columns)}); "
                            f"the registry's image_column / label_column name others")
    dataset_id = reading.dataset_id(name, f"data spec {spec.text!r}")
    feature = table.features[image_column]
    if isinstance(feature, datasets.Image):
        image_table = table.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False))
        empty = image_rows_without_data(table.data.column(image_column))
    elif getattr(feature, "dtype", None) in ("binary", "large_binary"):
        image_table = table.select_columns([image_column])
        empty = np.asarray(table.data.column(image_column).is_null())
    else:
        raise DataError(f"{where}: column {image_column!r} is {feature}: expected an Image "
                        "feature or bytes")
    source = ArrowTable(path, image_table, image_column, files, counts)
    source_id = reading.add_source(source)
    n = len(table)
    labels = (label_values(table, label_column, where, reading, name) if reading.labelled else
              np.zeros(n, dtype=np.int64))
    for row in np.flatnonzero(empty)[:20].tolist():
        reading.errors.append(f"{source.where(row, '')}: column {image_column!r} holds no image")
    if empty.any() and len(np.flatnonzero(empty)) > 20:
        reading.errors.append(f"{where}: {int(empty.sum())} rows without an image in all")
    reading.parts.append(part(source_id, dataset_id, range(n), labels, np.zeros(n, dtype="S1")))


def image_rows_without_data(column):
    """Rows of an Image column (struct of bytes and path) with neither, as a bool array."""
    import pyarrow.compute as pc
    empty = pc.and_(pc.is_null(pc.struct_field(column, "bytes")),
                    pc.is_null(pc.struct_field(column, "path")))
    return np.asarray(pc.or_(pc.is_null(column), pc.fill_null(empty, True)))


def label_values(table, column, where, reading, name):
    """The label column alone as int64 (NO_LABEL where empty); a ClassLabel gives class names."""
    datasets = import_datasets(where)
    feature = table.features[column]
    known = reading.registry[name].labels
    mapping = None
    if isinstance(feature, datasets.ClassLabel):
        names = [str(n) for n in feature.names]
        if known is None or names == known:
            reading.classes(name, names, None, f"{where} (ClassLabel {column!r})")
        else:  # the same classes in another order (or some of them): mapped by name
            unknown = [n for n in names if n not in known]
            if unknown:
                raise DataError(f"dataset {name!r}: the class names of {where} (ClassLabel "
                                f"{column!r}: {', '.join(names[:5])}"
                                f"{', ...' if len(names) > 5 else ''}) differ from the "
                                f"registry's labels ({', '.join(known[:5])}"
                                f"{', ...' if len(known) > 5 else ''}): "
                                f"{', '.join(repr(n) for n in unknown[:10])} are not among them")
            mapping = np.array([known.index(n) for n in names], dtype=np.int64)
    elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise DataError(f"{where}: column {column!r} is {feature}: expected class indices "
                        "(integers or a ClassLabel)")
    values = table.data.column(column)
    values = np.asarray(values.cast("int64").fill_null(NO_LABEL).to_numpy(), dtype=np.int64)
    if mapping is not None:
        inside = (values >= 0) & (values < len(mapping))
        values = np.where(inside, mapping[np.clip(values, 0, len(mapping) - 1)],
                          np.where(values == NO_LABEL, NO_LABEL, -1))
    return values


def read_shards(spec, reading, jsonl_record):
    """Each shard's index (built once, then read from its cache) gives its samples' image
    offsets and labels; problems of every shard are collected before anything is raised."""
    if is_url(spec.path):
        raise DataError(f"data spec {spec.text!r}: {URL_READ}")
    shards = spec_files(spec, SHARD_FILES)
    dataset_id = reading.dataset_id(spec.name, f"data spec {spec.text!r}")
    skipped = []
    for shard in shards:
        if not shard.endswith(".tar"):
            raise DataError(f"data spec {spec.text!r}: {shard} is a compressed shard: shards "
                            "are read by the byte offset of each member, so they must be "
                            f"uncompressed .tar files: uncompress it (gunzip, bunzip2 or unxz "
                            "leave a .tar), or stream it with train.py --streaming")
        try:
            index = load_tar_index(shard, reading.index_dir)
        except DataError as e:
            reading.errors.append(str(e))
            continue
        source = TarShard(shard)
        source_id = reading.add_source(source)
        members = index["members"]
        missing = index["offsets"] == NO_IMAGE
        if missing.any():
            lost = [f"{shard}:{m.decode()}" for m in members[missing]]
            if reading.skip_missing_images:
                skipped += lost
            else:
                reading.errors += [f"{w}: no image member (.{', .'.join(TAR_IMAGE_FIELDS)})"
                                   for w in lost]
        keep = ~missing if reading.skip_missing_images else np.ones(len(members), dtype=bool)
        reading.parts.append(part(source_id, dataset_id, np.flatnonzero(keep),
                                  index["labels"][keep], members[keep], index["offsets"][keep],
                                  index["sizes"][keep]))
        if reading.labelled:
            kept = members[keep]
            reading.add_names(spec.name, index["names"][keep], shard,
                              lambda i, kept=kept, shard=shard: f"{shard}:{kept[i].decode()}")
    if skipped:
        reading.notes.append(f"{len(skipped)} sample(s) without an image left out "
                             f"(--on_bad_image skip): {', '.join(skipped[:5])}"
                             f"{', ...' if len(skipped) > 5 else ''}")


def check_labels(records, registry, errors):
    """Every record's label inside [0, num_classes) of its dataset, checked on the arrays; each
    problem names its record. A record without a label is listed whatever the class count; the
    range of a dataset whose class count is not known yet is left to check_classes (a later
    source may give it)."""
    for dataset_id, (name, spec) in enumerate(registry.items()):
        members = np.flatnonzero(records.dataset_ids == dataset_id)
        if not len(members):
            continue
        k, labels = spec.num_classes, records.labels[members]
        missing = members[labels == NO_LABEL]
        outside = (members[(labels != NO_LABEL) & ((labels < 0) | (labels >= k))]
                   if k is not None else members[:0])
        errors += [f"{records[i].source}: no label (a .cls member, the 'label' of a .json member, "
                   "a .txt member, or the label column)" for i in missing[:20].tolist()]
        errors += [f"{records[i].source}: field 'label': {records.labels[i]} is outside [0, {k}) "
                   f"for dataset {name!r}" for i in outside[:20].tolist()]
        if len(missing) > 20 or len(outside) > 20:  # the arrays are checked whole, not listed
            errors.append(f"dataset {name!r}: {len(missing)} records without a label and "
                          f"{len(outside)} with one outside [0, {k}) in all")


def source_kind(source):
    """What a source is, for a message about what it does not give."""
    if isinstance(source, ArrowTable):
        return (("Parquet files" if source.files else "a Hugging Face dataset") +
                " with an integer label column, not a ClassLabel")
    return {JsonlFile: "JSONL records", TarShard: "WebDataset shards",
            MetadataFile: "an imagefolder's metadata file with integer labels"}.get(type(source),
                                                                           type(source).__name__)


def check_classes(registry, tables):
    """After every source of a run is read: each dataset knows its class count, and every
    record's label is checked against it (also those read before a later source gave it)."""
    errors = []
    for dataset_id, (name, spec) in enumerate(registry.items()):
        if spec.num_classes is not None:
            continue
        kinds = sorted({source_kind(t.sources[s]) for t in tables if t is not None
                        for s in np.unique(t.source_ids[t.dataset_ids == dataset_id]).tolist()})
        said = f" ({'; '.join(kinds)})" if kinds else ""
        errors.append(f"dataset {name!r}: no num_classes in the registry, and its sources{said} "
                      "do not say how many classes it has (an image folder or a ClassLabel "
                      "column does): add num_classes")
    for records in tables:
        if records is not None:
            check_labels(records, registry, errors)
    raise_data_errors(errors, 1, [])


# ----------------------------------------------------------------------------- tar index

def load_tar_index(shard, index_dir=None):
    """The index of a shard: per sample (in the shard's order) its member name, image offset and
    size (NO_IMAGE without an image) and label (NO_LABEL without one). Read from its cache when the
    shard is unchanged (size, mtime), else built by reading the headers (and the .cls / .json
    members) and cached beside the shard, or in index_dir where that folder is read-only."""
    stat = os.stat(shard)
    stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    places = [shard + INDEX_SUFFIX]
    if index_dir:
        digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
        places.append(os.path.join(index_dir, f"{digest}-{os.path.basename(shard)}{INDEX_SUFFIX}"))
    for place in places:
        try:
            with np.load(place, allow_pickle=False) as cached:
                if np.array_equal(cached["stamp"], stamp):
                    return {k: cached[k] for k in ("members", "offsets", "sizes", "labels",
                                                   "names")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            continue
    index = build_tar_index(shard, stat.st_size)
    for place in places:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(place)), exist_ok=True)
            temporary = f"{place}.tmp-{os.getpid()}"
            with open(temporary, "wb") as f:
                np.savez(f, stamp=stamp, **index)
            os.replace(temporary, place)
            return index
        except OSError:
            continue
    return index  # nowhere writable: built again next time


def sample_key(name):
    """WebDataset's split of a member name: (key, field) at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot or not key:
        return None, None
    return (f"{folder}/{key}" if folder else key), field


def build_tar_index(shard, size):
    """Read a shard's headers once; the .cls / .json members are read for their labels. tarfile
    takes a damaged or short header for the end of the archive, so where it stopped is checked
    (tar_end_problem): else the samples after it would be lost without a word."""
    samples, problems, tar = {}, [], None
    current, fields, name = None, {}, None  # the sample being read, its fields, the last member
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                key, field = sample_key(member.name)
                where = f"{shard}:{member.name}"
                if key is None:
                    problems.append(f"{where}: no KEY.EXT name, so it belongs to no sample")
                    continue
                if member.offset_data + member.size > size:
                    problems.append(f"{where}: cut off (the shard ends at byte {size})")
                    break
                field = field.lower()
                if key != current:
                    current, fields = key, {}
                    if key in samples:  # WebDataset's readers make two samples of one key
                        first, offset = samples[key]["first"]
                        problems.append(f"{shard}: key {key!r} again at member {member.name} "
                                        f"(byte {member.offset}) after other keys; its first "
                                        f"member is {first} (byte {offset})")
                        continue
                    samples[key] = {"image": None, "first": (member.name, member.offset)}
                if field in fields:
                    problems.append(f"{shard}: key {key!r} has .{field} twice: members "
                                    f"{fields[field][0]} (byte {fields[field][1]}) and "
                                    f"{member.name} (byte {member.offset})")
                    continue
                fields[field] = (member.name, member.offset)
                sample = samples[key]
                if field in TAR_IMAGE_FIELDS:
                    if sample["image"] is None:
                        sample["image"] = (member.name, member.offset_data, member.size)
                elif field in TAR_LABEL_FIELDS:
                    try:
                        sample[field] = tar_label(field, tar.extractfile(member).read())
                    except ValueError as e:
                        problems.append(f"{where}: {e}")
            else:
                problem = tar_end_problem(shard, tar.offset, size, name)
                if problem:
                    problems.append(problem)
    except (tarfile.TarError, OSError) as e:
        if tar is None:  # the first header (tarfile names what is wrong with it)
            problems.append(f"{shard}: not a readable tar file (byte 0: {e})")
        elif tar.offset > size:  # the padding of the last member's data is cut off
            problems.append(f"{shard}: cut off after member {name} (the shard ends at byte "
                            f"{size}, its next header was due at byte {tar.offset})")
        else:
            problems.append(f"{shard}: damaged header at byte {tar.offset} ({e})")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more in {shard}"]
                                 if len(problems) > 20 else [])
        raise DataError("\n  ".join(shown))
    members = [s["image"][0] if s["image"] else key for key, s in samples.items()]
    # .cls first, as WebDataset's own readers take it, then the label of .json, then .txt
    values = [next((s[f] for f in TAR_LABEL_FIELDS if s.get(f, NO_LABEL) != NO_LABEL),
                   NO_LABEL) for s in samples.values()]
    return {"members": as_bytes(members),
            "offsets": np.array([s["image"][1] if s["image"] else NO_IMAGE
                                 for s in samples.values()], dtype=np.int64),
            "sizes": np.array([s["image"][2] if s["image"] else 0 for s in samples.values()],
                              dtype=np.int64),
            "labels": np.array([v if isinstance(v, int) else NO_LABEL for v in values],
                               dtype=np.int64),
            # a class name where the label is one (mapped by read_records), else empty
            "names": as_bytes([v if isinstance(v, str) else "" for v in values])}


def tar_end_problem(shard, offset, size, last):
    """Why the end tarfile found at `offset` is not the archive's end, or None. An end is two
    zero blocks with only zeros after them (the writer's padding); tarfile also stops, without
    an error, at a header it cannot read, where a shard is cut short, and at a zero block in the
    middle."""
    after = f" after member {last}" if last else ""
    with open(shard, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
        if not block:
            return (f"{shard}: cut off{after}: it ends at byte {size} without the end-of-archive "
                    "blocks (two zero blocks)")
        if len(block) < tarfile.BLOCKSIZE and block.strip(b"\0"):
            return f"{shard}: cut off inside the header at byte {offset} (it ends at byte {size})"
        if block.strip(b"\0"):
            return (f"{shard}: damaged header at byte {offset} ({header_problem(block)}); the "
                    "members from there on cannot be read")
        position = offset + len(block)
        while True:  # only zeros to the end: what follows is a writer's padding
            chunk = f.read(1 << 16)
            if not chunk:
                break
            rest = chunk.lstrip(b"\0")
            if rest:
                at = position + len(chunk) - len(rest)
                at -= at % tarfile.BLOCKSIZE
                return (f"{shard}: a zero block at byte {offset} (read as the end of the archive)"
                        f" but data again at byte {at}: a damaged header or a zero block in the "
                        "middle; the members after it cannot be read")
            position += len(chunk)
    if size - offset < 2 * tarfile.BLOCKSIZE:
        return (f"{shard}: cut off{after}: it ends at byte {size} inside the end-of-archive "
                f"blocks that start at byte {offset}")
    return None


def header_problem(block):
    """What tarfile finds wrong with a header block (a bad checksum, a field that is no number)."""
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return str(e)
    return "a header tarfile does not read"


def tar_label(field, data):
    """The label of a .cls or .txt member (its text) or of a .json member (its "label"): a class
    index (an integer, or its digits as text), or a class name (other text); NO_LABEL for a
    .json without "label"."""
    text = data.decode("utf-8", errors="replace").strip()
    if field != "json":
        value = text
        if not value:
            raise ValueError(f"an empty .{field}: expected a class index or a class name")
    else:
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON ({e.msg})") from None
        if not isinstance(item, dict) or "label" not in item:
            return NO_LABEL
        value = item["label"]
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        value = int(value)
    if isinstance(value, str) and value.strip():
        return value.strip()  # a class name
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field 'label': expected an integer or a class name, got {value!r}")
    return value
