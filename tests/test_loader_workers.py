"""DataLoader workers: one loader re-aimed each epoch keeps its worker processes and gives the
batches fresh loaders give; loaders leave the global RNG alone; the choice is printed; a worker
writes each image once into a batch in shared memory; the main process leaves it its core."""
import argparse
import os

import pytest
import torch

from augment import augment_config, load_augmented, sample_rng
from conftest import read_jsonl
from config import loader_workers
from dataset import DatasetSpec, batch_tensor, compute_threads, make_loader
from preprocess import load_pixels
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


class SharedOrNot(torch.utils.data.Dataset):
    """Item: whether a batch tensor allocated where the item is made is in shared memory."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return batch_tensor((2, 3, 4, 4), torch.uint8).is_shared()


def test_a_worker_allocates_its_batches_in_shared_memory():
    assert [bool(x) for x in torch.utils.data.DataLoader(SharedOrNot(), num_workers=1)] == [True,
                                                                                           True]
    assert not any(torch.utils.data.DataLoader(SharedOrNot(), num_workers=0))


def test_worker_batches_are_contiguous_shared_and_equal_the_pixels_of_each_image(records):
    """Written once into a shared batch in the worker: the same values as the image loaded on its
    own, in the main process, with and without augmentation (seeded per sample)."""
    _, inputs = load_backbone("preset:vit-tiny")
    registry = {"faces": DatasetSpec("faces", 2)}
    for augment in (None, augment_config("crop_flip", registry, inputs),
                    augment_config("randaugment", registry, inputs)):
        order = [5, 0, 7, 3, 1, 9, 2]
        options = dict(inputs=inputs, dataset_names=["faces"], batch_size=4, fast_path=True,
                       augment=augment, epoch=3)
        worker = list(make_loader(records, order, num_workers=1, **options))
        main = batches(make_loader(records, order, num_workers=0, **options))
        for a, b in zip(worker, main, strict=True):
            pixels = a["pixel_values"]
            assert pixels.is_shared() and pixels.is_contiguous() and pixels.dtype == torch.uint8
            assert pixels.shape == (len(a["labels"]), 3, *inputs.recipe.output_size)
            assert not b["pixel_values"].is_shared()
            assert all(torch.equal(a[k], b[k]) for k in a)
        for i, index in enumerate(order):
            batch = main[i // 4]["pixel_values"]
            if augment is None:
                alone = load_pixels(records.open(index), inputs.recipe, use_draft=False)
            else:
                alone = load_augmented(records.open(index), inputs.recipe, augment, 0,
                                       sample_rng(augment.seed, 3, index))
            assert torch.equal(batch[i % 4], torch.from_numpy(alone))


def test_main_process_threads_on_a_cpu_leave_the_workers_their_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert compute_threads(3) == 5
        assert compute_threads(7) == compute_threads(12) == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert compute_threads(1) == 3
        torch.set_num_threads(2)
        assert compute_threads(1) == 2  # never more than torch's default
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(8)
        said = []
        args = argparse.Namespace(num_workers=3, prefetch_factor=None)
        loader_workers(args, said.append, "epochs", torch.device("cpu"))
        assert torch.get_num_threads() == 5 and "5 compute thread(s)" in said[0]
        torch.set_num_threads(8)  # a GPU computes little on the CPU: torch's default stays
        loader_workers(argparse.Namespace(num_workers=3, prefetch_factor=None), said.append,
                       "epochs", torch.device("meta"))
        assert torch.get_num_threads() == 8 and "compute thread" not in said[1]
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's choice stays
        loader_workers(argparse.Namespace(num_workers=3, prefetch_factor=None), said.append,
                       "epochs", torch.device("cpu"))
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(default)
