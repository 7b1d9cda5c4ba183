"""Sharded state in safetensors files through torch.distributed.checkpoint (DCP): every rank
writes the tensors it holds (DTensor shards too), and they are read back on any world size and
sharding. The trainer's state/ (checkpoint.py) and the EMA's ema_state/ (ema.py) are written
and read here; neither module imports the other for it.
"""
import math
import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from files import reason


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file."""


# DCP's safetensors writer builds each file in memory before writing it (twice the file's size):
# what a rank holds goes into up to STATE_FILES files, none smaller than MIN_FILE_BYTES, so that
# writing costs a small part of it, not two copies.
STATE_FILES = 16
MIN_FILE_BYTES = 64 << 20


def save_state_files(path, state):
    """torch.distributed.checkpoint (safetensors) of `state` (nested dicts of tensors, DTensor
    shards too): every rank writes what it holds, in files of bounded size (file_indices)."""
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore",
                                message=".*assuming the intent is to save in a single process")
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(
            path, fqn_to_index_mapping=file_indices(state), save_distributed=True))


def file_indices(state):
    """{DCP key (nested keys joined by dots): file number from 1}: consecutive tensors share a file
    up to 1/STATE_FILES of what a rank holds (at least MIN_FILE_BYTES), sized from the global
    shapes, so every rank computes the same numbers."""
    sizes = {key: held_bytes(value) for key, value in flat_items(state)}
    limit = max(MIN_FILE_BYTES, sum(sizes.values()) / STATE_FILES)
    indices, index, used = {}, 1, 0
    for key, size in sizes.items():
        if used and used + size > limit:
            index, used = index + 1, 0
        indices[key], used = index, used + size
    return indices


def flat_items(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def held_bytes(value):
    """Bytes of a tensor as one rank holds it (a DTensor: its share of the shards)."""
    from torch.distributed.tensor import DTensor
    if not torch.is_tensor(value):
        return 0
    size = value.numel() * value.element_size()
    if isinstance(value, DTensor):
        size //= math.prod(n for n, p in zip(value.device_mesh.shape, value.placements)
                           if p.is_shard())
    return size


def load_state_files(path, state, fitting, what, may_lack=(), opened=None, **options):
    """Read what save_state_files wrote at `path` into `state` ({part: {key: tensor}}) in place,
    on any world size and sharding. fitting: {part: its description} of the parts every tensor of
    which must be saved, in its shape (check_fits), but for keys in `may_lack`: those not saved
    are left out of `state` and returned. A truncated file is an error naming it. opened: what
    sharded_reader(path) gave, where the caller has read it already."""
    reader, saved = opened or sharded_reader(path)
    may_lack, lacking = set(may_lack), []
    for part, described in fitting.items():
        for key in [k for k in state[part] if k in may_lack and f"{part}.{k}" not in saved]:
            del state[part][key]
            lacking.append(key)
        check_fits(path, saved, state[part], part, described)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(state, storage_reader=reader, **options)
        # a truncated shard file, a shape that does not fit
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot load {what} ({reason(e)})") from None
    return lacking


def sharded_reader(path):
    """(DCP reader, saved tensors' metadata) of a folder of safetensors shards; a truncated or
    unreadable shard is an error naming the file, before torch reads any of it."""
    from weights import read_header
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            start, header = read_header(file)  # ValueError naming the file
            need = start + max([e["data_offsets"][1] for e in header.values()
                                if isinstance(e, dict) and "data_offsets" in e], default=0)
            if os.path.getsize(file) < need:
                raise CheckpointError(f"{file}: truncated ({os.path.getsize(file)} bytes, its "
                                      f"header needs {need})")
    reader = dcp.HuggingFaceStorageReader(path)
    try:
        return reader, reader.read_metadata().state_dict_metadata
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read the sharded state ({reason(e)})") from None


def check_fits(path, saved, state, prefix, what):
    """Refuse, in one line, a saved state that lacks a tensor of `state` or holds it in another
    shape (a changed --label_space, --num_labels, model, ...)."""
    missing = [k for k in state if f"{prefix}.{k}" not in saved]
    if missing:
        raise CheckpointError(f"{path} does not fit {what}: {len(missing)} tensor(s) are "
                              f"missing, e.g. {missing[:3]}")
    wrong = [f"{k} {list(saved[f'{prefix}.{k}'].size)} saved, {list(v.shape)} here"
             for k, v in state.items() if hasattr(v, "shape") and
             hasattr(saved[f"{prefix}.{k}"], "size") and
             list(saved[f"{prefix}.{k}"].size) != list(v.shape)]
    if wrong:
        raise CheckpointError(f"{path} does not fit {what}: {len(wrong)} tensor(s) have another "
                              f"shape, e.g. {'; '.join(wrong[:2])} (a changed --label_space, "
                              "--num_labels or model?)")
