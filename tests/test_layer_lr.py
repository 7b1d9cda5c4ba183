"""Learning rates by part: --layer_decay over a vision backbone's blocks, --vision_lr /
--merger_lr for vision-language backbones; every parameter in exactly one group."""
from argparse import Namespace

import pytest
import torch

from conftest import save_tiny_vlm
from backbone import load_backbone
from model import MaskedClassifier
from backbone import layer_blocks
from optimizer import check_lr_args, format_groups, make_optimizer, parameter_groups, set_lr


def args_of(**kw):
    return Namespace(**{"lr": 1e-3, "weight_decay": 0.05, "layer_decay": None, "vision_lr": None,
                        "merger_lr": None, **kw})


def classifier(path_or_preset):
    backbone, inputs = load_backbone(path_or_preset)
    return MaskedClassifier(backbone, 5, inputs=inputs)


def scales_by_name(model, args):
    groups = parameter_groups(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} is in two groups"
            out[names[id(p)]] = (g["lr_scale"], g["weight_decay"])
    assert set(out) == {n for n, p in model.named_parameters() if p.requires_grad}
    return out


def test_layer_decay_on_vit_places_tokens_with_the_embeddings(tmp_path):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, image_size=16, patch_size=4)
    ViTModel(config).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    model = classifier(str(tmp_path))
    d = 0.5
    scales = scales_by_name(model, args_of(layer_decay=d))
    depth = 4  # 3 blocks + 1
    for name, (scale, wd) in scales.items():
        if name.startswith("backbone.embeddings."):  # cls token, position embeddings, patches
            expected = d ** depth
        elif name.startswith("backbone.layers."):
            expected = d ** (depth - (int(name.split(".")[2]) + 1))
        else:  # final layernorm, pooler, head
            assert name.startswith(("backbone.layernorm", "backbone.pooler", "head")), name
            expected = 1.0
        assert scale == pytest.approx(expected), name
        assert wd == (0.05 if model.get_parameter(name).dim() >= 2 else 0.0), name
    for token in ("cls_token", "position_embeddings"):
        assert scales[f"backbone.embeddings.{token}"][0] == pytest.approx(d ** depth)


def test_register_tokens_go_with_the_embeddings(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    from transformers import ViTImageProcessorPil
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       mlp_ratio=2, image_size=16, patch_size=4,
                                       num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    model = classifier(str(tmp_path))
    scales = scales_by_name(model, args_of(layer_decay=0.7))
    assert scales["backbone.embeddings.register_tokens"][0] == pytest.approx(0.7 ** 3)
    assert scales["backbone.embeddings.cls_token"][0] == pytest.approx(0.7 ** 3)
    assert scales["backbone.embeddings.mask_token"][0] == pytest.approx(0.7 ** 3)
    assert scales["head.weight"][0] == 1.0


def test_set_lr_gives_each_group_its_scaled_rate(tiny_vit):
    model = classifier(tiny_vit)
    optimizer = make_optimizer(model, args_of(layer_decay=0.5), torch.device("cpu"))
    set_lr(optimizer, 2e-3)
    by_name = {(g["name"], g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert by_name[("embeddings", 0.05)] == pytest.approx(2e-3 * 0.5 ** 3)
    assert by_name[("backbone.layers.0", 0.05)] == pytest.approx(2e-3 * 0.25)
    assert by_name[("backbone.layers.1", 0.0)] == pytest.approx(2e-3 * 0.5)
    assert by_name[("head and final layers", 0.05)] == pytest.approx(2e-3)
    table = format_groups(optimizer.param_groups, 1e-3)
    assert "embeddings" in table and "head and final layers" in table and "0.000125" in table
    assert len(table.splitlines()) == 2 + len(optimizer.param_groups)


def test_without_part_rates_the_groups_are_todays(tiny_vit):
    model = classifier(tiny_vit)
    for args in (args_of(), args_of(layer_decay=1.0)):
        groups = parameter_groups(model, args)
        assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.05), (1.0, 0.0)]


def test_convnext_and_resnet_decay_by_stage():
    convnext = classifier("preset:convnext-tiny")
    assert [n for n, _ in layer_blocks(convnext.backbone)] == [
        f"encoder.stages.{i}" for i in range(3)]
    scales = scales_by_name(convnext, args_of(layer_decay=0.5))
    assert scales["backbone.embeddings.patch_embeddings.weight"][0] == 0.5 ** 4
    assert scales["backbone.encoder.stages.1.downsampling_layer.0.weight"][0] == 0.5 ** 2
    assert scales["backbone.encoder.stages.2.layers.0.dwconv.weight"][0] == 0.5
    assert scales["backbone.layernorm.weight"][0] == 1.0
    resnet = classifier("preset:resnet-tiny")
    scales = scales_by_name(resnet, args_of(layer_decay=0.5))
    assert scales["backbone.embedder.embedder.convolution.weight"][0] == 0.5 ** 4
    assert {s for n, (s, _) in scales.items() if n.startswith("backbone.encoder.stages.1.")} == {
        0.5 ** 2}
    assert scales["head.weight"][0] == 1.0


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm_lr"), "qwen2_5_vl")


def test_vision_merger_and_llm_rates_on_qwen2_5_vl(tiny_vlm):
    model = classifier(tiny_vlm)
    args = args_of(vision_lr=2e-4, merger_lr=5e-4)
    check_lr_args(args, token_inputs=True)
    scales = scales_by_name(model, args)
    vision = [n for n in scales if n.startswith("backbone.visual.")]
    assert vision
    for name in vision:
        expected = 0.5 if name.startswith("backbone.visual.merger.") else 0.2
        assert scales[name][0] == pytest.approx(expected), name
    others = [n for n in scales if n not in vision]
    assert any(n.startswith("backbone.language_model.") for n in others) and "head.weight" in others
    assert all(scales[n][0] == 1.0 for n in others)
    # --vision_lr alone: the merger stays at --lr
    scales = scales_by_name(model, args_of(vision_lr=1e-4))
    assert scales["backbone.visual.merger.mlp.0.weight"][0] == 1.0
    assert scales["backbone.visual.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.1)


def test_bad_values_are_refused(tiny_vit):
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--layer_decay must be in"):
            check_lr_args(args_of(layer_decay=bad), token_inputs=False)
    with pytest.raises(ValueError, match="--vision_lr is for vision-language"):
        check_lr_args(args_of(vision_lr=1e-4), token_inputs=False, model_name="ViTModel")
    with pytest.raises(ValueError, match="--layer_decay is for vision backbones"):
        check_lr_args(args_of(layer_decay=0.8), token_inputs=True)
    with pytest.raises(ValueError, match="--merger_lr must be"):
        check_lr_args(args_of(merger_lr=-1.0), token_inputs=True)
