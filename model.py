"""The masked classifier: a Hugging Face vision backbone, a pooled feature, one linear head.

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
import transformers
from safetensors.torch import load_file, save_file

# Per-shard progress bars of save_pretrained / from_pretrained would interleave with the training bar.
transformers.utils.logging.disable_progress_bar()

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
POOLINGS = ("auto", "pooler", "cls", "mean")

# Fresh random-init backbones for the demo and benchmarks (nothing can be downloaded).
# Each entry: transformers config class name, its kwargs, and the input size in pixels.
PRESETS = {
    "resnet-tiny": ("ResNetConfig", dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                                         layer_type="basic", downsample_in_first_stage=False), 32),
    "vit-tiny": ("ViTConfig", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                   image_size=32, patch_size=4), 32),
    "convnext-tiny": ("ConvNextConfig", dict(num_channels=3, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_stages=3,
                                             patch_size=2), 32),
}


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
            raise ValueError(f"--num_labels {num_labels} is smaller than the {needed} head rows that the {layout!r} "
                             f"layout needs for datasets {dict(zip(names, num_classes))}")
        return cls(list(names), list(num_classes), offsets, num_labels, layout)

    def tensors(self, device):
        """Per-dataset (num_classes, offsets) tensors, indexed by dataset id."""
        return (torch.tensor(self.num_classes, device=device), torch.tensor(self.offsets, device=device))


def mask_logits(logits, num_classes_per_sample, offsets_per_sample=None):
    """Set every logit outside [offset, offset + num_classes) of each sample's dataset to -inf.

    Masked rows then never win argmax and get probability exactly 0.
    """
    rows = torch.arange(logits.shape[-1], device=logits.device)
    low = torch.zeros_like(num_classes_per_sample) if offsets_per_sample is None else offsets_per_sample
    valid = (rows[None, :] >= low[:, None]) & (rows[None, :] < (low + num_classes_per_sample)[:, None])
    return logits.masked_fill(~valid, float("-inf"))


def backbone_feature_dim(config):
    for name in ("hidden_size", "embed_dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    raise ValueError(f"cannot tell the feature size of a {type(config).__name__}: it has no hidden_size or hidden_sizes")


def load_backbone(name_or_path, seed=0):
    """Return (backbone, image_processor) from a local model folder or a `preset:NAME`.

    A folder is read with AutoConfig/AutoModel; for two-tower checkpoints (CLIP, SigLIP)
    only the vision tower is loaded, through its own model class.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if name_or_path.startswith("preset:"):
        return build_preset(name_or_path.split(":", 1)[1], seed)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"--model {name_or_path}: no such folder (use a local model folder or one of "
                                f"{', '.join('preset:' + p for p in PRESETS)})")
    config = AutoConfig.from_pretrained(name_or_path)
    model_class = AutoModel
    if getattr(config, "vision_config", None) is not None:
        model_class = MODEL_MAPPING[type(config.vision_config)]
    backbone, info = model_class.from_pretrained(name_or_path, output_loading_info=True)
    if info["missing_keys"]:
        print(f"warning: {name_or_path}: weights missing from the folder, randomly initialised: "
              f"{sorted(info['missing_keys'])[:8]}{' ...' if len(info['missing_keys']) > 8 else ''}")
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    return backbone, image_processor


def build_preset(name, seed=0):
    from transformers import AutoModel, ViTImageProcessorPil

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config_class, kwargs, size = PRESETS[name]
    config = getattr(transformers, config_class)(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = AutoModel.from_config(config)
    # Plain resize + [-1, 1] scaling; the PIL backend needs no torchvision.
    image_processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return backbone, image_processor


class MaskedClassifier(nn.Module):
    """backbone -> pooled feature -> Linear(num_labels). Masking is applied by the caller."""

    def __init__(self, backbone, num_labels, pooling="auto"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone_feature_dim(backbone.config), num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, outputs):
        pooled = getattr(outputs, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)  # ResNet's pooler output is (B, C, 1, 1)
        if self.pooling == "pooler":
            raise ValueError(f"{type(self.backbone).__name__} returns no pooler_output; use --pooling cls or mean")
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # convolutional feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)

    def forward(self, pixel_values):
        return self.head(self.pool(self.backbone(pixel_values=pixel_values)))


def save_classifier(model, image_processor, folder, classifier_info):
    """Write the backbone in its own HF format, the image processor, the head and the label layout."""
    model.backbone.save_pretrained(folder, safe_serialization=True)
    image_processor.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()},
              os.path.join(folder, HEAD_FILE))
    with open(os.path.join(folder, CLASSIFIER_FILE), "w") as f:
        json.dump(classifier_info, f, indent=2)


def read_classifier_info(folder):
    path = os.path.join(folder, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a classifier checkpoint: {CLASSIFIER_FILE} is missing")
    with open(path) as f:
        return json.load(f)


def load_classifier(folder, pooling=None):
    """Rebuild a MaskedClassifier from a checkpoint folder (no pickle: safetensors + JSON)."""
    info = read_classifier_info(folder)
    backbone, image_processor = load_backbone(folder)
    model = MaskedClassifier(backbone, info["num_labels"], pooling or info.get("pooling", "auto"))
    load_head(model, folder)
    return model, image_processor, info


def load_head(model, folder):
    path = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    model.head.load_state_dict(load_file(path))


def load_classifier_weights(model, folder):
    """Copy a checkpoint's backbone and head weights into an existing MaskedClassifier."""
    saved = type(model.backbone).from_pretrained(folder)
    model.backbone.load_state_dict(saved.state_dict())
    load_head(model, folder)


def classify(model, batch, num_classes, offsets, masking=True):
    """One forward pass: (masked) logits and each sample's target row in the head.

    num_classes / offsets: per-dataset tensors indexed by batch["dataset_ids"].
    """
    dataset_ids = batch["dataset_ids"]
    logits = model(batch["pixel_values"])
    targets = offsets[dataset_ids] + batch["labels"]
    if masking:
        logits = mask_logits(logits, num_classes[dataset_ids], offsets[dataset_ids])
    return logits, targets


def autocast(device, precision):
    """Autocast for bf16 / fp16; a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision != "fp32")
