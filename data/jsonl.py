"""The JSONL reader: FILE.jsonl (or .json: one array or one object), each record naming its
dataset, its image path (relative to the file's folder) and label. The classifier's record is
{"image_path", "label", "dataset_name"} (classifier_line); --task generate and autoencoder read
their own records through the same json_items."""
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor

from data.types import JsonlFile, dataset_name_problem, part


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


@functools.cache
def split_named(keyword):
    """datasets' split of a keyword ("val" -> "validation"), or None."""
    from data.specs import SPLIT_KEYWORDS  # data.specs imports the readers
    return next((s for s, keywords in SPLIT_KEYWORDS.items() if keyword in keywords), None)


def check_split_field(item, training):
    """The split a record names ("split": "test") against its file's role: a validation or test
    record in training data is an error (every record of a file is read: the held-out set would
    be trained on). Returns the value where it is worth a note (training records in evaluation
    data, a split of another name), else None."""
    if "split" not in item:
        return None
    value = item["split"]
    split = split_named(str(value).strip().lower())
    if training and split in ("validation", "test"):
        raise ValueError(f"field 'split': {value!r}, in a file read as training data: every "
                         f"record of a file is read, so the {split} set would be trained on. "
                         "Give each split a file of its own (or drop the field)")
    return None if split in (("train",) if training else ("validation", "test")) else value


def read_json_source(spec, reading, jsonl_record):
    """Every record of a JSONL / JSON file, read by jsonl_record; its images checked to exist."""
    source = JsonlFile(spec.path)
    source_id = reading.add_source(source)
    folder = os.path.dirname(os.path.abspath(spec.path))
    rows, labels, dataset_ids, members, fields, splits = [], [], [], [], {}, {}
    for row, where, item in json_items(spec.path, reading.errors):
        try:
            split = check_split_field(item, reading.training)
            if split is not None:
                splits[str(split)] = splits.get(str(split), 0) + 1
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
    if splits:
        role = "training" if reading.training else "evaluation"
        reading.notes.append(f"{spec.path}: " + ", ".join(
            f"{n} record(s) name the split {v!r}" for v, n in splits.items()) + f" (field "
            f"'split'), in a file read as {role} data: every record of a file is read (give each "
            "split a file of its own to keep them apart)")
