"""--streaming with more readers (processes x DataLoader workers) than files: one Parquet file
split by row group and one shard split by sample among 4 workers, the shares held and a run
killed and resumed bitwise; a Parquet file of image paths; a stream over http:// from a local
http.server; eval.py told how to evaluate remote data."""
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest
import torch

import eval as evaluate
import train
from conftest import load_weights, run_script
from dataset import DataError, build_stream, load_registry, make_stream_loader, read_records
from test_sources import layouts, offline_datasets_cache, write_shard  # noqa: F401 (fixtures)
from test_streaming import registry_file, run_args

FACES_ROWS, ROW_GROUP, PARITY_SAMPLES = 16, 4, 40


@pytest.fixture(scope="module")
def single(layouts, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """faces as one Parquet file of 4 row groups whose image column holds paths (relative to
    its folder, as datasets writes an imagefolder-derived dataset without embedding), parity
    as one shard of 40 samples."""
    import datasets
    out = tmp_path_factory.mktemp("single")
    registry = load_registry({"faces": {}, "parity": {"num_classes": 2}})
    records = read_records(layouts["specs"]["train"][1:], registry)
    faces = [i for i in range(len(records)) if records.dataset_ids[i] == 0]
    parity = [i for i in range(len(records)) if records.dataset_ids[i] == 1]
    assert (len(faces), len(parity)) == (FACES_ROWS, PARITY_SAMPLES)
    (out / "images").mkdir()
    for n, i in enumerate(faces):
        (out / "images" / f"{n:02d}.png").write_bytes(records.open(i).read())
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["background", "face"])})
    datasets.Dataset.from_dict(
        {"image": [{"path": f"images/{n:02d}.png", "bytes": None} for n in range(len(faces))],
         "label": [int(records.labels[i]) for i in faces]},
        features=features).to_parquet(str(out / "faces.parquet"), batch_size=ROW_GROUP)
    write_shard(out / "parity-000.tar", [(f"s{n:04d}", {"png": records.open(i).read(),
                                                        "cls": str(records.labels[i]).encode()})
                                         for n, i in enumerate(parity)])
    return {"train": [f"faces={out}/faces.parquet", f"parity={out}/parity-000.tar"],
            "val": layouts["specs"]["val"][1:], "root": out}


def stream_of(specs, tmp_path, *, rank=0, world_size=1, num_workers=0, buffer=1):
    registry = load_registry(registry_file(tmp_path))
    stream, shares, summary = build_stream(specs, registry, True, seed=3, rank=rank,
                                           world_size=world_size, buffer=buffer,
                                           skip_bad_images=False, num_workers=num_workers)
    stream.num_classes = [s.num_classes for s in registry.values()]
    return stream, shares, summary


