"""export.py: a checkpoint's dataset as a standard Hugging Face image classifier, checked through
transformers.pipeline against the checkpoint's own masked predictions."""
import json
import os

import pytest
import torch
from PIL import Image

from dataset import load_registry, make_loader
from sources import read_records
from export import ExportError, export
from backbone import load_backbone
from model import LabelSpace, MaskedClassifier, classify, save_classifier

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def save_backbone(folder, family):
    """A tiny random-init backbone folder of one family, with a PIL image processor."""
    import transformers
    from transformers import AutoModel, ViTImageProcessorPil
    config = {
        "vit": transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, image_size=16, patch_size=4),
        "convnext": transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                num_stages=2, patch_size=2),
        "resnet": transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                            depths=[1, 1], layer_type="basic"),
        "dinov2": transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, mlp_ratio=2, image_size=16,
                                            patch_size=4),
    }[family]
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


def save_checkpoint(tmp_path, family, pooling, small_data):
    """A MaskedClassifier over digits (rows 0-9, named) and faces (rows 10-11) saved as training
    saves it; the head is scaled up so its predictions are far from ties."""
    backbone, inputs = load_backbone(save_backbone(tmp_path / f"{family}_backbone", family))
    model = MaskedClassifier(backbone, 12, pooling)
    torch.manual_seed(1)
    with torch.no_grad():
        model.head.weight.normal_(0, 3.0)
        model.head.bias.normal_(0, 1.0)
    info = {"num_labels": 12, "label_space": "disjoint", "pooling": pooling, "prompt": None,
            "no_logits_masking": False, "datasets": {
                "digits": {"num_classes": 10, "eval_ratio": 0.5, "offset": 0,
                           "labels": DIGIT_NAMES},
                "faces": {"num_classes": 2, "eval_ratio": 1.0, "offset": 10}}}
    folder = tmp_path / f"{family}_checkpoint"
    folder.mkdir()
    save_classifier(model, inputs, str(folder), info)
    return str(folder), model.eval(), inputs


def masked_predictions(model, inputs, small_data):
    """(records, masked logits) over every validation image, as eval.py computes them."""
    registry = load_registry(small_data["registry"])
    space = LabelSpace.build(list(registry), [s.num_classes for s in registry.values()],
                             "disjoint")
    records = read_records([small_data["digits_val"], small_data["faces_val"]], registry)
    num_classes, offsets = space.tensors("cpu")
    logits = []
    with torch.no_grad():
        for batch in make_loader(records, list(range(len(records))), inputs, space.names,
                                 batch_size=16, num_workers=0):
            logits.append(classify(model, batch, num_classes, offsets)[0])
    return records, torch.cat(logits)


@pytest.mark.parametrize("family,pooling", [("vit", "cls"), ("convnext", "auto"),
                                            ("resnet", "auto"), ("resnet", "mean"),
                                            ("dinov2", "auto")])
def test_pipeline_top1_equals_checkpoint(tmp_path, small_data, family, pooling):
    from transformers import AutoModelForImageClassification, pipeline
    checkpoint, model, inputs = save_checkpoint(tmp_path, family, pooling, small_data)
    records, logits = masked_predictions(model, inputs, small_data)
    for dataset, offset, k in [("digits", 0, 10), ("faces", 10, 2)]:
        out = str(tmp_path / f"export_{dataset}")
        export(checkpoint, dataset, out)
        loaded = AutoModelForImageClassification.from_pretrained(out)
        assert loaded.config.num_labels == k
        names = DIGIT_NAMES if dataset == "digits" else ["0", "1"]
        assert [loaded.config.id2label[i] for i in range(k)] == names
        classifier = pipeline("image-classification", model=out)
        mine = [i for i in range(len(records)) if records[i].dataset_id == (dataset == "faces")]
        paths = [records[i].image_path for i in mine]
        results = classifier(paths, top_k=k)
        compared = 0
        for i, result in zip(mine, results):
            rows = logits[i, offset:offset + k]
            assert torch.isinf(logits[i]).sum() == 12 - k  # masked outside the dataset's rows
            top2 = rows.topk(2).values
            scores = torch.tensor(sorted(r["score"] for r in result))
            torch.testing.assert_close(scores, torch.softmax(rows, 0).sort().values,
                                       atol=1e-4, rtol=0)
            if top2[0] - top2[1] > 1e-3:  # never compare the argmax of a near-tie
                assert result[0]["label"] == names[rows.argmax().item()]
                compared += 1
        assert compared >= len(mine) - 1


