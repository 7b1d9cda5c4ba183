"""Data as the hub and `datasets` lay it out (issue 30), written by the ecosystem's own writers
(`datasets`' to_parquet / save_to_disk, `webdataset`'s ShardWriter and TarWriter, Pillow
folders): the hub's data/{split}-00000-of-00001.parquet, a DatasetDict, WebDataset repositories
with split folders, image-folder roots of split folders, the hub's imagefolder with
metadata.csv / metadata.jsonl, class names as WebDataset labels, ClassLabels in another order,
compressed shards. A path holding splits is read as the split named (NAME=PATH:SPLIT) or
refused naming them, never as one dataset; each image's class (its colour) is checked against
the label read."""
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import train
from conftest import read_jsonl
from data.specs import NON_WORDS_CHARS, SHARDED_NAME, SPLIT_KEYWORDS
from dataset import DataError, absolute_spec, load_registry, parse_spec, read_records
from test_sources import offline_datasets_cache  # noqa: F401 (a fixture)

CLASSES = ["cat", "dog", "fish"]  # class c is an image whose channel c is lit
SIZES = {"train": 3, "val": 2, "validation": 2, "test": 2}  # images per class


def picture(name, i):
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., CLASSES.index(name)] = 120 + 20 * i
    return Image.fromarray(pixels)


def samples(split):
    """(key, class name, image) of a split, the classes interleaved."""
    return [(f"{split}_{i}_{name}", name, picture(name, i))
            for i in range(SIZES[split]) for name in CLASSES]


def colour_class(records, i):
    with Image.open(records.open(i)) as image:
        return CLASSES[int(np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0).argmax())]


def assert_classes(records, registry, name, count):
    """Every record's label, through the dataset's class names, is the class of its image."""
    assert len(records) == count
    labels = registry[name].labels
    for i in range(len(records)):
        assert labels[records.labels[i]] == colour_class(records, i), records[i].source


def read(specs, registry=None, **options):
    registry = registry if registry is not None else load_registry({"d": {}})
    return read_records(specs, registry, say=lambda m: None, **options), registry


def refused(spec, **options):
    with pytest.raises(DataError) as e:
        read([spec], **options)
    return str(e.value)


def hf_split(split, names=CLASSES):
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    rows = samples(split)
    return datasets.Dataset.from_dict({"image": [im for _, _, im in rows],
                                       "label": [names.index(n) for _, n, _ in rows]},
                                      features=features)


def hub_parquet_repo(root, splits=("train", "test")):
    """The hub's layout of a Parquet dataset: README.md, data/{split}-00000-of-00001.parquet."""
    os.makedirs(root / "data")
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    for split in splits:
        hf_split(split).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def write_wds(folder, rows, label, maxcount=4):
    """Shards by webdataset's ShardWriter; label(class name) -> the sample's label fields."""
    import webdataset
    os.makedirs(folder, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=maxcount,
                                verbose=0) as sink:
        for key, name, image in rows:
            sink.write({"__key__": key, "png": image, **label(name)})
    return folder


def image_folder(folder, rows):
    for key, name, image in rows:
        os.makedirs(folder / name, exist_ok=True)
        image.save(folder / name / f"{key}.png")
    return folder


def test_the_split_names_are_datasets_own():
    from datasets import data_files
    assert {str(k): v for k, v in data_files.SPLIT_KEYWORDS.items()} == SPLIT_KEYWORDS
    assert data_files.NON_WORDS_CHARS == NON_WORDS_CHARS
    import fnmatch
    pattern = os.path.basename(data_files.SPLIT_PATTERN_SHARDED).replace("{split}", "*")
    for name in ["train-00000-of-00001.parquet", "test-00003-of-00012.tar", "x.parquet",
                 "train-0000-of-0001.parquet", "train-00000-of-00001-abc.parquet"]:
        assert bool(SHARDED_NAME.fullmatch(name)) == fnmatch.fnmatch(name, pattern), name


