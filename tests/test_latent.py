"""--task generate --vae: the frozen VAE's encoding and scaling, flow matching on its latent
patches, the checks of a VAE folder, and the VAE staying out of training. Real digit images, tiny
AutoencoderKL and Qwen2 models built from configs and loaded back from folders."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

import train  # noqa: E402
from conftest import read_jsonl, save_tiny_vae, write_jsonl  # noqa: E402
from tasks.latent import load_codec  # noqa: E402
from tasks.generate.batches import make_generation_loader
from tasks.generate.model import (UnifiedModel, encode_latent_batch, load_language_model,
                                  unified_losses)
from tasks.generate.patches import ImageSpec, load_image, patchify, unpatchify
from tasks.generate.records import read_generation_files
from tasks.images import read_image

SCALE, SHIFT = 2.0, -0.5  # far from 1 and 0: a latent left unscaled shows in every check


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), scaling_factor=SCALE,
                         shift_factor=SHIFT)


@pytest.fixture(scope="module")
def digits(demo_dir):
    """64 training digit files with their labels."""
    rows = read_jsonl(demo_dir / "digits" / "train.jsonl")[:64]
    return [(str(demo_dir / "digits" / r["image_path"]), r["label"]) for r in rows]


def latent_spec(codec, image_size=8, patch_size=1):
    return ImageSpec(image_size, patch_size, 1, codec.latent_channels, codec.downsample)


def test_encode_decode_round_trip_and_scaling(vae, digits):
    from diffusers import AutoencoderKL
    reference = AutoencoderKL.from_pretrained(vae).eval()
    codec = load_codec(vae)
    pixels = torch.stack([read_image(path, 8, 1) for path, _ in digits[:6]])
    z = codec.encode(pixels)
    assert z.shape == (6, 4, 4, 4)
    with torch.no_grad():
        mean = reference.encode(pixels).latent_dist.mean
        torch.testing.assert_close(z, (mean - SHIFT) * SCALE)
        # decoding undoes the scaling: the VAE's own reconstruction from its posterior mean
        own = reference(pixels, sample_posterior=False).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(z), own)
    # a token of a latent patch covers patch_size * 2 image pixels a side: load_image's patches
    spec = latent_spec(codec, patch_size=2)
    patches = load_image(digits[0][0], spec)
    assert patches.shape == (spec.grid ** 2, 1 * 4 ** 2) and spec.patch_dim == 4 * 2 ** 2
    torch.testing.assert_close(unpatchify(patches, spec.pixel_patch, 1), pixels[0])
    assert not any(p.requires_grad for p in codec.vae.parameters())


def test_a_vae_with_per_channel_latent_moments_is_normalised_per_channel(tmp_path, digits):
    """An SDXL-style config.json (latents_mean, latents_std per channel) is normalised as
    diffusers' pipelines do; its moments were ignored (latents neither centred nor scaled per
    channel). Half of them, or beside a shift_factor, is refused."""
    from diffusers import AutoencoderKL
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 4.0, 0.5, 1.0]
    folder = save_tiny_vae(tmp_path / "sdxl", scaling_factor=0.5)
    config = json.loads((tmp_path / "sdxl" / "config.json").read_text())
    (tmp_path / "sdxl" / "config.json").write_text(json.dumps(
        {**config, "latents_mean": mean, "latents_std": std}))
    codec = load_codec(folder)
    pixels = torch.stack([read_image(path, 8, 1) for path, _ in digits[:4]])
    with torch.no_grad():
        raw = AutoencoderKL.from_pretrained(folder).eval().encode(pixels).latent_dist.mean
    view = (1, 4, 1, 1)
    expected = (raw - torch.tensor(mean).view(view)) * 0.5 / torch.tensor(std).view(view)
    torch.testing.assert_close(codec.encode(pixels), expected)
    with torch.no_grad():
        decoded = AutoencoderKL.from_pretrained(folder).eval().decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(expected), decoded, atol=1e-5, rtol=1e-4)
    for extra, message in [({"latents_mean": mean, "latents_std": None}, "must both list 4"),
                           ({"latents_mean": mean, "latents_std": std, "shift_factor": 0.1},
                            "sets both shift_factor and per-channel latents_mean")]:
        (tmp_path / "sdxl" / "config.json").write_text(json.dumps({**config, **extra}))
        with pytest.raises(ValueError, match=message):
            load_codec(folder)


def gen_records(tmp_path, digits, conversation=False):
    rows = [{"text_prompt": f"a handwritten digit {label}", "image_path": path}
            for path, label in digits]
    if conversation:
        path, label = digits[0]
        rows = [{"conversations": [
            {"role": "user", "type": "text", "content": "draw a digit"},
            {"role": "assistant", "type": "image", "image_path": path},
            {"role": "user", "type": "text", "content": "which one?"},
            {"role": "assistant", "type": "text", "content": str(label)}]}]
    return write_jsonl(tmp_path / "gen.jsonl", rows)


def test_latent_flow_matching_loss_at_init_is_one_plus_mean_square_latent(vae, digits, tiny_lm,
                                                                          tmp_path):
    # The zero-initialised head predicts v = 0, so the first image MSE is E[(eps - z)^2] over the
    # noised latent values: 1 + E[z^2] for unit noise, up to the noise's sampling error.
    codec = load_codec(vae)
    spec = latent_spec(codec)
    lm, tokenizer = load_language_model(tiny_lm)
    model = UnifiedModel(lm, spec, codec)
    conversations = read_generation_files([gen_records(tmp_path, digits)])
    batch = next(iter(make_generation_loader(conversations, list(range(len(digits))), tokenizer,
                                             spec, len(digits), 0, seed=5)))
    noise = batch["velocity_targets"].clone()  # before encoding: each noised image's noise
    _, image_sum = unified_losses(model, batch)
    mse = image_sum.item() / (len(digits) * spec.grid ** 2)
    z = patchify(codec.encode(torch.stack([read_image(p, 8, 1) for p, _ in digits])), 1)
    torch.testing.assert_close(mse, (noise - z).pow(2).mean().item(), rtol=1e-5, atol=0)
    square = z.pow(2).mean().item()
    assert square > 0.5  # the scaling moved the latents away from 0
    # (eps - z)^2 has variance 2 + 4 z^2 per value
    sigma = ((2 + 4 * square) / z.numel()) ** 0.5
    assert abs(mse - (1 + square)) < 4 * sigma, (mse, 1 + square, sigma)


def test_each_distinct_image_is_encoded_once_and_noised_in_latent_space(vae, digits, tiny_lm,
                                                                        tmp_path):
    # A text -> image turn followed by more turns: the noised image and its clean copy are one
    # image, so one encoder pass; the copy is its latent, the noised block (1 - t) z + t eps.
    codec = load_codec(vae)
    spec = latent_spec(codec)
    _, tokenizer = load_language_model(tiny_lm)
    conversations = read_generation_files([gen_records(tmp_path, digits, conversation=True)])
    batch = next(iter(make_generation_loader(conversations, [0], tokenizer, spec, 1, 0)))
    assert batch["image_noised"].tolist() == [True, False]
    encoded = []
    encode = codec.encode
    codec.encode = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    out = encode_latent_batch(batch, codec, spec)
    assert encoded == [1]
    z = patchify(encode(read_image(digits[0][0], 8, 1)[None]), 1)[0]
    t, eps = batch["timesteps"][0], batch["velocity_targets"][0]
    torch.testing.assert_close(out["images"][1], z)
    torch.testing.assert_close(out["images"][0], (1 - t) * z + t * eps)
    torch.testing.assert_close(out["velocity_targets"][0], eps - z)
    # image -> caption only: images to encode, none noised (a rank's share of evaluation)
    lm, _ = load_language_model(tiny_lm)
    captions = read_generation_files([write_jsonl(tmp_path / "captions.jsonl", [
        {"image_path": path, "caption": str(label)} for path, label in digits[:3]])])
    batch = next(iter(make_generation_loader(captions, [0, 1, 2], tokenizer, spec, 3, 0)))
    text, image = unified_losses(UnifiedModel(lm, spec, codec), batch)
    assert image.item() == 0 and text.item() > 0


def gen_args(records, lm, vae, out, *extra):
    return [str(a) for a in [
        "--task", "generate", "--model", lm, "--train_jsonl", records, "--output_dir", out,
        "--vae", vae, "--image_size", 8, "--image_channels", 1, "--patch_size", 1,
        "--num_workers", 0, "--batch_size", 8, "--lr", 1e-3, "--logging_steps", 1, *extra]]


def test_the_vae_is_frozen_and_outside_the_optimizer(vae, digits, tiny_lm, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file
    records = gen_records(tmp_path, digits[:16])
    vae = str(shutil.copytree(vae, tmp_path / "vae"))
    train.main(gen_args(records, tiny_lm, vae, tmp_path / "run", "--max_steps", 2,
                        "--skip_evaluation"))
    folder = tmp_path / "run" / "checkpoint-2"
    # the checkpoint carries the VAE unchanged, and no VAE weight among the trained ones
    before = load_file(os.path.join(vae, "diffusion_pytorch_model.safetensors"))
    after = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [k for k in load_file(folder / "unified.safetensors") if "vae" in k or "codec" in k]
    info = json.loads((folder / "unified.json").read_text())["image"]
    assert (info["latent_channels"], info["downsample"], info["patch_size"]) == (4, 2, 1)
    codec = load_codec(vae)
    lm, _ = load_language_model(tiny_lm)
    model = UnifiedModel(lm, latent_spec(codec), codec)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in codec.vae.parameters()}
    assert "codec" not in "".join(model.state_dict())
    # the VAE folder rewritten under the same path (an autoencoder run again): a resume that
    # would go on in another latent space is refused
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 3.0}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(gen_args(records, tiny_lm, vae, tmp_path / "run", "--max_steps", 3,
                            "--skip_evaluation", "--resume", "latest"))
    assert (f"--vae {vae}: config.json differs from the file the run started from"
            in capsys.readouterr().err)
    # allowed, the run's checkpoints hold two VAEs: eval.py over the run refuses to decode the
    # later checkpoint's latents through the first one's VAE (it built the model once)
    train.main(gen_args(records, tiny_lm, vae, tmp_path / "run", "--max_steps", 4,
                        "--skip_evaluation", "--save_steps", 2, "--resume", "latest",
                        "--allow_changed_flags"))
    import eval as eval_script
    capsys.readouterr()
    with pytest.raises(SystemExit):
        eval_script.main([str(tmp_path / "run"), "--num_workers", "0", "--val_data", records])
    err = capsys.readouterr().err
    assert f"{folder / 'vae'} differs from {tmp_path / 'run' / 'checkpoint-4' / 'vae'}" in err


def test_bad_vae_folders_and_shapes_are_refused_before_the_first_step(vae, digits, tiny_lm,
                                                                      tmp_path, capsys):
    records = gen_records(tmp_path, digits[:8])

    def error(vae_folder, *extra):
        with pytest.raises(SystemExit):
            train.main(gen_args(records, tiny_lm, vae_folder, tmp_path / "out", "--max_steps", 1,
                                "--skip_evaluation", "--overwrite", *extra))
        return capsys.readouterr().err

    assert "no such folder" in error(str(tmp_path / "missing"))
    assert "not an AutoencoderKL folder, config.json is missing" in error(str(tmp_path))
    pipeline = tmp_path / "pipeline"
    os.makedirs(pipeline / "vae")
    assert f"give its VAE, {pipeline / 'vae'}" in error(str(pipeline))
    # a Hugging Face model folder of another kind
    assert "describes no diffusers model" in error(tiny_lm)
    # a folder lacking weights: diffusers would leave them uninitialised
    from safetensors.torch import load_file, save_file
    lacking = save_tiny_vae(tmp_path / "lacking")
    weights = os.path.join(lacking, "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items()
               if not k.startswith("encoder.conv_out.")}, weights, metadata={"format": "pt"})
    assert ("2 weight(s) of its AutoencoderKL are not in the folder or of another shape: "
            "encoder.conv_out.bias, encoder.conv_out.weight") in error(lacking)
    # the images the VAE takes, latents the patches divide, the patch projection of a checkpoint
    assert "--image_channels 3" in error(vae, "--image_channels", 3)
    assert "into 4x4 latents, not a multiple of --patch_size 3" in error(vae, "--patch_size", 3)
    assert "--kl_weight: for --task autoencoder" in error(vae, "--kl_weight", 0.1)
    train.main(gen_args(records, tiny_lm, vae, tmp_path / "run", "--max_steps", 1,
                        "--skip_evaluation"))
    wide = save_tiny_vae(tmp_path / "wide", latent_channels=8)
    with pytest.raises(SystemExit):
        train.main(gen_args(records, tiny_lm, wide, tmp_path / "run", "--max_steps", 2,
                            "--skip_evaluation", "--resume", "latest"))
    assert "its patch projection takes 4 values per token" in capsys.readouterr().err
