"""--task generate: attention mask, starting values, sampler, loss normalisation, training, resume,
data checks, generate.py and eval.py with a judge. Real digit images, a tiny Qwen2 from a folder."""
import json
import math
import os

import pytest
import torch

import train
from conftest import (assert_same_adam_steps, comparable, killed_after, load_weights, read_jsonl,
                      run_script, write_jsonl)
from tasks.generate.batches import GenerationDataset, collate_sequences, target_counts
from tasks.generate.model import UnifiedModel, load_language_model, unified_losses
from tasks.generate.patches import ImageSpec, load_image
from tasks.generate.records import Turn, read_generation_files
from tasks.generate.sampling import euler_sample
from tasks.generate.sequences import assemble, build_attention_mask, build_parts

SPEC = ImageSpec(image_size=8, patch_size=2, channels=1)  # 16 tokens of 4 values per digit

LR = 3e-3  # of every training run here


@pytest.fixture(scope="session")
def gen_data(demo_dir, tmp_path_factory):
    """Text -> image and image -> caption records for 24 training and 7 validation digits."""
    out = tmp_path_factory.mktemp("gen")
    files = {}
    for split, n in [("train", 24), ("val", 7)]:
        rows = read_jsonl(demo_dir / "digits" / f"{split}.jsonl")[:n]
        records = []
        for i, row in enumerate(rows):
            path = str(demo_dir / "digits" / row["image_path"])
            # uneven text lengths
            text = f"a handwritten digit {row['label']}" + (" in black ink" * (i % 3))
            records += [{"text_prompt": text, "image_path": path},
                        {"image_path": path, "caption": text}]
        files[split] = write_jsonl(out / f"{split}.jsonl", records)
    return files


def gen_args(data, model, out, *extra):
    return [
        str(a) for a in [
            "--task", "generate", "--model", model, "--train_jsonl", data["train"], "--val_jsonl",
            data["val"], "--output_dir", out, "--image_size", 8, "--image_channels", 1,
            "--patch_size", 2, "--num_workers", 0, "--batch_size", 8, "--lr", LR,
            "--logging_steps", 1, *extra
        ]
    ]


# ----------------------------------------------------------------------------- attention mask

def test_attention_mask_text_causal_image_blocks_full_noised_hidden_and_samples_isolated():
    # Row: sample 0 = text(2) clean(3) text(1) noised(3) clean copy(3) text(1); sample 1 = text(2);
    # padding(1)
    kinds = ["t", "t", "c", "c", "c", "t", "n", "n", "n", "c2", "c2", "c2", "t", "s", "s", "p"]
    sample = torch.tensor([0] * 13 + [1, 1, -1])
    block = torch.tensor([{"c": 0, "n": 1, "c2": 2}.get(k, -1) for k in kinds])
    noised = torch.tensor([k == "n" for k in kinds])
    is_text = torch.tensor([k in ("t", "s") for k in kinds])
    mask = build_attention_mask(sample, block, noised, is_text, torch.zeros(16, dtype=torch.bool))
    assert mask[1, 0] and not mask[0, 1]  # text is causal
    # a clean block is bidirectional and sees the text before it
    assert mask[2, 4] and mask[4, 2] and mask[3, 0]
    assert mask[5, 2] and mask[5, 4]  # text after a clean block sees all of it
    # noised block: full inside, sees everything before
    assert mask[6, 8] and mask[8, 6] and mask[6, 5] and mask[6, 2]
    assert not mask[9:13, 6:9].any()  # ... and nothing after it sees the noised block
    assert mask[12, 9:12].all()  # the clean copy is what later text sees
    # packed samples never see each other
    assert not mask[13:15, :13].any() and not mask[:13, 13:15].any()
    assert mask[14, 13] and not mask[13, 14]
    assert mask[15].sum() == 1 and mask[15, 15]  # padding sees only itself (no empty softmax row)
    # text-condition dropout: the noised block sees no text, everything else is unchanged
    dropped = build_attention_mask(sample, block, noised, is_text, noised)
    assert not dropped[6:9][:, is_text].any() and dropped[6:9, 2:5].all()
    assert torch.equal(dropped[~noised], mask[~noised])


