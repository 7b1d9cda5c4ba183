"""Qwen2-VL / Qwen2.5-VL as the masked classifier: tiny models built from configs with a tokenizer
trained here, saved with save_pretrained and loaded back through --model FOLDER."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (assert_same_adam_steps, assert_same_weights, killed_after, load_weights,
                      read_jsonl, run_script, save_tiny_vlm, train_args)
from backbone import enable_activation_checkpointing, fsdp_units, load_backbone
from families import llava
from model import MaskedClassifier, set_trainable

KINDS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(params=KINDS)
def vlm_folder(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


SIZES = [(8, 8), (60, 100), (84, 84), (120, 40)]  # four different image grids
NAMES = ["digits", "faces", "digits", "faces"]


def test_prompt_placeholders_and_mm_token_type_ids(vlm_folder):
    backbone, inputs = load_backbone(vlm_folder)
    config = backbone.config
    batch = inputs(random_images(SIZES), NAMES)
    grids = batch["image_grid_thw"]
    assert len({tuple(g.tolist()) for g in grids}) == 4  # one batch, four grid shapes
    assert batch["pixel_values"].shape[0] == grids.prod(-1).sum()
    for row in range(len(SIZES)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        types = batch["mm_token_type_ids"][row][batch["attention_mask"][row].bool()]
        image = (ids == config.image_token_id).nonzero().flatten()
        # as many placeholders as merged patches, contiguous, framed by vision start / end
        assert len(image) == grids[row].prod() // 4
        assert image.tolist() == list(range(image[0], image[0] + len(image)))
        assert ids[image[0] -
                   1] == config.vision_start_token_id and ids[image[-1] +
                                                              1] == config.vision_end_token_id
        assert types.tolist() == (ids == config.image_token_id).long().tolist()
        text = inputs.tokenizer.decode(ids)
        assert f"Classify this {NAMES[row]} image." in text and text.endswith(
            "<|im_start|>assistant\n")
    assert (batch["mm_token_type_ids"][batch["attention_mask"] == 0] == 0).all()


def test_without_torchvision_the_processor_runs_without_its_video_processor(tiny_qwen2_vl,
                                                                            tmp_path, capsys):
    """AutoProcessor cannot load here (Qwen2VLProcessor's video processor needs torchvision), so
    the same class is built from the image processor and tokenizer alone (said once). Its batch
    is the one built here by hand: each image's placeholder repeated
    grid_t * grid_h * grid_w / merge_size^2 times, and mm_token_type_ids marking those tokens."""
    folder = shutil.copytree(tiny_qwen2_vl, tmp_path / "qwen2_vl")
    for _ in range(2):
        _, inputs = load_backbone(str(folder))
    assert capsys.readouterr().out.count("images go through Qwen2VLProcessor without it") == 1
    assert type(inputs.processor).__name__ == "Qwen2VLProcessor"
    assert not hasattr(inputs.processor, "video_processor")
    images = random_images(SIZES)
    vision = inputs.image_processor(images=images, return_tensors="pt")
    counts = (vision["image_grid_thw"].prod(-1) // inputs.image_processor.merge_size**2).tolist()
    texts = [inputs.text(n).replace("<|image_pad|>", "<|image_pad|>" * k)
             for n, k in zip(NAMES, counts)]
    text = inputs.tokenizer(texts, padding=True, return_tensors="pt")
    image_id = inputs.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    expected = {**text, **vision, "mm_token_type_ids": (text["input_ids"] == image_id).long()}
    got = inputs(images, NAMES)
    assert set(got) == set(expected)
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def features(model, batch):
    with torch.no_grad():
        return model.features(**batch)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_left_and_right_padding_and_batching_give_the_same_features(vlm_folder, pooling):
    backbone, inputs = load_backbone(vlm_folder)
    model = MaskedClassifier(backbone, 10, pooling, inputs=inputs).eval()
    images = random_images(SIZES)
    inputs.tokenizer.padding_side = "right"
    right = features(model, inputs(images, NAMES))
    inputs.tokenizer.padding_side = "left"
    left_batch = inputs(images, NAMES)
    assert (left_batch["attention_mask"][:, 0] == 0).any()  # there is left padding
    left = features(model, left_batch)
    alone = torch.cat([features(model, inputs([im], [n])) for im, n in zip(images, NAMES)])
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)


def test_multimodal_rope_needs_mm_token_type_ids(tiny_qwen2_vl, tiny_qwen2_5_vl):
    for folder in (tiny_qwen2_vl, tiny_qwen2_5_vl):
        backbone, inputs = load_backbone(folder)
        model = MaskedClassifier(backbone, 10, inputs=inputs).eval()
        batch = inputs(random_images(SIZES[:2]), NAMES[:2])
        without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        if "Qwen2_5" in type(backbone).__name__:  # silently falls back to 1-D positions
            assert not torch.allclose(features(model, batch), features(model, without), atol=1e-4)
        else:
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                features(model, without)


def test_pixel_bounds_reach_the_image_processor(tiny_qwen2_5_vl):
    _, small = load_backbone(tiny_qwen2_5_vl, max_pixels=56 * 56)
    _, large = load_backbone(tiny_qwen2_5_vl, min_pixels=112 * 112)
    image = random_images([(60, 100)])
    assert small(image, ["faces"])["image_grid_thw"].prod() <= 16
    assert large(image, ["faces"])["image_grid_thw"].prod() >= 64
    with pytest.raises(ValueError, match="larger than --max_pixels"):
        load_backbone(tiny_qwen2_5_vl, min_pixels=112 * 112, max_pixels=56 * 56)


def test_a_folder_without_chat_template_uses_the_plain_prompt(tmp_path):
    folder = save_tiny_vlm(tmp_path / "plain", "qwen2_vl", chat_template=False)
    _, inputs = load_backbone(folder, prompt="Which {dataset} class?")
    assert inputs.text(
        "food101") == "<|vision_start|><|image_pad|><|vision_end|>Which food101 class?"


def test_hub_checkpoint_layout_loads(tiny_qwen2_5_vl, tmp_path):
    """Qwen2.5-VL folders on the Hub keep the pre-5.x names (model.layers.*, visual.*)."""
    import re
    import shutil
    from safetensors.torch import load_file, save_file
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_qwen2_5_vl, legacy)
    weights = load_file(legacy / "model.safetensors")
    renamed = {
        re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", k)): v
        for k, v in weights.items()
    }
    assert "model.layers.0.mlp.up_proj.weight" in renamed
    assert "visual.merger.mlp.0.weight" in renamed
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    a, _ = load_backbone(tiny_qwen2_5_vl)
    b, _ = load_backbone(str(legacy))
    assert_same_weights(a.state_dict(), b.state_dict(), atol=0)


def test_freeze_choices_and_fsdp_units(tiny_qwen2_vl, tiny_vit):
    def trainable(model):
        return {
            n.split(".")[0] if n.startswith("head") else n.split(".")[1]
            for n, p in model.named_parameters() if p.requires_grad
        }

    for freeze, expected in [("none", {"visual", "language_model", "head"}),
                             ("vision", {"language_model", "head"}), ("llm", {"visual", "head"})]:
        backbone, inputs = load_backbone(tiny_qwen2_vl)
        model = MaskedClassifier(backbone, 10, inputs=inputs)
        set_trainable(model, freeze)
        assert trainable(model) == expected, freeze
    backbone, inputs = load_backbone(tiny_qwen2_vl)
    model = MaskedClassifier(backbone, 10, inputs=inputs)
    count, total = set_trainable(model, train_only_head=True)
    assert trainable(model) == {"head"} and count == 64 * 10 + 10 and total > count

    units = fsdp_units(model.backbone)
    assert units[0] is model.backbone.visual  # the vision tower as one unit
    assert units[1:] == list(model.backbone.language_model.layers)
    vit, vit_inputs = load_backbone(tiny_vit)
    assert fsdp_units(vit) == [m for m in vit.modules() if type(m).__name__ == "ViTLayer"] and len(
        fsdp_units(vit)) == 2
    with pytest.raises(ValueError, match="has no language model"):
        set_trainable(MaskedClassifier(vit, 10, inputs=vit_inputs), "llm")


def test_gradient_checkpointing_gives_the_same_gradients(tiny_qwen2_5_vl):
    def grads(checkpointing):
        torch.manual_seed(0)
        backbone, inputs = load_backbone(tiny_qwen2_5_vl)
        model = MaskedClassifier(backbone, 10, inputs=inputs).train()
        if checkpointing:
            enable_activation_checkpointing(backbone)
        model(**inputs(random_images(SIZES), NAMES)).logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}
    plain, checkpointed = grads(False), grads(True)
    assert all(g is not None for g in plain.values())
    assert_same_weights(plain, checkpointed, atol=1e-6)


def test_pooling_choices_are_checked(tiny_qwen2_vl, tiny_vit):
    with pytest.raises(ValueError, match="use --pooling last or mean"):
        MaskedClassifier(load_backbone(tiny_qwen2_vl)[0], 10, "cls", inputs=None)
    with pytest.raises(ValueError, match="--pooling last is for vision-language"):
        vit, inputs = load_backbone(tiny_vit)
        MaskedClassifier(vit, 10, "last", inputs=inputs)


# ----------------------------------------------------------------------------- train.py / eval.py c

def train(*argv, torchrun=0):
    result = run_script("train.py", *argv, torchrun=torchrun)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_train_resume_and_eval_a_qwen2_5_vl_classifier(small_data, tiny_qwen2_5_vl, tmp_path):
    """Two datasets (10 and 2 classes) in one head with masking; resume from the middle is exact;
    eval.py evaluates every checkpoint of the run; the checkpoint is a plain HF folder."""
    common = [
        "--max_steps", 6, "--save_steps", 3, "--eval_steps", 3, "--logging_steps", 2,
        "--warmup_steps", 2, "--save_all_checkpoints", "--gradient_checkpointing"
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    out = train(*train_args(small_data, tiny_qwen2_5_vl, full, *common))
    assert "Qwen2_5_VLModel:" in out.stdout and "100.0%)" in out.stdout  # all parameters trainable
    killed_after(full / "checkpoint-3", resumed)
    train(*train_args(small_data, tiny_qwen2_5_vl, resumed, *common, "--resume", "latest"))
    a, b = load_weights(full / "checkpoint-6"), load_weights(resumed / "checkpoint-6")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert not torch.equal(a["head.weight"], load_weights(full / "checkpoint-3")["head.weight"])

    log = read_jsonl(full / "metrics.jsonl")
    final = [r for r in log if r["event"] == "final_eval"][0]
    assert (final["final_eval_digits_samples"], final["final_eval_faces_samples"]) == (21, 10)
    assert "final_eval_digits_top5_accuracy" in final
    assert "final_eval_faces_top5_accuracy" not in final

    checkpoint = full / "checkpoint-6"
    assert {
        "config.json", "model.safetensors", "head.safetensors", "classifier.json", "tokenizer.json",
        "preprocessor_config.json"
    } <= set(os.listdir(checkpoint))
    with open(checkpoint / "classifier.json") as f:
        info = json.load(f)
    assert (info["pooling"], info["prompt"]) == ("last", "Classify this {dataset} image.")
    from transformers import AutoModel, AutoTokenizer
    # the fine-tuned backbone, usable without this code
    plain = AutoModel.from_pretrained(checkpoint)
    assert type(plain).__name__ == "Qwen2_5_VLModel"
    assert AutoTokenizer.from_pretrained(checkpoint).chat_template

    result = run_script("eval.py", full, "--num_workers", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(full / "eval_results.jsonl")
    assert [r["checkpoint"] for r in rows] == ["checkpoint-3", "checkpoint-6"]
    # the best one
    same = [r for r in rows if r["checkpoint"] == os.path.basename(final["checkpoint"])][0]
    assert same["eval_overall_accuracy"] == pytest.approx(final["final_eval_overall_accuracy"])
    assert same["eval_overall_loss"] == pytest.approx(final["final_eval_overall_loss"], rel=1e-5)


def test_qwen2_vl_linear_probe_and_frozen_vision_in_bf16(small_data, tiny_qwen2_vl, tmp_path):
    from safetensors.torch import load_file
    original = load_backbone(tiny_qwen2_vl)[0].state_dict()
    runs = [(["--train_only_head"], ("visual", "language_model"), torch.float32),
            (["--freeze", "vision", "--param_dtype", "bf16", "--precision",
              "bf16"], ("visual", ), torch.bfloat16)]
    for options, frozen, dtype in runs:
        out = tmp_path / options[0].strip("-")
        train(*train_args(small_data, tiny_qwen2_vl, out, "--max_steps", 2, "--skip_evaluation",
                          "--lr", 1e-2, *options, "--prompt", "What {dataset} class is this?"))
        saved = load_file(out / "checkpoint-2" / "model.safetensors")
        assert {v.dtype for v in saved.values()} == {dtype}
        for name, value in saved.items():
            before = original[name].to(dtype)
            if name.split(".")[0] in frozen:
                assert torch.equal(value, before), name
            elif name.endswith("q_proj.weight"):
                assert not torch.equal(value, before), name
    # a bf16 checkpoint evaluates as saved, with the prompt it was trained with
    with open(out / "checkpoint-2" / "classifier.json") as f:
        assert json.load(f)["prompt"] == "What {dataset} class is this?"
    result = run_script("eval.py", out / "checkpoint-2", "--num_workers", 0, "--precision", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_jsonl(out / "eval_results.jsonl")[0]
    assert (row["eval_digits_samples"], row["eval_faces_samples"]) == (21, 10)


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_two_process_vlm_training_matches_one_process(small_data, tiny_qwen2_vl, tmp_path, dist):
    # FSDP2 units: the vision tower whole, then each decoder layer; the root holds embeddings, norm
    # and head.
    common = [
        "--max_steps", 2, "--eval_steps", 2, "--save_steps", 2, "--lr", 1e-3, "--logging_steps", 1,
        "--pooling", "mean", "--no_final_eval"
    ]
    train(*train_args(small_data, tiny_qwen2_vl, tmp_path / "one", *common, "--batch_size", 8))
    two = train(
        *train_args(small_data, tiny_qwen2_vl, tmp_path / "two", *common, "--batch_size", 4,
                    "--dist", dist), torchrun=2)
    if dist == "fsdp":
        assert "FSDP2 over 2 processes: 3 block(s) + the root sharded" in two.stdout
    assert_same_adam_steps(load_weights(tmp_path / "one" / "checkpoint-2"),
                           load_weights(tmp_path / "two" / "checkpoint-2"), lr=1e-3, steps=2)
    evals = [[r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["event"] == "eval"][0]
             for run in ("one", "two")]
    assert evals[0]["eval_overall_samples"] == evals[1]["eval_overall_samples"]
    assert evals[0]["eval_overall_loss"] == pytest.approx(evals[1]["eval_overall_loss"], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--pooling", "cls"], "use --pooling last or mean"),
    (["--freeze", "llm", "--model", "preset:resnet-tiny"], "has no language model"),
    (["--max_pixels", "3136", "--model", "preset:resnet-tiny"
      ], "preset:resnet-tiny takes a fixed input size"),
    (["--min_pixels", "0"], "--min_pixels must be a positive number of pixels"),
])
def test_bad_vision_language_options_are_clear_errors(small_data, tiny_qwen2_vl, tmp_path, extra,
                                                      message, capsys):
    import train as train_script
    with pytest.raises(SystemExit) as e:
        train_script.main(train_args(small_data, tiny_qwen2_vl, tmp_path, "--max_steps", 1, *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_other_image_text_to_text_models_go_through_their_processor(tmp_path):
    from model import load_classifier, save_classifier
    folder = llava(tmp_path / "llava")  # CLIP vision tower + Llama; its AutoProcessor loads here
    backbone, inputs = load_backbone(folder, prompt="Which {dataset}?")
    assert type(backbone).__name__ == "LlavaModel" and inputs.processor is not None
    assert inputs.text("digits") == "<image>Which digits?"
    model = MaskedClassifier(backbone, 10, inputs=inputs).eval()
    images = random_images([(8, 8), (30, 50)])
    inputs.tokenizer.padding_side = "left"
    left = inputs(images, ["digits", "food101"])  # prompts of different lengths
    assert (left["attention_mask"][:, 0] == 0).any()
    inputs.tokenizer.padding_side = "right"
    right = inputs(images, ["digits", "food101"])
    torch.testing.assert_close(features(model, left), features(model, right), atol=1e-5, rtol=1e-4)

    units = fsdp_units(backbone)
    assert units[0] is backbone.vision_tower and units[1:] == list(backbone.language_model.layers)
    with torch.no_grad():
        logits = model(**right)
    save_classifier(model, inputs, str(tmp_path / "ckpt"),
                    {"num_labels": 10, "prompt": inputs.prompt})
    reloaded, reloaded_inputs, _ = load_classifier(str(tmp_path / "ckpt"))
    assert reloaded_inputs.processor is not None
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval()(**reloaded_inputs(images, ["digits", "food101"])), logits)
    with pytest.raises(ValueError, match="has no pixel-count bounds"):
        load_backbone(folder, max_pixels=3136)


def test_benchmark_script_reports_its_figures():
    result = run_script("tools/benchmark.py", "--shape", "tiny", "--steps", 1, "--batch_size", 2,
                        "--image_size", 56)
    assert result.returncode == 0, result.stderr[-3000:]
    for figure in ("step time", "tokens/s", "images/s", "model TFLOP/s", "(4 image tokens each)"):
        assert figure in result.stdout


def test_a_chat_template_that_writes_bos_gets_no_second_one(tmp_path, monkeypatch):
    """Gemma3's template starts with {{ bos_token }} and its tokenizer adds BOS too: tokenized
    with special tokens the prompt began <bos><bos>, which transformers' own
    apply_chat_template(tokenize=True) never gives."""
    import families
    from tokenizers import processors
    plain = families.train_tokenizer

    def adding_bos(*args, **kwargs):  # as Gemma's tokenizer.json post-processor does
        tokenizer = plain(*args, **kwargs)
        bos = tokenizer.convert_tokens_to_ids("<bos>")
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
        return tokenizer
    monkeypatch.setattr(families, "train_tokenizer", adding_bos)
    _, inputs = load_backbone(families.gemma3(str(tmp_path / "gemma3")))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    ours = inputs([image], ["food"])["input_ids"][0].tolist()
    messages = [{"role": "user", "content": [
        {"type": "image", "image": image},
        {"type": "text", "text": inputs.prompt.replace("{dataset}", "food")}]}]
    theirs = inputs.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=True,
                                                  return_tensors="pt")["input_ids"][0].tolist()
    bos = inputs.tokenizer.convert_tokens_to_ids("<bos>")
    assert ours[:2] == [bos, theirs[1]] and ours == theirs


def test_the_processor_path_composites_transparency_as_the_processor_would(tiny_qwen2_vl,
                                                                           tmp_path):
    """Qwen2-VL's processor composites transparency onto white (do_convert_rgb); the loader
    handed it an RGB image already converted by Pillow (alpha dropped, black behind)."""
    from dataset import RecordTable, make_loader
    pixels = np.zeros((56, 56, 4), np.uint8)  # a grey square on a transparent black background
    pixels[14:42, 14:42] = (128, 128, 128, 255)
    path = str(tmp_path / "logo.png")
    Image.fromarray(pixels, "RGBA").save(path)
    _, inputs = load_backbone(tiny_qwen2_vl)
    assert inputs.image_processor.do_convert_rgb
    records = RecordTable([path], [0], [0], ["x.jsonl"], [0], [1])
    batch = next(iter(make_loader(records, [0], inputs, ["logos"], batch_size=1, num_workers=0,
                                  fast_path=True)))
    with Image.open(path) as image:
        own = inputs.processor(images=[image], text=[inputs.text("logos")], padding=True,
                               return_tensors="pt")
    assert torch.equal(batch["pixel_values"], own["pixel_values"])
