"""Export one dataset of a classifier checkpoint as a standard Hugging Face image classifier.

    python export.py runs/food/checkpoint-5000 --dataset food101 exported/food101

The folder OUT loads with no code from this project:

    from transformers import AutoModelForImageClassification, pipeline
    classify = pipeline("image-classification", model="exported/food101")
    classify("dish.jpg")  # [{"label": "ramen", "score": 0.93}, ...]

It holds the backbone's weights in the layout of the family's *ForImageClassification class
(ViTForImageClassification, Dinov2ForImageClassification, ConvNextForImageClassification,
ResNetForImageClassification, SwinForImageClassification, SiglipForImageClassification, ...),
a classifier made of only that dataset's head rows (offset .. offset + num_classes), id2label /
label2id from the dataset's class names (the class index where it has none) and the image
processor. Its logits are the checkpoint's masked logits of that dataset, so its top-1 is
eval.py's prediction; this is checked on a test image before anything is written.

Each *ForImageClassification class pools the backbone output its own way; a checkpoint whose
pooling it cannot express is refused with the reason (e.g. ViTForImageClassification reads the
CLS token after the final layernorm, so a ViT trained on its pooler output, `--pooling auto`,
cannot be exported: train with `--pooling cls`). Vision-language checkpoints (Qwen2-VL, ...) are
refused: their inputs are a prompt plus image tokens, which no image-classification class takes.
A checkpoint trained with --no_logits_masking predicts over every head row (eval.py does too), so
its export keeps every row; rows of other datasets are named "dataset:class".

OUT must be new, empty or an earlier export (export_info.json lists what it wrote); anything else
is refused, never deleted. The new export is written beside OUT and swapped in (files.py), so a
kill at any point leaves the earlier export or the new one.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import SafetensorError

from backbone import is_vision_language
from checkpoint import CheckpointError
from faults import injected_fault
from files import OutputError, reason, recover_folder, swap_in, temporary, write_json
from model import last_hidden, load_classifier, read_classifier_info

EXPORT_INFO = "export_info.json"  # marks a folder export.py wrote, and lists its files
# what an export wrote before export_info.json listed it
EARLIER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

# What each target class feeds its classifier, as the source pooling it equals. Source poolings:
# "pooler" (the backbone's pooler_output), "cls" / "mean" (first token / mean of all tokens of
# last_hidden_state), "map_mean" (mean of a convolutional feature map).
CLS_TOKEN = ({"cls"}, "the CLS token after the final layernorm (last_hidden_state[:, 0]); it "
             "has no pooler")
CLS_AND_MEAN = ({"cls", "pooler"}, "the CLS token concatenated with the mean of the patch tokens")
CONVNEXT_POOLER = ({"pooler"}, "the pooler output (the final layernorm of the averaged feature "
                   "map)")
FEATURE_MAP = ({"pooler", "map_mean"}, "the averaged final feature map")
FINAL_TOKENS = ({"pooler", "mean"}, "the mean of the final tokens")
PATCH_MEAN = (set(), "the mean of the patch tokens before post_layernorm, which no --pooling "
              "computes")
TARGET_POOLINGS = {
    "ViTForImageClassification": CLS_TOKEN,
    "DeiTForImageClassification": CLS_TOKEN,
    "Dinov2ForImageClassification": CLS_AND_MEAN,
    "Dinov2WithRegistersForImageClassification": CLS_AND_MEAN,
    "ConvNextForImageClassification": CONVNEXT_POOLER,
    "ConvNextV2ForImageClassification": CONVNEXT_POOLER,
    "ResNetForImageClassification": FEATURE_MAP,
    "RegNetForImageClassification": FEATURE_MAP,
    "EfficientNetForImageClassification": FEATURE_MAP,
    "MobileNetV2ForImageClassification": FEATURE_MAP,
    "MobileViTForImageClassification": FEATURE_MAP,
    "SwinForImageClassification": FINAL_TOKENS,
    "Swinv2ForImageClassification": FINAL_TOKENS,
    "FocalNetForImageClassification": FINAL_TOKENS,
    "LevitForImageClassification": FINAL_TOKENS,
    "SiglipForImageClassification": ({"mean"}, "the mean of last_hidden_state over all tokens "
                                     "(not the attention-pooling head)"),
    "Siglip2ForImageClassification": ({"mean"}, "the mean of last_hidden_state over the real "
                                      "(unpadded) patches (not the attention-pooling head)"),
    "BeitForImageClassification": ({"pooler"}, "the pooler output (the layer-normed mean of the "
                                   "patch tokens)"),
    "CLIPForImageClassification": PATCH_MEAN,
    "MetaClip2ForImageClassification": PATCH_MEAN,
    "ViTMSNForImageClassification": CLS_TOKEN,
    "HGNetV2ForImageClassification": ({"map_mean"}, "the averaged last feature map"),
    # fc(flatten(avgpool(...))): TextNetModel's own pooler averages to 2 x 2, not to 1 x 1
    "TextNetForImageClassification": ({"map_mean"}, "the averaged final feature map (its "
                                      "pooler output is a 2 x 2 average: train with --pooling "
                                      "mean)"),
    # the mean of the final feature map after a BatchNorm (set to the identity on export)
    "SwiftFormerForImageClassification": ({"map_mean"}, "the averaged final feature map"),
    "IJepaForImageClassification": ({"mean"}, "the mean of the final tokens (not its pooler)"),
    "HieraForImageClassification": ({"pooler"}, "the pooler output (the layer-normed mean of "
                                     "the final tokens)"),
    # the class token PvtModel adds in its last stage
    "PvtForImageClassification": CLS_TOKEN,
    "PvtV2ForImageClassification": ({"map_mean"}, "the averaged final feature map"),
}


class ExportError(ValueError):
    """The checkpoint cannot be expressed as a standard image classifier; the message says why."""


def source_pooling(model, outputs):
    """The pooling the checkpoint's MaskedClassifier applied: pooler, cls, mean or map_mean."""
    if model.pooling in ("auto", "pooler") and getattr(outputs, "pooler_output", None) is not None:
        return "pooler"
    return "map_mean" if last_hidden(outputs).dim() == 4 else (
        "cls" if model.pooling == "cls" else "mean")