def test_sequence_layout_labels_and_positions(tiny_lm):
    _, tokenizer = load_language_model(tiny_lm)
    x0 = torch.zeros(16, 4)
    parts = build_parts(
        [Turn("user", "image", x0), Turn("assistant", "text", "seven")], tokenizer, SPEC)
    tokens, images, times, targets = assemble(parts)
    n = len(tokens["input_ids"])
    caption = tokenizer("seven", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = [(i, y) for i, y in enumerate(tokens["labels"]) if y != -100]
    # next-token targets: caption + eos
    assert [y for _, y in labelled] == caption and labelled[-1][0] == n - 2
    # [start] 16 patches [end], clean
    assert tokens["block"].count(0) == 18 and len(images) == 1 and not targets
    block_positions = {p for p, b in zip(tokens["position_ids"], tokens["block"]) if b == 0}
    assert len(block_positions) == 1  # one position for the whole block; text runs on after it
    assert tokens["position_ids"][-1] == tokens["position_ids"][0] + n - 17 - 1


# ----------------------------------------------------------------------------- starting values and

def test_starting_losses_with_the_zero_initialised_head(tiny_lm, gen_data):
    lm, tokenizer = load_language_model(tiny_lm)
    model = UnifiedModel(lm, SPEC)
    conversations = read_generation_files([gen_data["train"]])
    dataset = GenerationDataset(conversations, tokenizer, SPEC, seed=0)
    batch = collate_sequences([dataset[i] for i in range(len(dataset))])
    text, image = unified_losses(model, batch)
    n_text, n_image = target_counts(batch)
    x0 = torch.stack([load_image(t.value, SPEC) for c in conversations for t in c.turns
                      if t.kind == "image" and t.role == "assistant"])
    expected = 1 + x0.pow(2).mean().item()  # E[(eps - x0)^2] with a velocity prediction of 0
    assert image.item() / n_image == pytest.approx(expected, abs=0.1)
    assert text.item() / n_text == pytest.approx(math.log(len(tokenizer)), abs=0.3)


def test_sampler_fed_the_true_velocity_recovers_x0(tiny_lm):
    torch.manual_seed(0)
    x0, noise = torch.rand(3, 16, 4) * 2 - 1, torch.randn(3, 16, 4)
    for steps, shift in [(1, 1.0), (7, 1.0), (20, 3.0)]:
        out = euler_sample(lambda x, t: noise - x0, noise, steps, shift)
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # and the velocity form matters: a wrong sign ends far away
    assert (euler_sample(lambda x, t: x0 - noise, noise, 10) - x0).abs().max() > 0.5


# ----------------------------------------------------------------------------- training

def assert_same_first_step(a, b):
    la, lb = [[r for r in read_jsonl(d / "metrics.jsonl") if r["event"] == "train"][0]
              for d in (a, b)]
    for key in ("train_text_loss", "train_image_loss", "train_total_loss"):
        assert la[key] == pytest.approx(lb[key], rel=1e-5), key
    assert (la["train_text_tokens"], la["train_image_tokens"]) == (lb["train_text_tokens"],
                                                                   lb["train_image_tokens"])
    assert la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-4)
    wa, wb = load_weights_unified(a / "checkpoint-1"), load_weights_unified(b / "checkpoint-1")
    assert_same_adam_steps(wa, wb, lr=LR, steps=1)


def load_weights_unified(folder):
    return load_weights(folder, "unified")


@pytest.mark.parametrize("micro_batch, accum", [(4, 3), (5, 3)])
def test_loss_is_normalised_over_the_whole_batch_with_uneven_lengths(gen_data, tiny_lm, tmp_path,
                                                                     micro_batch, accum):
    # One batch, or micro-batches: text lengths differ per sample (prompts of 3 lengths, captions vs
    # images), so text and image targets fall unevenly into the micro-batches; a per-micro-batch
    # mean would weight them differently.
    common = ["--max_steps", 1, "--skip_evaluation", "--no_shuffle", "--max_grad_norm", 0]
    train.main(
        gen_args(gen_data, tiny_lm, tmp_path / "big", *common, "--batch_size", micro_batch * accum))
    train.main(
        gen_args(gen_data, tiny_lm, tmp_path / "acc", *common, "--batch_size", micro_batch,
                 "--grad_accum", accum))
    assert_same_first_step(tmp_path / "big", tmp_path / "acc")