def test_the_hubs_parquet_splits_are_named_or_refused(tmp_path):
    import datasets
    repo = hub_parquet_repo(tmp_path / "repo")
    assert set(datasets.load_dataset(str(repo))) == {"train", "test"}  # datasets' own reading
    # today read as one dataset, train and test mixed; now refused, with or without hf:
    for spec in [f"d={repo}", f"d=hf:{repo}", f"d={repo}/data", f"d=hf:{repo}/data"]:
        message = refused(spec)
        path = spec[2:].replace("hf:", "")
        prefix = "hf:" if "hf:" in spec else ""
        shown = "" if path.endswith("/data") else "data/"
        assert (f"{path} holds the splits train ({shown}train-00000-of-00001.parquet), test "
                f"({shown}test-00000-of-00001.parquet) (the hub's" in message), message
        assert f"name one, e.g. d={prefix}{path}:train or d={prefix}{path}:test" in message
    records, registry = read([f"d={repo}:train"])
    assert registry["d"].labels == CLASSES
    assert_classes(records, registry, "d", 9)
    val, _ = read([f"d=hf:{repo}/data:test"], registry)
    assert_classes(val, registry, "d", 6)
    assert "has no split 'validation'; it holds the splits train" in refused(
        f"d={repo}:validation")
    assert "is a file (PATH:SPLIT reads split SPLIT of the folder PATH)" in refused(
        f"d={repo}/data/train-00000-of-00001.parquet:train")
    # a glob over the files of both splits is refused too; one split's glob is read
    assert "matches files of the splits train (train-00000-of-00001.parquet), test" in refused(
        f"d={repo}/data/*.parquet")
    records, _ = read([f"d={repo}/data/train-*.parquet"])
    assert len(records) == 9
    # one split's files and nothing else: no mixing, read as they are
    single = hub_parquet_repo(tmp_path / "single", ["train"])
    records, registry = read([f"d={single}"])
    assert_classes(records, registry, "d", 9)


def test_rows_of_two_parquet_files_of_one_folder_are_other_images(tmp_path):
    repo = hub_parquet_repo(tmp_path / "repo")
    said = []
    records = read_records([f"d={repo}:train", f"d={repo}:test"], load_registry({"d": {}}),
                           training=True, say=said.append)
    assert len(records) == 9 + 6 and said == []  # row i of each split: two images
    read_records([f"d={repo}:train", f"d={repo}/data/train-00000-of-00001.parquet"],
                 load_registry({"d": {}}), training=True, say=said.append)
    assert said[0].startswith("note: 9 record(s) read an image of their dataset again")


def test_validation_rows_of_a_training_parquet_file_are_found(tmp_path):
    from dataset import images_also_in
    repo = hub_parquet_repo(tmp_path / "repo")
    train, registry = read([f"d={repo}:train"], training=True)
    same, _ = read([f"d={repo}/data/train-00000-of-00001.parquet"], registry)
    other, _ = read([f"d={repo}:test"], registry)
    assert images_also_in(same, train).tolist() == list(range(9))
    assert images_also_in(other, train).tolist() == []


def test_a_datasetdict_is_refused_naming_its_splits_or_read_by_split(tmp_path):
    import datasets
    root = tmp_path / "dd"
    datasets.DatasetDict({"train": hf_split("train"), "test": hf_split("test")}).save_to_disk(
        str(root))
    assert set(datasets.load_from_disk(str(root))) == {"train", "test"}
    messages = [refused(s).split(": ", 1)[1] for s in (f"d={root}", f"d=hf:{root}")]
    assert "holds the splits train (train/), test (test/) (a DatasetDict" in messages[0]
    assert messages[0].replace(f"d={root}", f"d=hf:{root}") == messages[1]  # the same words
    records, registry = read([f"d={root}:test"])
    assert_classes(records, registry, "d", 6)
    records, _ = read([f"d={root}/train"], load_registry({"d": {}}))  # a split's own folder
    assert len(records) == 9


def test_a_webdataset_repository_with_split_folders(tmp_path):
    repo = tmp_path / "wds"
    for split in ("train", "validation"):  # the hub's WebDataset layout
        write_wds(repo / split, samples(split), lambda n: {"cls": CLASSES.index(n)})
    for spec in (f"d={repo}", f"d=wds:{repo}"):  # was an image folder of 2 classes
        assert "holds the splits train (train/), validation (validation/)" in refused(spec)
    registry = load_registry({"d": {"num_classes": 3, "labels": CLASSES}})
    records, _ = read([f"d={repo}:train"], registry)
    assert parse_spec(f"d={repo}:train").path == str(repo / "train")
    assert len([f for f in os.listdir(repo / "train") if f.endswith(".tar")]) == 3  # 4 a shard
    assert_classes(records, registry, "d", 9)
    val, _ = read([f"d={repo}:validation"], registry)
    assert_classes(val, registry, "d", 6)