def image_classification_class(config):
    """The *ForImageClassification class transformers maps `config` to; of several (DeiT, LeViT:
    with a distillation head too), the plain classifier."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING[type(config)]
    if not isinstance(classes, (tuple, list)):
        return classes
    plain = [c for c in classes if c.__name__.endswith("ForImageClassification")]
    if len(plain) != 1:
        raise ExportError(f"transformers maps {type(config).__name__} to "
                          f"{', '.join(c.__name__ for c in classes)}: none is the plain classifier")
    return plain[0]


def target_config(config, num_classes, names):
    """The backbone config turned into the config of its *ForImageClassification class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    config_class = type(config)
    if config_class in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        target = config_class.from_dict(config.to_dict())
    else:  # a vision tower (SiglipVisionConfig): its two-tower config holds it as vision_config
        outer = [c for c in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.keys()
                 if getattr(c, "sub_configs", {}).get("vision_config") is config_class]
        if not outer:
            raise ExportError(f"transformers has no image-classification class for "
                              f"{config_class.__name__} (model_type {config.model_type!r})")
        target = outer[0](vision_config=config.to_dict())
    target.num_labels = num_classes
    target.id2label = dict(enumerate(names))
    target.label2id = {name: i for i, name in enumerate(names)}
    target.problem_type = "single_label_classification"  # softmax in the pipeline, even for 1 class
    target.architectures = [image_classification_class(target).__name__]
    return target


def dataset_names(info, dataset):
    entry = info["datasets"][dataset]
    names = [str(n) for n in (entry.get("labels") or range(entry["num_classes"]))]
    if len(names) != entry["num_classes"]:
        raise ExportError(f"classifier.json: dataset {dataset!r} has {len(names)} class names "
                          f"for {entry['num_classes']} classes")
    return names


def class_names(info, dataset, masked=True):
    """The names of the exported rows: the dataset's classes; without logits masking every head
    row, a row of another dataset named "other:class" ("a:x|b:y" where datasets share it)."""
    names = dataset_names(info, dataset)
    if not masked:
        own = info["datasets"][dataset]["offset"]
        rows = []
        for row in range(info["num_labels"]):
            if own <= row < own + len(names):
                rows.append(names[row - own])
                continue
            owners = [f"{d}:{dataset_names(info, d)[row - e['offset']]}"
                      for d, e in info["datasets"].items()
                      if e["offset"] <= row < e["offset"] + e["num_classes"]]
            rows.append("|".join(owners) or f"row {row}")
        names = rows
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExportError(f"dataset {dataset!r}: class names must be unique for label2id, "
                          f"repeated: {repeated[:5]}")
    return names


def backbone_part(backbone, target):
    """(module, its name in `target`) of the part of `target` that holds the backbone: its
    submodule of the backbone's class, else the target itself where it holds every backbone
    weight under the same name and shape (HGNetV2ForImageClassification keeps HGNetV2Backbone's
    embedder and encoder at its top level)."""
    inner = next(((name, m) for name, m in target.named_modules()
                  if type(m) is type(backbone)), None)
    if inner is not None:
        return inner[1], inner[0]
    wanted = target.state_dict()
    if all(k in wanted and wanted[k].shape == v.shape for k, v in backbone.state_dict().items()):
        return target, ""
    raise ExportError(f"{type(target).__name__} holds no {type(backbone).__name__}")


