"""A new kind of source is one reader module and one line of the table of kinds (data.specs.KINDS):
a toy kind, a text file of `IMAGE LABEL` lines, is read, detected, forced by its prefix and
checked through that line alone; a one-file kind is fingerprinted as its file (a kind whose data
is a folder of files needs its line in data/fingerprint.py too)."""
import importlib.util

import pytest
from PIL import Image

from data import specs
from data.fingerprint import data_fingerprint
from dataset import DataError, ImageDataset, load_registry, read_records

READER = '''"""A toy reader: a .pairs file of `IMAGE LABEL` lines, images relative to the file."""
import os

from data.types import Source, part


class PairsFile(Source):
    def open(self, row, member, offset, size):
        return member


def read_pairs(spec, reading, jsonl_record):
    source_id = reading.add_source(PairsFile(spec.path))
    dataset_id = reading.dataset_id(spec.name, f"data spec {spec.text!r}")
    rows, members, labels = [], [], []
    with open(spec.path) as f:
        for row, line in enumerate(f, 1):
            image, label = line.split()
            rows.append(row)
            members.append(os.path.join(os.path.dirname(spec.path), image))
            labels.append(int(label))
    reading.parts.append(part(source_id, dataset_id, rows, labels, members))
'''


def test_a_new_kind_is_one_module_and_one_line_of_the_table(tmp_path, monkeypatch):
    (tmp_path / "pairs_reader.py").write_text(READER)
    module = importlib.util.spec_from_file_location("pairs_reader", tmp_path / "pairs_reader.py")
    reader = importlib.util.module_from_spec(module)
    module.loader.exec_module(reader)
    line = specs.Kind("pairs", reader.read_pairs, file=(".pairs",))
    monkeypatch.setattr(specs, "KINDS", (*specs.KINDS, line))

    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (4, 4), color).save(tmp_path / f"{i}.png")
    listing = tmp_path / "colors.pairs"
    listing.write_text("0.png 0\n1.png 1\n")
    registry = load_registry({"colors": {"num_classes": 2}})
    for spec in (f"colors={listing}", f"colors=pairs:{listing}"):  # detected, then forced
        records = read_records([spec], registry)
        assert records.labels.tolist() == [0, 1] and records[1].source == f"{listing}:2"
        image, label, _, _ = ImageDataset(records)[1]
        assert image.getpixel((0, 0)) == (0, 0, 255) and label == 1
    assert list(data_fingerprint(f"colors={listing}")["units"]) == ["colors.pairs"]

    listing.write_text("0.png 0\n1.png 5\n")  # the checks every kind's records pass
    with pytest.raises(DataError, match=r"colors.pairs:2: field 'label': 5 is outside \[0, 2\)"):
        read_records([f"colors={listing}"], registry)
    with pytest.raises(DataError, match="prefix it with folder:, hf:, pairs:, wds: or jsonl:"):
        read_records([f"colors={tmp_path}/*.png"], registry)  # messages name the new kind
