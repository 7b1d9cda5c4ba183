"""The Hugging Face reader: NAME=PATH to .parquet files (a file, a folder of them, a glob) or a
folder written by datasets' save_to_disk, read with `datasets` (pip install -e '.[hf]'):
columns `image` and `label` (the registry's image_column / label_column), class names from a
ClassLabel label column. Parquet is converted once into datasets' cache; the Arrow table is then
memory-mapped and each record read by its row."""
import bisect
import io
import os

import numpy as np

from data.paths import URL_READ, is_url, spec_files
from data.types import NO_LABEL, SHOWN, DataError, Source, part

SAVED_FILES = ("dataset_info.json", "state.json")  # in a folder written by save_to_disk


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

    def image_files(self, rows):
        if not self.files:
            return super().image_files(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        return ([os.path.abspath(f) for f in self.files], which,
                rows - np.asarray(self.starts)[which])

    def file_of(self, row):
        """The index of the Parquet file that holds `row` (files given)."""
        return bisect.bisect_right(self.starts, row) - 1

    def where(self, row, member):
        if not self.files:
            return f"{self.path}:{row}"
        i = self.file_of(row)
        return f"{self.files[i]}:{row - self.starts[i]}"

    def what(self):
        return (("Parquet files" if self.files else "a Hugging Face dataset") +
                " with an integer label column, not a ClassLabel")

    def open(self, row, member, offset, size):
        value = self.value(int(row))
        if isinstance(value, dict):  # an Image feature: {"bytes", "path"}
            if value.get("bytes") is not None:
                return io.BytesIO(value["bytes"])
            if value.get("path"):  # relative to the Parquet file of the row
                folder = (os.path.dirname(self.files[self.file_of(row)]) if self.files
                          else self.path)
                return os.path.join(folder, value["path"])
            raise DataError(f"column {self.column!r} holds no image in this row")
        if value is None:
            raise DataError(f"column {self.column!r} is empty in this row")
        return io.BytesIO(value)


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
        files = spec_files(spec, ".parquet")
        footers = [parquet_footer(f) for f in files]
        counts = [rows for rows, _ in footers]
        classes = [class_names(schema, label_column) for _, schema in footers]
        try:
            table = datasets.Dataset.from_parquet(files)
        except Exception as e:  # pyarrow's errors say what is wrong, not which file
            raise DataError(f"data spec {spec.text!r}: cannot read the Parquet files "
                            f"{', '.join(files)}: {e}") from None
        same_class_names(files, classes, label_column, f"data spec {spec.text!r}",
                         "give such files as separate specs of the dataset (each is mapped to "
                         "its classes by name)")
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
    for row in np.flatnonzero(empty)[:SHOWN].tolist():
        reading.errors.append(f"{source.where(row, '')}: column {image_column!r} holds no image")
    if empty.sum() > SHOWN:
        reading.errors.append(f"{where}: {int(empty.sum())} rows without an image in all")
    reading.parts.append(part(source_id, dataset_id, range(n), labels, np.zeros(n, dtype="S1")))


def parquet_footer(path):
    """(rows, Arrow schema) of a local Parquet file, from its footer alone (the file closed
    again), or a DataError naming it."""
    import pyarrow.parquet as pq
    try:
        metadata = pq.read_metadata(path)
        return metadata.num_rows, metadata.schema.to_arrow_schema()
    except Exception as e:  # pyarrow's errors say what is wrong, not which file
        raise DataError(f"{path}: cannot read the Parquet file ({e})") from None


def class_names(schema, column):
    """The class names of a Parquet file's ClassLabel `column` (datasets keeps its features in
    the file's schema), or None where the column is not one."""
    datasets = import_datasets("a Parquet file's ClassLabel")
    feature = datasets.Features.from_arrow_schema(schema).get(column)
    return [str(n) for n in feature.names] if isinstance(feature, datasets.ClassLabel) else None


def same_class_names(files, classes, column, what, remedy):
    """Refuse files of one dataset read as one table whose ClassLabel `column` names its
    classes otherwise (`classes`: each file's, class_names): the table would take the first
    file's names for every file's indices."""
    def shown(names):
        return "no ClassLabel" if names is None else "[" + ", ".join(names[:6]) + (
            ", ...]" if len(names) > 6 else "]")
    for file, names in zip(files[1:], classes[1:]):
        if names != classes[0]:
            raise DataError(f"{what}: {file} gives the classes of column {column!r} as "
                            f"{shown(names)}, {files[0]} as {shown(classes[0])}: its indices "
                            f"would be read by the first file's names; {remedy}")


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
