"""Data where users keep it: image folders, Parquet written by `datasets` (a ClassLabel column),
WebDataset tar shards; their specs, checks, indexes, and a run mixing the three that trains,
resumes after a kill and evaluates exactly as the same data as JSONL, with the sources' class
names in predictions, per-class metrics and exports."""
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

import train
from conftest import load_weights, read_jsonl, run_script, write_jsonl
from data.tar_index import INDEX_SUFFIX
from dataset import DataError, ImageDataset, load_registry, parse_spec, read_records
from demo import make_demo


@pytest.fixture(autouse=True)
def offline_datasets_cache(tmp_path_factory, monkeypatch):
    """datasets' cache (Parquet converted to Arrow) in this test run's folder; nothing online."""
    import datasets
    cache = str(tmp_path_factory.getbasetemp() / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def png(path):
    with open(path, "rb") as f:
        return f.read()


def write_parquet(path, rows, names):
    import datasets
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict(
        {"image": [None if r["image_path"] is None else {"bytes": png(r["image_path"]),
                                                         "path": None} for r in rows],
         "label": [r["label"] for r in rows]}, features=features).to_parquet(str(path))
    return str(path)


def write_shard(path, samples):
    """samples: (key, {field: bytes}) in order, as WebDataset's writers lay them out."""
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def layouts(demo_dir, tmp_path_factory):
    """Three datasets from the demo's PNG files, each in another layout, and the same records as
    JSONL in the order the sources give them: digits as an image folder (class folders 0-9),
    faces as Parquet (ClassLabel background / face), parity (digits labelled even / odd) as
    WebDataset shards (two training shards, one with .cls and one with .json labels)."""
    out = tmp_path_factory.mktemp("layouts")
    rows = {s: read_jsonl(demo_dir / "digits" / f"{s}.jsonl") for s in ("train", "val")}
    faces = {s: read_jsonl(demo_dir / "faces" / f"{s}.jsonl") for s in ("train", "val")}
    for table, name in ((rows, "digits"), (faces, "faces")):
        for split in table.values():
            for r in split:
                r["image_path"] = str(demo_dir / name / r["image_path"])
    specs, jsonl = {"train": [], "val": []}, {"train": [], "val": []}
    sizes = {"train": 40, "val": 21}
    for split, n in sizes.items():
        folder = out / "digits" / split
        chosen = []
        for r in rows[split][:n]:
            target = folder / str(r["label"]) / os.path.basename(r["image_path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(r["image_path"], target)
            chosen.append({"image_path": str(target), "label": r["label"],
                           "dataset_name": "digits"})
        for label in range(10):  # a class without images in this split is still a class
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
        jsonl[split] += sorted(chosen, key=lambda r: (r["label"], r["image_path"]))
        specs[split].append(f"digits={folder}")

        middle, k = len(faces[split]) // 2, 8 if split == "train" else 5
        chosen = [{**r, "dataset_name": "faces"}  # faces first, then background: some of each
                  for r in faces[split][middle - k:middle + k]]
        path = write_parquet(out / f"faces_{split}.parquet", chosen, ["background", "face"])
        jsonl[split] += chosen
        specs[split].append(f"faces={path}")

        chosen = [{"image_path": r["image_path"], "label": r["label"] % 2,
                   "dataset_name": "parity"} for r in rows[split][n:2 * n]]
        half = len(chosen) // 2 if split == "train" else len(chosen)
        for k, part in enumerate([chosen[:half], chosen[half:]] if half < len(chosen) else
                                 [chosen]):
            label_field = ("cls", lambda r: str(r["label"]).encode()) if k == 0 else (
                "json", lambda r: json.dumps({"label": r["label"], "note": "x"}).encode())
            write_shard(out / f"parity_{split}-{k:03d}.tar",
                        [(f"s{i:04d}", {"png": png(r["image_path"]),
                                        label_field[0]: label_field[1](r)})
                         for i, r in enumerate(part)])
        jsonl[split] += chosen
        last = 1 if split == "train" else 0
        specs[split].append(f"parity={out}/parity_{split}-{{000..{last:03d}}}.tar")
    files = {f"{s}_jsonl": write_jsonl(out / f"{s}.jsonl", jsonl[s]) for s in jsonl}
    with open(out / "mixed.json", "w") as f:
        json.dump({"digits": {"eval_ratio": 0.5}, "faces": {},
                   "parity": {"num_classes": 2, "labels": ["even", "odd"]}}, f)
    with open(out / "plain.json", "w") as f:
        json.dump({"digits": {"num_classes": 10, "eval_ratio": 0.5}, "faces": {"num_classes": 2},
                   "parity": {"num_classes": 2}}, f)
    return {**files, "specs": specs, "mixed": str(out / "mixed.json"),
            "plain": str(out / "plain.json"), "root": out}


def test_specs_name_their_kind(layouts, tmp_path):
    root = layouts["root"]
    both = tmp_path.with_name(tmp_path.name + "_both")
    both.mkdir()
    for file in ("a.parquet", "b.tar"):
        shutil.copy(root / ("faces_train.parquet" if file.endswith("parquet") else
                            "parity_val-000.tar"), both / file)
    kinds = [parse_spec(s).kind for s in layouts["specs"]["train"]]
    assert kinds == ["folder", "hf", "wds"]
    assert parse_spec(f"digits=folder:{root}/digits/train").kind == "folder"
    assert parse_spec(f"parity=wds:{root}/parity_train-*.tar").kind == "wds"
    assert parse_spec(layouts["train_jsonl"]).kind == "jsonl"
    assert parse_spec("parity=hf://datasets/me/parity/x.parquet").kind == "hf"
    for spec, message in [(f"{root}/digits/train", "name its dataset"),
                          (f"d={layouts['train_jsonl']}", "without NAME="),
                          (f"d={tmp_path}/absent", "not found"),
                          (f"d={tmp_path}", "no class subfolders"),
                          (f"d={root}", r"holds the splits train \(faces_train.parquet and 2 "
                                        r"more\), val .*name one, e\.g\. d=.*:train or "),
                          (f"d={both}", "both .parquet and .tar files; prefix PATH"),
                          (f"d={root}/parity_train-{{005..006}}.tar", "not found")]:
        with pytest.raises(DataError, match=message):
            parse_spec(spec)


def test_each_kind_gives_the_records_the_jsonl_gives(layouts):
    registry = load_registry(layouts["mixed"])
    for split in ("train", "val"):
        mixed = read_records(layouts["specs"][split], registry)
        plain = read_records([layouts[f"{split}_jsonl"]], load_registry(layouts["plain"]))
        assert len(mixed) == len(plain) == (96 if split == "train" else 52)
        assert mixed.labels.tolist() == plain.labels.tolist()
        assert mixed.dataset_ids.tolist() == plain.dataset_ids.tolist()
        a, b = ImageDataset(mixed), ImageDataset(plain)
        for i in range(len(mixed)):
            assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])), mixed[i].source
    assert registry["digits"].labels == [str(d) for d in range(10)]
    assert (registry["faces"].num_classes, registry["faces"].labels) == (2, ["background", "face"])
    names = [mixed[i].source for i in range(len(mixed))]
    assert any(n.endswith("faces_val.parquet:0") for n in names)
    assert any(n.endswith("parity_val-000.tar:s0000.png") for n in names)
    assert all(os.path.isfile(n) for n in names[:21])  # a folder's record is its image file