def copy_backbone(backbone, target):
    """Load the backbone's weights into the part of `target` that holds it; every weight of that
    part must come from the backbone (its unused pooler may be left out). Returns the names of
    the target's entries it filled."""
    inner, name = backbone_part(backbone, target)
    weights = backbone.state_dict()
    wanted = inner.state_dict() if inner is not target else weights
    missing = [k for k in wanted if k not in weights or weights[k].shape != wanted[k].shape]
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise ExportError(f"{type(target).__name__} needs parts the backbone was built without or "
                          f"in another shape: {', '.join(parts)} ({missing[:5]}); it cannot hold "
                          "this checkpoint")
    inner.load_state_dict({k: weights[k] for k in wanted}, strict=inner is not target)
    return {f"{name}.{k}" if name else k for k in wanted}


def set_classifier(target, weight, bias, filled):
    """Write the dataset's head rows into the target's classifier, found by structure: the Linear
    layers outside the backbone (`filled`: the entries copy_backbone filled) that give one output
    per class (`classifier`, TextNet's `fc`, ...). Where the class averages several heads
    (SwiftFormer: `head` and `dist_head`) each gets the rows, so their mean is the head; a
    BatchNorm outside the backbone (LeViT's classifier, SwiftFormer's `norm`) is set to the
    identity. Any other weight outside the backbone is one the checkpoint cannot fill: refused."""
    name = type(target).__name__
    heads = [(n, m) for n, m in target.named_modules() if isinstance(m, nn.Linear)
             and f"{n}.weight" not in filled and m.out_features == weight.shape[0]]
    if not heads:
        raise ExportError(f"{name} has no linear classifier of {weight.shape[0]} outputs outside "
                          "the backbone to hold the head")
    norms = [m for n, m in target.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.weight" not in filled]
    held = {f"{n}.{k}" for n, m in target.named_modules()
            if any(m is part for _, part in heads) or any(m is norm for norm in norms)
            for k in m.state_dict()}
    other = [k for k in target.state_dict() if k not in filled and k not in held]
    if other:
        raise ExportError(f"{name} has weights outside the backbone and its classifier that the "
                          f"checkpoint cannot fill: {other[:5]}")
    d = weight.shape[1]
    for head_name, linear in heads:
        rows = weight
        if linear.in_features == 2 * d and "Dinov2" in name:
            # [CLS, mean of patches] -> the head reads the CLS half only
            rows = torch.cat([weight, torch.zeros_like(weight)], dim=1)
        if linear.weight.shape != rows.shape:
            raise ExportError(f"{name}'s classifier {head_name} is "
                              f"{tuple(linear.weight.shape)}, the head rows are "
                              f"{tuple(weight.shape)}")
        with torch.no_grad():
            linear.weight.copy_(rows.to(linear.weight.dtype))
            linear.bias.copy_(bias.to(linear.bias.dtype))
    with torch.no_grad():
        for norm in norms:  # (x - 0) / sqrt(1 - eps + eps)
            norm.reset_parameters()
            norm.running_var.fill_(1 - norm.eps)
    return [n for n, _ in heads]


def random_image(seed=0, size=64):
    """A random RGB image; the image processor resizes it to the model's input."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@torch.no_grad()
def export(checkpoint, dataset, out):
    """Write `dataset`'s classifier of `checkpoint` to the folder `out`; returns the model."""
    from transformers import AutoConfig, AutoImageProcessor

    out = os.path.normpath(out)
    note = recover_folder(out)  # a swap a kill interrupted: the earlier export back
    if note:
        print(f"note: {note}")
    refused = not_replaceable(out)
    if refused:
        raise OutputError(refused)
    info = read_classifier_info(checkpoint)
    if dataset not in info["datasets"]:
        raise ExportError(f"--dataset {dataset}: {checkpoint} knows {', '.join(info['datasets'])}")
    if is_vision_language(AutoConfig.from_pretrained(checkpoint)):
        raise ExportError(f"{checkpoint} is a vision-language checkpoint: its inputs are a prompt "
                          "plus image tokens, which no *ForImageClassification class takes; use "
                          "eval.py or model.load_classifier")
    model, inputs, info = load_classifier(checkpoint)
    model.eval()
    entry = info["datasets"][dataset]
    # eval.py's prediction is the argmax over the dataset's rows, or over all rows unmasked
    masked = not info.get("no_logits_masking", False)
    rows = (slice(entry["offset"], entry["offset"] + entry["num_classes"]) if masked
            else slice(0, info["num_labels"]))
    names = class_names(info, dataset, masked)
    config = target_config(model.backbone.config, len(names), names)
    target_class = image_classification_class(config)
    name = target_class.__name__

    dtype = model.head.weight.dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in inputs([random_image()], [dataset]).items()}
    outputs = model.backbone(**batch)
    pooling = source_pooling(model, outputs)
    expressible, reads = TARGET_POOLINGS.get(name, (None, None))
    if expressible is not None and pooling not in expressible:
        raise ExportError(f"{checkpoint} pools the backbone output as {pooling!r} (--pooling "
                          f"{info.get('pooling', 'auto')}), but {name} classifies {reads}; it "
                          f"can express {sorted(expressible) or 'none of them'}")

    target = target_class(config).to(model.head.weight.dtype).eval()
    filled = copy_backbone(model.backbone, target)
    heads = set_classifier(target, model.head.weight[rows], model.head.bias[rows], filled)
    if len(heads) > 1:
        print(f"note: {name} averages its heads {', '.join(heads)}: each holds the head rows")

    expected = model.head(model.pool(outputs, batch))[:, rows].float()
    got = target(**batch).logits.float()
    scale = max(1.0, expected.abs().max().item())
    tolerance = (1e-4 if dtype == torch.float32 else 3e-2) * scale
    if not torch.allclose(got, expected, atol=tolerance, rtol=0):
        gap = (got - expected).abs().max().item()
        raise ExportError(f"{name} does not reproduce the checkpoint's logits (max difference "
                          f"{gap:.3g} > {tolerance:.3g}): it pools the backbone output "
                          f"differently from --pooling {info.get('pooling', 'auto')}")

    # written beside OUT and swapped in: OUT is never half-written, and an earlier export is
    # deleted only once the new one is in place
    tmp = temporary(out)
    try:
        os.makedirs(tmp)
        target.save_pretrained(tmp)
        AutoImageProcessor.from_pretrained(checkpoint).save_pretrained(tmp)
        write_json(os.path.join(tmp, EXPORT_INFO), {  # last: the folder is complete
            "checkpoint": os.path.abspath(checkpoint), "dataset": dataset,
            "rows": [rows.start, rows.stop], "logits_masking": masked, "pooling": pooling,
            "class": name, "files": sorted(os.listdir(tmp)) + [EXPORT_INFO]})
        injected_fault("kill_in_export", 1)
        swap_in(tmp, out)
    # safetensors reports a full disk as its own error
    except (OSError, OutputError, SafetensorError) as e:
        recover_folder(out)
        kept = "the earlier export is kept" if os.path.isdir(out) else "nothing was written"
        raise OutputError(f"cannot write the export {out} ({reason(e)}); {kept}") from None
    return target


