import os

import pytest
import torch
import torch.nn.functional as F

from backbone import load_backbone
from model import (LabelSpace, MaskedClassifier, classify, load_classifier, mask_logits,
                   save_classifier)


def test_masked_rows_never_win_argmax_and_get_zero_probability():
    torch.manual_seed(0)
    logits = torch.randn(6, 10)
    logits[:, 7:] += 100.0  # the invalid rows are by far the largest
    num_classes = torch.tensor([2, 3, 10, 5, 1, 7])
    masked = mask_logits(logits, num_classes)
    pred = masked.argmax(-1)
    assert (pred < num_classes).all()
    probs = F.softmax(masked, -1)
    rows = torch.arange(10)
    invalid = rows[None, :] >= num_classes[:, None]
    assert (probs[invalid] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    # valid rows keep their values: softmax over them equals softmax of the slice
    torch.testing.assert_close(probs[0, :2], F.softmax(logits[0, :2], -1))


def test_disjoint_layout_masks_outside_each_datasets_slice():
    space = LabelSpace.build(["a", "b", "c"], [3, 2, 4], "disjoint")
    assert space.offsets == [0, 3, 5] and space.num_labels == 9
    num_classes, offsets = space.tensors("cpu")
    ids = torch.tensor([0, 1, 2, 1])
    logits = torch.full((4, 9), 50.0)
    logits[:, 4] = 99.0  # row 4 belongs to dataset b
    masked = mask_logits(logits, num_classes[ids], offsets[ids])
    pred = masked.argmax(-1)
    assert pred.tolist()[1] == 4 and pred.tolist()[3] == 4
    for i, d in enumerate(ids.tolist()):
        lo, hi = offsets[d].item(), offsets[d].item() + num_classes[d].item()
        assert lo <= pred[i] < hi
        assert torch.isinf(masked[i, :lo]).all() and torch.isinf(masked[i, hi:]).all()
        assert torch.isfinite(masked[i, lo:hi]).all()


def test_label_space_sizes_and_num_labels_check():
    assert LabelSpace.build(["a", "b"], [101, 2000], "shared").num_labels == 2000
    assert LabelSpace.build(["a", "b"], [101, 2000], "shared", num_labels=2048).num_labels == 2048
    assert LabelSpace.build(["a", "b"], [101, 2000], "disjoint").num_labels == 2101
    with pytest.raises(ValueError, match="smaller than the 2000"):
        LabelSpace.build(["a", "b"], [101, 2000], "shared", num_labels=1000)
    with pytest.raises(ValueError, match="smaller than the 2101"):
        LabelSpace.build(["a", "b"], [101, 2000], "disjoint", num_labels=2000)


def test_classify_maps_labels_to_head_rows():
    space = LabelSpace.build(["a", "b"], [3, 2], "disjoint")
    num_classes, offsets = space.tensors("cpu")
    # noqa: E731 - only the bookkeeping is tested
    model = lambda pixel_values: torch.zeros(len(pixel_values), 5)
    # every key but labels / dataset_ids / indices reaches the model as a keyword argument
    batch = {
        "pixel_values": torch.zeros(2, 3, 4, 4), "labels": torch.tensor([2, 1]),
        "dataset_ids": torch.tensor([0, 1])
    }
    logits, targets = classify(model, batch, num_classes, offsets)
    assert targets.tolist() == [2, 4]
    assert torch.isinf(logits[0, 3:]).all() and torch.isinf(logits[1, :3]).all()


def _tiny_backbone_configs():
    from transformers import (CLIPConfig, ConvNextConfig, Dinov2Config, ResNetConfig, SiglipConfig,
                              ViTConfig)
    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 image_size=32, patch_size=8)
    return {
        "vit": ViTConfig(**tower),
        "dinov2": Dinov2Config(**tower),
        "resnet": ResNetConfig(embedding_size=16, hidden_sizes=[16, 24], depths=[1, 1]),
        "convnext": ConvNextConfig(hidden_sizes=[16, 24], depths=[1, 1], num_stages=2),
        "clip": CLIPConfig(
            vision_config=tower, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64)),
        "siglip": SiglipConfig(
            vision_config=tower, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64)),
    }


@pytest.mark.parametrize("kind", ["vit", "dinov2", "resnet", "convnext", "clip", "siglip"])
def test_backbones_load_from_a_folder_and_round_trip_through_a_checkpoint(kind, tmp_path):
    from transformers import AutoModel, ViTImageProcessorPil
    config = _tiny_backbone_configs()[kind]
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "src")
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "src")

    backbone, inputs = load_backbone(str(tmp_path / "src"))
    if kind in ("clip", "siglip"):  # two-tower checkpoints: only the vision tower is kept
        assert "Vision" in type(backbone).__name__
    model = MaskedClassifier(backbone, num_labels=7, inputs=inputs).eval()
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()

    save_classifier(model, inputs, str(tmp_path / "ckpt"),
                    {"num_labels": 7, "label_space": "shared", "datasets": {}})
    assert {"config.json", "model.safetensors", "head.safetensors", "classifier.json",
            "preprocessor_config.json"} <= set(os.listdir(tmp_path / "ckpt"))
    reloaded, _, info = load_classifier(str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=pixel_values), logits)
    # The fine-tuned backbone is a plain Hugging Face folder.
    plain = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert type(plain).__name__ == type(backbone).__name__


def test_unknown_model_folder_and_preset_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown preset"):
        load_backbone("preset:nope")


@pytest.mark.parametrize("name", ["resnet-tiny", "vit-tiny", "convnext-tiny"])
def test_presets_build_a_backbone_and_its_preprocessing(name):
    from PIL import Image
    backbone, inputs = load_backbone(f"preset:{name}", seed=1)
    again, _ = load_backbone(f"preset:{name}", seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(backbone.state_dict().values(),
                                          again.state_dict().values()))
    batch = inputs([Image.new("RGB", (8, 8)), Image.new("RGB", (25, 25))], ["digits", "faces"])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert MaskedClassifier(backbone, 10, inputs=inputs).eval()(**batch).shape == (2, 10)


def test_a_folder_backbone_trains_in_train_mode_and_frozen_parts_stay_in_eval_mode(
        tiny_qwen2_5_vl):
    from backbone import eval_mode, load_backbone, restore_modes, train_mode, vision_language_parts
    from model import MaskedClassifier, set_trainable
    backbone, inputs = load_backbone(tiny_qwen2_5_vl)
    assert not backbone.training  # from_pretrained hands it over in eval mode
    model = MaskedClassifier(backbone, 3, inputs=inputs)
    set_trainable(model, freeze="vision")
    train_mode(model)
    vision, language = vision_language_parts(backbone)
    assert model.training and model.head.training and language.training
    assert not any(m.training for m in vision.modules())  # frozen: statistics and dropout still
    modes = eval_mode(model)
    assert not any(m.training for m in model.modules())
    restore_modes(modes)
    assert language.training and not vision.training
