"""Reading safetensors files into a model that is already built, in place, and writing a
model's weights to one, a tensor at a time.

A key map names, for each entry of the model's state dict, the file and the key in that file
that holds it (folder_map: a Hugging Face folder's weights, renamed the way transformers renames
them on loading; file_map: a plain file of this codebase, such as head.safetensors). Reading a
map fills every mapped entry: a full tensor takes the whole entry, an FSDP2 shard (a DTensor) only
its own rows, so a rank never holds more of the weights than its shards; on the CPU those rows are
the file's pages, memory-mapped, as from_pretrained keeps a model's weights. Entries on the meta
device (parameters_on_meta) are given memory on the model's device first.

eval.py reads every checkpoint of a run into one model this way; under --dist fsdp train.py and
eval.py build the backbone with its parameters on the meta device, shard it, then read.

Writing (write_safetensors, write_pretrained) is the mirror image: the header first, from the
shapes and dtypes, then each tensor in turn, an FSDP2 shard gathered whole only for its turn, so
no process ever holds more than one whole tensor beside its shards.
"""
import contextlib
import json
import math
import os
from typing import Callable, NamedTuple

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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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


def key_renaming():
    """transformers' renaming of checkpoint keys (loading: older layouts and *For...* prefixes ->
    the model's names; saving: back to the layout save_pretrained writes) is done by helpers
    outside its public API. This is the one place they are imported, once, when this module is
    (the start of train.py and eval.py). Returns (helpers, None), or (None, what is missing): then
    folder_map refuses (the caller reads whole files, with a note) and saved_names keeps the
    model's own names, which from_pretrained reads too."""
    import transformers
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, rename_source_key,
                                                     revert_weight_conversion)
    except ImportError as e:
        return None, (f"transformers {transformers.__version__} lacks the key-renaming helpers "
                      f"this reader uses ({e})")
    return (get_model_conversion_mapping, WeightConverter, rename_source_key,
            revert_weight_conversion), None


RENAMING, RENAMING_MISSING = key_renaming()


def folder_map(module, folder, prefix=""):
    """{prefix + state-dict key of `module` (a transformers model): (file, key in the file)} for
    the weights of `folder`, with transformers' own renaming of checkpoint keys (older layouts,
    the base-model prefix of an *For...* checkpoint). Raises WeightsMismatch where a key needs
    more than a renaming (fused or split tensors), an entry has no key in the folder, or this
    transformers lacks the renaming helpers."""
    if RENAMING is None:
        raise WeightsMismatch(RENAMING_MISSING)
    get_model_conversion_mapping, WeightConverter, rename_source_key, _ = RENAMING
    # the renaming load_backbone gave from_pretrained (a two-tower folder's vision tower prefix)
    transforms = get_model_conversion_mapping(module, getattr(module, "folder_key_mapping", None))
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


