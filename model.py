"""The masked classifier: a backbone (backbone.py), a pooled feature, one linear head.

A vision-language backbone's LM head is dropped and the head sits on the last (or mean) hidden
state of the valid tokens.

One head serves every dataset. In the `shared` label layout the head has
max(num_classes) rows and class i of every dataset lives on row i; in the
`disjoint` layout each dataset owns its own slice of rows (offsets in registry
order). Either way a sample may only predict rows inside its own dataset's
slice: `mask_logits` sets every other row to -inf.
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors.torch import load_file

from backbone import is_vision_language, load_backbone, vision_language_parts, backbone_feature_dim
from weights import model_weights, write_pretrained, write_safetensors


CLASSIFIER_FILE = "classifier.json"


HEAD_FILE = "head.safetensors"


POOLINGS = ("auto", "pooler", "cls", "mean", "last")


# every other batch key is a backbone input
BATCH_TARGETS = ("labels", "dataset_ids", "indices", "soft_targets")


@dataclass
class LabelSpace:
    """Where each dataset's classes live in the head: rows [offset, offset + num_classes)."""
    names: list
    num_classes: list
    offsets: list
    num_labels: int
    layout: str

    @classmethod
    def build(cls, names, num_classes, layout="shared", num_labels=None):
        if layout == "shared":
            offsets, needed = [0] * len(num_classes), max(num_classes)
        elif layout == "disjoint":
            offsets = [sum(num_classes[:i]) for i in range(len(num_classes))]
            needed = sum(num_classes)
        else:
            raise ValueError(f"--label_space must be 'shared' or 'disjoint', got {layout!r}")
        if num_labels is None:
            num_labels = needed
        elif num_labels < needed:
            raise ValueError(
                f"--num_labels {num_labels} is smaller than the {needed} head rows that the "
                f"{layout!r} layout needs for datasets {dict(zip(names, num_classes))}")
        return cls(list(names), list(num_classes), offsets, num_labels, layout)

    def tensors(self, device):
        """Per-dataset (num_classes, offsets) tensors, indexed by dataset id."""
        return (torch.tensor(self.num_classes,
                             device=device), torch.tensor(self.offsets, device=device))


def mask_logits(logits, num_classes_per_sample, offsets_per_sample=None):
    """Set every logit outside [offset, offset + num_classes) of each sample's dataset to -inf.

    Masked rows then never win argmax and get probability exactly 0.
    """
    rows = torch.arange(logits.shape[-1], device=logits.device)
    low = torch.zeros_like(
        num_classes_per_sample) if offsets_per_sample is None else offsets_per_sample
    valid = (rows[None, :] >= low[:, None]) & (rows[None, :] < (low + num_classes_per_sample)[:,
                                                                                              None])
    return logits.masked_fill(~valid, float("-inf"))


def pool_tokens(hidden, attention_mask, pooling):
    """Last valid token or mean over valid tokens; right padding (1 1 0) and left padding (0 1 1)
    alike.

    attention_mask.sum(1) - 1 would be the last token only under right padding.
    """
    if pooling == "last":
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


class MaskedClassifier(nn.Module):
    """backbone -> pooled feature -> Linear(num_labels). Masking is applied by the caller."""

    def __init__(self, backbone, num_labels, pooling="auto", pixel_normalize=None):
        super().__init__()
        # uint8 pixel_values (the fast image path) -> normalised floats on the device; not state
        self.pixel_normalize = pixel_normalize
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        self.token_inputs = is_vision_language(backbone.config)
        name = type(backbone).__name__
        if self.token_inputs and pooling in ("pooler", "cls"):
            raise ValueError(
                f"--pooling {pooling}: {name} is a vision-language model; use --pooling last or "
                "mean"
            )
        if not self.token_inputs and pooling == "last":
            raise ValueError(
                f"--pooling last is for vision-language backbones; {name} takes pooler, cls or mean"
            )
        self.backbone = backbone
        self.pooling = ("last" if self.token_inputs else "auto") if pooling == "auto" else pooling
        self.head = nn.Linear(backbone_feature_dim(backbone.config), num_labels,
                              dtype=backbone.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, outputs):
        pooled = getattr(outputs, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)  # ResNet's pooler output is (B, C, 1, 1)
        if self.pooling == "pooler":
            raise ValueError(
                f"{type(self.backbone).__name__} returns no pooler_output; use --pooling cls or "
                "mean"
            )
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)

    def features(self, **inputs):
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            if self.pixel_normalize is None:
                raise ValueError("uint8 pixel_values (the fast image path) need the processor's "
                                 "normalisation: MaskedClassifier(..., pixel_normalize="
                                 "inputs.pixel_normalize)")
            pixels = self.pixel_normalize(pixels, self.head.weight.dtype)
            inputs = {**inputs, "pixel_values": pixels}
        if self.token_inputs:
            outputs = self.backbone(**inputs, use_cache=False)
            return pool_tokens(outputs.last_hidden_state, inputs["attention_mask"], self.pooling)
        return self.pool(self.backbone(**inputs))

    def forward(self, **inputs):
        return self.head(self.features(**inputs))


