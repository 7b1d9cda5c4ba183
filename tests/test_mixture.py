"""Weighted dataset mixing: target shares, reshuffling, world-size invariance, today's order."""
import math

import numpy as np
import pytest

from data.sampling import mixture_shares, summarize_mixture
from dataset import DataError, load_registry, mixture_indices, read_records, train_indices


def registry_of(**weights):
    return load_registry({name: {"num_classes": 2, **({"sampling_weight": w} if w else {})}
                          for name, w in weights.items()})


def test_temperature_and_weights_give_the_shares():
    counts = [100, 900]
    assert mixture_shares(registry_of(a=None, b=None), counts, 2.0) == pytest.approx([0.25, 0.75])
    assert mixture_shares(registry_of(a=None, b=None), counts, 1e9) == pytest.approx([0.5, 0.5])
    assert mixture_shares(registry_of(a=3, b=1), counts) == pytest.approx([0.75, 0.25])


def test_natural_mixture_is_exactly_todays_order():
    reg = registry_of(a=None, b=None)
    for temperature in (None, 1.0):
        assert mixture_shares(reg, [10, 30], temperature) is None
    ids = [0] * 10 + [1] * 30
    for epoch, rank, world in [(0, 0, 1), (3, 1, 3), (1, 0, 2)]:
        assert mixture_indices(ids, None, epoch, 7, shuffle=True, rank=rank,
                               world_size=world) == train_indices(40, epoch, 7, True, rank, world)
    assert mixture_indices(ids, None, 0, 7, shuffle=False) == list(range(40))


def test_shares_hold_per_epoch_and_within_sampling_noise_over_a_window(small_data):
    reg = load_registry(small_data["registry"])
    records = read_records([small_data["digits_train"], small_data["faces_train"]], reg)
    counts = np.bincount(records.dataset_ids).tolist()  # 40 digits, 16 faces
    shares = [0.3, 0.7]
    for epoch in range(3):
        order = mixture_indices(records.dataset_ids, shares, epoch, 0)
        assert len(order) == len(records)  # an epoch is the mixture's size
        got = np.bincount(records.dataset_ids[order], minlength=2)
        assert got.tolist() == [round(0.3 * 56), 56 - round(0.3 * 56)]
    big = np.array([0] * 3000 + [1] * 500 + [2] * 1500)
    order = mixture_indices(big, [0.2, 0.5, 0.3], 0, 1)
    window = big[order[:800]]  # the first 800 samples of the epoch, e.g. one logging window
    for d, share in enumerate([0.2, 0.5, 0.3]):
        sigma = math.sqrt(share * (1 - share) / 800)
        assert abs((window == d).mean() - share) < 4 * sigma
    assert summarize_mixture(counts, reg, shares).count("natural") == 2
    assert "target 70.0%" in summarize_mixture(counts, reg, shares)


def test_a_dataset_that_runs_out_reshuffles_and_the_next_epoch_continues():
    ids = np.array([0] * 5 + [1] * 45)
    stream = []
    for epoch in range(3):  # 25 of dataset 0 per epoch: 5 passes over its 5 samples
        order = np.array(mixture_indices(ids, [0.5, 0.5], epoch, 3))
        stream += order[ids[order] == 0].tolist()
    blocks = [stream[i:i + 5] for i in range(0, len(stream), 5)]
    assert all(sorted(b) == [0, 1, 2, 3, 4] for b in blocks)
    assert len({tuple(b) for b in blocks}) > 5  # reshuffled, not the same order repeated
    # undersampled: 45 samples of dataset 1, 25 per epoch: two epochs see all of them
    seen = set()
    for epoch in range(2):
        order = np.array(mixture_indices(ids, [0.5, 0.5], epoch, 3))
        seen |= set(order[ids[order] == 1].tolist())
    assert seen == set(range(5, 50))


def test_global_order_is_the_same_for_any_world_size():
    ids = np.array([0] * 7 + [1] * 20 + [2] * 3)
    full = mixture_indices(ids, [0.2, 0.3, 0.5], 2, 5)
    for world in (2, 3, 4):
        parts = [mixture_indices(ids, [0.2, 0.3, 0.5], 2, 5, rank=r, world_size=world)
                 for r in range(world)]
        interleaved = [parts[r][i] for i in range(len(parts[0])) for r in range(world)]
        assert interleaved == full[:len(interleaved)]
    assert mixture_indices(ids, [0.2, 0.3, 0.5], 2, 5) == full  # resume: the same order


def test_a_share_that_rounds_to_no_sample_is_refused_not_never_drawn():
    from data.sampling import stream_shares
    from data.stream import StreamSource
    # weights given as sizes: 2,000 of 5,002,000 rounds to no slot of a block of 1,000, so the
    # same quota, drawn for every block, would never draw it
    reg = registry_of(big=5_000_000, small=2_000)
    sources = [StreamSource(n, i, "hf", []) for i, n in enumerate(reg)]
    with pytest.raises(DataError, match=r"dataset 'small' a share of 0.0004, no sample of a "
                       r"block of 1,000 .*it would never be drawn; raise its sampling_weight"):
        stream_shares(sources, reg)
    assert stream_shares(sources, registry_of(big=5_000_000, small=600_000))[1] > 0.1
    # an epoch of 2,050 samples: 0.0002 of it is under one sample, every epoch
    with pytest.raises(DataError, match=r"dataset 'b' a share of 0.0002, no sample of an "
                       r"epoch of 2,050 samples"):
        mixture_shares(registry_of(a=1, b=0.0002), [2000, 50])
    with pytest.raises(DataError, match=r"dataset 'b' .*raise --mix_temperature \(now 0.1\)"):
        mixture_shares(registry_of(a=None, b=None), [20000, 50], 0.1)
    assert mixture_shares(registry_of(a=1, b=0.001), [2000, 50])[1] > 0


def test_bad_values_are_refused():
    with pytest.raises(DataError, match="not for b"):
        mixture_shares(registry_of(a=2, b=None), [5, 5])
    with pytest.raises(DataError, match="keep one"):
        mixture_shares(registry_of(a=2, b=1), [5, 5], 2.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(DataError, match="--mix_temperature must be"):
            mixture_shares(registry_of(a=None, b=None), [5, 5], bad)
    with pytest.raises(DataError, match="no training samples"):
        mixture_shares(registry_of(a=2, b=1), [5, 0])
    with pytest.raises(DataError, match="--no_shuffle"):
        mixture_indices([0, 1], [0.5, 0.5], 0, 0, shuffle=False)
    with pytest.raises(DataError, match="sampling_weight"):
        load_registry({"a": {"num_classes": 2, "sampling_weight": 0}})
