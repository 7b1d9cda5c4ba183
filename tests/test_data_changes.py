"""A resume continues the run only on the data it started with, and eval.py's "already
evaluated on this data" holds only while the data is the same: real folders, Parquet files and
shards changed the ways a user changes them (an image added deep in a class folder, one
overwritten in place, a shard or a Parquet file added or removed, a class folder renamed, the
registry's class names reordered), each refused naming what changed; the same data resumes."""
import json
import os
import shutil
import time

import pytest

import eval as eval_script
import train
from conftest import read_jsonl
from test_sources import offline_datasets_cache, png, write_parquet, write_shard  # noqa: F401


@pytest.fixture
def mixed(demo_dir, tmp_path):
    """An image folder of named classes (a nested folder in one), two Parquet files in a folder,
    two shards in a glob, and a registry; the validation data is the folder again."""
    digits = read_jsonl(demo_dir / "digits" / "train.jsonl")[:60]
    for k, r in enumerate(digits):
        r["image_path"] = str(demo_dir / "digits" / r["image_path"])
        seen = [d["label"] for d in digits[:k]].count(r["label"])  # every second one nested
        folder = tmp_path / "digits" / f"d{r['label']}" / ("deep" if seen % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["image_path"], folder / f"{k:03d}.png")
    os.makedirs(tmp_path / "faces")
    for k in range(2):
        rows = [{**r, "label": r["label"] % 2} for r in digits[k * 10:(k + 1) * 10]]
        write_parquet(tmp_path / "faces" / f"part-{k}.parquet", rows, ["even", "odd"])
    for k in range(2):
        write_shard(tmp_path / f"parity-{k:03d}.tar",
                    [(f"s{i:03d}", {"png": png(r["image_path"]), "cls": str(r["label"] % 2)
                                    .encode()}) for i, r in enumerate(digits[k * 8:(k + 1) * 8])])
    registry = tmp_path / "datasets.json"
    registry.write_text(json.dumps({"digits": {"eval_ratio": 1.0}, "faces": {},
                                    "parity": {"num_classes": 2, "labels": ["even", "odd"]}}))
    return {"root": tmp_path, "registry": registry, "image": digits[0]["image_path"],
            "train": [f"digits={tmp_path}/digits", f"faces={tmp_path}/faces",
                      f"parity={tmp_path}/parity-*.tar"]}


def args(data, model, out, *extra):
    return [str(a) for a in ["--model", model, "--train_data", *data["train"], "--datasets",
                             data["registry"], "--output_dir", out, "--num_workers", 0,
                             "--batch_size", 8, "--max_steps", 2, "--save_steps", 2, *extra]]


def refused(argv, capsys):
    """The one-line error of a resume that train.py refuses before its first step."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.splitlines()[-1]  # after datasets' progress bars
    assert e.value.code == 2 and err.startswith("error: "), err
    return err


def test_a_resume_refuses_changed_data_naming_what_changed(mixed, tiny_vit, tmp_path, capsys):
    root, out = mixed["root"], tmp_path / "run"
    train.main(args(mixed, tiny_vit, out, "--skip_evaluation", "--max_steps", 4))
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 3
    resume = args(mixed, tiny_vit, out, "--skip_evaluation", "--max_steps", 4, "--resume",
                  "latest")
    added = root / "digits" / "d3" / "deep" / "new.png"
    shutil.copy(mixed["image"], added)
    err = refused(resume, capsys)
    assert f"--train_data digits={root}/digits: 'd3' " in err and "files" in err, err
    added.unlink()

    image = next((root / "digits" / "d5" / "deep").iterdir())
    kept, stat = image.read_bytes(), image.stat()
    image.write_bytes(kept[:-4] + bytes(4))  # the same size, other bytes, a later time
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert "'d5' modified" in refused(resume, capsys)
    image.write_bytes(kept)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    shard = root / "parity-000.tar"  # written again in place: its middle may differ, its size not
    stat = shard.stat()
    shard.write_bytes(shard.read_bytes())
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert "'parity-000.tar' modified" in refused(resume, capsys)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    shutil.copy(root / "parity-001.tar", root / "parity-002.tar")
    assert f"--train_data parity={root}/parity-*.tar: 'parity-002.tar' added" in refused(
        resume, capsys)
    (root / "parity-002.tar").unlink()
    os.rename(root / "parity-001.tar", root / "parity-001.tar.aside")
    assert "'parity-001.tar' removed" in refused(resume, capsys)
    os.rename(root / "parity-001.tar.aside", root / "parity-001.tar")

    shutil.copy(root / "faces" / "part-1.parquet", root / "faces" / "part-2.parquet")
    assert f"--train_data faces={root}/faces: 'part-2.parquet' added" in refused(resume, capsys)
    (root / "faces" / "part-2.parquet").unlink()

    os.rename(root / "digits" / "d9", root / "digits" / "a9")  # sorts first: every index moves
    err = refused(resume, capsys)
    assert "'a9' added; 'd9' removed" in err
    assert "dataset 'digits': classes moved to other indices: 'd0' 0 -> 1, 'd1' 1 -> 2" in err
    os.rename(root / "digits" / "a9", root / "digits" / "d9")

    saved = mixed["registry"].read_text()
    entries = json.loads(saved)
    entries["parity"]["labels"] = ["odd", "even"]
    mixed["registry"].write_text(json.dumps(entries))
    assert "dataset 'parity': classes moved to other indices: 'even' 0 -> 1, 'odd' 1 -> 0" in \
        refused(resume, capsys)
    mixed["registry"].write_text(saved)

    train.main(resume)  # the data as it was: the run continues
    assert os.path.isdir(out / "checkpoint-4")


def test_eval_evaluates_again_when_the_data_changed_anywhere(mixed, tiny_vit, tmp_path, capsys):
    out, root = tmp_path / "run", mixed["root"]
    train.main(args(mixed, tiny_vit, out, "--val_data", f"digits={root}/digits", "--no_final_eval",
                    "--eval_steps", 2))
    checkpoint = str(out / "checkpoint-2")
    evaluate = [checkpoint, "--num_workers", "0"]

    def records():
        return len(read_jsonl(out / "eval_results.jsonl"))

    eval_script.main(evaluate)
    eval_script.main(evaluate)
    assert "already evaluated on this data" in capsys.readouterr().out and records() == 1
    image = next((root / "digits" / "d2" / "deep").iterdir())
    time.sleep(0.01)
    image.write_bytes(image.read_bytes())  # overwritten in place, deep in a class folder
    eval_script.main(evaluate)
    assert records() == 2
    shutil.copy(mixed["image"], root / "digits" / "d7" / "deep" / "new.png")
    eval_script.main(evaluate)
    assert records() == 3

    registry = tmp_path / "reordered.json"  # the head's rows stay where training put them
    registry.write_text(json.dumps({"digits": {"labels": [f"d{9 - i}" for i in range(10)]}}))
    with pytest.raises(SystemExit) as e:
        eval_script.main([*evaluate, "--datasets", str(registry), "--force"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "dataset 'digits': the class names of the data sit at other indices than in the " \
           "checkpoint's head" in err and "'d0' 0 -> 9" in err, err
