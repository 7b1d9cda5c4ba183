"""Reading records: read_records parses every data spec, has its kind's reader (specs.KINDS) add
its records to one Reading, and checks them all into one RecordTable, raising one DataError that
lists every problem.

Every kind serves a record by index, without unpacking anything: image files by path, Arrow
tables memory-mapped by `datasets` (Parquet is converted once into datasets' cache), tar members
by their byte offset, from an index of each shard built once and kept beside it (or under the
run's folder where the shards' folder is read-only). So the keyed sampler of loaders.py works the
same over every kind. Every record is checked before the first step; a problem names its
`file:line`, `file.parquet:row`, `shard.tar:member` or image file.

A label may be a class name: mapped through the dataset's labels, else the sorted names of the
training data (Reading.map_names); a ClassLabel maps by name onto labels known already.
"""
import os
import re

import numpy as np

from data.jsonl import classifier_line
from data.specs import kind_named, parse_spec
from data.types import (NO_LABEL, SHOWN, DataError, DatasetSpec, RecordTable, dataset_name_problem,
                        raise_data_errors)


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
                self.check_one_kind_of_label(name, entries, wheres)
                decimal = [n for n in seen if re.fullmatch(r"-?\d+\.0*", n)]
                if decimal:  # a float column written out (pandas: 3.0): an index, not a name
                    first = next(e[5](e[2][i]) for e in entries for i, n in enumerate(e[3])
                                 if n == decimal[0])
                    raise DataError(
                        f"{first}: the label {decimal[0]!r} is a class index written as a "
                        f"decimal ({len(decimal)} such in {wheres}): read as class names they "
                        "would be sorted as text (10.0 before 2.0). Write the labels as integers, "
                        "or give the dataset's labels in the registry to read them as names")
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

    def check_one_kind_of_label(self, name, entries, wheres):
        """Refuse a dataset without known labels (none from the registry, an image folder or a
        ClassLabel) whose sources label by class name (`entries`) and others by class index
        (each source is checked alone in add_names): the names' sorted order is a guess."""
        dataset_id = list(self.registry).index(name)
        named = {e[1] for e in entries}
        indexed = [self.sources[int(p["source_ids"][0])].path for k, p in enumerate(self.parts)
                   if k not in named and ((p["dataset_ids"] == dataset_id)
                                          & (p["labels"] != NO_LABEL)).any()]
        if indexed:
            raise DataError(f"dataset {name!r}: {indexed[0]} labels by class index and {wheres} "
                            "by class name: which index is which name is not known. Give the "
                            "dataset's labels (its class names in index order) in the registry, "
                            "or one kind of label")

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
        kind_named(spec.kind).read(spec, reading, jsonl_record)
    reading.map_names()
    records = RecordTable.concatenate(reading.parts, reading.sources)
    if labelled:
        check_labels(records, registry, reading.errors)
        check_repeats(records, registry, reading.errors, reading.notes, reading.training)
    for note in reading.notes:
        say(f"note: {note}")
    raise_data_errors(reading.errors, len(records), [s.text for s in parsed])
    return records


def image_files(records, ids=None):
    """(file id, row there or -1, member) of each record: the image it reads, one file id per
    file whoever names it (`ids`: path -> id, shared by tables). A record whose member is its
    image's path (JSONL, image folder) is identified by that file, in its folder's real path
    (`..`, `.`, doubled slashes, a relative spec, a linked folder: one file), its member then
    b""; a shard's or Parquet file's record by the file, its member or row."""
    files, rows = np.zeros(len(records), dtype=np.int64), np.full(len(records), -1)
    named_by_path = [source.member_is_path for source in records.sources]
    members = (np.zeros(len(records), dtype="S1") if all(named_by_path) else  # no copy of all
               records.members.copy() if any(named_by_path) else records.members)
    ids = {} if ids is None else ids
    real_folders = {}  # a folder as records name it -> its real path (one call per folder)
    by_source = np.argsort(records.source_ids, kind="stable")  # one pass, not one per source
    bounds = np.searchsorted(records.source_ids[by_source], np.arange(len(records.sources) + 1))
    for source_id, source in enumerate(records.sources):
        at = by_source[bounds[source_id]:bounds[source_id + 1]]
        if source.member_is_path:
            files[at] = [ids.setdefault(real_file(m, real_folders), len(ids))
                         for m in records.members[at].tolist()]
            members[at] = b""
            continue
        paths, which, in_file = source.image_files(records.rows[at])
        files[at] = np.array([ids.setdefault(p, len(ids)) for p in paths], dtype=np.int64)[which]
        rows[at] = np.where(records.members[at] == b"", in_file, -1)
    return files, rows, members


def real_file(path, real_folders):
    """An image's path (bytes) in its folder's real path; `real_folders` caches the folders."""
    folder, _, name = path.rpartition(b"/")
    real = real_folders.get(folder)
    if real is None:  # b"" is the current folder, or "/" for a path "/name"
        real = real_folders[folder] = os.fsencode(os.path.realpath(
            os.fsdecode(folder) if folder or not path.startswith(b"/") else "/")).rstrip(b"/")
    return real + b"/" + name


