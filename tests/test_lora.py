"""LoRA through peft: the base model at init, what trains, merged weights that load without
peft, and the errors."""
import sys

import pytest
import torch
from PIL import Image

from conftest import read_jsonl, save_tiny_vlm
from lora import (add_lora, adapter_state, check_lora_args, default_targets, merged_state_dict,
                  require_peft, trainable_summary)
from model import MaskedClassifier, load_backbone

peft = pytest.importorskip("peft", reason="LoRA needs the optional extra: pip install -e '.[lora]'")


def demo_images(demo_dir, n=3):
    rows = read_jsonl(demo_dir / "digits" / "train.jsonl")[:n]
    return [Image.open(demo_dir / "digits" / r["image_path"]).convert("RGB") for r in rows]


def build(folder):
    torch.manual_seed(0)
    backbone, inputs = load_backbone(folder)
    return MaskedClassifier(backbone, 4).eval(), inputs


def randomize_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def test_vit_lora_starts_as_the_base_and_merges_into_a_plain_backbone(tiny_vit, demo_dir,
                                                                      tmp_path):
    model, inputs = build(tiny_vit)
    batch = inputs(demo_images(demo_dir), ["digits"] * 3)
    with torch.no_grad():
        base = model(**batch)
    expected = default_targets(model.backbone)
    adapted = add_lora(model, rank=4, alpha=8, dropout=0.1)
    assert adapted == expected
    assert adapted and all(n.startswith("layers.") for n in adapted)  # the blocks' linears
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), base)  # lora_B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")}
    assert {"head.weight", "head.bias"} <= trainable and len(trainable) == 2 + 2 * len(adapted)
    assert "trainable" in trainable_summary(model, adapted)

    randomize_lora_b(model)
    with torch.no_grad():
        adapted_logits = model(**batch)
    assert not torch.allclose(adapted_logits, base, atol=1e-4)
    merged = merged_state_dict(model.state_dict(), scaling=8 / 4)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain, _ = build(tiny_vit)
    plain.load_state_dict(merged)  # strict: exactly the plain model's names
    with torch.no_grad():
        # float32 matmuls of O(1) numbers: a different summation order moves them by ~1e-6
        torch.testing.assert_close(plain(**batch), adapted_logits, rtol=1e-4, atol=1e-5)
    # what a checkpoint does: save_pretrained of the adapted backbone with the merged weights
    backbone_part = {k[len("backbone."):]: v for k, v in merged.items()
                     if k.startswith("backbone.")}
    model.backbone.save_pretrained(tmp_path, state_dict=backbone_part)
    inputs.save_pretrained(tmp_path)
    reloaded, _ = build(str(tmp_path))
    reloaded.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch), adapted_logits, rtol=1e-4, atol=1e-5)
    adapters = adapter_state(model.state_dict())
    assert adapters and all(".lora_" in k for k in adapters)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm_lora"), "qwen2_5_vl")


def test_qwen2_5_vl_adapts_the_language_model_and_trains_the_merger(tiny_vlm, demo_dir):
    model, inputs = build(tiny_vlm)
    batch = inputs(demo_images(demo_dir, 2), ["digits", "digits"])
    with torch.no_grad():
        base = model(**batch)
    adapted = add_lora(model, rank=2, train=["visual.merger"])
    assert adapted and all(n.startswith("language_model.layers.") for n in adapted)
    leaves = {n.rsplit(".", 1)[-1] for n in adapted}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), base)
    for name, p in model.named_parameters():
        expected = (".lora_" in name or name.startswith("head.")
                    or name.startswith("backbone.visual.merger."))
        assert p.requires_grad == expected, name
    randomize_lora_b(model)
    with torch.no_grad():
        adapted_logits = model(**batch)
    plain, _ = build(tiny_vlm)
    plain.load_state_dict(merged_state_dict(model.state_dict(), scaling=1.0))
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch), adapted_logits, rtol=1e-4, atol=1e-5)
    merger = adapter_state(model.state_dict(), train=["visual.merger"])
    assert any(k.startswith("backbone.visual.merger.") for k in merger)


def test_errors(tiny_vit, monkeypatch):
    model, _ = build(tiny_vit)
    with pytest.raises(ValueError, match=r"--lora_targets qkv: .*named .*q_proj"):
        add_lora(model, rank=2, targets=["q_proj", "qkv"])
    with pytest.raises(ValueError, match="--lora_train visual.merger: no such module"):
        add_lora(model, rank=2, train=["visual.merger"])
    resnet, _ = build("preset:resnet-tiny")
    with pytest.raises(ValueError, match="no linear layers"):
        add_lora(resnet, rank=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="--lora_rank"):
            check_lora_args(bad, None, 0.0)
    with pytest.raises(ValueError, match="--lora_dropout"):
        check_lora_args(4, 8, 1.0)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"pip install -e '.\[lora\]'"):
        require_peft()


def test_explicit_targets_match_as_peft_does(tiny_vit):
    model, _ = build(tiny_vit)
    adapted = add_lora(model, rank=2, targets=["q_proj", "layers.1.mlp.fc1"])
    assert adapted == sorted(["layers.0.attention.q_proj", "layers.1.attention.q_proj",
                              "layers.1.mlp.fc1"])