def saved_names(module, names):
    """{name in the model: name in the file} as save_pretrained writes `module`'s weights: renamed
    back to the layout transformers converts from on loading (ViT: layers.0.attention.q_proj ->
    encoder.layer.0.attention.attention.query). Where that layout fuses or splits tensors, or the
    renaming helpers are missing, the model's own names (from_pretrained reads both)."""
    if RENAMING is None:
        return {name: name for name in names}
    get_model_conversion_mapping, WeightConverter, _, revert_weight_conversion = RENAMING
    if any(isinstance(t, WeightConverter) for t in get_model_conversion_mapping(module)):
        return {name: name for name in names}
    # one call over all names (a tensor each, to match them up): the mapping is built once
    tensors = {name: torch.empty(0, device="meta") for name in names}
    model_name = {id(t): name for name, t in tensors.items()}
    return {model_name[id(t)]: saved for saved, t in
            revert_weight_conversion(module, tensors).items()}


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
    """Fill every entry of `model` named in key_map from its file; a DTensor gets its local rows
    only. Meta entries get memory on `device` first; one that key_map does not name is an error
    (nothing could give it values).

    Rows held on the CPU in the file's own dtype are not copied: they become the file's pages,
    memory-mapped copy-on-write (as from_pretrained keeps a model's weights), so they are no
    process's private memory and every process mapping the file shares them; a tensor written
    later (an optimizer step) gets private pages then, and the file is never written. The
    parameters keep their identity (tied weights, FSDP2's bookkeeping). Other entries (a GPU,
    another dtype) are read into their own memory."""
    entries = model.state_dict(keep_vars=True)
    unfilled = [k for k, t in entries.items() if t.is_meta and k not in key_map
                and not any(n in key_map for n in same_tensor(entries, t))]
    if unfilled:
        raise WeightsMismatch(f"no weights to read for {unfilled[:3]}")
    for module in model.modules():
        if any(t.is_meta for t in [*module.parameters(recurse=False),
                                   *module.buffers(recurse=False)]):
            # to_empty leaves every tensor of the module unset: the buffers its code computed
            # (CLIP's position ids beside its class embedding) keep their values
            computed = {n: b for n, b in module.named_buffers(recurse=False) if not b.is_meta}
            module.to_empty(device=device, recurse=False)
            for name, buffer in computed.items():
                module._buffers[name] = buffer.to(device)
    entries = model.state_dict(keep_vars=True)
    by_file = {}
    for key, (path, file_key) in key_map.items():
        by_file.setdefault(path, []).append((key, file_key))
    mapped = {}
    with torch.no_grad():
        for path, pairs in by_file.items():
            start, header = read_header(path)
            size, pages = os.path.getsize(path), None
            with open(path, "rb", buffering=0) as f:
                for key, file_key in pairs:
                    where = f"{path}:{file_key}"
                    local, dtype, first, end = stored_rows(entries[key], header[file_key], where)
                    first, end = start + first, start + end
                    if end > size:
                        raise ValueError(f"{where}: the file ends early (truncated?)")
                    if first == end:
                        continue
                    if local.device.type == "cpu" and local.dtype == dtype and \
                            local.is_contiguous():
                        if pages is None:
                            pages = torch.from_file(path, shared=False, size=size,
                                                    dtype=torch.uint8)
                        mapped[key] = with_local(entries[key],
                                                 pages[first:end].view(dtype).view(local.shape))
                    else:
                        buffer = torch.empty(local.shape, dtype=dtype)
                        f.seek(first)
                        f.readinto(buffer.view(-1).view(torch.uint8).numpy())
                        local.copy_(buffer)
        if mapped:
            swap = torch.__future__.get_swap_module_params_on_conversion()
            torch.__future__.set_swap_module_params_on_conversion(True)  # keep the objects
            try:
                result = model.load_state_dict(mapped, strict=False, assign=True)
            finally:
                torch.__future__.set_swap_module_params_on_conversion(swap)
            if result.unexpected_keys:
                raise WeightsMismatch(f"{type(model).__name__} did not take "
                                      f"{result.unexpected_keys[:3]} by their names")


def same_tensor(entries, tensor):
    return [k for k, t in entries.items() if t is tensor]


def stored_rows(target, stored, where):
    """(the tensor `target` holds its part in, the stored dtype, first byte, end byte of that
    part from the start of the file's data) of a stored tensor (its header entry): the whole
    tensor, or the rows of a DTensor shard."""
    from torch.distributed.tensor import DTensor
    shape, dtype = tuple(stored["shape"]), DTYPES.get(stored["dtype"])
    if shape != tuple(target.shape):
        raise WeightsMismatch(f"{where}: shape {shape}, the model's is {tuple(target.shape)}")
    if dtype is None:
        raise WeightsMismatch(f"{where}: dtype {stored['dtype']} is not supported")
    rows, local = (0, shape[0] if shape else 1), target.detach()
    if isinstance(target, DTensor):
        # FSDP2 shards dim 0: this rank holds rows [offset, offset + local rows)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local_shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements)
        if tuple(local_shape[1:]) != shape[1:]:
            raise WeightsMismatch(f"{where}: only shards of dim 0 can be read")
        rows, local = (offset[0], offset[0] + local_shape[0]), target.to_local()
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    first = stored["data_offsets"][0] + rows[0] * row_bytes
    return local, dtype, first, first + local.numel() * dtype.itemsize


