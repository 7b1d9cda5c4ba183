import json
import os

import pytest

from conftest import write_jsonl
from dataset import (DataError, ImageDataset, count_per_dataset, load_registry,
                     partial_eval_indices, read_records, summarize, train_indices)


@pytest.fixture
def registry():
    return load_registry({
        "digits": {"num_classes": 10, "eval_ratio": 0.3},
        "faces": {"num_classes": 2, "eval_ratio": 1.0}
    })


def test_relative_image_paths_resolve_against_the_jsonl_folder(demo_dir, registry):
    records = read_records(
        [str(demo_dir / "digits" / "val.jsonl"),
         str(demo_dir / "faces" / "val.jsonl")], registry)
    assert len(records) == 359 + 40
    assert all(os.path.isabs(r.image_path) and os.path.isfile(r.image_path) for r in records)
    assert {r.dataset_id for r in records} == {0, 1}
    image, label, dataset_id, index = ImageDataset(records)[0]
    assert image.mode == "RGB" and image.size == (8, 8)


def test_registry_from_file_and_flags(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "food101: {num_classes: 101, eval_ratio: 0.2, description: Food}\n"
        "food2k: {num_classes: 2000, eval_ratio: 0.1}\n")
    reg = load_registry(str(tmp_path / "r.yaml"))
    assert list(reg) == [
        "food101", "food2k"
    ] and reg["food2k"].num_classes == 2000 and reg["food101"].description == "Food"
    (tmp_path / "r.json").write_text(
        json.dumps({"datasets": {"dataset_configs": {"a": {"num_classes": 3}}}}))
    assert load_registry(str(tmp_path / "r.json"))["a"].eval_ratio == 1.0
    reg = load_registry(["a=10:0.5", "b=3"])
    assert (reg["a"].num_classes, reg["a"].eval_ratio, reg["b"].eval_ratio) == (10, 0.5, 1.0)


@pytest.mark.parametrize("bad, message", [
    ({"a": {"num_classes": 3, "eval_ratio": 0}}, "'eval_ratio' must be in \\(0, 1\\], got 0"),
    ({"a": {"num_classes": 3, "eval_ratio": 1.5}}, "'eval_ratio' must be in \\(0, 1\\], got 1.5"),
    ({"a": {"num_classes": 0}}, "'num_classes' must be a positive integer"),
    ({"a": {"num_classes": 3, "ratio": 0.2}}, "unknown field"),
    (["food=101:0.2:3.0"], "--datasets 'food=101:0.2:3.0': expected name=num_classes"),
])
def test_bad_registry_entries(bad, message):
    with pytest.raises(DataError, match=message):
        load_registry(bad)


def test_registry_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.yaml: cannot read"):
        load_registry(str(tmp_path / "missing.yaml"))
    (tmp_path / "r.yaml").write_text("a: {num_classes: 3, eval_ratio: -1}\n")
    with pytest.raises(DataError, match=r"r.yaml: dataset 'a': field 'eval_ratio'"):
        load_registry(str(tmp_path / "r.yaml"))


@pytest.fixture
def image(tmp_path):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    return "ok.png"


@pytest.mark.parametrize("line, field_message", [
    ('{"image_path": "ok.png", "label": 1', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"image_path": "ok.png", "dataset_name": "digits"}', "missing field\\(s\\) 'label'"),
    ('{"label": 1, "dataset_name": "digits"}', "missing field\\(s\\) 'image_path'"),
    ('{"image_path": "ok.png", "label": "3", "dataset_name": "digits"}',
     "field 'label': expected an integer, got '3'"),
    ('{"image_path": "ok.png", "label": 2.0, "dataset_name": "digits"}',
     "field 'label': expected an integer"),
    ('{"image_path": "ok.png", "label": 10, "dataset_name": "digits"}',
     "field 'label': 10 is outside \\[0, 10\\)"),
    ('{"image_path": "ok.png", "label": -1, "dataset_name": "digits"}',
     "field 'label': -1 is outside"),
    ('{"image_path": "ok.png", "label": 2, "dataset_name": "faces"}',
     "field 'label': 2 is outside \\[0, 2\\)"),
    ('{"image_path": "ok.png", "label": 0, "dataset_name": "food101"}',
     "field 'dataset_name': 'food101' is not in"),
    ('{"image_path": "ok.png", "label": 0, "dataset_name": ["digits"]}',
     "field 'dataset_name': \\['digits'\\] is not in"),
    ('{"image_path": "nope.png", "label": 0, "dataset_name": "digits"}',
     "field 'image_path': image file not found"),
])
def test_each_bad_line_is_reported_with_file_line_and_field(tmp_path, image, registry, line,
                                                            field_message):
    good = json.dumps({"image_path": image, "label": 0, "dataset_name": "digits"})
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, line])
    with pytest.raises(DataError, match=f"data.jsonl:3: {field_message}"):
        read_records([path], registry)