def test_packed_rows_take_the_same_step_as_padded_rows(gen_data, tiny_lm, tmp_path, capsys):
    # --pack_tokens puts several samples in a row (about 270 tokens each: 256 image patches); the
    # step (losses, counts, gradient norm) is the one of one padded sample per row. A row shorter
    # than a sample is refused up front.
    common = ["--max_steps", 1, "--skip_evaluation", "--no_shuffle", "--batch_size", 12]
    train.main(gen_args(gen_data, tiny_lm, tmp_path / "padded", *common))
    train.main(gen_args(gen_data, tiny_lm, tmp_path / "packed", *common, "--pack_tokens", 1100))
    assert_same_first_step(tmp_path / "padded", tmp_path / "packed")
    with pytest.raises(SystemExit):
        train.main(gen_args(gen_data, tiny_lm, tmp_path / "short", *common, "--pack_tokens", 8))
    assert "more than --pack_tokens 8" in capsys.readouterr().err


def test_two_processes_take_the_same_step_as_one(gen_data, tiny_lm, tmp_path):
    common = ["--max_steps", 1, "--skip_evaluation", "--no_shuffle", "--max_grad_norm", 0]
    train.main(gen_args(gen_data, tiny_lm, tmp_path / "one", *common, "--batch_size", 12))
    result = run_script(
        "train.py",
        *gen_args(gen_data, tiny_lm, tmp_path / "two", *common, "--batch_size", 3, "--grad_accum",
                  2, "--dist", "fsdp"), torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_first_step(tmp_path / "one", tmp_path / "two")


def test_short_run_both_losses_fall_and_resume_is_exact(gen_data, tiny_lm, tmp_path):
    common = [
        "--max_steps", 30, "--save_steps", 15, "--eval_steps", 15, "--logging_steps", 5,
        "--warmup_steps", 5, "--save_all_checkpoints", "--sample_prompts", "a handwritten digit 1",
        "a handwritten digit 2", "--samples_per_prompt", 3, "--sample_steps", 4
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(gen_args(gen_data, tiny_lm, full, *common))
    log = [r for r in read_jsonl(full / "metrics.jsonl") if r["event"] == "train"]
    assert log[-1]["train_text_loss"] < 0.7 * log[0]["train_text_loss"]
    assert log[-1]["train_image_loss"] < 0.9 * log[0]["train_image_loss"]
    evals = [r for r in read_jsonl(full / "metrics.jsonl") if r["event"] == "eval"]
    assert {"eval_text_loss", "eval_text_perplexity", "eval_image_loss",
            "eval_total_loss"} <= set(evals[0])
    from PIL import Image
    with Image.open(full / "samples.png") as grid:
        assert grid.size == (3 * 8, 2 * 8)  # a row of 3 per prompt

    killed_after(full / "checkpoint-15", resumed)
    train.main(gen_args(gen_data, tiny_lm, resumed, *common, "--resume", "latest"))
    a, b = load_weights_unified(full / "checkpoint-30"), load_weights_unified(resumed /
                                                                              "checkpoint-30")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert comparable(read_jsonl(resumed / "metrics.jsonl")) == comparable(
        read_jsonl(full / "metrics.jsonl"))


# ----------------------------------------------------------------------------- data checks

def test_all_three_formats_and_json_arrays_are_read(demo_dir, tmp_path):
    image = str(demo_dir / "digits" / "images" / "00001.png")
    records = [{
        "conversations": [{"role": "user", "type": "text", "content": "draw a one"},
                          {"role": "assistant", "type": "image", "image_path": image},
                          {"role": "user", "type": "text", "content": "and say it"},
                          {"role": "assistant", "type": "text", "content": "one"}]
    }, {"text_prompt": "a one", "image_path": image}, {"image_path": image, "caption": "a one"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    conversations = read_generation_files(
        [str(path), write_jsonl(tmp_path / "more.jsonl", records)])
    assert len(conversations) == 6 and conversations[3].source.endswith("more.jsonl:1")
    # the conversation's assistant image carries loss and, with a turn after it, also appears clean
    _, tokenizer = load_language_model("preset:qwen2-tiny")
    tokens, images, _, targets = assemble(build_parts(conversations[0].turns, tokenizer, SPEC,
                                                      lambda x0: (x0, 0.5, x0)))
    assert len(images) == 2 and len(targets) == 1


def test_bad_records_are_reported_with_file_and_line(demo_dir, tmp_path, gen_data, tiny_lm, capsys):
    image = str(demo_dir / "digits" / "images" / "00001.png")
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"text_prompt": "ok", "image_path": image},
        "{not json",
        {"text_prompt": "", "image_path": image},
        {"image_path": "missing.png", "caption": "x"},
        {"conversations": [{"role": "user", "type": "text", "content": "hi"}]},
        {"conversations": [{"role": "robot", "type": "text", "content": "hi"}]},
        {"conversations": [{"role": "assistant", "type": "video", "content": "hi"}]},
        {"label": 3},
        {"text_prompt": "held out", "image_path": image, "split": "test"},
        {"text_prompt": "a digit", "image_path": image, "caption": "one"}])
    with pytest.raises(SystemExit) as e:
        train.main(
            gen_args({**gen_data, "train": path}, tiny_lm, tmp_path / "out", "--max_steps", 1))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "9 problem(s)" in err
    for line, message in [
        (2, "malformed JSON"), (3, "field 'text_prompt': expected a non-empty string"),
        (4, "field 'image_path': image file not found"),
        (5, "field 'conversations': no assistant turn"),
        (6, "field 'conversations[0].role': expected one of system, user, assistant"),
        (7, "field 'conversations[0].type': expected text or image"),
        (8, "expected 'conversations', 'text_prompt' + 'image_path', or 'image_path' + 'caption'"),
        (9, "field 'split': 'test', in a file read as training data"),
        (10, "fields 'text_prompt', 'caption': a record is one of the formats")
    ]:
        assert f"bad.jsonl:{line}: {message}" in err
    assert not os.path.exists(tmp_path / "out")


def test_sample_data_format_file_is_valid(tmp_path):
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "sample_data_format.json")
    with open(config) as f:
        records = json.load(f)
    formats = {
        "conversations"
        if "conversations" in r else "text_prompt" if "text_prompt" in r else "caption"
        for r in records
    }
    assert formats == {"conversations", "text_prompt", "caption"}