def test_refuses_pooling_the_class_cannot_express(tmp_path, small_data):
    checkpoint, _, _ = save_checkpoint(tmp_path, "vit", "auto", small_data)
    with pytest.raises(ExportError, match="pooler.*CLS token after the final layernorm"):
        export(checkpoint, "digits", str(tmp_path / "out"))
    checkpoint, _, _ = save_checkpoint(tmp_path, "convnext", "mean", small_data)
    with pytest.raises(ExportError, match="map_mean.*pooler output"):
        export(checkpoint, "digits", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ExportError, match="--dataset cats: .* knows digits, faces"):
        export(checkpoint, "cats", str(tmp_path / "out"))


def test_refuses_vision_language_checkpoint(tmp_path, tiny_qwen2_vl):
    backbone, inputs = load_backbone(tiny_qwen2_vl)
    model = MaskedClassifier(backbone, 2, "last")
    info = {"num_labels": 2, "label_space": "shared", "pooling": "last", "prompt": None,
            "datasets": {"faces": {"num_classes": 2, "eval_ratio": 1.0, "offset": 0}}}
    folder = tmp_path / "vlm_checkpoint"
    folder.mkdir()
    save_classifier(model, inputs, str(folder), info)
    with pytest.raises(ExportError, match="vision-language checkpoint"):
        export(str(folder), "faces", str(tmp_path / "out"))


def test_cli_names_the_reason(tmp_path, small_data):
    from conftest import run_script
    checkpoint, _, _ = save_checkpoint(tmp_path, "vit", "auto", small_data)
    result = run_script("export.py", checkpoint, "--dataset", "digits", tmp_path / "out")
    assert result.returncode != 0
    assert "error:" in result.stderr and "ViTForImageClassification" in result.stderr
    with open(os.path.join(checkpoint, "classifier.json")) as f:
        assert json.load(f)["pooling"] == "auto"


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_two_tower_vision_towers(tmp_path, family):
    """SigLIP's class averages every token (exported with --pooling mean, checked against the
    checkpoint's logits inside export); CLIP's averages pre-layernorm patch tokens: refused."""
    import transformers
    from transformers import AutoModelForImageClassification, ViTImageProcessorPil
    config_class, model_class = {"siglip": (transformers.SiglipConfig, transformers.SiglipModel),
                                 "clip": (transformers.CLIPConfig, transformers.CLIPModel)}[family]
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    model_class(config_class(vision_config=dict(tower, image_size=16, patch_size=4),
                             text_config=dict(tower, vocab_size=100))).save_pretrained(
                                 tmp_path / "tower")
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "tower")
    backbone, inputs = load_backbone(str(tmp_path / "tower"))
    model = MaskedClassifier(backbone, 3, "mean")
    info = {"num_labels": 3, "label_space": "shared", "pooling": "mean", "prompt": None,
            "datasets": {"d": {"num_classes": 3, "eval_ratio": 1.0, "offset": 0}}}
    (tmp_path / "checkpoint").mkdir()
    save_classifier(model, inputs, str(tmp_path / "checkpoint"), info)
    if family == "clip":
        with pytest.raises(ExportError, match="CLIPForImageClassification classifies the mean of "
                           "the patch tokens before post_layernorm"):
            export(str(tmp_path / "checkpoint"), "d", str(tmp_path / "out"))
        return
    export(str(tmp_path / "checkpoint"), "d", str(tmp_path / "out"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))
    assert type(loaded).__name__ == "SiglipForImageClassification"
    pixels = inputs([Image.new("RGB", (20, 20), (200, 30, 90))], ["d"])["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels),
                                   atol=1e-5, rtol=1e-4)