def set_trainable(model, freeze="none", train_only_head=False):
    """Freeze parts of the backbone; returns (trainable, total) parameter counts.

    --freeze vision: a vision-language model's vision tower (for a vision backbone: all of it);
    --freeze llm: its language trunk; --train_only_head: everything but the head (linear probe).
    """
    if train_only_head:
        model.backbone.requires_grad_(False)
    elif freeze == "vision":
        (vision_language_parts(model.backbone)[0]
         if model.token_inputs else model.backbone).requires_grad_(False)
    elif freeze == "llm":
        if not model.token_inputs:
            raise ValueError(f"--freeze llm: {type(model.backbone).__name__} has no language model")
        vision_language_parts(model.backbone)[1].requires_grad_(False)
    elif freeze != "none":
        raise ValueError(f"--freeze must be vision, llm or none, got {freeze!r}")
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_classifier(model, inputs, folder, classifier_info, weights=None, rank=0):
    """Write the backbone in its own HF format, its processor files, the head and the label layout.

    weights: {name: tensor} of the whole classifier as the model holds it (FSDP2: its shards; a
    LoRA backbone: the merged weights, weights.Derived); by default the model's own. Every
    process calls it: a shard is gathered one tensor at a time and rank 0 writes."""
    weights = weights if weights is not None else model_weights(model)
    part = lambda prefix: {k[len(prefix):]: v for k, v in weights.items()  # noqa: E731
                           if k.startswith(prefix)}
    write_pretrained(model.backbone, folder, part("backbone."), rank)
    write_safetensors(os.path.join(folder, HEAD_FILE), part("head."), rank)
    if rank == 0:
        inputs.save_pretrained(folder)
        with open(os.path.join(folder, CLASSIFIER_FILE), "w") as f:
            json.dump(classifier_info, f, indent=2)


def read_classifier_info(folder):
    path = os.path.join(folder, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} is not a classifier checkpoint: {CLASSIFIER_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def load_classifier(folder, pooling=None, meta=False):
    """Rebuild a MaskedClassifier and its inputs from a checkpoint folder (no pickle: safetensors +
    JSON). meta: the backbone's parameters on the meta device (see load_backbone)."""
    info = read_classifier_info(folder)
    backbone, inputs = load_backbone(folder, prompt=info.get("prompt"), meta=meta)
    model = MaskedClassifier(backbone, info["num_labels"], pooling or info.get("pooling", "auto"),
                             getattr(inputs, "pixel_normalize", None))
    load_head(model, folder)
    return model, inputs, info


def load_head(model, folder):
    path = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        model.head.load_state_dict(load_file(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot load the head ({type(e).__name__}: {e})") from None


def classify(model, batch, num_classes, offsets, masking=True):
    """One forward pass: (masked) logits and each sample's target row in the head.

    num_classes / offsets: per-dataset tensors indexed by batch["dataset_ids"].
    """
    dataset_ids = batch["dataset_ids"]
    logits = model(**{k: v for k, v in batch.items() if k not in BATCH_TARGETS})
    targets = offsets[dataset_ids] + batch["labels"]
    if masking:
        logits = mask_logits(logits, num_classes[dataset_ids], offsets[dataset_ids])
    return logits, targets