def with_local(target, local):
    """`local` as the tensor to put where `target` is: a DTensor of target's layout around it
    (FSDP2 then adopts it as the shard), or itself."""
    from torch.distributed.tensor import DTensor
    if not isinstance(target, DTensor):
        return local
    return DTensor.from_local(local, target.device_mesh, target.placements, shape=target.shape,
                              stride=target.stride())


class Derived(NamedTuple):
    """A tensor to write that is computed from others when its turn comes (a LoRA-merged
    weight): its shape and dtype for the header, and compute() -> the whole tensor, called on
    every process (it may gather shards)."""
    shape: tuple
    dtype: torch.dtype
    compute: Callable


def whole(tensor, keep=True):
    """The whole tensor in CPU memory: an FSDP2 shard (DTensor) gathered from every process (a
    collective), a Derived computed, a plain tensor as it is. keep False (a process that writes
    nothing): only the collective is taken part in; None is returned."""
    from torch.distributed.tensor import DTensor
    if isinstance(tensor, Derived):
        tensor = tensor.compute()  # it may gather shards: every process computes it
        return tensor.cpu() if keep else None
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        local, mesh = tensor.to_local(), tensor.device_mesh
        if local.device.type != mesh.device_type:  # --cpu_offload: the shard is in CPU memory
            tensor = DTensor.from_local(local.to(mesh.device_type), mesh, tensor.placements,
                                        shape=tensor.shape, stride=tensor.stride())
        tensor = tensor.full_tensor()
    return tensor.cpu() if keep else None


def write_safetensors(path, tensors, rank, metadata=None):
    """Write `tensors` ({name: tensor, DTensor shard or Derived}) as one safetensors file on
    rank 0; every process calls it with the same names. The header comes first, from the
    shapes and dtypes (wider dtypes first, so every tensor is aligned to its element size, as the
    safetensors library lays them out); then each tensor is made whole in turn (gathered: a
    collective), written from its own memory and freed."""
    from torch.distributed.tensor import DTensor
    names = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)  # stable
    header, offset = {}, 0
    for name in names:
        shape, dtype = tuple(tensors[name].shape), tensors[name].dtype
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") if rank == 0 else contextlib.nullcontext() as f:
        if f:
            f.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            if not f and not isinstance(tensors[name], (DTensor, Derived)):
                continue  # no collective: only the writing process needs the tensor
            tensor = whole(tensors[name], keep=bool(f))
            if tensor is None:
                continue
            if (tuple(tensor.shape), tensor.dtype) != (tuple(tensors[name].shape),
                                                       tensors[name].dtype):
                raise ValueError(f"{path}: {name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"not {tuple(tensors[name].shape)} {tensors[name].dtype}")
            if f:
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def model_weights(module):
    """{name: tensor} of what save_pretrained writes of `module`: its state dict as it holds it
    (FSDP2: the shards), one name per tied tensor (the first), without _keys_to_ignore_on_save."""
    ignored = set(getattr(module, "_keys_to_ignore_on_save", None) or ())
    found, seen = {}, set()
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen and key not in ignored:
            found[key] = tensor
        seen.add(id(tensor))
    return found


def write_pretrained(module, folder, weights, rank):
    """The folder module.save_pretrained(folder) writes (config, generation config, a remote-code
    model's files, the weights under saved_names in model.safetensors) with `weights` ({name:
    tensor} of the model, as model_weights gives them) written by write_safetensors: every
    process calls it."""
    if rank == 0:
        module.save_pretrained(folder, state_dict={})  # everything but the weights
    names = saved_names(module, weights)
    write_safetensors(os.path.join(folder, WEIGHTS_FILE),
                      {names[k]: v for k, v in weights.items()}, rank, {"format": "pt"})
