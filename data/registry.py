"""The dataset registry: each dataset's name, class count, evaluation share, sampling weight,
augmentation and class names (types.DatasetSpec), from a YAML / JSON file, a config's mapping or
name=num_classes[:eval_ratio] items, every field checked."""
import os

from augment import AUGMENTS
from data.types import DataError, DatasetSpec, dataset_name_problem

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
    hflip = _true_or_false(name, entry, "hflip", True, where)
    for column in ("image_column", "label_column"):
        value = entry.get(column)
        if value is not None and (not isinstance(value, str) or not value):
            raise DataError(f"{where}: dataset {name!r}: field {column!r} must be a column name, "
                            f"got {value!r}")
    eval_only = _true_or_false(name, entry, "eval_only", False, where)
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


def _true_or_false(name, entry, field, default, where):
    value = entry.get(field, default)
    if not isinstance(value, bool):
        raise DataError(f"{where}: dataset {name!r}: field {field!r} must be true or false, "
                        f"got {value!r}")
    return value


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
            if len(parts) > 2:  # a third part would be dropped unread
                raise ValueError
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