# ----------------------------------------------------------------------------- generate.py and eval

def test_generate_and_judge_a_checkpoint(gen_data, tiny_lm, small_data, tiny_vit, tmp_path,
                                         capsys):
    import eval as eval_script
    import generate

    def generate_main(*args):  # generate.py in this process: (exit code, stderr)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            generate.main([str(a) for a in args])
        return e.value.code, capsys.readouterr().err

    train.main(
        gen_args(gen_data, tiny_lm, tmp_path / "gen", "--max_steps", 4, "--eval_steps", 4,
                 "--save_steps", 4, "--timestep_shift", 3))
    # sampled with the shift it was trained with, unless told otherwise
    checkpoint = tmp_path / "gen" / "checkpoint-4"
    kept = json.loads((checkpoint / "unified.json").read_text())
    assert kept["timestep_shift"] == 3.0 and kept["cond_dropout"] == 0.1
    grids = {}
    for shift in (None, 3, 1):
        out = tmp_path / f"shift{shift}"
        generate.main([str(a) for a in [checkpoint, "--prompt", "a digit", "--num_images", 1,
                                        "--steps", 3, "--out_dir", out] +
                       ([] if shift is None else ["--timestep_shift", shift])])
        grids[shift] = (out / "grid.png").read_bytes()
    assert grids[None] == grids[3] != grids[1]
    code, err = generate_main(tmp_path / "gen" / "checkpoint-4", "--image", gen_data["val"])
    assert code == 2 and f"cannot decode image {gen_data['val']}" in err  # a clear error
    # a flag typed that cannot act: sampling flags without a prompt, a caption's without an image
    for flags, message in [(["--image", "x.png", "--steps", 8, "--cfg_scale", 2],
                            "--steps, --cfg_scale: no effect without --prompt"),
                           (["--prompt", "a digit", "--max_new_tokens", 8],
                            "--max_new_tokens: no effect without --image")]:
        code, err = generate_main(tmp_path / "gen" / "checkpoint-4", *flags)
        assert code == 2 and message in err, err
    image = read_jsonl(gen_data["val"])[1]["image_path"]
    # two prompts of one file name (they differ in punctuation): neither overwrites the other
    out = run_script("generate.py", tmp_path / "gen" / "checkpoint-4", "--prompt",
                     "a handwritten digit 3", "--prompt", "a handwritten digit 3!",
                     "--num_images", 2, "--steps", 3, "--image", image,
                     "--max_new_tokens", 4, "--out_dir", tmp_path / "png")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "png")) == [
        "a_handwritten_digit_3-2_0.png", "a_handwritten_digit_3-2_1.png",
        "a_handwritten_digit_3_0.png", "a_handwritten_digit_3_1.png", "grid.png"
    ]
    assert f"{image}: " in out.stdout
    (tmp_path / "taken").write_text("mine")  # an --out_dir that is a file: one line, exit 2
    code, err = generate_main(tmp_path / "gen" / "checkpoint-4", "--prompt", "a digit",
                              "--num_images", 1, "--steps", 1, "--out_dir", tmp_path / "taken")
    assert code == 2 and err == (f"error: --out_dir {tmp_path / 'taken'}: cannot create it "
                                 f"(File exists: {tmp_path / 'taken'})\n")

    # a judge trained by train.py on the digits (10 classes) scores images generated for each class
    train.main([
        str(a) for a in [
            "--model", tiny_vit, "--train_jsonl", small_data["digits_train"], "--val_jsonl",
            small_data["digits_val"], "--datasets", "digits=10", "--output_dir", tmp_path /
            "judge", "--num_workers", 0, "--batch_size", 8, "--max_steps", 2
        ]
    ])
    eval_script.main([str(a) for a in [
        tmp_path / "gen", "--num_workers", 0, "--judge", tmp_path / "judge" / "checkpoint-2",
        "--judge_prompt", "a handwritten digit {label}", "--judge_samples", 2, "--sample_steps", 2,
        "--cfg_scale", 3]])
    row = read_jsonl(tmp_path / "gen" / "eval_results.jsonl")[-1]
    assert row["judge_samples"] == 20 and row["judge_chance"] == 0.1
    # the 7 image -> text samples
    assert row["eval_captions"] == 7 and 0 <= row["eval_caption_accuracy"] <= 1
    assert 0 <= row["judge_accuracy_cfg1"] <= 1 and 0 <= row["judge_accuracy_cfg3"] <= 1
    final = [
        r for r in read_jsonl(tmp_path / "gen" / "metrics.jsonl") if r["event"] == "final_eval"
    ][0]
    assert row["eval_text_loss"] == pytest.approx(final["final_eval_text_loss"], rel=1e-5)
    assert row["eval_image_loss"] == pytest.approx(final["final_eval_image_loss"], rel=1e-5)
    # a classifier's eval.py flag on a generation checkpoint: refused, nothing recorded
    result = run_script("eval.py", tmp_path / "gen", "--num_workers", 0, "--partial")
    assert result.returncode == 2
    assert "--partial: for --task classify / autoencoder, not generate" in result.stderr
    assert read_jsonl(tmp_path / "gen" / "eval_results.jsonl")[-1] == row


