"""--streaming: Parquet (written by `datasets`) and WebDataset shards read as a stream through
datasets' iterable datasets; exact shares per block, disjoint parts per rank, the stream's
position through torchdata's StatefulDataLoader as JSON, a training run killed and resumed
bitwise, and bad samples named as they come."""
import json
import os

import numpy as np
import pytest
import torch

import train
from conftest import load_weights, run_script
from dataset import DataError, build_stream, load_registry, make_stream_loader, read_records
from test_sources import layouts, offline_datasets_cache, write_shard  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def specs(layouts, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """faces as Parquet, parity as two shards whose samples all hold .png and .cls (datasets'
    WebDataset reader takes a stream's fields from its first samples)."""
    out = tmp_path_factory.mktemp("stream")
    records = read_records(layouts["specs"]["train"][2:],
                           load_registry({"parity": {"num_classes": 2}}))
    for k, members in enumerate(np.array_split(np.arange(len(records)), 2)):
        write_shard(out / f"parity-{k:03d}.tar",
                    [(f"s{i:04d}", {"png": records.open(i).read(),
                                    "cls": str(records.labels[i]).encode()})
                     for i in members.tolist()])
    return {"train": [layouts["specs"]["train"][1], f"parity={out}/parity-{{000..001}}.tar"],
            "val": layouts["specs"]["val"][1:]}


def registry_file(tmp_path, weights=(1, 3)):
    path = tmp_path / "stream.json"
    path.write_text(json.dumps({"faces": {"sampling_weight": weights[0]},
                                "parity": {"num_classes": 2, "sampling_weight": weights[1]}}))
    return str(path)


def stream_of(specs, tmp_path, rank=0, world_size=1, buffer=16, weights=(1, 3)):
    registry = load_registry(registry_file(tmp_path, weights))
    stream, shares, _ = build_stream(specs["train"], registry, True, seed=3,
                                     rank=rank, world_size=world_size, buffer=buffer,
                                     skip_bad_images=False)
    stream.num_classes = [s.num_classes for s in registry.values()]
    return stream, shares, registry


def test_shares_hold_and_ranks_read_disjoint_parts(specs, tmp_path):
    stream, shares, registry = stream_of(specs, tmp_path)
    assert shares == [0.25, 0.75] and registry["faces"].labels == ["background", "face"]
    items = [item for _, item in zip(range(2000), stream)]
    counts = np.bincount([dataset_id for _, _, dataset_id, _ in items], minlength=2)
    assert counts.tolist() == [500, 1500]  # exact shares per block of the schedule
    assert len({key for *_, key in items}) == 2000  # every sample its own augmentation key
    # two ranks: each reads its part of each dataset (one of the two parity shards each, every
    # other row of the one faces file): within a pass no sample is read twice, by either rank
    seen = []
    for rank in range(2):
        part, _, _ = stream_of(specs, tmp_path, rank=rank, world_size=2, buffer=1)
        seen.append([image.tobytes() for _, (image, *_) in zip(range(20), part)])
    assert len(set(seen[0] + seen[1])) == 40


def test_files_that_do_not_divide_among_the_readers_are_said(specs, tmp_path):
    """3 shards over 2 readers: each reader takes as many samples, so the shard of the reader
    holding one comes around twice as often as the other two; the summary says so."""
    import glob
    import shutil
    shards = sorted(glob.glob(specs["train"][1].split("=", 1)[1].replace("{000..001}", "*")))
    for k, shard in enumerate(shards + shards[:1]):
        shutil.copy(shard, tmp_path / f"p-{k:03d}.tar")
    registry = load_registry({"parity": {"num_classes": 2}})
    for world_size, said in ((2, True), (3, False)):
        *_, summary = build_stream([f"parity={tmp_path}/p-{{000..002}}.tar"], registry, True,
                                   seed=0, rank=0, world_size=world_size, buffer=1,
                                   skip_bad_images=False)
        assert ("3 files for 2 readers (processes x DataLoader workers): some read 1, others 2"
                in summary) == said and ("about 2x as often" in summary) == said, summary


def test_the_loader_resumes_from_its_json_state(specs, tmp_path):
    from backbone import load_backbone
    from dataset import pixel_path
    _, inputs = load_backbone("preset:vit-tiny")
    for workers in (0, 1):
        def loader():
            stream, _, registry = stream_of(specs, tmp_path, buffer=12)
            stream.pixels = pixel_path(inputs, True)
            return make_stream_loader(stream, inputs, list(registry), batch_size=5,
                                      num_workers=workers, pin_memory=False)
        whole = iter(loader())
        batches = [next(whole) for _ in range(9)]
        first = loader()
        part = iter(first)
        for _ in range(4):  # resumed inside the second block of 12 samples
            next(part)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = loader()
        resumed.load_state_dict(state)
        again = iter(resumed)
        for expected in batches[4:]:
            got = next(again)
            assert all(torch.equal(got[k], expected[k]) for k in expected), workers


def run_args(model, out, specs, tmp_path, *extra, workers=1):
    return [str(a) for a in [
        "--model", model, "--train_data", *specs["train"], "--val_data", *specs["val"],
        "--datasets", registry_file(tmp_path), "--streaming",
        "--shuffle_buffer", 10, "--output_dir", out, "--batch_size", 8, "--lr", 1e-3,
        "--max_steps", 6, "--save_steps", 2, "--eval_steps", 3, "--logging_steps", 2,
        "--save_all_checkpoints", "--no_final_eval", "--num_workers", workers, *extra]]


def test_a_streaming_run_resumes_bitwise_after_a_kill(specs, tiny_vit, tmp_path, monkeypatch,
                                                      request, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same sums
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train.main(run_args(tiny_vit, whole, specs, tmp_path))
    assert ("note: --streaming: the training images are read as they are trained on, so they are "
            "not checked for repeats, nor the validation records for training images"
            ) in capsys.readouterr().out
    with monkeypatch.context() as m:
        m.setenv("MIXTRAIN_FAULT", "kill_before_save:4")
        result = run_script("train.py", *run_args(tiny_vit, killed, specs, tmp_path))
    assert result.returncode == -9 and not (killed / "checkpoint-4").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the position is per process and worker
        train.main(run_args(tiny_vit, killed, specs, tmp_path, "--num_workers", 0, "--resume",
                            "latest"))
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "is one per process and DataLoader worker" in captured.err
    assert "trainable" not in captured.out  # refused before the model is built
    argv = run_args(tiny_vit, killed, specs, tmp_path, "--resume", "latest",
                    "--allow_changed_flags")
    cut = argv.index("--shuffle_buffer")  # the same data read by index: refused, not restarted
    with pytest.raises(SystemExit) as e:
        train.main([a for a in argv[:cut] + argv[cut + 2:] if a != "--streaming"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "resumes with --streaming exactly when" in captured.err
    assert "trainable" not in captured.out
    latest = max(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    info_file = latest / "training_info.json"
    kept = info_file.read_text()
    info = json.loads(kept)
    del info["stream_split"]  # as written before the split over readers was planned
    info_file.write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        train.main(run_args(tiny_vit, killed, specs, tmp_path, "--resume", "latest"))
    assert e.value.code == 2 and "cannot be continued exactly" in capsys.readouterr().err
    info_file.write_text(kept)
    train.main(run_args(tiny_vit, killed, specs, tmp_path, "--resume", "latest"))
    a, b = load_weights(whole / "checkpoint-6"), load_weights(killed / "checkpoint-6")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(whole / "metrics.jsonl")]
    trained = [r for r in rows if r["event"] == "train"]
    assert sum(r["train_overall_samples"] for r in trained) == 48


def test_a_stream_stopped_by_a_bad_image_resumes_from_where_its_checkpoint_step_ended(
        specs, tiny_vit, tmp_path, request, capsys):
    """A streaming run stops at an image it cannot decode and checkpoints the last completed
    step. Its stream position was taken after the failed step's first micro-batches, so a resume
    (--on_bad_image skip) never trained them: now it equals a run that skipped the image."""
    import glob
    import tarfile
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    shard_glob = specs["train"][1].split("=", 1)[1].replace("{000..001}", "*")
    samples = []
    for shard in sorted(glob.glob(shard_glob)):
        with tarfile.open(shard) as tar:
            samples += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({name.split(".")[0] for name, _ in samples})
    bad = keys[21]  # in step 3's second micro-batch (8 samples a step)
    fields = {}
    for name, data in samples:
        key, field = name.split(".", 1)
        fields.setdefault(key, {})[field] = b"\x89PNG cut" if (key, field) == (bad, "png") else data
    for k, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        write_shard(tmp_path / f"bad-{k:03d}.tar", [(key, fields[key]) for key in part])
    registry = tmp_path / "parity.json"
    registry.write_text(json.dumps({"parity": {"num_classes": 2, "sampling_weight": 1}}))

    def argv(out, *extra):
        return [str(a) for a in [
            "--model", tiny_vit, "--train_data", f"parity={tmp_path}/bad-{{000..001}}.tar",
            "--datasets", registry, "--streaming", "--no_shuffle", "--output_dir", out,
            "--batch_size", 4, "--grad_accum", 2, "--lr", 1e-3, "--max_steps", 5,
            "--save_steps", 100, "--logging_steps", 1, "--skip_evaluation", "--num_workers", 0,
            *extra]]
    train.main(argv(tmp_path / "skipped", "--on_bad_image", "skip"))
    with pytest.raises(SystemExit) as e:
        train.main(argv(tmp_path / "stopped"))
    assert e.value.code == 2 and "checkpoint-2 holds the last completed step" in (
        capsys.readouterr().err)
    train.main(argv(tmp_path / "stopped", "--on_bad_image", "skip", "--resume", "latest"))
    a = load_weights(tmp_path / "skipped" / "checkpoint-5")
    b = load_weights(tmp_path / "stopped" / "checkpoint-5")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parquet_images_named_by_relative_path_are_read_beside_their_own_file(tmp_path):
    """Parquet files in two folders whose Image column holds paths relative to each file (as
    `datasets` writes them unembedded): one glob read them all beside the first file (the second
    folder's labels on the first folder's images); a stream, whose rows do not say their file,
    refuses them instead of guessing."""
    import datasets
    from PIL import Image
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["dark", "light"])})
    for folder, label in (("a", 0), ("b", 1)):
        os.makedirs(tmp_path / folder / "images")
        for n in range(2):
            Image.new("L", (8, 8), 255 * label).save(tmp_path / folder / "images" / f"{n}.png")
        datasets.Dataset.from_dict(
            {"image": [{"path": f"images/{n}.png", "bytes": None} for n in range(2)],
             "label": [label] * 2}, features=features).to_parquet(tmp_path / folder / "f.parquet",
                                                                   batch_size=2)
    registry = load_registry({"faces": {}})
    records = read_records([f"faces={tmp_path}/*/f.parquet"], registry)
    assert [(int(records.labels[i]), Image.open(records.open(i)).getpixel((0, 0)))
            for i in range(len(records))] == [(0, 0), (0, 0), (1, 255), (1, 255)]
    stream, _, _ = build_stream([f"faces={tmp_path}/a/f.parquet", f"faces={tmp_path}/b/f.parquet"],
                                registry, True, seed=0, rank=0, world_size=1, buffer=1,
                                skip_bad_images=False)
    stream.num_classes = [2]
    with pytest.raises(DataError, match="a path relative to its Parquet file, whose folder a "
                                        "streamed row does not tell: the dataset's files sit in 2"):
        next(iter(stream))


def test_stream_flags_and_bad_samples_are_refused_clearly(specs, layouts, tiny_vit,  # noqa: F811
                                                          tmp_path, capsys):
    base = run_args(tiny_vit, tmp_path / "out", specs, tmp_path)
    cases = [
        ([a for a in base if a != "--streaming"], "--shuffle_buffer: no effect without"),
        (base + ["--mix_temperature", "2"], "--mix_temperature: no effect without the sizes"),
        (base[:base.index("--max_steps")] + base[base.index("--max_steps") + 2:],
         "--streaming: a stream has no epochs"),
        (base + ["--train_data", *layouts["specs"]["train"]],
         "--streaming reads Parquet files or WebDataset shards, not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, message
    registry = tmp_path / "unweighted.json"
    registry.write_text(json.dumps({"faces": {}, "parity": {"num_classes": 2}}))
    with pytest.raises(SystemExit):
        train.main(base + ["--datasets", str(registry)])
    assert "give every streamed dataset a sampling_weight" in capsys.readouterr().err
    # a label outside the classes and an image that does not decode, named when they come
    png = next((layouts["root"] / "digits").rglob("*.png")).read_bytes()
    write_shard(tmp_path / "bad-000.tar", [("k0", {"png": b"\x89PNG cut", "cls": b"0"}),
                                           ("k1", {"png": png, "cls": b"7"})])
    for skip in (False, True):
        stream, _, _ = build_stream([f"parity={tmp_path}/bad-000.tar"],
                                    load_registry({"parity": {"num_classes": 2}}), True, seed=0,
                                    rank=0, world_size=1, buffer=1, skip_bad_images=skip)
        stream.num_classes = [2]
        items = iter(stream)
        if skip:
            image, message, *_ = next(items)
            assert image is None and "bad-000.tar:k0.png: cannot decode image" in message
        else:
            with pytest.raises(DataError, match="bad-000.tar:k0.png: cannot decode image"):
                next(items)
            continue
        with pytest.raises(DataError, match=r"bad-000.tar:k1.png: field 'label': 7 is outside"):
            next(items)


def test_a_folder_of_shards_streams_its_compressed_shards_too(specs, tmp_path):
    """A folder given to --streaming streams every shard read_records would list: a gzipped one
    beside a plain one is read, not left out without a word."""
    import glob
    import gzip
    import itertools
    import shutil
    plain, other = sorted(glob.glob(specs["train"][1].split("=", 1)[1].replace(
        "{000..001}", "*")))
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(plain, folder / "parity-000.tar")
    with open(other, "rb") as f, gzip.open(folder / "parity-001.tar.gz", "wb") as out:
        out.write(f.read())
    registry = load_registry({"parity": {"num_classes": 2}})
    stream, _, _ = build_stream([f"parity=wds:{folder}"], registry, True, seed=3, rank=0,
                                world_size=1, buffer=16, skip_bad_images=False)
    assert [os.path.basename(f) for f in stream.sources[0].files] == ["parity-000.tar",
                                                                   "parity-001.tar.gz"]
    stream.num_classes = [2]
    whole = read_records([specs["train"][1]], load_registry({"parity": {"num_classes": 2}}))
    keys = [item[3] for item in itertools.islice(iter(stream), len(whole))]
    assert len(set(map(str, keys))) == len(whole)  # one pass: every sample of both shards
    # the data's fingerprint (a resume's check) holds the gzipped shard as well
    from data.fingerprint import data_fingerprint
    assert sorted(data_fingerprint(f"parity=wds:{folder}")["units"]) == ["parity-000.tar",
                                                                        "parity-001.tar.gz"]


def test_a_resume_says_that_remote_files_are_compared_by_their_url_alone(specs, tiny_vit,
                                                                         tmp_path, capsys):
    name, path = specs["train"][0].split("=", 1)
    remote = {**specs, "train": [f"{name}=file://{path}", *specs["train"][1:]]}
    args = run_args(tiny_vit, tmp_path / "run", remote, tmp_path, workers=0)
    cut = args.index("--max_steps")
    train.main(args[:cut + 1] + ["2"] + args[cut + 2:])
    capsys.readouterr()
    train.main(args[:cut + 1] + ["2"] + args[cut + 2:] + ["--resume", "latest"])
    assert (f"note: 1 remote data file(s) (e.g. file://{path}) are compared with the checkpoint's "
            "by their URL alone") in capsys.readouterr().out
