"""DataLoader workers: one loader re-aimed each epoch keeps its worker processes and gives the
batches fresh loaders give; loaders leave the global RNG alone; the choice is printed."""
import argparse

import pytest
import torch

from augment import augment_config
from conftest import read_jsonl
from config import loader_workers
from dataset import DatasetSpec, make_loader
from sources import RecordTable
from backbone import load_backbone


@pytest.fixture(scope="module")
def records(demo_dir):
    rows = read_jsonl(demo_dir / "faces" / "train.jsonl")[:12]
    paths = [str(demo_dir / "faces" / r["image_path"]) for r in rows]
    return RecordTable(paths, [r["label"] for r in rows], [0] * len(rows), ["faces"],
                       [0] * len(rows), list(range(1, len(rows) + 1)))


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_a_persistent_loader_keeps_its_worker_and_gives_each_epochs_batches(records):
    _, inputs = load_backbone("preset:vit-tiny")
    augment = augment_config("crop_flip", {"faces": DatasetSpec("faces", 2)}, inputs)
    options = dict(inputs=inputs, dataset_names=["faces"], batch_size=5, num_workers=1,
                   fast_path=True, augment=augment)
    orders = {0: [3, 1, 4, 0, 5, 9, 2, 6], 1: [7, 2, 11, 8, 3, 10]}  # the second: a resumed epoch
    kept = make_loader(records, orders[0], epoch=0, persistent_workers=True, **options)
    seen, workers = {}, set()
    for epoch, order in orders.items():
        kept.sampler.set(order, epoch)
        seen[epoch] = batches(kept)
        workers.add(kept._iterator._workers[0].pid)
    assert len(workers) == 1  # the same process served both epochs
    for epoch, order in orders.items():
        fresh = batches(make_loader(records, order, epoch=epoch, **options))
        assert len(fresh) == len(seen[epoch])
        for a, b in zip(fresh, seen[epoch]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # epochs draw different crops of the same image
    assert not torch.equal(seen[0][0]["pixel_values"][1], seen[1][0]["pixel_values"][4])


def test_building_and_iterating_loaders_leaves_the_global_rng_alone(records):
    _, inputs = load_backbone("preset:vit-tiny")
    before = torch.get_rng_state()
    for _ in range(2):
        batches(make_loader(records, range(6), inputs, ["faces"], batch_size=4, num_workers=0,
                            fast_path=True))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_worker_choice_is_printed_and_a_prefetch_without_workers_refused():
    said = []
    args = argparse.Namespace(num_workers=2, prefetch_factor=None)
    loader_workers(args, said.append, "epochs")
    assert (args.num_workers, args.prefetch_factor) == (2, 4)
    assert said == ["data loading: 2 worker process(es) per rank, 4 batches prefetched per "
                    "worker, workers kept across epochs"]
    with pytest.raises(ValueError, match="--prefetch_factor 8: needs"):
        loader_workers(argparse.Namespace(num_workers=0, prefetch_factor=8), said.append, "epochs")