def test_a_record_of_another_split_than_its_file_is_refused_in_training_said_elsewhere(
        tmp_path, image, registry):
    rows = [{"image_path": image, "label": 0, "dataset_name": "digits", "split": split}
            for split in ("train", "train", "test", "validation", "fold1")]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    with pytest.raises(DataError) as e:  # a test record in training: the test set trained on
        read_records([path], registry, training=True)
    assert "2 problem(s)" in str(e.value)
    assert ("all.jsonl:3: field 'split': 'test', in a file read as training data: every record "
            "of a file is read, so the test set would be trained on") in str(e.value)
    said = []  # evaluating on training records, or a split of another name: said
    assert len(read_records([path], registry, say=said.append)) == 5  # one image, five lines
    assert said[0] == (f"note: {path}: 2 record(s) name the split 'train', 1 record(s) name the "
                       "split 'fold1' (field 'split'), in a file read as evaluation data: every "
                       "record of a file is read (give each split a file of its own to keep "
                       "them apart)")
    train = write_jsonl(tmp_path / "train.jsonl", rows[:2])
    said.clear()
    assert len(read_records([train], registry, training=True, say=said.append)) == 2
    assert not any("name the split" in m for m in said)


def test_one_image_under_other_spellings_of_its_path_is_one_image(tmp_path, monkeypatch):
    """An image folder given relatively, a JSONL naming its images with `..`, `./`, a doubled
    slash, an absolute path or through a linked folder: each the same file. Compared as text they
    were other images, so validation records of training images went unsaid."""
    from PIL import Image

    from data.reading import images_also_in
    from dataset import DatasetSpec
    for name in ("cat", "dog"):
        os.makedirs(tmp_path / "pool" / name)
        Image.new("RGB", (8, 8), name == "cat" and "white" or "black").save(
            tmp_path / "pool" / name / "0.png")
    os.symlink(tmp_path / "pool", tmp_path / "linked")
    os.makedirs(tmp_path / "val")
    spellings = ["../pool/cat/0.png", str(tmp_path / "pool" / "dog" / "0.png"),
                 ".//..//pool/./dog/0.png", "../linked/cat/0.png"]
    val_file = write_jsonl(tmp_path / "val" / "val.jsonl", [
        {"image_path": p, "label": int("dog" in p), "dataset_name": "pets"} for p in spellings])
    monkeypatch.chdir(tmp_path)
    registry = {"pets": DatasetSpec("pets", 2)}
    train = read_records(["pets=folder:pool"], registry, training=True)
    val = read_records([val_file], registry)
    assert images_also_in(val, train).tolist() == [0, 1, 2, 3]
    said = []
    read_records(["pets=folder:pool", "pets=folder:linked"], registry, training=True,
                 say=said.append)
    assert said[-1].startswith("note: 2 record(s) read an image of their dataset again"), said


def test_an_image_read_again_for_its_dataset_is_said_and_with_another_label_refused(
        tmp_path, image, registry):
    from PIL import Image
    Image.new("RGB", (4, 4), "white").save(tmp_path / "other.png")
    rows = [{"image_path": name, "label": label, "dataset_name": "digits"}
            for name, label in [(image, 0), ("other.png", 1), (image, 0)]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    said = []
    assert len(read_records([path], registry, say=said.append, training=True)) == 3
    assert said == [f"note: 1 record(s) read an image of their dataset again (e.g. {path}:3, the "
                    f"image of {path}:1): each is trained on as often as it is listed"]
    said.clear()  # evaluation data: each scored as often
    read_records([path], registry, say=said.append)
    assert said[0].endswith("each is scored as often as it is listed")
    said.clear()  # the same file given twice: every record again
    assert len(read_records([path, path], registry, say=said.append)) == 6
    assert said[0].startswith("note: 4 record(s) read an image of their dataset again")
    rows[2]["label"] = 3
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d.jsonl:3: the image of .*d.jsonl:1 again, as class 3 "
                       r"\(there 0\): one image, two classes of dataset 'digits': keep one"):
        read_records([path], registry, say=said.append)
    # the same image in two datasets is two samples
    rows[2]["dataset_name"] = "faces"
    rows[2]["label"] = 1
    write_jsonl(tmp_path / "d.jsonl", rows)
    said.clear()
    assert len(read_records([path], registry, say=said.append)) == 3 and said == []


def test_all_problems_are_listed_at_once_and_missing_files_are_named(tmp_path, image, registry):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        ['{"bad json', '{"image_path": "ok.png", "label": 99, "dataset_name": "digits"}'])
    with pytest.raises(DataError) as e:
        read_records([path, str(tmp_path / "absent.jsonl")], registry)
    text = str(e.value)
    assert "3 problem(s)" in text and "data.jsonl:1:" in text and "data.jsonl:2:" in text
    assert "absent.jsonl: cannot read the data file" in text


def test_an_undecodable_image_names_its_file(tmp_path, registry):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"image_path": "broken.png", "label": 0, "dataset_name": "digits"}])
    records = read_records([path], registry)
    with pytest.raises(DataError, match="d.jsonl:1: cannot decode image .*broken.png"):
        ImageDataset(records)[0]


