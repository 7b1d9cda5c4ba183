"""Sampling: which samples each step sees. The seeded order of an epoch (train_indices), a
weighted mixture of the datasets (mixture_shares, mixture_indices), the stream's schedule of
datasets (stream_shares, block_schedule), both drawn from one largest-remainder quota, the fixed
subset of the partial evaluation, and the summaries a run prints of them."""
import random
import zlib

import numpy as np
import torch

from data.types import DataError

SCHEDULE_BLOCK = 1000  # slots per block of a stream worker's dataset schedule


def largest_remainder(shares, total):
    """round(share * total) slots per dataset, `total` in all: each dataset its floor, then one
    more to each of the largest remainders (ties: the first in registry order)."""
    quotas = np.asarray(shares, dtype=np.float64) * total
    taken = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - taken), kind="stable")
    taken[order[:total - taken.sum()]] += 1
    return taken


def partial_eval_indices(records, registry, seed):
    """A fixed, seeded subset of eval_ratio of each dataset's records (at least one sample each)."""
    chosen = []
    for dataset_id, spec in enumerate(registry.values()):
        members = np.flatnonzero(records.dataset_ids == dataset_id).tolist()
        if not members:
            continue
        keep = max(1, round(len(members) * spec.eval_ratio))
        # Seed per dataset name so that adding a dataset leaves the others' subsets unchanged.
        rng = random.Random(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
        chosen += rng.sample(members, keep)
    return sorted(chosen)


def train_indices(num_samples, epoch, seed, shuffle, rank=0, world_size=1):
    """This rank's sample order for one epoch.

    Global order is one seeded permutation per epoch; rank r takes positions r, r+W, ...
    so that global micro-batch j is the same set of samples for any world size.
    The last num_samples % world_size samples of the permutation are dropped so every
    rank runs the same number of steps.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = list(range(num_samples))
    usable = num_samples // world_size * world_size
    return order[rank:usable:world_size]


def mixture_shares(registry, counts, temperature=None):
    """Each dataset's target share of the training samples, or None for the natural mixture
    (in proportion to size: train_indices's order, unchanged).

    From the registry's `sampling_weight` (relative; all datasets with training samples must
    give one, or none) or from --mix_temperature T (share proportional to n^(1/T); T = 1 is by
    size, large T nearly uniform). `counts`: training samples per dataset, registry order.
    """
    weights = {name: spec.sampling_weight for name, spec in registry.items()}
    given = [n for n, w in weights.items() if w is not None]
    if temperature is not None and not 0 < temperature < float("inf"):
        raise DataError(f"--mix_temperature must be a positive number, got {temperature}")
    if given and temperature is not None:
        raise DataError(f"--mix_temperature {temperature} and the registry's sampling_weight "
                        f"(given for {', '.join(given)}) both set the mixture: keep one")
    if given:
        present = [n for n, c in zip(weights, counts) if c > 0]
        missing = [n for n in present if weights[n] is None]
        if missing:
            raise DataError(f"sampling_weight is given for {', '.join(given)} but not for "
                            f"{', '.join(missing)}: weights are relative, give every dataset one")
        empty = [n for n, c in zip(weights, counts) if c == 0 and weights[n] is not None]
        if empty:
            raise DataError(f"dataset(s) {', '.join(empty)} have a sampling_weight but no "
                            "training samples")
        raw = [weights[n] if c > 0 else 0.0 for n, c in zip(weights, counts)]
    elif temperature is None or temperature == 1:
        return None
    else:
        raw = [c ** (1 / temperature) if c > 0 else 0.0 for c in counts]
    total = sum(raw)
    shares = [w / total for w in raw]
    check_no_share_lost(shares, sum(counts), list(registry),
                        f"an epoch of {sum(counts):,} samples (the training set's size)",
                        "raise its sampling_weight (relative to the others')" if given else
                        f"raise --mix_temperature (now {temperature:g}) towards equal shares")
    return shares


def check_no_share_lost(shares, slots, names, what, remedy):
    """Refuse a dataset with a positive share whose largest-remainder quota of `slots` is none:
    the same quota is drawn for every epoch (or block), so it would never be trained."""
    taken = largest_remainder(shares, slots)
    lost = [(n, s) for n, s, t in zip(names, shares, taken.tolist()) if s > 0 and t == 0]
    if lost:
        raise DataError("the mixture gives " + ", ".join(
            f"dataset {n!r} a share of {s:.2g}" for n, s in lost) + f", no sample of {what}: "
            f"it would never be drawn; {remedy}")


def mixture_indices(dataset_ids, shares, epoch, seed, *, shuffle=True, rank=0, world_size=1):
    """This rank's sample order for one epoch of a weighted mixture (train_indices when
    `shares` is None).

    An epoch has as many samples as the training set (so --epochs counts passes over the
    mixture's size); dataset d fills round(N * share_d) of them (largest remainder), the same
    number every epoch, at seeded random positions. Its samples come from an endless stream of
    seeded permutations of its members: one that runs out reshuffles and continues, and epoch e
    takes up where epoch e - 1 left off, so an undersampled dataset still cycles through all of
    its samples. Global order depends on (seed, epoch) only; rank r takes positions r, r+W, ...
    """
    num_samples = len(dataset_ids)
    if shares is None:
        return train_indices(num_samples, epoch, seed, shuffle, rank, world_size)
    if not shuffle:
        raise DataError("--no_shuffle keeps the files' order: it cannot be combined with a "
                        "weighted mixture (sampling_weight or --mix_temperature)")
    dataset_ids = np.asarray(dataset_ids, dtype=np.int64)
    taken = largest_remainder(shares, num_samples)
    slots = np.repeat(np.arange(len(shares)), taken)
    rng = np.random.default_rng([seed, epoch, 0x6D6978])
    slots = slots[rng.permutation(num_samples)]
    order = np.empty(num_samples, dtype=np.int64)
    for d, count in enumerate(taken.tolist()):
        if count == 0:
            continue
        members = np.flatnonzero(dataset_ids == d)
        start = epoch * count  # where this epoch starts in the dataset's stream
        cycles = range(start // len(members), (start + count - 1) // len(members) + 1)
        stream = np.concatenate([members[np.random.default_rng([seed, d, k, 0x737472]).permutation(
            len(members))] for k in cycles])
        first = start - cycles[0] * len(members)
        order[slots == d] = stream[first:first + count]
    usable = num_samples // world_size * world_size
    return order[rank:usable:world_size].tolist()


def summarize_mixture(counts, registry, shares):
    """Load-time summary: each dataset's samples, natural share and target share per epoch."""
    n = max(1, sum(counts))
    lines = ["training mixture (share of each epoch's samples):"]
    for dataset_id, spec in enumerate(registry.values()):
        natural = counts[dataset_id] / n
        target = natural if shares is None else shares[dataset_id]
        passes = target * n / counts[dataset_id] if counts[dataset_id] else 0.0
        lines.append(f"  {spec.name}: {counts[dataset_id]:,} samples, natural {100 * natural:.1f}%"
                     f", target {100 * target:.1f}% ({passes:.2f} passes over it per epoch)")
    return "\n".join(lines)


def count_per_dataset(records, num_datasets, indices=None):
    """Samples per dataset in records (or in records[indices])."""
    ids = records.dataset_ids if indices is None else records.dataset_ids[np.asarray(
        indices, dtype=np.int64)]
    return np.bincount(ids, minlength=num_datasets).tolist()


def summarize(counts, registry, title, total=None):
    """Samples per dataset and share of the total; with `total` (counts before a subset), N -> M
    (ratio)."""
    n = max(1, sum(counts))
    lines = [f"{title}:"]
    for dataset_id, spec in enumerate(registry.values()):
        share = f"{counts[dataset_id]:,} samples ({100 * counts[dataset_id] / n:.1f}%)"
        if total is not None:
            subset = f"{total[dataset_id]:,} -> {counts[dataset_id]:,}"
            share = f"{subset} ({100 * spec.eval_ratio:.0f}%), " + share
        lines.append(f"  {spec.name}: {share}")
    lines.append(f"  total: {sum(counts):,} samples")
    return "\n".join(lines)


def check_training_samples(registry, counts, stream=False):
    """Every dataset of the registry has training samples (`counts`, registry order; under
    --streaming whether --train_data streams it), except those the registry marks eval_only,
    which have none: a dataset left out of the training data by mistake is not trained silently
    (its head rows would stay at their initialisation)."""
    for spec, count in zip(registry.values(), counts):
        if count and spec.eval_only:
            raise DataError(f"dataset {spec.name!r} is eval_only in the registry, but --train_data "
                            + ("streams it" if stream else f"holds {count:,} of its samples"))
        if not count and not spec.eval_only:
            raise DataError(f"dataset {spec.name!r} has no training samples (--train_data "
                            f"{'streams none' if stream else 'holds none'} of it): give it some, "
                            "or mark it `eval_only: true` in the registry (--datasets) if it is "
                            "for evaluation only")


def plan_epochs(registry, train, val, args, say, noun="data"):
    """(partial evaluation subset, mixture shares or None) of a run, with their summary printed:
    samples per dataset, the target shares beside the natural ones, the partial subset."""
    partial = partial_eval_indices(val, registry, args.seed) if val else []
    counts = count_per_dataset(train, len(registry))
    check_training_samples(registry, counts)
    shares = mixture_shares(registry, counts, args.mix_temperature)
    if shares is not None and args.no_shuffle:
        raise ValueError("--no_shuffle keeps the files' order; a weighted mixture "
                         "(sampling_weight, --mix_temperature) draws a seeded schedule")
    say(summarize(counts, registry, f"training {noun}"))
    if shares is not None:
        say(summarize_mixture(counts, registry, shares))
    if val:
        val_counts = count_per_dataset(val, len(registry))
        say(summarize(count_per_dataset(val, len(registry), partial), registry,
                      "partial evaluation subset", total=val_counts))
        unseen = [n for n, c, v in zip(registry, counts, val_counts) if c and not v]
        if unseen:
            say(f"note: dataset(s) {', '.join(unseen)} have training samples but none in "
                "--val_data: they are not evaluated, and the overall metrics leave them out")
    return partial, shares


def stream_shares(sources, registry):
    """Each dataset's share of the stream, from the registry's sampling_weight (a stream's size
    is not known before it is read, so the natural mixture cannot be drawn)."""
    names = list(registry)
    weights = [registry[s.name].sampling_weight for s in sources]
    if len(sources) > 1 and None in weights:
        missing = [s.name for s, w in zip(sources, weights) if w is None]
        raise DataError(f"--streaming: give every streamed dataset a sampling_weight in the "
                        f"registry (missing for {', '.join(missing)}): a stream's size is not "
                        "known before it is read")
    shares = [0.0] * len(names)
    total = sum(w or 1.0 for w in weights)
    for source, weight in zip(sources, weights):
        shares[source.dataset_id] = (weight or 1.0) / total
    check_no_share_lost(shares, SCHEDULE_BLOCK, names,
                        f"a block of {SCHEDULE_BLOCK:,} (the stream draws its datasets' "
                        "samples a block at a time)",
                        "raise its sampling_weight (relative to the others')")
    return shares


def block_schedule(shares, seed, part, block):
    """The datasets of one block of SCHEDULE_BLOCK slots: round(share * SCHEDULE_BLOCK) each,
    largest remainder, at positions drawn from (seed, part, block)."""
    slots = np.repeat(np.arange(len(shares)), largest_remainder(shares, SCHEDULE_BLOCK))
    return slots[np.random.default_rng([seed, part, block, 0x736368]).permutation(len(slots))]