def same_as_previous(order, keys):
    """For each record in `order` after the first: whether every key equals the previous one's
    (records sorted by those keys: one image's records are neighbours)."""
    same = np.ones(max(0, len(order) - 1), dtype=bool)
    for key in keys:
        ranked = key[order]
        same &= ranked[1:] == ranked[:-1]
    return same


def images_also_in(val, train):
    """The positions of `val`'s records whose image a record of `train` reads for the same
    dataset (its file with its member or row), sorted."""
    ids = {}
    both = [image_files(train, ids), image_files(val, ids)]
    files, rows, members = (np.concatenate([table[k] for table in both]) for k in (0, 1, 2))
    datasets = np.concatenate([train.dataset_ids, val.dataset_ids])
    side = np.repeat([0, 1], [len(train), len(val)])  # 0: train
    keys = (side, rows, members, files, datasets)
    order = np.lexsort(keys)  # each image's records together, its training records first
    image = np.cumsum(np.concatenate([[True], ~same_as_previous(order, keys[1:])])) - 1
    trained = np.zeros(image[-1] + 1 if len(image) else 0, dtype=bool)
    trained[image[side[order] == 0]] = True
    in_val = side[order] == 1
    return np.sort(order[in_val & trained[image]] - len(train))


def say_trained_in_val(val, train, registry, say):
    """A note per dataset whose validation records read images its training records read: its
    evaluations (and the best checkpoint) would score images the model trains on."""
    shared = images_also_in(val, train)
    for dataset_id, name in enumerate(registry):
        mine = shared[val.dataset_ids[shared] == dataset_id]
        if len(mine):
            total = int((val.dataset_ids == dataset_id).sum())
            say(f"note: dataset {name!r}: {len(mine)} of its {total} validation records read "
                f"a training image (e.g. {val[int(mine[0])].source}): its evaluations score "
                "images the model trains on (leave them out of --val_data to score held-out ones)")


def check_repeats(records, registry, errors, notes, training=True):
    """Records of one dataset that read the same image again (a line repeated, two specs or
    globs over the same files): with another label an error (one image, two classes), else a
    note (each is trained on as often as it is listed). An image is what image_files names: a
    JSONL or folder record's own path, a shard's or Parquet file's member or row; checked on the
    arrays, sorted."""
    n = len(records)
    if n < 2:
        return
    files, rows, members = image_files(records)
    keys = (rows, members, files, records.dataset_ids)
    order = np.lexsort(keys)
    again = same_as_previous(order, keys)
    if not again.any():
        return
    labels = records.labels[order]
    specs = list(registry.values())

    def named(record):
        classes = specs[record.dataset_id].labels
        return repr(classes[record.label]) if classes and 0 <= record.label < len(classes) else (
            str(record.label))
    for i in np.flatnonzero(again & (labels[1:] != labels[:-1]))[:SHOWN].tolist():
        first, then = records[order[i]], records[order[i + 1]]
        errors.append(f"{then.source}: the image of {first.source} again, as class {named(then)} "
                      f"(there {named(first)}): one image, two classes of dataset "
                      f"{specs[first.dataset_id].name!r}: keep one of the two records")
    i = int(np.flatnonzero(again)[0])
    first, then = records[order[i]], records[order[i + 1]]
    notes.append(f"{int(again.sum())} record(s) read an image of their dataset again (e.g. "
                 f"{then.source}, the image of {first.source}): each is "
                 f"{'trained on' if training else 'scored'} as often as it is listed")


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
                   "a .txt member, or the label column)" for i in missing[:SHOWN].tolist()]
        errors += [f"{records[i].source}: field 'label': {records.labels[i]} is outside [0, {k}) "
                   f"for dataset {name!r}" for i in outside[:SHOWN].tolist()]
        if len(missing) > SHOWN or len(outside) > SHOWN:  # the arrays are checked whole, not listed
            errors.append(f"dataset {name!r}: {len(missing)} records without a label and "
                          f"{len(outside)} with one outside [0, {k}) in all")


def check_classes(registry, tables):
    """After every source of a run is read: each dataset knows its class count, and every
    record's label is checked against it (also those read before a later source gave it)."""
    errors = []
    for dataset_id, (name, spec) in enumerate(registry.items()):
        if spec.num_classes is not None:
            continue
        kinds = sorted({t.sources[s].what() for t in tables if t is not None
                        for s in np.unique(t.source_ids[t.dataset_ids == dataset_id]).tolist()})
        said = f" ({'; '.join(kinds)})" if kinds else ""
        errors.append(f"dataset {name!r}: no num_classes in the registry, and its sources{said} "
                      "do not say how many classes it has (an image folder or a ClassLabel "
                      "column does): add num_classes")
    for records in tables:
        if records is not None:
            check_labels(records, registry, errors)
    raise_data_errors(errors, 1, [])
