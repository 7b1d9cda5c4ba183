"""LoRA adapters through peft (optional extra: pip install -e '.[lora]').

The adapters are injected into the backbone in place (peft.inject_adapter_in_model): the
backbone keeps its class and forward, each targeted nn.Linear becomes a peft LoRA layer
(`x.base_layer` + `x.lora_A.default` / `x.lora_B.default`), and only the adapters, the head and
the --lora_train modules train. lora_B starts at zero, so the model starts as the base model.

Checkpoints hold the adapters (adapter_state) and a merged backbone (merged_weights:
W + (alpha / r) B A under the plain names), which eval.py and plain transformers load without
peft.
"""
import re

import torch.nn as nn

ADAPTER_FILE = "adapter.safetensors"  # a checkpoint's adapters, beside the merged model
LORA_KEY = re.compile(r"\.lora_(A|B)\.[^.]+\.weight$")


def require_peft():
    """The peft module, or an error naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise ImportError("--lora_rank needs peft: pip install -e '.[lora]' (or pip install "
                          "peft)") from None
    return peft


def check_lora_args(rank, alpha, dropout):
    """Refuse LoRA settings out of range (rank 0 = off)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"--lora_rank must be a whole number >= 0 (0 = off), got {rank!r}")
    if alpha is not None and not 0 < alpha < float("inf"):
        raise ValueError(f"--lora_alpha must be a positive number, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout}")


def check_lora_flags(args):
    """train.py's LoRA flags, before the data is read: in range, peft installed, and no freezing
    flag that LoRA would override (the --lora_* flags without --lora_rank are refused with the
    classifier's other flags, tasks/classify.py FLAG_NEEDS)."""
    check_lora_args(args.lora_rank, args.lora_alpha, args.lora_dropout or 0.0)
    if not args.lora_rank:
        return
    if args.freeze != "none" or args.train_only_head:
        raise ValueError("--freeze / --train_only_head cannot be combined with --lora_rank: LoRA "
                         "freezes the backbone itself (choose what adapts with --lora_targets and "
                         "what trains fully with --lora_train)")
    try:
        require_peft()
    except ImportError as e:
        raise ValueError(str(e)) from None


def scaling(rank, alpha=None):
    """What LoRA multiplies B A by: alpha / rank (alpha defaults to the rank)."""
    return (alpha or rank) / rank


def linear_names(module):
    """Full names of the module's nn.Linear layers."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def default_targets(backbone):
    """Full names of the linears LoRA adapts by default: the attention and MLP linears of a
    vision-language model's language model, or of a vision backbone's blocks."""
    from backbone import fsdp_units, is_vision_language, layer_blocks, vision_language_parts
    if is_vision_language(backbone.config):
        vision = vision_language_parts(backbone)[0]
        blocks = [b for b in fsdp_units(backbone) if b is not vision]
    else:
        blocks = [b for _, b in layer_blocks(backbone)]
    names = {id(m): n for n, m in backbone.named_modules()}
    targets = [f"{names[id(b)]}.{n}" for b in blocks for n in linear_names(b)]
    if not targets:
        raise ValueError(f"--lora_rank: {type(backbone).__name__} has no linear layers in its "
                         "blocks to adapt (a convolutional backbone?); give --lora_targets")
    return targets


def matching(names, target):
    """peft's rule: a target matches a module whose full name is it or ends with '.' + it."""
    return [n for n in names if n == target or n.endswith("." + target)]


def add_lora(model, rank, alpha=None, dropout=0.0, targets=None, train=()):
    """Inject LoRA into model.backbone in place; returns the adapted linear layers' names.

    targets: module names (full, or a last part such as q_proj, matched as peft does; default
    default_targets). train: backbone module names trained fully (e.g. visual.merger). The head
    trains; the rest of the backbone is frozen.
    """
    peft = require_peft()
    backbone = model.backbone
    linears = linear_names(backbone)
    if targets:
        unmatched = [t for t in targets if not matching(linears, t)]
        if unmatched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"--lora_targets {' '.join(unmatched)}: no linear layer of "
                             f"{type(backbone).__name__} is named so; its linear layers are "
                             f"named {', '.join(leaves)}")
        chosen = sorted({n for t in targets for n in matching(linears, t)})
    else:
        chosen = default_targets(backbone)
    modules = dict(backbone.named_modules())
    unknown = [m for m in train if m not in modules]
    if unknown:
        tops = sorted({n.split(".")[0] for n in modules if n})
        raise ValueError(f"--lora_train {' '.join(unknown)}: no such module in "
                         f"{type(backbone).__name__} (its top-level modules: {', '.join(tops)})")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout,
                             target_modules=chosen)
    peft.inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_(bool(LORA_KEY.search("." + name)))
    for m in train:
        modules[m].requires_grad_(True)
    model.head.requires_grad_(True)
    return chosen


def trainable_summary(model, adapted):
    """One line: adapted layers, trainable parameters and their share."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return (f"LoRA on {len(adapted)} linear layer(s): {trainable:,} of {total:,} parameters "
            f"trainable ({100 * trainable / total:.2f}%)")


def merged_weights(weights, scaling):
    """Weights with LoRA merged in and peft's names gone: x.base_layer.weight +
    scaling * x.lora_B.*.weight @ x.lora_A.*.weight becomes x.weight (computed in float32 when its
    turn to be written comes, a weights.Derived, stored in the base weight's dtype);
    x.base_layer.bias becomes x.bias. scaling = alpha / rank. Takes {name: tensor} with any
    prefix, whole or FSDP2 shards (weights.model_weights); weights.whole makes an entry whole."""
    from weights import Derived, whole
    merged, lora = {}, {}
    for key, value in weights.items():
        match = LORA_KEY.search(key)
        if match:
            lora.setdefault(key[:match.start()], {})[match.group(1)] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for prefix, ab in lora.items():
        base = merged[f"{prefix}.weight"]

        def merge(base=base, a=ab["A"], b=ab["B"]):
            delta = whole(b).float() @ whole(a).float()
            return (whole(base).float() + scaling * delta).to(base.dtype)
        merged[f"{prefix}.weight"] = Derived(tuple(base.shape), base.dtype, merge)
    return merged


def adapter_state(state_dict, train=()):
    """The adapters (and the --lora_train modules' weights, under their names) of a state dict."""
    prefixes = tuple(f"backbone.{m}." for m in train)
    return {k: v for k, v in state_dict.items() if LORA_KEY.search(k) or k.startswith(prefixes)}
