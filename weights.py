"""Reading safetensors files into a model that is already built, in place.

A key map names, for each entry of the model's state dict, the file and the key in that file
that holds it (folder_map: a Hugging Face folder's weights, renamed the way transformers renames
them on loading; file_map: a plain file of this codebase, such as head.safetensors). Reading a
map fills every mapped entry where it lives: a full tensor reads the whole entry, an FSDP2 shard
(a DTensor) reads only its own rows, so a rank never holds more of the weights than its shards.
Entries on the meta device (parameters_on_meta) are given memory on the model's device first.

eval.py reads every checkpoint of a run into one model this way; under --dist fsdp train.py and
eval.py build the backbone with its parameters on the meta device, shard it, then read.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class WeightsMismatch(ValueError):
    """A folder's weights do not map one to one onto the model's entries."""


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) and their buffers
    as usual: non-persistent buffers (rotary inv_freq, position ids) are computed by the modules'
    own code, so they need no re-initialisation after the parameters are read. The global RNG
    is left as it was: random initialisations drawn here are thrown away."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with torch.random.fork_rng():
            yield
    finally:
        nn.Module.register_parameter = register


def folder_files(folder):
    """{key: file} of a Hugging Face folder's weights (one model.safetensors, or an index)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} nor {INDEX_FILE}")
    return {k: path for k in file_keys(path)}


# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path):
    """(offset of the data, {key: {"dtype", "shape", "data_offsets"}}) of a safetensors file: an
    8-byte little-endian length, then that many bytes of JSON."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return 8 + size, header
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as safetensors ({type(e).__name__}: {e})"
                         ) from None


def file_keys(path):
    return list(read_header(path)[1])


def folder_map(module, folder, prefix=""):
    """{prefix + state-dict key of `module` (a transformers model): (file, key in the file)} for
    the weights of `folder`, with transformers' own renaming of checkpoint keys (older layouts,
    the base-model prefix of an *For...* checkpoint). Raises WeightsMismatch where a key needs
    more than a renaming (fused or split tensors) or an entry has no key in the folder."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    transforms = get_model_conversion_mapping(module)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    entries = module.state_dict(keep_vars=True)
    found = {}
    for key, path in folder_files(folder).items():
        name, converted = rename_source_key(key, renamings, converters, module.base_model_prefix,
                                            entries)
        if converted is not None:
            raise WeightsMismatch(f"{folder}: {key} is converted on loading, not only renamed")
        if name in entries:
            found[name] = (path, key)
    missing = [k for k in tied_complete(entries, found) if k not in found]
    if missing:
        raise WeightsMismatch(f"{folder}: no weights for {len(missing)} entr(ies) of "
                              f"{type(module).__name__}, e.g. {missing[:3]}")
    return {prefix + k: v for k, v in found.items()}


def tied_complete(entries, found):
    """The entries still to find: one of several names of one tied tensor is enough (the
    others point at the same tensor)."""
    names = {}
    for key, tensor in entries.items():
        names.setdefault(id(tensor), []).append(key)
    return [key for group in names.values() if not any(k in found for k in group)
            for key in group[:1]]


def file_map(path, keys, prefix=""):
    """{prefix + key: (path, key)} of a plain safetensors file that holds exactly `keys`."""
    present = set(file_keys(path))
    missing = sorted(set(keys) - present)
    if missing:
        raise WeightsMismatch(f"{path}: missing {missing[:3]}")
    return {prefix + k: (path, k) for k in keys}


def read_weights(model, key_map, device):
    """Fill every entry of `model` named in key_map from its file, in place; a DTensor reads its
    local rows only. Meta entries get memory on `device` first; one that key_map does not name
    is an error (nothing could give it values)."""
    entries = model.state_dict(keep_vars=True)
    unfilled = [k for k, t in entries.items() if t.is_meta and k not in key_map
                and not any(n in key_map for n in same_tensor(entries, t))]
    if unfilled:
        raise WeightsMismatch(f"no weights to read for {unfilled[:3]}")
    for module in model.modules():
        if any(t.is_meta for t in [*module.parameters(recurse=False),
                                   *module.buffers(recurse=False)]):
            module.to_empty(device=device, recurse=False)
    entries = model.state_dict(keep_vars=True)
    by_file = {}
    for key, (path, file_key) in key_map.items():
        by_file.setdefault(path, []).append((key, file_key))
    with torch.no_grad():
        for path, pairs in by_file.items():
            start, header = read_header(path)
            with open(path, "rb", buffering=0) as f:
                for key, file_key in pairs:
                    read_entry(entries[key], f, start, header[file_key], f"{path}:{file_key}")


def same_tensor(entries, tensor):
    return [k for k, t in entries.items() if t is tensor]


def read_entry(target, f, start, stored, where):
    """Read the part of a stored tensor (its header entry) that `target` holds into it: the whole
    tensor, or the rows of a DTensor shard. Plain reads into the tensor's memory, not a memory
    map: the file's pages never count as this process's memory."""
    from torch.distributed.tensor import DTensor
    shape, dtype = tuple(stored["shape"]), DTYPES.get(stored["dtype"])
    if shape != tuple(target.shape):
        raise WeightsMismatch(f"{where}: shape {shape}, the model's is {tuple(target.shape)}")
    if dtype is None:
        raise WeightsMismatch(f"{where}: dtype {stored['dtype']} is not supported")
    rows, local = (0, shape[0] if shape else 1), target
    if isinstance(target, DTensor):
        # FSDP2 shards dim 0: this rank holds rows [offset, offset + local rows)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local_shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements)
        if tuple(local_shape[1:]) != shape[1:]:
            raise WeightsMismatch(f"{where}: only shards of dim 0 can be read")
        rows, local = (offset[0], offset[0] + local_shape[0]), target.to_local()
    if not local.numel():
        return
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    f.seek(start + stored["data_offsets"][0] + rows[0] * row_bytes)
    direct = local.device.type == "cpu" and local.dtype == dtype and local.is_contiguous()
    buffer = local if direct else torch.empty(local.shape, dtype=dtype)
    view = buffer.view(-1).view(torch.uint8).numpy()
    if f.readinto(view) != view.nbytes:
        raise ValueError(f"{where}: the file ends early (truncated?)")
    if not direct:
        local.copy_(buffer)
