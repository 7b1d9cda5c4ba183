"""The VAE of latent-space generation (--task generate --vae DIR) and of --task autoencoder: a
diffusers AutoencoderKL read from a local folder (optional extra: pip install -e '.[vae]').

A generator sees scaled latents z = (mean - shift_factor) * scaling_factor, where mean is the
posterior mean of the encoder (deterministic: the same image always gives the same latent) and
the two factors come from the VAE's config.json; a VAE whose config.json gives per-channel
latents_mean and latents_std (SDXL-style, e.g. Playground v2.5's) is normalised per channel
instead, z = (mean - latents_mean) * scaling_factor / latents_std, as diffusers' pipelines do.
Decoding inverts the scaling first. The VAE of a
generator is frozen: it is held beside the model, never as a submodule, so it is in no optimizer,
no gradient and no sharded state.
"""
import json
import os

import torch

CONFIG_FILE = "config.json"
CLASS_NAME = "AutoencoderKL"


def autoencoder_class(flag):
    """diffusers' AutoencoderKL, or a ValueError naming `flag` and the extra to install."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError(f"{flag} needs diffusers: pip install -e '.[vae]' (or pip install "
                         "diffusers)") from None
    return AutoencoderKL


def load_autoencoder(folder, flag="--vae"):
    """The AutoencoderKL of a local folder (config.json + weights, as save_pretrained writes it);
    a ValueError naming the folder when it holds something else."""
    AutoencoderKL = autoencoder_class(flag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder}: no such folder")
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        hint = (f" (a diffusers pipeline folder: give its VAE, {os.path.join(folder, 'vae')})"
                if os.path.isdir(os.path.join(folder, "vae")) else "")
        raise ValueError(f"{flag} {folder}: not an {CLASS_NAME} folder, {CONFIG_FILE} is "
                         f"missing{hint}")
    try:
        with open(path) as f:
            name = json.load(f).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{flag} {folder}: cannot read {path} ({e})") from None
    if name != CLASS_NAME:
        raise ValueError(f"{flag} {folder}: not an {CLASS_NAME} folder ({path} describes "
                         f"{name or 'no diffusers model'})")
    from diffusers.utils import logging as diffusers_logging
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its load report: the missing weights are ours
    try:
        vae, info = AutoencoderKL.from_pretrained(folder, local_files_only=True,
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{flag} {folder}: cannot load the {CLASS_NAME} "
                         f"({type(e).__name__}: {str(e)[:500]})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # diffusers leaves a weight the folder lacks uninitialised (on the meta device): on the CPU
    # a convolution over it runs on whatever memory it gets
    missing = sorted(info["missing_keys"]) + [k for k, *_ in info["mismatched_keys"]]
    if missing:
        raise ValueError(f"{flag} {folder}: {len(missing)} weight(s) of its {CLASS_NAME} are "
                         f"not in the folder or of another shape: {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    return vae


def downsampling(config):
    """Pixels per latent pixel side: each encoder level but the last halves the image."""
    return 2 ** (len(config.block_out_channels) - 1)


class LatentCodec:
    """A frozen AutoencoderKL and its latent scaling: pixels in [-1, 1] <-> scaled latents."""

    def __init__(self, vae, folder=None):
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.scale = float(config.scaling_factor)
        self.shift = float(config.shift_factor or 0.0)
        self.per_channel = channel_moments(config, folder)  # (mean, std) of shape (1, C, 1, 1)
        self.image_channels = int(config.in_channels)
        self.downsample = downsampling(config)
        self.folder = folder

    @property
    def scaling(self):
        """How latents are scaled, for a message."""
        if self.per_channel:
            return f"(z - latents_mean) x {self.scale:g} / latents_std, per channel"
        return f"scaled (z - {self.shift:g}) x {self.scale:g}"

    def _follow(self, x):
        """The VAE goes to the device of its input the first time it meets one (it is not a
        submodule, so model.to(device) does not move it)."""
        weight = next(self.vae.parameters())
        if weight.device != x.device:
            self.vae.to(x.device)
            if self.per_channel:  # moved with it, not copied at every batch
                self.per_channel = tuple(t.to(x.device) for t in self.per_channel)
        return x.to(weight.dtype)

    @torch.no_grad()
    def encode(self, pixels):
        """(N, C, H, W) pixels in [-1, 1] -> (N, latent_channels, H / f, W / f) scaled latents,
        float32."""
        mean = self.vae.encode(self._follow(pixels)).latent_dist.mean.float()
        if self.per_channel:
            center, std = (t.to(mean.device) for t in self.per_channel)  # no copy once moved
            return (mean - center) * self.scale / std
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> pixels in [-1, 1], float32."""
        if self.per_channel:  # .to: no copy once _follow has moved them
            center, std = (t.to(latents.device) for t in self.per_channel)
            latents = latents * std / self.scale + center
        else:
            latents = latents / self.scale + self.shift
        pixels = self.vae.decode(self._follow(latents)).sample
        return pixels.float().clamp(-1, 1)

    def save(self, folder):
        """The VAE as it was loaded, in its own format (what load_codec reads back)."""
        self.vae.save_pretrained(folder, safe_serialization=True)


def channel_moments(config, folder):
    """(latents_mean, latents_std) of a config.json that gives them, as (1, C, 1, 1) tensors;
    None where it gives neither. Half of them, one of another length, or beside a shift_factor
    (two centrings of one latent) is refused."""
    mean, std = (getattr(config, k, None) for k in ("latents_mean", "latents_std"))
    if mean is None and std is None:
        return None
    where = f"{os.path.join(folder or '', CONFIG_FILE)}"
    channels = int(config.latent_channels)
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise ValueError(f"{where}: latents_mean and latents_std must both list "
                         f"{channels} values (its latent_channels)")
    if config.shift_factor:
        raise ValueError(f"{where}: sets both shift_factor and per-channel latents_mean: which "
                         "centres the latents is ambiguous (keep one)")
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))


def load_codec(folder, flag="--vae"):
    return LatentCodec(load_autoencoder(folder, flag), folder)
