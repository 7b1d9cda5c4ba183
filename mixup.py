"""Mixup and CutMix within a dataset, for the masked multi-dataset classifier.

A sample is only mixed with another sample of the same dataset in its micro-batch (in the
`shared` label layout different datasets' classes share head rows, so a cross-dataset mix would
be a meaningless target). Per micro-batch, as timm's Mixup in batch mode: with probability
`mix_prob` the batch is mixed; when both alphas are > 0, CutMix or Mixup is chosen with
probability 0.5 each; lambda ~ Beta(alpha, alpha); a CutMix box covers about 1 - lambda of the
image and lambda is corrected to the area the clipped box really leaves. Each dataset's members
are paired by a random permutation of those members; a dataset with one sample in the batch is
left as it is. The soft target of sample i is lambda on its own class row and 1 - lambda on its
partner's class row, both inside the dataset's rows of the head.

Draws are a function of (seed, step, micro-batch index) for the mode, lambda and box, and of
(seed, step, micro-batch index, the samples' global indices) for the pairing: never of the rank,
so a resumed run mixes exactly as the uninterrupted one did. Under another world size the mode,
lambda and box of each micro-batch stay the same; the partners do not, since they must share a
process's micro-batch (pairing across processes would cost an all-gather of the images).

uint8 pixel values (the fast image path normalises on the device) are mixed in float32 and
rounded back to uint8: normalisation ((x / 255 - mean) / std) is affine, so it commutes with a
convex combination, and the only difference to mixing after normalisation is the rounding, at
most 0.5 / 255, the size of the quantisation every uint8 image already has. CutMix copies pixels
and is exact in any dtype.
"""
import numpy as np
import torch

_STREAM_BATCH, _STREAM_PAIRS = 0x6D6978, 0x70616972  # separate the two streams of draws


def check_mix_args(mixup, cutmix, mix_prob, task="classify", token_inputs=False, model_name=""):
    """Refuse values and settings where mixing cannot take effect; call before the first step."""
    for flag, alpha in (("--mixup", mixup), ("--cutmix", cutmix)):
        if not alpha >= 0 or alpha == float("inf"):
            raise ValueError(f"{flag} must be a finite alpha >= 0 (0 = off), got {alpha}")
    if not 0 <= mix_prob <= 1:
        raise ValueError(f"--mix_prob must be in [0, 1], got {mix_prob}")
    if not (mixup > 0 or cutmix > 0):
        return
    flags = " / ".join(f for f, a in (("--mixup", mixup), ("--cutmix", cutmix)) if a > 0)
    if task != "classify":
        raise ValueError(f"{flags} is for --task classify (image classification), not "
                         f"--task {task}")
    if token_inputs:
        raise ValueError(f"{flags}: {model_name or 'this backbone'} is a vision-language model fed "
                         "image tokens, not a pixel grid; mixup / cutmix are for vision backbones")
    if mix_prob == 0:
        raise ValueError(f"{flags} with --mix_prob 0 would never mix; give --mix_prob > 0")


def check_image_grid(pixels, batch):
    """Mixing blends and pastes (B, C, H, W) images; a processor that hands the backbone patches
    (SigLIP2's (B, patches, 3 p p) with a patch mask) would be mixed patch index by patch index
    against labels that assume whole images."""
    masked = " and a pixel_attention_mask" if "pixel_attention_mask" in batch else ""
    if pixels.dim() != 4 or pixels.shape[1] not in (1, 3) or masked:
        raise ValueError(f"--mixup / --cutmix mix (batch, channels, height, width) images; this "
                         f"backbone's processor gives pixel_values of shape {tuple(pixels.shape)}"
                         f"{masked} (patches): train it without mixing")


def draw_mix(mixup, cutmix, mix_prob, seed, step, micro_index, height, width):
    """The micro-batch's mixing: None (not mixed) or (mode, lambda, box); box = (y0, y1, x0, x1)
    for cutmix, None for mixup. lambda is the share of each sample's own image."""
    rng = np.random.default_rng([_STREAM_BATCH, seed, step, micro_index])
    if rng.random() >= mix_prob:
        return None
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if not use_cutmix:
        return "mixup", lam, None
    cut = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the clipped box's true area
    return "cutmix", float(lam), (int(y0), int(y1), int(x0), int(x1))


def same_dataset_partners(dataset_ids, indices, seed, step, micro_index):
    """partner[i]: the position in the batch whose image sample i is mixed with, always of the
    same dataset; a random permutation of each dataset's members, seeded by their global
    indices (a dataset with one member keeps it: partner[i] = i)."""
    dataset_ids, indices = dataset_ids.tolist(), indices.tolist()
    partner = list(range(len(dataset_ids)))
    for d in sorted(set(dataset_ids)):
        members = sorted((i for i, x in enumerate(dataset_ids) if x == d),
                         key=lambda i: indices[i])
        if len(members) < 2:
            continue
        rng = np.random.default_rng([_STREAM_PAIRS, seed, step, micro_index,
                                     *(indices[i] for i in members)])
        for i, j in zip(members, rng.permutation(len(members))):
            partner[i] = members[j]
    return partner


def mix_batch(batch, offsets, num_labels, mixup, cutmix, mix_prob, seed, step, micro_index):
    """Mix batch["pixel_values"] within datasets; returns (batch, soft targets (B, num_labels)).

    Call on the device, before the forward. `offsets`: per-dataset head offsets (LabelSpace),
    indexed by batch["dataset_ids"]; step and micro_index: the optimizer step about to be taken
    and the micro-batch's place in it. The returned batch holds the mixed pixel values and the
    original labels (hard accuracy is measured on them); the loss takes the soft targets.
    """
    labels, dataset_ids = batch["labels"], batch["dataset_ids"]
    rows = offsets.to(labels.device)[dataset_ids] + labels
    soft = torch.zeros(len(labels), num_labels, device=labels.device)
    pixels = batch["pixel_values"]
    check_image_grid(pixels, batch)
    draw = draw_mix(mixup, cutmix, mix_prob, seed, step, micro_index, pixels.shape[-2],
                    pixels.shape[-1])
    if draw is None:
        return batch, soft.scatter_(1, rows[:, None], 1.0)
    mode, lam, box = draw
    partner = torch.tensor(same_dataset_partners(dataset_ids.cpu(), batch["indices"].cpu(), seed,
                                                 step, micro_index), device=pixels.device)
    paired = partner != torch.arange(len(partner), device=pixels.device)
    if mode == "mixup":
        w = torch.where(paired, lam, 1.0).to(torch.float32).view(-1, *[1] * (pixels.dim() - 1))
        mixed = w * pixels.float() + (1 - w) * pixels[partner].float()
        mixed = mixed.round().clamp_(0, 255) if pixels.dtype == torch.uint8 else mixed
        mixed = mixed.to(pixels.dtype)
    else:
        y0, y1, x0, x1 = box
        mixed = pixels.clone()
        mixed[..., y0:y1, x0:x1] = pixels[partner][..., y0:y1, x0:x1]
    own = torch.where(paired, lam, 1.0).to(torch.float32)
    soft.scatter_add_(1, rows[:, None], own[:, None])
    soft.scatter_add_(1, rows[partner][:, None], (1 - own)[:, None])
    return {**batch, "pixel_values": mixed}, soft