def test_guidance_of_a_checkpoint_trained_without_condition_dropout_is_said(gen_data, tiny_lm,
                                                                            tmp_path, capsys):
    """--cond_dropout 0 leaves the unconditional prediction untrained: generate.py's default
    guidance (4) would extrapolate from it. It samples with 1 instead and says so; a scale
    given is kept, with a note; a checkpoint that records no dropout is left as it was."""
    from generate import guidance_scale
    assert guidance_scale({"cond_dropout": 0.0}, 4.0, given=False) == 1.0
    assert "sampling without guidance (--cfg_scale 1" in capsys.readouterr().out
    assert guidance_scale({"cond_dropout": 0.0}, 3.0, given=True) == 3.0
    assert "note: --cfg_scale 3: the checkpoint was trained with --cond_dropout 0" in (
        capsys.readouterr().out)
    assert guidance_scale({"cond_dropout": 0.1}, 4.0, given=False) == 4.0
    assert guidance_scale({}, 4.0, given=False) == 4.0 and not capsys.readouterr().out
    # the run's own samples.png: guided as asked, and said
    train.main(gen_args(gen_data, tiny_lm, tmp_path / "run", "--max_steps", 1, "--cond_dropout",
                        0, "--sample_prompts", "a digit", "--samples_per_prompt", 1,
                        "--sample_steps", 1, "--skip_evaluation"))
    assert ("samples.png is guided (--cfg_scale 4) from an unconditional prediction this run "
            "never trained") in capsys.readouterr().out


def test_a_text_only_batch_still_gives_every_parameter_a_gradient(tiny_lm):
    # DDP expects each parameter in every backward; a batch of text-only conversations has no image
    # block.
    lm, tokenizer = load_language_model(tiny_lm)
    model = UnifiedModel(lm, SPEC)
    conversation = [Turn("user", "text", "hi"), Turn("assistant", "text", "hello")]
    batch = collate_sequences([(*assemble(build_parts(conversation, tokenizer, SPEC)), False, 0)])
    text, image = unified_losses(model, batch)
    (text + image).backward()
    assert image.item() == 0 and text.item() > 0
    assert all(p.grad is not None for p in model.parameters())