def test_four_readers_split_one_file_each_and_hold_the_shares(single, tmp_path):
    _, _, summary = stream_of(single["train"], tmp_path, num_workers=4)
    assert "faces: 1 Parquet file(s), 4 row groups (a reader reads whole row groups)" in summary
    assert ("note: --streaming dataset 'parity': 1 file(s) for 4 readers (processes x "
            "DataLoader workers): each reads all of them and takes one sample in 4") in summary
    # the split is one of readers: 4 processes of no worker read as 1 process of 4 workers
    seen = {0: [], 1: []}
    for rank in range(4):
        stream, shares, _ = stream_of(single["train"], tmp_path, rank=rank, world_size=4)
        items = [item for _, item in zip(range(1000), stream)]
        counts = np.bincount([dataset_id for _, _, dataset_id, _ in items], minlength=2)
        assert shares == [0.25, 0.75] and counts.tolist() == [250, 750]  # every reader
        for d, n in ((0, FACES_ROWS // 4), (1, PARITY_SAMPLES // 4)):  # its first pass
            seen[d] += [image.tobytes() for image, _, i, _ in items if i == d][:n]
    # within a pass no sample is read twice, and every one is read
    assert len(set(seen[0])) == FACES_ROWS and len(set(seen[1])) == PARITY_SAMPLES


def test_four_workers_read_one_file_and_resume_from_their_json_state(single, tmp_path):
    from backbone import load_backbone
    from dataset import pixel_path
    _, inputs = load_backbone("preset:vit-tiny")

    def loader():
        stream, _, _ = stream_of(single["train"], tmp_path, num_workers=4, buffer=8)
        stream.pixels = pixel_path(inputs, True)
        return make_stream_loader(stream, inputs, ["faces", "parity"], batch_size=5,
                                  num_workers=4, pin_memory=False)

    def take(loader, count, state=None):
        """count batches, the workers ended before anything is checked (a failed check
        leaves no worker behind)."""
        if state is not None:
            loader.load_state_dict(state)
        batches = iter(loader)
        taken = [next(batches) for _ in range(count)]
        del batches
        return taken
    # 200 batches of 5 from each worker: 1,000 samples, one schedule block, 125 shuffle blocks
    batches = take(loader(), 800)
    counts = np.zeros((4, 2), dtype=np.int64)
    for b in batches:
        np.add.at(counts, ((b["indices"] >> 40).numpy(), b["dataset_ids"].numpy()), 1)
    assert counts.tolist() == [[250, 750]] * 4  # every worker read, the shares exact in each
    first = loader()
    take(first, 7)  # workers 0-2 inside their second shuffle block of 8 samples, 3 its first
    state = json.loads(json.dumps(first.state_dict()))
    again = take(loader(), 20, state)
    for got, expected in zip(again, batches[7:]):
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_one_parquet_file_with_four_workers_resumes_bitwise_after_a_kill(
        single, tiny_vit, tmp_path, monkeypatch, request, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same sums
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train.main(run_args(tiny_vit, whole, single, tmp_path, workers=4))
    out = capsys.readouterr().out
    assert "4 row groups" in out and "takes one sample in 4" in out  # said, not guessed
    with monkeypatch.context() as m:
        m.setenv("MIXTRAIN_FAULT", "kill_before_save:4")
        result = run_script("train.py", *run_args(tiny_vit, killed, single, tmp_path, workers=4))
    assert result.returncode == -9 and not (killed / "checkpoint-4").exists(), result.stderr
    info = json.loads((killed / "checkpoint-2" / "training_info.json").read_text())
    assert len(info["loader_states"]) == 1  # one rank, its 4 workers' positions inside
    train.main(run_args(tiny_vit, killed, single, tmp_path, "--resume", "latest", workers=4))
    a, b = load_weights(whole / "checkpoint-6"), load_weights(killed / "checkpoint-6")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(whole / "metrics.jsonl")]
    trained = [r for r in rows if r["event"] == "train"]
    assert sum(r["train_overall_samples"] for r in trained) == 48


def test_parquet_image_paths_resolve_beside_the_file_or_are_named(single, tmp_path):
    stream, _, _ = stream_of(single["train"][:1], tmp_path)
    image, label, dataset_id, _ = next(iter(stream))
    assert image.size[0] > 0 and dataset_id == 0 and label in (0, 1)
    # the same file elsewhere without its images: the missing one is named with its path
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "faces.parquet").write_bytes((single["root"] / "faces.parquet")
                                                       .read_bytes())
    stream, _, _ = stream_of([f"faces={tmp_path}/moved/faces.parquet"], tmp_path)
    with pytest.raises(DataError, match=r"moved/images/\d\d\.png\): cannot decode image"):
        next(iter(stream))


@pytest.fixture
def served(single):
    """single's folder over http:// from a local http.server thread."""
    handler = functools.partial(QuietHandler, directory=str(single["root"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # each request logged would fill the test's output
        pass


def test_a_stream_over_http_trains_and_eval_says_how_to_read_remote_data(
        single, served, tiny_vit, tmp_path, capsys):
    data = {"train": [f"faces={served}/faces.parquet", f"parity={served}/parity-000.tar"],
            "val": single["val"]}
    out = tmp_path / "http"
    argv = run_args(tiny_vit, out, data, tmp_path, "--max_steps", 2, workers=2)
    train.main(argv)  # faces' image paths are read over http too, beside the Parquet file
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sum(r["train_overall_samples"] for r in rows if r["event"] == "train") == 16
    assert os.path.isdir(out / "checkpoint-2")
    capsys.readouterr()
    for run in (lambda: evaluate.main([str(out / "checkpoint-2"), "--val_data", *data["train"],
                                       "--num_workers", "0"]),
                lambda: train.main(run_args(tiny_vit, tmp_path / "val", data, tmp_path,
                                            "--val_data", *data["train"], workers=4))):
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err
        assert e.value.code == 2 and "download its files first" in err, err
        assert "add --streaming" not in err
