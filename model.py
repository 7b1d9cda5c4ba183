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

from backbone import (eval_mode, is_vision_language, load_backbone, meta_forward,
                      restore_modes, vision_language_parts)
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
    """backbone -> pooled feature -> Linear(num_labels). Masking is applied by the caller.

    inputs: the backbone's batch builder (load_backbone returns it): its uint8 normalisation
    (the fast image path) and an example batch for measuring the feature width. The width is the
    backbone's own: a vision-language model's language model width (its token embeddings), a
    vision backbone's pooled output of the example on the meta device (no memory, no compute).
    """

    def __init__(self, backbone, num_labels, pooling="auto", *, inputs):
        super().__init__()
        # uint8 pixel_values (the fast image path) -> normalised floats on the device; not state
        self.pixel_normalize = getattr(inputs, "pixel_normalize", None)
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
        if pooling == "cls" and not has_cls_token(backbone):
            raise ValueError(f"--pooling cls: {name} has no CLS token (no cls_token or "
                             "class_embedding parameter); use --pooling auto or mean")
        self.backbone = backbone
        self.pooling = ("last" if self.token_inputs else "auto") if pooling == "auto" else pooling
        self.head = nn.Linear(self.feature_width(inputs), num_labels, dtype=backbone.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def feature_width(self, inputs):
        if self.token_inputs:
            language = vision_language_parts(self.backbone)[1]
            return language.get_input_embeddings().embedding_dim
        example = inputs.example()
        modes = eval_mode(self.backbone)  # BatchNorm in training mode refuses a batch of one
        try:
            outputs = meta_forward(self.backbone, example)
        except Exception as e:  # noqa: BLE001 - a family whose forward needs values
            raise ValueError(f"{type(self.backbone).__name__}: its forward does not run on the "
                             f"meta device ({type(e).__name__}: {str(e)[:200]}), so its feature "
                             "width cannot be measured (docs/backbones.md lists the families "
                             "tested)") from None
        finally:
            restore_modes(modes)
        return self.pool(outputs, {k: v.to("meta") for k, v in example.items()}).shape[-1]

    def pool(self, outputs, inputs=None):
        """The pooled feature of a vision backbone's outputs; `inputs` may hold a mask of its
        output tokens (SigLIP2's pixel_attention_mask marks the padding patches)."""
        pooled = getattr(outputs, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)  # ResNet's pooler output is (B, C, 1, 1)
        if self.pooling == "pooler":
            raise ValueError(
                f"--pooling pooler: {type(self.backbone).__name__} returns no pooler_output; use "
                "--pooling auto or mean"
            )
        hidden = last_hidden(outputs)
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = token_mask(inputs or {}, hidden)
        return hidden.mean(dim=1) if mask is None else pool_tokens(hidden, mask, "mean")

    def features(self, **inputs):
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            if self.pixel_normalize is None:
                raise ValueError("uint8 pixel_values (the fast image path) need the processor's "
                                 "normalisation: MaskedClassifier(..., inputs=inputs) with the "
                                 "inputs of load_backbone")
            pixels = self.pixel_normalize(pixels, self.head.weight.dtype)
            inputs = {**inputs, "pixel_values": pixels}
        if self.token_inputs:
            outputs = self.backbone(**inputs, use_cache=False)
            return pool_tokens(outputs.last_hidden_state, inputs["attention_mask"], self.pooling)
        return self.pool(self.backbone(**inputs), inputs)

    def forward(self, **inputs):
        return self.head(self.features(**inputs))


def last_hidden(outputs):
    """The backbone's last hidden state; for a *Backbone class (HGNetV2Backbone, any AutoBackbone),
    whose output is feature maps only, its last feature map."""
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and getattr(outputs, "feature_maps", None):
        hidden = outputs.feature_maps[-1]
    if hidden is None:
        raise ValueError(f"{type(outputs).__name__} holds neither a last_hidden_state nor "
                         "feature maps to pool")
    return hidden


def has_cls_token(backbone):
    """Does the backbone prepend a learned class token (ViT, DeiT, BEiT, DINOv2/v3: cls_token;
    CLIP: class_embedding) to its output tokens?"""
    return any(name.rsplit(".", 1)[-1] in ("cls_token", "class_embedding")
               for name, _ in backbone.named_parameters())


def token_mask(inputs, hidden):
    """The input marking which of the backbone's output tokens are real (its length is theirs),
    or None."""
    for name, value in inputs.items():
        if name.endswith("attention_mask") and tuple(value.shape) == tuple(hidden.shape[:2]):
            return value
    return None


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
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:  # a truncated or corrupt file: name it
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a classifier description (a JSON object)")
    return info


def load_classifier(folder, pooling=None, meta=False):
    """Rebuild a MaskedClassifier and its inputs from a checkpoint folder (no pickle: safetensors +
    JSON). meta: the backbone's parameters on the meta device (see load_backbone)."""
    info = read_classifier_info(folder)
    backbone, inputs = load_backbone(folder, prompt=info.get("prompt"), meta=meta)
    model = MaskedClassifier(backbone, info["num_labels"], pooling or info.get("pooling", "auto"),
                             inputs=inputs)
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