def test_the_registry_and_the_sources_must_agree(layouts, tmp_path):
    specs = layouts["specs"]["train"]
    for registry, message in [
            ({"digits": {}, "faces": {"num_classes": 3}},
             "num_classes 3, .*faces_train.parquet.* has 2"),
            ({"digits": {}, "faces": {"labels": ["no", "yes"]}},
             "class names of .*faces_train.parquet .*differ from the registry's labels"),
            ({"digits": {"labels": [str(d) for d in range(9)] + ["nine"]}, "faces": {}},
             "class folder '9' is not a class of dataset 'digits'"),
            ({"faces": {}}, "dataset 'digits' is not in the dataset registry")]:
        with pytest.raises(DataError, match=message):
            read_records(specs[:2], load_registry(registry))
    from dataset import check_classes
    registry = {}  # an open registry: the shards do not know how many classes there are
    records = read_records(specs[2:], registry, fixed=False)
    with pytest.raises(DataError, match="dataset 'parity': no num_classes"):
        check_classes(registry, [records])
    with pytest.raises(DataError, match=r"parity_train-000.tar:s\d+.png: field 'label': 1 is "
                                        r"outside \[0, 1\)"):
        read_records(specs[2:], load_registry({"parity": {"num_classes": 1}}))


def test_bad_rows_and_shards_are_named(layouts, tmp_path):
    root = layouts["root"]
    image = png(next((root / "digits" / "train").rglob("*.png")))
    # a tar: no image member, an unreadable label, a member cut off; a corrupt image decodes late
    write_shard(tmp_path / "bad-000.tar", [("a", {"png": image, "cls": b"1"}),
                                           ("b", {"cls": b"0"}),
                                           ("c", {"png": image, "cls": b" "})])
    write_shard(tmp_path / "bad-001.tar", [("d", {"png": image, "json": b'{"other": 1}'})])
    data = (tmp_path / "cut-000.tar")
    write_shard(data, [("e", {"png": image * 20, "cls": b"1"})])
    data.write_bytes(data.read_bytes()[:1200])
    registry = {"p": {"num_classes": 2}}
    with pytest.raises(DataError) as e:
        read_records([f"p={tmp_path}/bad-{{000..001}}.tar", f"p={tmp_path}/cut-000.tar"],
                     load_registry(registry))
    text = str(e.value)
    assert "bad-000.tar:c.cls: an empty .cls: expected a class index or a class name" in text
    assert "cut-000.tar:e.png: cut off" in text
    with pytest.raises(DataError) as e:
        read_records([f"p={tmp_path}/bad-001.tar"], load_registry(registry))
    assert "bad-001.tar:d.png: no label" in str(e.value)
    write_shard(tmp_path / "bad-000.tar", [("a", {"png": image, "cls": b"1"}),
                                           ("b", {"cls": b"0"}),
                                           ("c", {"png": b"\x89PNG not really", "cls": b"0"})])
    with pytest.raises(DataError, match="bad-000.tar:b: no image member"):
        read_records([f"p={tmp_path}/bad-000.tar"], load_registry(registry))
    said = []
    records = read_records([f"p={tmp_path}/bad-000.tar"], load_registry(registry),
                           skip_missing_images=True, say=said.append)
    assert len(records) == 2 and "1 sample(s) without an image left out" in said[0]
    assert "bad-000.tar:b" in said[0]
    with pytest.raises(DataError, match="bad-000.tar:c.png: cannot decode image"):
        ImageDataset(records)[1]
    assert ImageDataset(records, skip_bad_images=True)[1][0] is None
    # Parquet: an empty image and a label outside the classes, each by file and row
    rows = [{"image_path": str(next((root / "digits" / "train").rglob("*.png"))), "label": 0}] * 3
    rows[1] = {"image_path": None, "label": 1}
    path = write_parquet(tmp_path / "bad.parquet", rows, ["a", "b"])
    with pytest.raises(DataError, match=r"bad.parquet:1: column 'image' holds no image"):
        read_records([f"q={path}"], load_registry({"q": {}}))
    with pytest.raises(DataError, match="no column 'picture'"):
        read_records([f"q={path}"], load_registry({"q": {"image_column": "picture"}}))
    # an image folder: an image outside the class folders, a note for what is not an image
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(image)
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "dog").mkdir()
    (folder / "dog" / "2.png").write_bytes(image)
    said = []
    records = read_records([f"f={folder}"], load_registry({"f": {}}), say=said.append)
    assert len(records) == 2 and "notes.txt" in said[0]
    (folder / "loose.png").write_bytes(image)
    with pytest.raises(DataError, match="loose.png: an image directly in .* belongs to no class"):
        read_records([f"f={folder}"], load_registry({"f": {}}))


