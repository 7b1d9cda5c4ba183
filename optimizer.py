"""AdamW over parameter groups and the learning-rate schedule.

Each group carries an `lr_scale`: the schedule gives the peak-relative learning rate of a step,
and every group runs at that rate times its scale. Groups split the parameters by part of the
model (--layer_decay for vision backbones; --vision_lr / --merger_lr for vision-language ones)
and by weight decay (none on biases and norm weights).
"""
import math

import torch

from backbone import layer_blocks, merger_of, vision_language_parts


def lr_at(step, args, total_steps):
    """The learning rate of optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    if args.lr_scheduler == "linear":
        return args.lr * max(0.0, 1 - progress)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def check_lr_args(args, token_inputs, model_name=""):
    """Refuse part learning rates that are out of range or cannot apply to this backbone."""
    decay = getattr(args, "layer_decay", None)
    vision_lr, merger_lr = getattr(args, "vision_lr", None), getattr(args, "merger_lr", None)
    if decay is not None and not 0 < decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1], got {decay}")
    for flag, value in (("--vision_lr", vision_lr), ("--merger_lr", merger_lr)):
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"{flag} must be a learning rate >= 0, got {value}")
        if value is not None and not token_inputs:
            raise ValueError(f"{flag} is for vision-language backbones; {model_name or 'this'} is "
                             "a vision backbone (use --layer_decay)")
    if decay is not None and token_inputs:
        raise ValueError(f"--layer_decay is for vision backbones; {model_name or 'this'} is a "
                         "vision-language model: give --vision_lr / --merger_lr beside --lr")
    frozen = ("--train_only_head" if getattr(args, "train_only_head", False) else
              "--freeze vision" if getattr(args, "freeze", "none") == "vision" else None)
    if decay not in (None, 1) and frozen:
        raise ValueError(f"--layer_decay {decay} scales the learning rates of the backbone's "
                         f"layers, which {frozen} keeps frozen: it would change nothing; drop it")


def parameter_parts(model, args):
    """[(part name, lr scale, [(parameter name, parameter)])], every trainable parameter of the
    MaskedClassifier `model` in exactly one part: by --layer_decay (vision backbones), by
    --vision_lr / --merger_lr (vision-language backbones), or all in one part. Only trainable
    parameters are grouped: with LoRA the adapters, each in the part of the layer it sits in."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone, decay = getattr(model, "backbone", model), getattr(args, "layer_decay", None)
    vision_lr, merger_lr = getattr(args, "vision_lr", None), getattr(args, "merger_lr", None)
    if decay is not None and decay != 1:
        return layer_decay_parts(backbone, named, decay)
    if vision_lr is not None or merger_lr is not None:
        return vision_language_lr_parts(backbone, named, args.lr, vision_lr, merger_lr)
    return [("all", 1.0, named)]


def layer_decay_parts(backbone, named, decay):
    """--layer_decay D: block i of n (1-based) runs at lr * D^(n + 1 - i); what comes before the
    first block (patch and position embeddings, cls / register / mask tokens) at lr * D^(n + 1);
    a parameter between two blocks (ConvNeXt's downsampling) with the block after it; the head
    and what follows the last block (final norm, pooler) at lr."""
    blocks = layer_blocks(backbone)
    if not blocks:
        raise ValueError(f"--layer_decay: {type(backbone).__name__} has no layer list to "
                         "take blocks from")
    depth = len(blocks) + 1
    owner = {id(p): i for i, (_, b) in enumerate(blocks, 1) for p in b.parameters()}
    layer_of = {n: owner[id(p)] for n, p in named if id(p) in owner}
    pending = []  # parameters outside blocks, placed once the next block (or the end) is known
    layers = []
    for name, p in named:
        if name in layer_of:
            layers += [(n, q, layer_of[name] if seen_any else 0) for n, q, seen_any in pending]
            pending = []
            layers.append((name, p, layer_of[name]))
        else:
            pending.append((name, p, bool(layers)))
    layers += [(n, q, depth) for n, q, _ in pending]
    titles = ["embeddings", *(f"backbone.{n}" for n, _ in blocks), "head and final layers"]
    parts = [(titles[i], decay ** (depth - i), [(n, q) for n, q, j in layers if j == i])
             for i in range(depth + 1)]
    return [part for part in parts if part[2]]


def vision_language_lr_parts(backbone, named, lr, vision_lr, merger_lr):
    """--vision_lr / --merger_lr: the vision tower without its merger, and the merger, at their
    own rates; the language model and the head at --lr. A rate given for a part with nothing
    trainable (frozen, or LoRA elsewhere) is an error."""
    vision = vision_language_parts(backbone)[0]
    merger = merger_of(backbone, vision)
    if merger_lr is not None and merger is None:
        raise ValueError(f"--merger_lr: cannot find the projector of {type(backbone).__name__} "
                         "(the one part outside its vision tower and language model, or the "
                         "tower's merger)")
    in_merger = {id(p) for p in merger.parameters()} if merger is not None else set()
    in_vision = {id(p) for p in vision.parameters()} - in_merger
    scale = lambda rate: 1.0 if rate is None else rate / lr  # noqa: E731
    parts = [("vision tower", scale(vision_lr),
              [(n, p) for n, p in named if id(p) in in_vision]),
             ("merger", scale(merger_lr if merger_lr is not None else lr),
              [(n, p) for n, p in named if id(p) in in_merger]),
             ("language model and head", 1.0,
              [(n, p) for n, p in named if id(p) not in in_vision | in_merger])]
    for flag, value, (title, _, params) in zip(("--vision_lr", "--merger_lr"),
                                               (vision_lr, merger_lr), parts):
        if value is not None and not params:  # frozen (--freeze, LoRA): the rate cannot act
            raise ValueError(f"{flag}: nothing in the {title} of {type(backbone).__name__} "
                             "trains (frozen by --freeze or --lora_rank; train it with "
                             "--lora_targets / --lora_train)")
    return [part for part in parts if part[2]]


def parameter_groups(model, args):
    """Optimizer groups: each part split into weight decay (dim >= 2) and none (biases, norms)."""
    groups = []
    for title, scale, params in parameter_parts(model, args):
        for decayed in (True, False):
            chosen = [p for _, p in params if (p.dim() >= 2) == decayed]
            if chosen:
                groups.append({"params": chosen, "name": title, "lr_scale": scale,
                               "weight_decay": args.weight_decay if decayed else 0.0})
    return groups


def format_groups(groups, lr):
    """The table of optimizer groups printed at start: name, parameters, peak lr, weight decay."""
    rows = [(g["name"], f"{sum(p.numel() for p in g['params']):,}", f"{lr * g['lr_scale']:.3g}",
             f"{g['weight_decay']:g}") for g in groups]
    header = ("group", "parameters", "lr", "weight decay")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(["optimizer groups:", line(header), *map(line, rows)])


def make_optimizer(model, args, device):
    """AdamW over parameter_groups (the part learning rates, no weight decay below 2 dims), fused
    on a GPU and on the CPU: one kernel per parameter instead of a dozen elementwise passes
    (ViT-Ti/16's 5.6M parameters on 2 CPUs: 12 ms a step against 40 ms, docs/performance.md)."""
    return torch.optim.AdamW(parameter_groups(model, args), lr=args.lr,
                             fused=device.type in ("cuda", "cpu"))
