"""--attn_implementation reaches every loaded model; flash_attention_2 is refused where it cannot
run; a model class without the implementation asked for is named."""
import importlib.util

import pytest
import torch

import train
from conftest import train_args
from backbone import LOADING, check_attn_implementation, load_backbone
from tasks.generate.batches import GenerationDataset, collate_sequences
from tasks.generate.model import UnifiedModel, load_language_model, unified_losses
from tasks.generate.patches import ImageSpec
from tasks.generate.records import read_generation_files


@pytest.fixture
def attention(monkeypatch):
    """Set LOADING.attn_implementation for one test (train.py / eval.py set it from the flag)."""
    return lambda value: monkeypatch.setattr(LOADING, "attn_implementation", value)


@pytest.mark.parametrize("asked, expected", [(None, "sdpa"), ("sdpa", "sdpa"),
                                             ("eager", "eager")])
def test_the_flag_reaches_vision_and_vision_language_backbones(tiny_vit, tiny_qwen2_vl, attention,
                                                               asked, expected):
    attention(asked)
    vit, _ = load_backbone(tiny_vit)
    assert vit.config._attn_implementation == expected
    vlm, _ = load_backbone(tiny_qwen2_vl)
    configs = [vlm.config, vlm.config.vision_config, vlm.config.text_config,
               vlm.language_model.config]
    assert [c._attn_implementation for c in configs] == [expected] * 4
    preset, _ = load_backbone("preset:vit-tiny")
    assert preset.config._attn_implementation == expected


def test_train_py_passes_the_flag_to_the_model_it_trains(small_data, tiny_vit, tmp_path, capsys):
    train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 1, "--skip_evaluation",
                          "--attn_implementation", "eager"))
    assert "attention: eager" in capsys.readouterr().out


def test_a_model_without_sdpa_takes_eager_by_default_and_refuses_sdpa(attention):
    backbone, _ = load_backbone("preset:resnet-tiny")  # no attention layers at all
    assert backbone.config._attn_implementation == "eager"
    attention("sdpa")
    with pytest.raises(ValueError, match="ResNetModel does not support it"):
        load_backbone("preset:resnet-tiny")


def test_flash_attention_2_is_refused_without_its_package_or_a_gpu(monkeypatch, small_data,
                                                                   tiny_vit, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        check_attn_implementation("flash_attention_2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_attn_implementation("flash_attention_2")
    monkeypatch.undo()
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return
    # through the command line, before any data or model is read
    with pytest.raises(SystemExit) as e:
        train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 1,
                              "--attn_implementation", "flash_attention_2"))
    assert e.value.code == 2 and "flash_attention_2 needs" in capsys.readouterr().err


def test_generation_model_takes_sdpa_or_eager_alike_and_refuses_flash(tiny_lm, demo_dir, tmp_path,
                                                                       attention):
    from conftest import read_jsonl, write_jsonl
    rows = read_jsonl(demo_dir / "digits" / "val.jsonl")[:4]
    path = write_jsonl(tmp_path / "gen.jsonl", [
        {"text_prompt": f"digit {r['label']}", "image_path": str(demo_dir / "digits" /
                                                                  r["image_path"])}
        for r in rows])
    spec = ImageSpec(image_size=8, patch_size=2, channels=1)
    conversations = read_generation_files([path])
    losses = {}
    for asked in ("sdpa", "eager"):
        attention(asked)
        lm, tokenizer = load_language_model(tiny_lm)
        assert lm.config._attn_implementation == asked
        torch.manual_seed(0)
        model = UnifiedModel(lm, spec).eval()
        dataset = GenerationDataset(conversations, tokenizer, spec, seed=0)
        batch = collate_sequences([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            losses[asked] = torch.stack(unified_losses(model, batch))
    torch.testing.assert_close(losses["sdpa"], losses["eager"], rtol=1e-4, atol=1e-5)
    attention("flash_attention_2")
    with pytest.raises(ValueError, match="needs sdpa or eager"):
        load_language_model(tiny_lm)
