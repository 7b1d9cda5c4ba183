"""The image folder reader: NAME=FOLDER with one subfolder per class (sorted by name: the names
are the class names; where every name is an integer, it is the label) and the image files under
each, at any depth. Or the hub's imagefolder: metadata.csv / metadata.jsonl listing each image's
file_name and label."""
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor

from data.jsonl import json_items, read_data_file
from data.types import NO_LABEL, DataError, JsonlFile, Source, as_bytes, part

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # the hub's imagefolder


class ImageFolder(Source):
    """An image folder: member is the image's path, which also names the record."""
    member_is_path = True

    def where(self, row, member):
        return member

    def open(self, row, member, offset, size):
        return member


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
        if len(class_dirs) == 1:  # e.g. an unzipped archive's flowers/flowers/{daisy,rose}
            reading.errors.append(one_class_folder(root, class_dirs[0], name))
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

    def what(self):
        return "an imagefolder's metadata file with integer labels"


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


def one_class_folder(root, class_dir, name):
    """The error of an image folder whose class folders are one: every image would be that
    class, a loss of 0 and an accuracy of 100 % whatever the model does."""
    inside = os.path.join(root, class_dir)
    subfolders = sorted(e.name for e in os.scandir(inside)
                        if e.is_dir() and not e.name.startswith("."))
    hint = (f"; it holds the folders {', '.join(subfolders[:5])}"
            f"{', ...' if len(subfolders) > 5 else ''}: give {inside} if those are the classes"
            if subfolders else "")
    return (f"{root}: one class folder, {class_dir!r}, gives dataset {name!r} one class, which "
            f"a classifier cannot learn (every image is that class){hint}. With the dataset's "
            "labels in the registry the folder is read as one class of them")


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