def test_an_image_folder_of_split_folders(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        image_folder(root / split, samples(split))
    for spec in (f"d={root}", f"d=folder:{root}"):  # was a 2-class image folder train / val
        message = refused(spec)
        assert "holds the splits train (train/), val (val/) (split folders" in message
        assert f"e.g. {spec}:train or {spec}:val" in message
    records, registry = read([f"d={root}:train"], training=True)
    assert registry["d"].labels == CLASSES
    assert_classes(records, registry, "d", 9)
    val, _ = read([f"d={root}:val"], registry)
    assert_classes(val, registry, "d", 6)
    # one split folder alone is not a class: named, not read as a 1-class folder
    only = image_folder(tmp_path / "only" / "train", samples("train")).parent
    assert "holds the splits train (train/)" in refused(f"d={only}")
    # a class named like a split among other classes stays a class
    classes = image_folder(tmp_path / "vehicles", [(k, n, im) for k, n, im in samples("val")])
    os.rename(classes / "fish", classes / "train")
    records, registry = read([f"d={classes}"])
    assert registry["d"].labels == ["cat", "dog", "train"] and len(records) == 6


def test_an_image_folder_of_one_class_folder_is_refused_naming_the_folder_of_classes(tmp_path):
    # an unzipped archive's double folder: flowers/flowers/{cat,dog,fish}
    inner = image_folder(tmp_path / "flowers" / "flowers", samples("train"))
    message = refused(f"d={inner.parent}", training=True)
    assert f"{inner.parent}: one class folder, 'flowers', gives dataset 'd' one class" in message
    assert f"it holds the folders cat, dog, fish: give {inner} if those are the classes" in message
    records, registry = read([f"d={inner}"], training=True)
    assert_classes(records, registry, "d", 9)
    # with the dataset's classes known, a folder of one of them is that class's images
    one = image_folder(tmp_path / "cats", [r for r in samples("val") if r[1] == "cat"])
    records, _ = read([f"d={one}"], load_registry({"d": {"labels": CLASSES}}), training=True)
    assert records.labels.tolist() == [0, 0]


def test_split_names_in_file_names_are_datasets_splits(tmp_path):
    import datasets
    folder = tmp_path / "faces"
    folder.mkdir()
    for split in ("train", "validation"):
        hf_split(split).to_parquet(str(folder / f"{split}.parquet"))
    assert set(datasets.load_dataset(str(folder))) == {"train", "validation"}
    assert "holds the splits train (train.parquet), validation (validation.parquet)" in refused(
        f"d={folder}")
    records, registry = read([f"d={folder}:validation"])
    assert_classes(records, registry, "d", 6)


def test_the_hubs_imagefolder_with_metadata(tmp_path):
    import datasets
    root = tmp_path / "hub_images"
    lines = {}
    for split in ("train", "test"):
        rows = samples(split)
        os.makedirs(root / split / "images")
        for key, _, image in rows:
            image.save(root / split / "images" / f"{key}.png")
        lines[split] = [{"file_name": f"images/{k}.png", "label": n, "note": "x"}
                        for k, n, _ in rows]
        (root / split / "metadata.csv").write_text("file_name,label,note\n" + "".join(
            f"{r['file_name']},{r['label']},x\n" for r in lines[split]))
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root))
    assert set(loaded) == {"train", "test"} and sorted(set(loaded["train"]["label"])) == CLASSES
    # the test split's metadata as JSON lines (datasets reads one kind per dataset)
    (root / "test" / "metadata.csv").unlink()
    (root / "test" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                          for r in lines["test"]))
    assert "holds the splits train (train/), test (test/)" in refused(f"d={root}")
    records, registry = read([f"d={root}:train"])
    assert registry["d"].labels == CLASSES  # the sorted names seen
    assert_classes(records, registry, "d", 9)
    assert records[0].source == f"{root}/train/metadata.csv:2"
    val, _ = read([f"d={root}:test"], registry)  # the training names map validation's
    assert_classes(val, registry, "d", 6)
    # the registry's labels (another order) and label_column
    registry = load_registry({"d": {"labels": CLASSES[::-1]}})
    records, _ = read([f"d={root}/train"], registry)
    assert_classes(records, registry, "d", 9)
    assert "no column 'kind' (columns: file_name, label, note)" in refused(
        f"d={root}/train", registry=load_registry({"d": {"label_column": "kind"}}))
    # a name validation has that training did not: named, with where it is
    with open(root / "test" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "images/test_0_cat.png", "label": "bird"}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:7: class name\(s\) 'bird' are not "
                                        r"classes of dataset 'd' \(its classes: cat, dog, fish"):
        read([f"d={root}:test"], load_registry({"d": {"labels": CLASSES}}))
    (root / "test" / "images" / "test_0_dog.png").unlink()
    assert "metadata.jsonl:2: column 'file_name': image file not found" in refused(
        f"d={root}:test")