def test_a_shard_index_is_built_once_and_rebuilt_when_the_shard_changes(layouts, tmp_path,
                                                                        monkeypatch):
    from data import tar_index
    builds = []
    build = tar_index.build_tar_index
    monkeypatch.setattr(tar_index, "build_tar_index", lambda *a: builds.append(a) or build(*a))
    shard = tmp_path / "s-000.tar"
    shutil.copy(layouts["root"] / "parity_train-000.tar", shard)
    registry = {"p": {"num_classes": 2}}
    read_records([f"p={shard}"], load_registry(registry))
    index = tmp_path / ("s-000.tar" + INDEX_SUFFIX)
    built = index.stat().st_mtime_ns
    read_records([f"p={shard}"], load_registry(registry))
    assert len(builds) == 1  # the second read takes the cached index
    samples = [("z", {"png": png(next((layouts["root"] / "digits").rglob("*.png"))),
                      "cls": b"5"})]
    write_shard(shard, samples)
    os.utime(shard, ns=(built + 10 ** 9, built + 10 ** 9))
    with pytest.raises(DataError, match="s-000.tar:z.png: field 'label': 5 is outside"):
        read_records([f"p={shard}"], load_registry(registry))
    assert len(builds) == 2  # rebuilt for the changed shard


def test_demo_writes_each_layout_with_the_same_records(tmp_path):
    from dataset import check_classes
    expected = None
    for layout in ("jsonl", "folder", "parquet", "wds"):
        out = tmp_path / layout
        make_demo(str(out), layout=layout)
        if layout == "jsonl":
            specs = [str(out / n / "val.jsonl") for n in ("digits", "faces")]
        elif layout == "folder":
            specs = [f"{n}={out / n / 'val'}" for n in ("digits", "faces")]
        elif layout == "parquet":
            specs = [f"{n}={out / n / 'val.parquet'}" for n in ("digits", "faces")]
        else:
            specs = [f"{n}={out / n / 'val-000.tar'}" for n in ("digits", "faces")]
        registry = load_registry(str(out / "datasets.json"))
        records = read_records(specs, registry)
        check_classes(registry, [records])
        key = sorted(zip(records.dataset_ids.tolist(), records.labels.tolist(),
                         [np.asarray(ImageDataset(records)[i][0]).sum() for i in
                          range(len(records))]))
        assert expected is None or key == expected, layout
        expected = key
        if layout != "jsonl":
            assert registry["faces"].labels == ["background", "face"]


