"""--task autoencoder through the same loop, checkpoints, resume, eval.py and torchrun as the
other tasks, its record checks, and the latent demo end to end (a VAE trained here, then the
generator in its latent space, generate.py and eval.py). Real digit and face images."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

import eval as eval_script  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402
from conftest import (assert_same_adam_steps, comparable, killed_after, read_jsonl,  # noqa: E402
                      run_script, save_tiny_vae, write_jsonl)

LR = 3e-3
SHAPE = ["--model", "preset:vae-tiny", "--vae_channels", 8, 8, "--latent_channels", 2,
         "--image_size", 8, "--image_channels", 1]


def ae_args(data, out, *extra):
    return [str(a) for a in [
        "--task", "autoencoder", *SHAPE, "--train_jsonl", data["digits_train"],
        data["faces_train"], "--val_jsonl", data["digits_val"], data["faces_val"], "--datasets",
        data["registry"], "--output_dir", out, "--num_workers", 0, "--batch_size", 8, "--lr", LR,
        "--logging_steps", 1, *extra]]


def vae_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_trains_resumes_exactly_and_eval_py_agrees(small_data, tmp_path):
    common = ["--max_steps", 8, "--save_steps", 4, "--eval_steps", 4, "--save_all_checkpoints",
              "--recon_loss", "mse", "--kl_weight", 1e-3]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.main(ae_args(small_data, full, *common))
    log = read_jsonl(full / "metrics.jsonl")
    steps = [r for r in log if r["event"] == "train"]
    assert steps[-1]["train_overall_loss"] < 0.8 * steps[0]["train_overall_loss"]
    evals = [r for r in log if r["event"] == "eval"]
    assert {"eval_digits_psnr", "eval_faces_psnr", "eval_overall_psnr", "eval_digits_kl",
            "eval_faces_recon_loss", "eval_overall_latent_std"} <= set(evals[0])
    assert evals[0]["eval_digits_samples"] == 10 and evals[0]["eval_faces_samples"] == 10
    summary = json.loads((full / "run_summary.json").read_text())
    assert summary["best_metric"] == "overall_psnr"
    assert summary["final_eval"]["final_eval_overall_samples"] == 31
    assert os.path.isfile(full / "reconstructions.png")

    killed_after(full / "checkpoint-4", resumed)
    train.main(ae_args(small_data, resumed, *common, "--resume", "latest"))
    a, b = vae_weights(full / "checkpoint-8"), vae_weights(resumed / "checkpoint-8")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    assert comparable(read_jsonl(resumed / "metrics.jsonl")) == comparable(log)
    config = json.loads((full / "checkpoint-8" / "config.json").read_text())
    assert config == json.loads((resumed / "checkpoint-8" / "config.json").read_text())

    # the checkpoint is an AutoencoderKL folder; its scaling makes the latents unit-scale
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(full / "checkpoint-8")
    assert vae.config.latent_channels == 2 and vae.config.scaling_factor != 1.0
    final = summary["final_eval"]
    std, mean = final["final_eval_overall_latent_std"], final["final_eval_overall_latent_mean"]
    assert 0.5 < vae.config.scaling_factor * std < 2
    assert abs(mean - vae.config.shift_factor) < 2 * std

    eval_script.main([str(full / summary["best_checkpoint"].split("/")[-1]), "--num_workers", 0])
    record = read_jsonl(full / "eval_results.jsonl")[-1]
    for name in ("overall_psnr", "digits_psnr", "faces_loss", "overall_latent_std"):
        assert record[f"eval_{name}"] == pytest.approx(final[f"final_eval_{name}"], rel=1e-6)


def test_two_processes_take_the_same_steps_as_one(small_data, tmp_path):
    # Noise per sample from (seed, epoch, index), GroupNorm per sample: 2 DDP processes x 4 take
    # the steps of 1 x 8 (and the running latent statistics do not enter the weights).
    common = ["--max_steps", 2, "--skip_evaluation", "--no_shuffle", "--max_grad_norm", 0]
    train.main(ae_args(small_data, tmp_path / "one", *common))
    result = run_script("train.py", *ae_args(small_data, tmp_path / "two", *common,
                                             "--batch_size", 4), torchrun=2, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (vae_weights(tmp_path / run / "checkpoint-2") for run in ("one", "two"))
    # Biases whose gradient is about 0 (key biases of attention, a conv bias before a GroupNorm
    # of 2 channels) move by +-lr under Adam whatever the sign of that float noise: in this
    # 14k-parameter model they are 1% of the weights, so they get only the bound on each entry.
    kernels = [k for k in one if one[k].dim() > 1]
    assert_same_adam_steps({k: one[k] for k in kernels}, {k: two[k] for k in kernels}, LR, 2)
    for k in one:
        assert (one[k] - two[k]).abs().max() <= 2 * LR * 2 * 1.01, k
    logs = [[r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["event"] == "train"]
            for run in ("one", "two")]
    for one, two in zip(*logs):
        assert one["train_overall_loss"] == pytest.approx(two["train_overall_loss"], rel=1e-4)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-3)


def test_the_ema_model_is_written_with_the_latent_scaling_of_the_run(small_data, tmp_path):
    """The running latent moments describe the data, not weights: averaged by the EMA from their
    start [0, 0, 1], a short run's ema/config.json got a scaling near 1 (1.32 against 3.50 after
    60 steps at decay 0.99), which a generator on that VAE would take."""
    out = tmp_path / "out"
    train.main(ae_args(small_data, out, "--max_steps", 6, "--skip_evaluation", "--ema_decay",
                       0.9, "--save_steps", 3))
    for step in (3, 6):
        folder = out / f"checkpoint-{step}"
        raw, averaged = (json.loads((f / "config.json").read_text())
                         for f in (folder, folder / "ema"))
        assert raw["scaling_factor"] != 1.0
        assert (averaged["scaling_factor"], averaged["shift_factor"]) == (
            raw["scaling_factor"], raw["shift_factor"])
    # a resume reads the EMA state back (the moments are not in it) and goes on alike
    resumed = tmp_path / "resumed"
    killed_after(out / "checkpoint-3", resumed)
    train.main(ae_args(small_data, resumed, "--max_steps", 6, "--skip_evaluation",
                       "--ema_decay", 0.9, "--save_steps", 3, "--resume", "latest"))
    for folder in ("checkpoint-6", "checkpoint-6/ema"):
        assert (out / folder / "config.json").read_text() == (
            resumed / folder / "config.json").read_text()


def test_validation_records_of_training_images_are_said(small_data, tmp_path, capsys):
    """The classifier's note, for the autoencoder too: a validation PSNR on images it trains on
    measures memory, not reconstruction."""
    leaky = {**small_data, "digits_val": small_data["digits_train"]}
    train.main(ae_args(leaky, tmp_path / "out", "--max_steps", 1, "--skip_evaluation"))
    assert ("note: dataset 'digits': 40 of its 40 validation records read a training image"
            in capsys.readouterr().out)


def test_bad_records_and_flags_are_refused_before_the_first_step(small_data, demo_dir, tmp_path,
                                                                 capsys):
    image = str(demo_dir / "digits" / "images" / "00001.png")
    records = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text_prompt": "a one", "image_path": image},
        {"conversations": [{"role": "user", "type": "text", "content": "hello"},
                           {"role": "assistant", "type": "text", "content": "hi"}]},
        {"caption": "a one"},
        {"image_path": image, "dataset_name": "digits", "label": 1},
        {"conversations": [{"role": "user", "type": "image", "image_path": image},
                           {"role": "user", "type": "text", "content": "and this one?"},
                           {"role": "user", "type": "image", "image_path": "gone.png"},
                           {"role": "assistant", "type": "text", "content": "a one"}]}])

    def error(*args):
        with pytest.raises(SystemExit):
            train.main([str(a) for a in args])
        return capsys.readouterr().err

    out = tmp_path / "out"
    message = error("--task", "autoencoder", *SHAPE, "--train_jsonl", records, "--output_dir", out)
    assert f"{records}:2: a text-only record" in message
    assert f"{records}:3: a text-only record" in message
    assert f"{records}:1:" not in message and f"{records}:4:" not in message
    # a missing image is named by the field that holds it
    assert (f"{records}:5: field 'conversations[2].image_path': image file not found: "
            f"{tmp_path / 'gone.png'}") in message
    vae = save_tiny_vae(tmp_path / "vae")
    args = ["--task", "autoencoder", "--train_jsonl", small_data["digits_train"], "--output_dir",
            out, "--image_size", 8]
    assert "--vae_channels / --latent_channels shape a new VAE" in error(
        *args, "--model", vae, "--latent_channels", 8)
    assert "--image_channels 3: --model" in error(*args, "--model", vae)
    assert "--image_size 9 is not a multiple of 2" in error(
        *args, "--model", vae, "--image_channels", 1, "--image_size", 9)
    assert "--mixup: for --task classify, not autoencoder" in error(
        *args, "--model", vae, "--mixup", 0.2)


def test_latent_demo_end_to_end(demo_dir, tmp_path, capsys):
    # configs/demo_autoencoder.yaml then configs/demo_generate_latent.yaml, shrunk: a VAE trained
    # on the digits, the generator in its latent space, its samples, generate.py, eval.py.
    digits = demo_dir / "digits"
    gen_rows = []
    for split, n in (("train", 24), ("val", 6)):
        rows = read_jsonl(digits / f"generate_{split}.jsonl")[:n]
        for row in rows:
            row["image_path"] = str(digits / row["image_path"])
        gen_rows.append(write_jsonl(tmp_path / f"gen_{split}.jsonl", rows))
    ae = tmp_path / "ae"
    train.main(["--config", "configs/demo_autoencoder.yaml", "--output_dir", str(ae),
                "--train_jsonl", str(digits / "train.jsonl"), "--val_jsonl",
                str(digits / "val.jsonl"), "--max_steps", "2", "--eval_steps", "2",
                "--save_steps", "2", "--num_workers", "0", "--gradient_checkpointing"])
    vae = ae / "checkpoint-2"
    gen = tmp_path / "gen"
    train.main(["--config", "configs/demo_generate_latent.yaml", "--vae", str(vae),
                "--output_dir", str(gen), "--train_jsonl", gen_rows[0], "--val_jsonl",
                gen_rows[1], "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2",
                "--num_workers", "0", "--sample_prompts", "a handwritten digit 3",
                "--samples_per_prompt", "2", "--sample_steps", "3"])
    from PIL import Image
    with Image.open(gen / "samples.png") as grid:
        assert grid.size == (2 * 16, 16)  # decoded to the VAE's 16x16 images
    capsys.readouterr()
    generate.main([str(gen / "checkpoint-2"), "--prompt", "a handwritten digit 3",
                   "--num_images", "1", "--steps", "3", "--out_dir", str(tmp_path / "png"),
                   "--image", str(digits / "images" / "00003.png"), "--max_new_tokens", "4"])
    with Image.open(tmp_path / "png" / "a_handwritten_digit_3_0.png") as png:
        assert png.size == (16, 16)
    assert "00003.png: " in capsys.readouterr().out
    eval_script.main([str(gen / "checkpoint-2"), "--num_workers", "0"])
    record = read_jsonl(gen / "eval_results.jsonl")[-1]
    assert record["eval_captions"] == 3 and record["eval_image_loss"] > 0