def test_class_indices_written_as_decimals_are_refused_not_sorted_as_names(tmp_path):
    import pandas
    root = tmp_path / "scans"
    rows = [(k, n, im) for k, n, im in samples("train")]
    os.makedirs(root / "images")
    for key, _, image in rows:
        image.save(root / "images" / f"{key}.png")
    # pandas writes a float label column (after a merge and dropna) as 0.0, 1.0, 2.0
    frame = pandas.DataFrame({"file_name": [f"images/{k}.png" for k, _, _ in rows],
                              "label": [float(CLASSES.index(n)) for _, n, _ in rows]})
    frame.to_csv(root / "metadata.csv", index=False)
    message = refused(f"d={root}", training=True)
    assert (f"{root}/metadata.csv:2: the label '0.0' is a class index written as a decimal"
            in message)
    frame.astype({"label": int}).to_csv(root / "metadata.csv", index=False)
    records, registry = read([f"d={root}"], load_registry({"d": {"num_classes": 3}}),
                             training=True)
    assert [CLASSES[i] for i in records.labels] == [n for _, n, _ in rows]
    # as names, when the registry says they are
    frame.to_csv(root / "metadata.csv", index=False)
    records, _ = read([f"d={root}"], load_registry({"d": {"labels": ["2.0", "1.0", "0.0"]}}),
                      training=True)
    assert [CLASSES[2 - i] for i in records.labels] == [n for _, n, _ in rows]


