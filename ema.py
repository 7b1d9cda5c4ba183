"""Exponential moving average of the model's weights (--ema_decay, --ema_every).

After every `every`-th optimizer step, for each parameter w that trains and each floating-point
buffer the model saves (BatchNorm's running mean and variance):

    ema = decay * ema + (1 - decay) * w

computed in float32 whatever the parameters' dtype. A frozen parameter (a frozen backbone, LoRA's
base weights) is its own average: it has no shadow, which would be a float32 copy of it in every
process for nothing. The statistics are averaged with the weights, as timm's ModelEmaV2/V3 do:
the current statistics belong to the current weights, and using them with the averaged weights
cost a ResNet 7 points (demo digits, 3 seeds: 87.7% against 94.9%).
The shadow is a dict {name: tensor} holding one float32 tensor per parameter or buffer *as the
model holds it*: under FSDP2 the parameters are DTensor shards and so is the shadow (same mesh
and placements), so each process keeps and updates only its own shard.

The shadow is a flat dict of tensors, so torch.distributed.checkpoint saves and loads it as it
does the model (save_ema_state / load_ema_state: the same safetensors layout as the trainer's
sharded state, readable on any world size). `swapped_in(model, shadow)` puts the EMA weights
into the model for evaluation or for writing `checkpoint-N/ema/`, and restores the trained
weights bit for bit on exit.

In train.py: metrics of the EMA weights are named `eval_ema_*` (`--best_metric ema_*` picks the
best checkpoint by them); a checkpoint holds the shadow in ema_state/ (what resuming reads) and
the EMA model under ema/ in the model's own files (what eval.py reads).
"""
import os
from contextlib import contextmanager

import torch

from state_files import load_state_files, save_state_files

EMA_DIR = "ema_state"
MODEL_DIR = "ema"  # checkpoint-N/ema: the EMA model, loadable as a checkpoint of its task
METRIC_PREFIX = "ema_"  # eval_ema_overall_accuracy, --best_metric ema_overall_accuracy


def check_ema_args(decay, every):
    """Refuse --ema_decay outside [0, 1) and --ema_every below 1."""
    if not 0 <= decay < 1:
        raise ValueError(f"--ema_decay must be in [0, 1) (0 = off), got {decay}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"--ema_every must be a whole number of steps >= 1, got {every!r}")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _averaged(model):
    """{name: tensor} of what the EMA averages, as this process holds them: the parameters that
    train and the floating-point buffers that are saved (not constants such as rotary
    frequencies, nor statistics of the data that a module names in NOT_AVERAGED: averaged from
    their starting values they would lean toward those, and they describe no weights).
    Under FSDP2 every unit is resharded first: the root keeps its weights gathered after a
    forward without backward (an evaluation), and a later forward would reuse that stale
    gathered copy instead of the shards written here."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    averaged = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if (buffer.is_floating_point() and name not in module._non_persistent_buffers_set
                    and name not in getattr(module, "NOT_AVERAGED", ())):
                averaged[f"{prefix}.{name}" if prefix else name] = buffer
    return averaged


def make_ema(model):
    """The shadow: a float32 copy of every averaged tensor, sharded as it is (call after the model
    is sharded or moved to its device, so the shadow lives where the weights do)."""
    return {name: p.detach().to(torch.float32, copy=True)
            for name, p in _averaged(model).items()}


@torch.no_grad()
def update_ema(shadow, model, decay, taken=True):
    """ema = decay * ema + (1 - decay) * w for every averaged tensor, on each process's own
    shards. taken: a 0-dim bool tensor on the device where the optimizer decided there whether
    it stepped (fp16's scaler, a fused AdamW); where false the shadow stays as it was, and no
    host sync is needed to know."""
    params = _averaged(model)
    if params.keys() != shadow.keys():
        raise ValueError("the EMA shadow does not fit the model's parameters")
    emas = [_local(shadow[n]) for n in params]
    weights = [_local(p.detach()).float() for p in params.values()]
    if taken is True:
        torch._foreach_mul_(emas, decay)
        torch._foreach_add_(emas, weights, alpha=1 - decay)
        return
    kept = torch.where(taken, decay, 1.0).to(emas[0].device)  # 1: the step was skipped
    torch._foreach_mul_(emas, kept)
    torch._foreach_add_(emas, torch._foreach_mul(weights, 1 - kept))


def plain_metric(name):
    """The metric a --best_metric names, without the ema_ prefix that picks the EMA weights."""
    return name.removeprefix(METRIC_PREFIX)


def check_best_metric(name, valid):
    """--best_metric `name` is one of `valid` (what the task's evaluation reports), or ema_ + one
    of them (that metric of the EMA weights)."""
    if plain_metric(name) not in valid:
        raise ValueError(f"--best_metric {name!r} is not one of {', '.join(valid)} "
                         "(or ema_ + one of them, with --ema_decay)")


def ema_due(step, every):
    """Whether the EMA is updated after optimizer step `step` (1-based count of steps done)."""
    return step % every == 0


@contextmanager
def swapped_in(model, shadow):
    """Within the block the model holds the EMA weights (cast to its dtype); on exit its own
    weights come back exactly. Costs one copy of the (local) weights."""
    kept = {n: _local(p.detach()).clone() for n, p in _averaged(model).items()}
    copy_into(model, shadow)
    try:
        yield model
    finally:
        copy_into(model, kept)


@torch.no_grad()
def copy_into(model, weights):
    """Put `weights` ({parameter name: tensor, as the model holds it}) into the model's
    parameters, cast to their dtype; for good at the end of training, when the EMA won."""
    for n, p in _averaged(model).items():
        _local(p.detach()).copy_(_local(weights[n]))


def save_ema_state(folder, shadow):
    """Every process writes its shards of the shadow to folder/ema_state (safetensors, DCP)."""
    save_state_files(os.path.join(folder, EMA_DIR), {"ema": shadow})


def load_ema_state(folder, shadow, may_lack=()):
    """Read folder/ema_state into `shadow` in place, on any world size and sharding. Entries named
    in `may_lack` that it lacks (parameters frozen when it was written) keep their value: the
    weights they had, their average while frozen. Returns those names."""
    path = os.path.join(folder, EMA_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: this checkpoint was written without "
                                "--ema_decay, so its EMA cannot be resumed")
    # a copy of the dict (the same tensors, read in place): the entries it lacks leave the copy
    return load_state_files(path, {"ema": dict(shadow)}, {"ema": "this model's EMA"}, "the EMA",
                            may_lack)