RUN = ["--model", None, "--pooling", "cls", "--batch_size", 8, "--lr", 1e-3, "--max_steps", 6,
       "--save_steps", 2, "--eval_steps", 3, "--logging_steps", 2, "--save_all_checkpoints",
       "--no_final_eval", "--num_workers", 0]


def run_args(model, out, train_specs, val_specs, registry, *extra):
    args = [model if a is None else a for a in RUN]
    return [str(a) for a in [*args, "--train_data", *train_specs, "--val_data", *val_specs,
                             "--datasets", registry, "--output_dir", out, *extra]]


def test_a_run_mixing_three_layouts_trains_resumes_and_evaluates_as_its_jsonl(
        layouts, tiny_vit, tmp_path, monkeypatch, request):
    specs = layouts["specs"]
    mixed, plain = tmp_path / "mixed", tmp_path / "plain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same sums
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    train.main(run_args(tiny_vit, mixed, specs["train"], specs["val"], layouts["mixed"]))
    train.main(run_args(tiny_vit, plain, [layouts["train_jsonl"]], [layouts["val_jsonl"]],
                        layouts["plain"]))
    a, b = load_weights(mixed / "checkpoint-6"), load_weights(plain / "checkpoint-6")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same records, images and order
    evals = [[r for r in read_jsonl(d / "metrics.jsonl") if r["event"] == "eval"]
             for d in (mixed, plain)]
    assert evals[0] == evals[1]

    # killed after step 4 (checkpoint-4 never written), resumed with a DataLoader worker
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setenv("MIXTRAIN_FAULT", "kill_before_save:4")
        result = run_script("train.py", *run_args(tiny_vit, killed, specs["train"], specs["val"],
                                                  layouts["mixed"], "--num_workers", 1))
    assert result.returncode == -9 and not (killed / "checkpoint-4").exists()
    train.main(run_args(tiny_vit, killed, specs["train"], specs["val"], layouts["mixed"],
                        "--num_workers", 1, "--resume", "latest"))
    c = load_weights(killed / "checkpoint-6")
    assert all(torch.equal(a[k], c[k]) for k in a)

    import eval as eval_script
    from export import export
    predictions = tmp_path / "predictions.jsonl"
    eval_script.main([str(mixed / "checkpoint-6"), "--val_data", *specs["val"], "--predictions",
                      str(predictions), "--per_class", "--num_workers", "0"])
    rows = read_jsonl(predictions)
    names = {r["dataset_name"]: set() for r in rows}
    for r in rows:
        names[r["dataset_name"]].add(r["label_name"])
    assert names == {"digits": {str(d) for d in range(10)}, "faces": {"background", "face"},
                     "parity": {"even", "odd"}}
    assert any(r["image_path"].endswith("parity_val-000.tar:s0000.png") for r in rows)
    with open(mixed / "per_class" / "checkpoint-6.json") as f:
        per_class = json.load(f)["datasets"]
    assert "background" in json.dumps(per_class["faces"])
    eval_script.main([str(mixed / "checkpoint-6"), "--num_workers", "0", "--force"])
    results = read_jsonl(mixed / "eval_results.jsonl")
    assert results[0]["eval_overall_accuracy"] == results[1]["eval_overall_accuracy"]
    assert results[0]["val_data"] == results[1]["val_data"]  # the run's own, from the checkpoint
    exported = export(str(mixed / "checkpoint-6"), "faces", str(tmp_path / "faces_model"))
    assert exported.config.id2label == {0: "background", 1: "face"}


def test_the_autoencoder_and_the_generator_read_through_the_same_readers(layouts):
    from tasks.autoencoder import ImageNoiseDataset, ImageShape, read_images
    from tasks.generate.records import read_generation_files
    registry = {}
    mixed = read_images(layouts["specs"]["val"], registry, False, None)
    plain = read_images([layouts["val_jsonl"]], {}, False, None)
    assert list(registry) == ["digits", "faces", "parity"] and len(mixed) == len(plain)
    shape = ImageShape(8, 1, 4, 4)
    a, b = (ImageNoiseDataset(r, shape, train=False) for r in (mixed, plain))
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(len(plain)))
    with pytest.raises(DataError, match="--task generate reads JSON / JSONL records"):
        read_generation_files([layouts["specs"]["val"][0]])