def test_class_names_as_webdataset_labels(tmp_path):
    """The three fields WebDataset users keep a class name in: .cls, the label of .json, .txt;
    mapped through the registry's labels or the sorted names seen, one mapping for validation."""
    ways = [lambda n: {"cls": n}, lambda n: {"json": {"label": n, "id": 1}},
            lambda n: {"txt": n}]
    train_rows = samples("train")
    folder = tmp_path / "shards"
    for w, way in enumerate(ways):  # one shard per way, each by webdataset's writer
        write_wds(folder / f"w{w}", train_rows[w::3], way, maxcount=100)
    specs = [f"d={folder}/w{w}/shard-000000.tar" for w in range(3)]
    records, registry = read(specs, training=True)
    assert registry["d"].labels == CLASSES and registry["d"].num_classes == 3
    assert_classes(records, registry, "d", 9)
    again, _ = read(specs, load_registry({"d": {}}))  # from the cached index
    assert np.array_equal(again.labels, records.labels)
    write_wds(tmp_path / "val", samples("val"), ways[0])
    val, _ = read([f"d={tmp_path}/val"], registry)
    assert_classes(val, registry, "d", 6)
    # the registry's labels in another order: mapped through them
    registry = load_registry({"d": {"labels": ["fish", "dog", "cat"]}})
    records, _ = read(specs, registry)
    assert_classes(records, registry, "d", 9)
    # a name not among the classes, a num_classes the names do not fill, indices mixed in
    write_wds(tmp_path / "bird", [("b0", "cat", picture("cat", 0))], lambda n: {"cls": "bird"})
    with pytest.raises(DataError, match=r"bird/shard-000000.tar:b0.png: class name\(s\) 'bird' "
                                        "are not classes of dataset 'd'"):
        read([f"d={tmp_path}/bird"], load_registry({"d": {"labels": CLASSES}}))
    with pytest.raises(DataError, match=r"its records name 3 classes \(cat, dog, fish\) .*"
                                        "registry says num_classes 4: give the class names"):
        read(specs, load_registry({"d": {"num_classes": 4}}))
    import webdataset
    mixed = tmp_path / "mixed-000.tar"
    with webdataset.TarWriter(str(mixed)) as sink:
        sink.write({"__key__": "a", "png": picture("cat", 0), "cls": 0})
        sink.write({"__key__": "b", "png": picture("dog", 0), "cls": "dog"})
    with pytest.raises(DataError, match=r"both class indices \(.*mixed-000.tar:a.png: 0\) and "
                                        r"class names \(.*mixed-000.tar:b.png: 'dog'\)"):
        read([f"d={mixed}"], load_registry({"d": {"labels": CLASSES}}))
    # indices in one shard, names in another of the same dataset: refused without its labels
    by_index = write_wds(tmp_path / "by_index", train_rows[:3],
                         lambda n: {"cls": CLASSES.index(n)})
    by_name = f"{folder}/w0/shard-000000.tar"
    with pytest.raises(DataError, match=r"dataset 'd': .*by_index/shard-000000.tar labels by "
                                        r"class index and .*w0/shard-000000.tar by class name"):
        read([f"d={by_index}", f"d={by_name}"], load_registry({"d": {"num_classes": 3}}),
             training=True)
    records, registry = read([f"d={by_index}", f"d={by_name}"],
                             load_registry({"d": {"labels": CLASSES}}), training=True)
    assert_classes(records, registry, "d", 6)
    # a JSONL file of indices whose first record is of another dataset
    image = tmp_path / "one.png"
    picture("cat", 0).save(image)
    lines = [{"image_path": str(image), "label": 0, "dataset_name": "other"},
             {"image_path": str(image), "label": 0, "dataset_name": "d"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"dataset 'd': .*mixed.jsonl labels by class index"):
        read([str(tmp_path / "mixed.jsonl"), f"d={by_name}"],
             load_registry({"d": {"num_classes": 3}, "other": {"num_classes": 1}}),
             training=True)


def test_classlabels_in_another_order_map_by_name(tmp_path):
    train_path, val_path = tmp_path / "train.parquet", tmp_path / "val.parquet"
    hf_split("train").to_parquet(str(train_path))
    hf_split("val", names=CLASSES[::-1]).to_parquet(str(val_path))  # fish, dog, cat
    records, registry = read([f"d={train_path}"], training=True)
    val, _ = read([f"d={val_path}"], registry)  # was refused: "differ from the registry's"
    assert_classes(val, registry, "d", 6)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    other = tmp_path / "other.parquet"
    hf_split("val", names=["fish", "dog", "cat", "cow"]).to_parquet(str(other))
    with pytest.raises(DataError, match="differ from the registry's labels .*'cow' are not "):
        read([f"d={other}"], registry)


def test_parquet_files_of_one_spec_or_stream_with_classlabels_in_another_order_are_refused(
        tmp_path):
    from dataset import build_stream
    folder = tmp_path / "parts"
    os.makedirs(folder)
    hf_split("train").to_parquet(str(folder / "part-a.parquet"))
    hf_split("val", names=CLASSES[::-1]).to_parquet(str(folder / "part-b.parquet"))
    # one table would read part-b's indices by part-a's names: every fish a cat
    message = refused(f"d={folder}", training=True)
    assert "part-b.parquet gives the classes of column 'label' as [fish, dog, cat]" in message
    assert "part-a.parquet as [cat, dog, fish]" in message and "separate specs" in message
    records, registry = read([f"d={folder}/part-a.parquet", f"d={folder}/part-b.parquet"],
                             training=True)
    assert_classes(records, registry, "d", 9 + 6)
    with pytest.raises(DataError, match="--streaming dataset 'd': .*part-b.parquet gives"):
        build_stream([f"d={folder}/part-a.parquet", f"d={folder}/part-b.parquet"],
                     load_registry({"d": {}}), True, seed=0, rank=0, world_size=1, buffer=4,
                     skip_bad_images=False)


def test_a_compressed_shard_says_what_to_type_with_or_without_a_prefix(tmp_path):
    import webdataset
    plain = write_wds(tmp_path / "plain", samples("val"), lambda n: {"cls": CLASSES.index(n)},
                      maxcount=100) / "shard-000000.tar"
    folder = tmp_path / "gz"
    folder.mkdir()
    for name, mode in (("a.tar.gz", "w:gz"), ("b.tgz", "w:gz")):
        with tarfile.open(plain) as source, tarfile.open(folder / name, mode) as out:
            for member in source:
                out.addfile(member, source.extractfile(member))
    with webdataset.TarWriter(str(folder / "c.tar.gz"), compress=True) as sink:
        sink.write({"__key__": "k", "png": picture("cat", 0), "cls": 0})
    for name in ("a.tar.gz", "b.tgz", "c.tar.gz"):
        messages = [refused(f"d={prefix}{folder / name}").split(": ", 1)[1]
                    for prefix in ("", "wds:")]  # was "a JSONL file" without wds:
        assert messages[0] == messages[1]
        assert (f"{folder / name} is a compressed shard: shards are read by the byte offset of "
                "each member, so they must be uncompressed .tar files: uncompress it") in (
                    messages[0])
        assert "or stream it with train.py --streaming" in messages[0]
    assert "a.tar.gz is a compressed shard" in refused(f"d={folder}")
    assert parse_spec(f"d={folder}").kind == "wds"


def test_the_split_suffix_is_one_syntax(tmp_path, monkeypatch):
    repo = hub_parquet_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("d=repo:train") == f"d={repo}:train"
    assert absolute_spec("d=hf:repo:test") == f"d=hf:{repo}:test"
    spec = parse_spec(f"d=hf:{repo}:train")
    assert (spec.kind, spec.split, spec.root) == ("hf", "train", str(repo))
    assert [os.path.basename(f) for f in spec.files] == ["train-00000-of-00001.parquet"]
    assert parse_spec("d=http://host:8000/x.parquet").kind == "hf"  # a port, not a split
    with pytest.raises(DataError, match="the splits of a URL are not looked up"):
        parse_spec("d=s3://bucket/repo:train")
    named = tmp_path / "records:v2.jsonl"  # a file with a colon in its name is that file
    named.write_text("")
    assert parse_spec(str(named)).path == str(named)


def test_train_and_eval_read_the_named_splits(tmp_path, tiny_vit, capsys):
    """train.py on three layouts read by split (Parquet repository, image-folder root, a
    WebDataset repository with class names), 2 steps, then eval.py from the checkpoint; a spec
    of a path holding splits is refused before any model loads."""
    repo = hub_parquet_repo(tmp_path / "repo")
    images = tmp_path / "images"
    for split in ("train", "val"):
        image_folder(images / split, samples(split))
    shards = tmp_path / "shards"
    for split in ("train", "validation"):
        write_wds(shards / split, samples(split), lambda n: {"json": {"label": n}})
    args = ["--pooling", "cls", "--batch_size", 4, "--lr", 1e-3, "--max_steps", 2,
            "--save_steps", 2, "--eval_steps", 2, "--logging_steps", 1, "--num_workers", 0,
            "--output_dir", tmp_path / "run"]
    with pytest.raises(SystemExit) as e:  # the model folder does not exist: not reached
        train.main([str(a) for a in ["--model", tmp_path / "no_model", *args, "--train_data",
                                     f"a={repo}", "--val_data", f"a={repo}:test"]])
    assert e.value.code == 2
    assert f"{repo} holds the splits train" in capsys.readouterr().err
    train.main([str(a) for a in [
        "--model", tiny_vit, *args,
        "--train_data", f"a={repo}:train", f"b={images}:train", f"c={shards}:train",
        "--val_data", f"a={repo}:test", f"b={images}:val", f"c={shards}:validation"]])
    info = json.load(open(tmp_path / "run" / "checkpoint-2" / "training_info.json"))
    assert f"a={repo}:train" in info["args"]["train_data"]
    import eval as eval_script
    predictions = tmp_path / "predictions.jsonl"
    eval_script.main([str(tmp_path / "run" / "checkpoint-2"), "--predictions", str(predictions),
                      "--num_workers", "0"])
    rows = read_jsonl(predictions)
    assert len(rows) == 18
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # eval.py's specs: the same rule, the same message
        eval_script.main([str(tmp_path / "run" / "checkpoint-2"), "--val_data", f"c={shards}",
                          "--num_workers", "0"])
    assert e.value.code == 2
    assert (f"{shards} holds the splits train (train/), validation (validation/)" in
            capsys.readouterr().err)
    by_name = {}
    for r in rows:
        by_name.setdefault(r["dataset_name"], set()).add(r["label_name"])
    assert by_name == {n: set(CLASSES) for n in "abc"}
    for r in rows:  # the folder's and the shards' keys end with their image's class name
        if r["dataset_name"] != "a":
            assert r["image_path"].rsplit("_", 1)[-1].split(".")[0] == r["label_name"], r
