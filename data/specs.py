"""Data specs: [NAME=][KIND:]PATH[:SPLIT] parsed into a types.Spec, the kind of its PATH
detected through the table of kinds (KINDS) unless a prefix forces it, and the layouts of splits.

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
Any other file is JSONL; a prefix folder:, hf:, wds: or jsonl: before PATH forces the kind.
A folder holding splits (the hub's data/{split}-00000-of-00001.parquet, split folders such as
train/ and val/, a DatasetDict) is read one split at a time: NAME=PATH:SPLIT (split_layout); a
PATH that holds several is refused, naming them.

A kind of source is a reader module and one line of KINDS: its reader and what makes a path
its kind.
"""
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from data.folder import METADATA_FILES, read_image_folder
from data.hf import SAVED_FILES, read_hf_dataset
from data.jsonl import read_json_source
from data.paths import expand_paths, expand_ranges, is_url
from data.types import DataError, Spec
from data.wds import SHARD_FILES, read_shards


@dataclass(frozen=True)
class Kind:
    """One kind of source: `name` is the prefix that forces it (NAME=KIND:PATH); read(spec,
    reading, jsonl_record) appends the records of one types.Spec to a reading.Reading (its
    add_source, dataset_id, parts of types.part, errors, notes). The rest is what detect_kind
    reads a path by."""
    name: str
    read: Callable
    files: tuple = ()  # endings of its data files (in a folder, a glob, a split)
    urls: tuple = ()  # endings of a URL of this kind
    marks: tuple = ()  # files that make a folder holding one this kind
    subfolders: str = None  # what a folder's subfolders are to this kind (None: not its kind)
    file: tuple = ()  # endings of a path that is one file of this kind
    other_files: bool = False  # a file no other kind claims is this kind


# The first line that claims a path wins (a save_to_disk folder's own files before metadata).
# Messages name the kinds in alphabetical order, the kind of any other file last.
KINDS = (
    Kind("hf", read_hf_dataset, files=(".parquet",), urls=(".parquet",), marks=SAVED_FILES),
    Kind("folder", read_image_folder, marks=METADATA_FILES, subfolders="class subfolders"),
    Kind("wds", read_shards, files=SHARD_FILES, urls=(".tar",)),
    Kind("jsonl", read_json_source, file=(".jsonl", ".json"), other_files=True),
)


def kind_named(name):
    """The Kind of a prefix or a Spec's kind; None for any other name."""
    return next((k for k in KINDS if k.name == name), None)


def file_kind(name):
    """The kind whose data files end as `name` does (hf: a Parquet file, wds: a shard,
    compressed too); None for other files."""
    return next((k.name for k in KINDS if name.endswith(k.files)), None)


def files_kind(files, text):
    kinds = {file_kind(f) for f in files}
    if len(kinds) != 1:
        raise DataError(f"data spec {text!r}: {files[0]} ... hold both {endings(kinds, 'and')} "
                        "files; give the files of one kind (a glob)")
    return kinds.pop()


def detect_kind(path, text):
    """The kind of PATH given without a prefix: by a URL's ending, a file's ending, the files a
    folder holds (or its subfolders), or the files a glob or range matches."""
    if is_url(path):
        kind = next((k.name for k in KINDS if path.endswith(k.urls)), None)
        if kind:
            return kind
        raise DataError(f"data spec {text!r}: cannot tell the kind of this URL; prefix it with "
                        f"{prefixes(k for k in KINDS if k.urls)}")
    kind = next((k.name for k in KINDS if path.endswith(k.file)), None)
    if kind or (os.path.isfile(path) and not file_kind(path)):  # as --train_jsonl took any file
        return kind or next(k.name for k in KINDS if k.other_files)
    if os.path.isdir(path):
        return folder_kind(path, text)
    files = expand_paths(path, text)
    kinds = {file_kind(f) for f in files}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    extensions = {os.path.splitext(f)[1] for f in files}
    raise DataError(f"data spec {text!r}: cannot tell the kind of {path} (files ending in "
                    f"{', '.join(sorted(extensions))}); prefix it with {prefixes(KINDS)}")


def folder_kind(path, text):
    """The kind of a folder: by its marks (a save_to_disk folder's files, a metadata file), else
    the one kind of its data files, else its subfolders'."""
    for kind in KINDS:
        if any(os.path.isfile(os.path.join(path, mark)) for mark in kind.marks):
            return kind.name
    entries = list(os.scandir(path))
    found = {file_kind(e.name) for e in entries if e.is_file()} - {None}
    if not found and any(e.is_dir() and not e.name.startswith(".") for e in entries):
        found = {k.name for k in KINDS if k.subfolders}
    if len(found) == 1:
        return found.pop()
    held = [k.subfolders for k in ordered(KINDS) if k.subfolders] + [
        k.files[0] for k in ordered(KINDS) if k.files]
    raise DataError(f"data spec {text!r}: {path} holds " + (
        f"both {endings(found, 'and')} files" if found else f"no {listed(held, 'or')} files") +
        "; prefix PATH with " + prefixes(k for k in KINDS if k.files or k.marks or k.subfolders))


def ordered(kinds):
    """Kinds as messages name them: alphabetically, the kind of any other file last."""
    return sorted(kinds, key=lambda k: (k.other_files, k.name))


def prefixes(kinds):
    return listed([f"{k.name}:" for k in ordered(kinds)], "or")


def endings(names, conjunction):
    """The ending of the data files of each kind named."""
    return listed([k.files[0] for k in ordered(KINDS) if k.name in names], conjunction)


def listed(words, conjunction):
    """a, b or c."""
    return ", ".join(words[:-1]) + f" {conjunction} " + words[-1] if len(words) > 1 else words[0]

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


def parse_spec(text):
    """[NAME=][KIND:]PATH[:SPLIT] -> Spec; the kind is detected from PATH unless a prefix forces
    it. A PATH holding splits is read as the split named, or refused (split_layout)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or "/" in name or os.sep in name:
        name, rest = None, text
    prefix, colon, path = rest.partition(":")
    forced = prefix if colon and kind_named(prefix) and not path.startswith("//") else None
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
