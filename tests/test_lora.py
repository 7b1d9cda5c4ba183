"""LoRA through peft: the base model at init, what trains, merged weights that load without
peft, training / resume / FSDP2 through train.py, and the errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from conftest import (ROOT, assert_same_adam_steps, killed_after, read_jsonl, run_script,
                      save_tiny_vlm, train_args)
from lora import (add_lora, adapter_state, check_lora_args, default_targets, merged_weights,
                  require_peft, trainable_summary)
from backbone import load_backbone
from model import MaskedClassifier
from optimizer import parameter_parts
from weights import whole, write_pretrained

# The refusals that need no peft run without it; the rest need the optional extra.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="LoRA needs the optional extra: pip install -e '.[lora]'")


def demo_images(demo_dir, n=3):
    rows = read_jsonl(demo_dir / "digits" / "train.jsonl")[:n]
    return [Image.open(demo_dir / "digits" / r["image_path"]).convert("RGB") for r in rows]


def build(folder):
    torch.manual_seed(0)
    backbone, inputs = load_backbone(folder)
    return MaskedClassifier(backbone, 4, inputs=inputs).eval(), inputs


def randomize_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


@needs_peft
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
    merged = {k: whole(v) for k, v in merged_weights(model.state_dict(), scaling=2).items()}
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain, _ = build(tiny_vit)
    plain.load_state_dict(merged)  # strict: exactly the plain model's names
    with torch.no_grad():
        # float32 matmuls of O(1) numbers: a different summation order moves them by ~1e-6
        torch.testing.assert_close(plain(**batch), adapted_logits, rtol=1e-4, atol=1e-5)
    # what a checkpoint does: the adapted backbone's folder with the merged weights
    backbone_part = {k[len("backbone."):]: v for k, v in merged_weights(
        model.state_dict(), scaling=2).items() if k.startswith("backbone.")}
    write_pretrained(model.backbone, str(tmp_path), backbone_part, rank=0)
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


@needs_peft
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
    plain.load_state_dict({k: whole(v) for k, v in
                           merged_weights(model.state_dict(), scaling=1.0).items()})
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch), adapted_logits, rtol=1e-4, atol=1e-5)
    merger = adapter_state(model.state_dict(), train=["visual.merger"])
    assert any(k.startswith("backbone.visual.merger.") for k in merger)


@needs_peft
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


@needs_peft
def test_explicit_targets_match_as_peft_does(tiny_vit):
    model, _ = build(tiny_vit)
    adapted = add_lora(model, rank=2, targets=["q_proj", "layers.1.mlp.fc1"])
    assert adapted == sorted(["layers.0.attention.q_proj", "layers.1.attention.q_proj",
                              "layers.1.mlp.fc1"])


@needs_peft
def test_layer_decay_runs_each_adapter_at_its_blocks_rate(tiny_vit):
    from argparse import Namespace
    model, _ = build(tiny_vit)
    add_lora(model, rank=2)
    args = Namespace(lr=1e-3, weight_decay=0.05, layer_decay=0.5, vision_lr=None, merger_lr=None)
    scales = {n: scale for _, scale, params in parameter_parts(model, args) for n, _ in params}
    # only the adapters and the head are grouped; block i of 2 at 0.5^(3 - i), the head at 1
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, scale in scales.items():
        block = name.split(".")[2] if name.startswith("backbone.layers.") else None
        assert scale == {"0": 0.25, "1": 0.5, None: 1.0}[block], name


LORA = ["--lora_rank", 4, "--lora_alpha", 8, "--lora_dropout", 0.1]


@needs_peft
def test_lora_training_resumes_exactly_and_its_checkpoint_evaluates_without_peft(
        small_data, tiny_vit, tmp_path):
    """Only the adapters and the head train; a resumed run ends bitwise where an uninterrupted one
    does (dropout draws included); model.safetensors holds the merged backbone under the plain
    names, and eval.py without peft gets the numbers the in-memory adapted model got."""
    common = ["--max_steps", 6, "--save_steps", 3, "--eval_steps", 3, "--logging_steps", 1,
              "--lr", 1e-2, "--save_all_checkpoints", "--pooling", "mean", *LORA]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(train_args(small_data, tiny_vit, full, *common))
    killed_after(full / "checkpoint-3", resumed)
    train.main(train_args(small_data, tiny_vit, resumed, *common, "--resume", "latest"))
    for name in ("model.safetensors", "head.safetensors", "adapter.safetensors"):
        a, b = (load_file(run / "checkpoint-6" / name) for run in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    checkpoint = full / "checkpoint-6"
    with open(checkpoint / "classifier.json") as f:
        info = json.load(f)["lora"]
    assert (info["rank"], info["alpha"], info["dropout"]) == (4, 8, 0.1)
    adapted = set(info["targets"])
    assert len(adapted) == 12  # q, k, v, o, fc1, fc2 of 2 blocks
    adapters = load_file(checkpoint / "adapter.safetensors")
    assert {k.split(".lora_")[0] for k in adapters} == {f"backbone.{n}" for n in adapted}
    assert len(adapters) == 2 * len(adapted)
    # the merged backbone: the base model's names; only the adapted linears' weights moved
    # (read back as a user does: transformers renames some weights in the file)
    base, merged = (load_backbone(str(f))[0].state_dict() for f in (tiny_vit, checkpoint))
    assert merged.keys() == base.keys()
    for key, value in merged.items():
        moved = key.endswith(".weight") and key[:-len(".weight")] in adapted
        assert torch.equal(value, base[key]) != moved, key

    final = [r for r in read_jsonl(full / "metrics.jsonl") if r["event"] == "final_eval"][0]
    blocked = ("import runpy, sys; sys.modules['peft'] = None; sys.argv[0] = 'eval.py'; "
               "runpy.run_path('eval.py', run_name='__main__')")  # as if peft were not installed
    result = subprocess.run([sys.executable, "-c", blocked, final["checkpoint"], "--num_workers",
                             "0"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_jsonl(full / "eval_results.jsonl")[0]
    for key, value in final.items():
        if key.startswith("final_eval_") and key.endswith(("_samples", "_correct", "_loss")):
            assert row[key.replace("final_", "")] == pytest.approx(value, rel=1e-5), key


@needs_peft
def test_lora_on_qwen2_5_vl_under_fsdp2_and_ddp_takes_the_steps_of_one_process(
        small_data, tiny_qwen2_5_vl, tmp_path):
    """2 FSDP2 processes and 2 DDP processes (gloo): the adapters of the LLM, the merger
    (--lora_train, at its own --merger_lr) and the head take the steps one process takes; the
    vision tower stays as loaded; eval.py evaluates the merged FSDP2 checkpoint as training did."""
    common = ["--max_steps", 2, "--eval_steps", 2, "--save_steps", 2, "--lr", 1e-3,
              "--logging_steps", 1, "--no_final_eval", "--lora_rank", 2, "--lora_train",
              "visual.merger", "--merger_lr", 2e-3]
    train.main(train_args(small_data, tiny_qwen2_5_vl, tmp_path / "one", *common,
                          "--batch_size", 8))
    for dist in ("fsdp", "ddp"):
        two = run_script("train.py", *train_args(small_data, tiny_qwen2_5_vl, tmp_path / dist,
                                                 *common, "--batch_size", 4, "--dist", dist),
                         torchrun=2)
        assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
        assert "LoRA on 14 linear layer(s)" in two.stdout
        assert "merger" in two.stdout and "0.002" in two.stdout  # its optimizer group
        assert ("FSDP2 over 2 processes: 3 block(s) + the root sharded" in two.stdout) == (
            dist == "fsdp")

    def trained(run):
        folder = tmp_path / run / "checkpoint-2"
        return {**load_file(folder / "adapter.safetensors"),
                **{f"head.{k}": v for k, v in load_file(folder / "head.safetensors").items()}}

    one, sharded = trained("one"), trained("fsdp")
    assert any(k.startswith("backbone.visual.merger.") for k in sharded)
    assert_same_adam_steps(one, sharded, lr=2e-3, steps=2)
    assert_same_adam_steps(one, trained("ddp"), lr=2e-3, steps=2)
    base = load_backbone(tiny_qwen2_5_vl)[0].state_dict()
    merged = load_backbone(str(tmp_path / "fsdp" / "checkpoint-2"))[0].state_dict()
    assert merged.keys() == base.keys()
    assert all(torch.equal(v, base[k]) for k, v in merged.items()
               if k.startswith("visual.") and not k.startswith("visual.merger."))
    assert not torch.equal(merged["visual.merger.mlp.0.weight"], base["visual.merger.mlp.0.weight"])
    assert not torch.equal(merged["language_model.layers.0.self_attn.q_proj.weight"],
                           base["language_model.layers.0.self_attn.q_proj.weight"])

    import eval as eval_script
    eval_script.main([str(tmp_path / "fsdp" / "checkpoint-2"), "--num_workers", "0", "--partial"])
    row = read_jsonl(tmp_path / "fsdp" / "eval_results.jsonl")[0]
    during = [r for r in read_jsonl(tmp_path / "fsdp" / "metrics.jsonl") if r["event"] == "eval"][0]
    assert row["eval_overall_samples"] == during["eval_overall_samples"]
    assert row["eval_overall_loss"] == pytest.approx(during["eval_overall_loss"], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--lora_alpha", 8, "--lora_targets", "q_proj"],
     "--lora_alpha, --lora_targets: no effect without --lora_rank"),
    (["--lora_rank", -1], "--lora_rank must be a whole number >= 0"),
    (["--lora_rank", 2, "--lora_dropout", 1], "--lora_dropout must be in [0, 1)"),
    (["--lora_rank", 2, "--train_only_head"], "cannot be combined with --lora_rank"),
    (["--lora_rank", 2, "--freeze", "vision"], "cannot be combined with --lora_rank"),
    ("no peft", "--lora_rank needs peft: pip install -e '.[lora]'"),
    pytest.param(["--lora_rank", 2, "--lora_targets", "q_proj", "qkv"],
                 "--lora_targets qkv: no linear layer of ViTModel is named so; its linear layers "
                 "are named dense, fc1, fc2, k_proj, o_proj, q_proj, v_proj", marks=needs_peft),
    pytest.param(["--lora_rank", 2, "--lora_train", "visual.merger"],
                 "--lora_train visual.merger: no such module in ViTModel", marks=needs_peft),
    pytest.param(["--lora_rank", 2, "--model", "preset:resnet-tiny"],
                 "ResNetModel has no linear layers in its blocks", marks=needs_peft),
    pytest.param(["--lora_rank", 2, "--model", "QWEN", "--vision_lr", 1e-4],
                 "--vision_lr: nothing in the vision tower of Qwen2_5_VLModel trains",
                 marks=needs_peft),
    pytest.param(["--lora_rank", 2, "--task", "generate"], "--lora_rank: for --task classify",
                 marks=needs_peft),
])
def test_lora_refusals_stop_before_the_first_step(small_data, tiny_vit, tiny_qwen2_5_vl, demo_dir,
                                                  tmp_path, monkeypatch, capsys, extra, message):
    argv = train_args(small_data, tiny_vit, tmp_path, "--max_steps", 1)
    if extra == "no peft":
        monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
        extra = ["--lora_rank", 2]
    if "QWEN" in extra:
        extra[extra.index("QWEN")] = tiny_qwen2_5_vl
    if "generate" in extra:
        generate = str(demo_dir / "digits" / "generate_train.jsonl")
        argv = ["--model", tiny_vit, "--train_jsonl", generate, "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        train.main(argv + [str(a) for a in extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoint-1")


@needs_peft
def test_lora_with_an_ema_writes_checkpoints_with_the_ema_adapters(small_data, tiny_vit, tmp_path):
    """checkpoint-N/ema holds the EMA model in the same files, adapters included; eval.py reads
    it."""
    import eval as eval_script
    train.main(train_args(small_data, tiny_vit, tmp_path, "--max_steps", 2, "--save_steps", 2,
                          "--skip_evaluation", "--pooling", "mean", "--ema_decay", 0.5, *LORA))
    ema = tmp_path / "checkpoint-2" / "ema"
    averaged, live = (load_file(folder / "adapter.safetensors")
                      for folder in (ema, tmp_path / "checkpoint-2"))
    assert averaged.keys() == live.keys()
    assert any(not torch.equal(averaged[k], live[k]) for k in live)  # the EMA's, not the live
    eval_script.main([str(ema), "--num_workers", "0"])
    assert read_jsonl(tmp_path / "eval_results.jsonl")[0]["checkpoint"] == "checkpoint-2/ema"