def not_replaceable(out):
    """Why export.py may not write `out` (None: it may). A folder is replaced only if it is empty
    or an earlier export holding nothing but what export.py wrote."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        return f"OUT {out} is a file, not a folder"
    entries = sorted(os.listdir(out))
    if not entries:
        return None
    try:
        with open(os.path.join(out, EXPORT_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not {"checkpoint", "dataset"} <= set(info):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return (f"OUT {out} is not an earlier export (no {EXPORT_INFO}; it holds {shown}); "
                "export.py replaces only its own exports: give a new or empty folder")
    extra = [e for e in entries if e not in set(info.get("files") or EARLIER_FILES) |
             {EXPORT_INFO}]
    if extra:
        return (f"OUT {out} is an earlier export but also holds {', '.join(extra[:4])}, which "
                "export.py did not write; move them or give another folder")
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a classifier checkpoint-* folder")
    p.add_argument("out", help="the folder to write: new, empty, or an earlier export (then "
                   "replaced; a folder holding anything else is refused)")
    p.add_argument("--dataset", required=True, help="which of the checkpoint's datasets to export")
    args = p.parse_args(argv)
    try:
        target = export(args.checkpoint, args.dataset, args.out)
    except (ExportError, OutputError, CheckpointError, ValueError, OSError) as e:
        # user errors, as in train.py and eval.py: one line, exit code 2
        text = reason(e) if isinstance(e, OSError) and e.strerror else str(e)
        print(f"error: {text}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {type(target).__name__}, {target.config.num_labels} classes of "
          f"{args.dataset}")
    print(PIPELINE_DECODE)


# what transformers' load_image does otherwise than training's decode (preprocess.to_rgb)
PIPELINE_DECODE = (
    "note: the pipeline decodes images with transformers' load_image (Pillow's convert('RGB')): "
    "16-bit greyscale is clipped (training scaled it to 8 bits) and a transparent image's "
    "hidden pixels keep their stored colour (training composited them onto white where the "
    "processor converts to RGB): give it 8-bit images without transparency, as eval.py saw them")


if __name__ == "__main__":
    main()
