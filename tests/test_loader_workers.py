"""DataLoader workers: one loader re-aimed each epoch keeps its worker processes and gives the
batches fresh loaders give; loaders leave the global RNG alone; the choice is printed; a worker
writes each image once into a batch in shared memory and sends its small tensors by value; the
main process computes on every core beside its workers, OpenMP's idle threads asleep."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import cpu_threads
from augment import augment_config, load_augmented, sample_rng
from conftest import ROOT, read_jsonl
from config import loader_workers
from data.loaders import batch_tensor
from dataset import DatasetSpec, RecordTable, make_loader
from preprocess import load_pixels
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


def in_ring(loader, pixels):
    """Whether a batch's pixels lie in its loader's ring of shared batches (data.SharedBatches)."""
    ring = loader.collate_fn.shared.pixels
    return ring.data_ptr() <= pixels.data_ptr() < ring.data_ptr() + ring.numel()


def test_worker_batches_are_contiguous_shared_and_equal_the_pixels_of_each_image(records):
    """Written once into a slot of the loader's ring of shared batches in the worker: the same
    values as the image loaded on its own, in the main process, with and without augmentation
    (seeded per sample)."""
    _, inputs = load_backbone("preset:vit-tiny")
    registry = {"faces": DatasetSpec("faces", 2)}
    for augment in (None, augment_config("crop_flip", registry, inputs),
                    augment_config("randaugment", registry, inputs)):
        order = [5, 0, 7, 3, 1, 9, 2]
        options = dict(inputs=inputs, dataset_names=["faces"], batch_size=4, fast_path=True,
                       augment=augment, epoch=3)
        loader = make_loader(records, order, num_workers=1, **options)
        worker = list(loader)
        main = batches(make_loader(records, order, num_workers=0, **options))
        for a, b in zip(worker, main, strict=True):
            pixels = a["pixel_values"]
            assert in_ring(loader, pixels) and pixels.is_contiguous()
            assert pixels.dtype == torch.uint8
            assert pixels.shape == (len(a["labels"]), 3, *inputs.recipe.output_size)
            assert not b["pixel_values"].is_shared()
            assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
            # the small tensors came pickled with the batch, not as shared memory of their own
            assert not any(a[k].is_shared() for k in ("labels", "dataset_ids", "indices"))
        for i, index in enumerate(order):
            batch = main[i // 4]["pixel_values"]
            if augment is None:
                alone = load_pixels(records.open(index), inputs.recipe, use_draft=False)
            else:
                alone = load_augmented(records.open(index), inputs.recipe, augment, 0,
                                       sample_rng(augment.seed, 3, index))
            assert torch.equal(batch[i % 4], torch.from_numpy(alone))


def test_a_slot_of_the_ring_is_written_again_only_once_no_tensor_views_its_batch(records):
    """Batches held (more than the ring has slots) and views kept of batches dropped keep their
    pixels while the worker goes on: a worker with no free slot allocates a shared batch of its
    own. Batches taken one at a time all come through the ring, and each slot is free again once
    its batch is gone."""
    _, inputs = load_backbone("preset:vit-tiny")
    options = dict(inputs=inputs, dataset_names=["faces"], batch_size=1, fast_path=True)
    order = list(range(len(records)))  # 12 batches of one image
    main = [b["pixel_values"] for b in make_loader(records, order, num_workers=0, **options)]
    loader = make_loader(records, order, num_workers=1, prefetch_factor=1, **options)
    assert loader.collate_fn.shared.busy.shape == (1, 3)  # 3 slots for the worker
    held = [b["pixel_values"] for b in loader]
    assert sum(in_ring(loader, p) for p in held) == 3  # the other 9: shared batches of their own
    assert all(torch.equal(a, b) for a, b in zip(held, main, strict=True))
    assert all(p.is_shared() for p in held if not in_ring(loader, p))
    views = [b["pixel_values"][0, 1:] for b in loader]  # each batch itself dropped at once
    assert all(torch.equal(v, m[0, 1:]) for v, m in zip(views, main, strict=True))
    del held, views
    taken = [in_ring(loader, b["pixel_values"]) and torch.equal(b["pixel_values"], m)
             for b, m in zip(loader, main)]
    assert all(taken) and len(taken) == len(main)
    assert not loader.collate_fn.shared.busy.any()


def test_a_cpu_process_computes_on_every_core_beside_its_workers_and_says_so():
    said = []
    threads = torch.get_num_threads()
    for workers, device in ((1, "cpu"), (1, "meta"), (0, "cpu")):
        loader_workers(argparse.Namespace(num_workers=workers, prefetch_factor=None), said.append,
                       "epochs", torch.device(device))
        assert torch.get_num_threads() == threads  # torch's default stays, whatever the device
    assert said[0].endswith(f"; {threads} compute thread(s) in this process beside them "
                            f"(OMP_WAIT_POLICY {cpu_threads.wait_policy()})")
    assert not any("compute thread" in s for s in said[1:])  # a GPU, or no workers


# Records the OpenMP wait policy in the environment when torch is first imported, then runs the
# script's imports as its main module would (argv[1]).
IMPORT_ORDER = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("torch loads with OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
import importlib
module = importlib.import_module(sys.argv[1])
import cpu_threads
print("in force", cpu_threads.IN_FORCE, cpu_threads.wait_policy())
"""


@pytest.mark.parametrize("script", ["train", "eval"])
def test_openmp_threads_sleep_when_idle_unless_the_environment_says_otherwise(script):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = ROOT
    run = subprocess.run([sys.executable, "-c", IMPORT_ORDER, script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines() == ["torch loads with OMP_WAIT_POLICY PASSIVE",
                                       "in force True PASSIVE"], run.stderr
    run = subprocess.run([sys.executable, "-c", IMPORT_ORDER, script],
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.stdout.splitlines() == ["torch loads with OMP_WAIT_POLICY ACTIVE",
                                       "in force True ACTIVE from the environment"], run.stderr


def test_the_policy_set_after_torch_loaded_says_it_is_not_in_force():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", "import torch, cpu_threads; "
                          "print(cpu_threads.wait_policy())"], env={**env, "PYTHONPATH": ROOT},
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "PASSIVE, set after torch was loaded: not in force", run.stderr