def test_partial_eval_subset_sizes_and_determinism(demo_dir, registry):
    records = read_records(
        [str(demo_dir / "digits" / "val.jsonl"),
         str(demo_dir / "faces" / "val.jsonl")], registry)
    subset = partial_eval_indices(records, registry, seed=0)
    per_dataset = [sum(1 for i in subset if records[i].dataset_id == d) for d in (0, 1)]
    assert per_dataset == [round(359 * 0.3), 40]
    assert subset == partial_eval_indices(records, registry, seed=0)  # fixed for a seed
    assert subset != partial_eval_indices(records, registry, seed=1)
    assert len(set(subset)) == len(subset)
    # another dataset in the registry leaves the existing datasets' subsets unchanged
    bigger = load_registry({
        "digits": {"num_classes": 10, "eval_ratio": 0.3}, "faces": {"num_classes": 2},
        "other": {"num_classes": 4}
    })
    assert partial_eval_indices(records, bigger, seed=0) == subset
    summary = summarize(count_per_dataset(records, 2, subset), registry, "partial",
                        total=count_per_dataset(records, 2))
    assert "digits: 359 -> 108 (30%)" in summary and "faces: 40 -> 40 (100%)" in summary


def test_tiny_ratio_keeps_at_least_one_sample(demo_dir):
    registry = load_registry({"faces": {"num_classes": 2, "eval_ratio": 0.001}})
    records = read_records([str(demo_dir / "faces" / "val.jsonl")], registry)
    assert len(partial_eval_indices(records, registry, seed=0)) == 1


def test_train_order_is_seeded_per_epoch_and_shards_cover_the_global_order():
    a0, a1 = train_indices(50, 0, seed=3, shuffle=True), train_indices(50, 1, seed=3, shuffle=True)
    assert sorted(a0) == list(range(50)) and a0 != a1 and a0 == train_indices(
        50, 0, seed=3, shuffle=True)
    assert train_indices(50, 0, seed=3, shuffle=False) == list(range(50))
    shards = [train_indices(50, 0, seed=3, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    # global micro-batch j (batch 2 per rank) is the same set of samples as a 6-sample batch of one
    # process
    for j in range(8):
        assert sorted(x for s in shards for x in s[2 * j:2 * j + 2]) == sorted(a0[6 * j:6 * j + 6])


@pytest.mark.parametrize("names, message", [
    (["overall", "faces"], "dataset 'overall': 'overall' names the aggregate"),
    (["", "faces"], "dataset '': a dataset name must not be empty"),
    (["digits", "ema_digits"], "collide with the EMA metrics of 'digits'"),
    (["digits", "digits_top5"], "collide with the top-5 metrics of 'digits'"),
    (["ema_overall"], "collide with the EMA metrics of 'overall'"),
])
def test_dataset_names_that_collide_with_metric_names_are_refused(tmp_path, names, message):
    """Metrics are named {prefix}_{dataset}_{metric}: such a dataset's numbers would be
    overwritten by the aggregate's or another dataset's."""
    entries = {name: {"num_classes": 2} for name in names}
    (tmp_path / "r.json").write_text(json.dumps(entries))
    for value in (entries, str(tmp_path / "r.json"), [f"{n}=2" for n in names]):
        with pytest.raises(DataError, match=message):
            load_registry(value)
    (tmp_path / "n.yaml").write_text("1: {num_classes: 2}\n")
    with pytest.raises(DataError, match="a dataset name must be text, got 1"):
        load_registry(str(tmp_path / "n.yaml"))


@pytest.mark.parametrize("labels, message", [
    (["cat", "cat", "dog"], r"each class needs its own name, repeated: \['cat'\]"),
    (["cat", "", "dog"], "name 1 is empty"),
    (["cat", True, "dog"], "expected a list of names"),
])
def test_class_names_must_be_distinct_non_empty_text(labels, message):
    with pytest.raises(DataError, match=message):
        load_registry({"a": {"num_classes": 3, "labels": labels}})


def test_a_class_names_file_with_a_byte_order_mark_or_a_blank_line(tmp_path):
    (tmp_path / "names.txt").write_bytes("\ufeffcat\ndog\r\nfox\n\n".encode("utf-8"))
    (tmp_path / "r.json").write_text(json.dumps({"a": {"num_classes": 3, "labels": "names.txt"}}))
    assert load_registry(str(tmp_path / "r.json"))["a"].labels == ["cat", "dog", "fox"]
    (tmp_path / "names.txt").write_text("cat\n\ndog\nfox\n")  # would shift dog and fox
    with pytest.raises(DataError, match=r"names.txt\): line 2 is empty"):
        load_registry(str(tmp_path / "r.json"))


def test_a_labels_file_named_in_a_config_file_resolves_against_the_config_folder(
        tmp_path, monkeypatch):
    from config import parse_args
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "names.txt").write_text("not a face\nface\n")
    (folder / "run.yaml").write_text(
        "datasets:\n  faces: {num_classes: 2, labels: names.txt}\n")
    monkeypatch.chdir(tmp_path)  # another folder than the config's
    args = parse_args(["--config", str(folder / "run.yaml"), "--model", "preset:resnet-tiny",
                       "--train_jsonl", "t.jsonl", "--output_dir", "out"])
    assert load_registry(args.datasets)["faces"].labels == ["not a face", "face"]
