"""Images as tokens: how an image is sized and cut into patches (of its pixels, or of a VAE's
latents), and the noise level of flow matching."""
import math
from dataclasses import dataclass

import torch

from tasks.images import read_image


@dataclass
class ImageSpec:
    """How an image becomes tokens. It is resized to image_size (channels 1 or 3) and cut into
    patch_size patches: of its pixels, or with a VAE (latent_channels > 0) of its latents, whose
    pixels each cover `downsample` image pixels a side (patch_size then counts latent pixels)."""
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    latent_channels: int = 0
    downsample: int = 1

    @property
    def latent(self):
        return self.latent_channels > 0

    @property
    def pixel_patch(self):
        """Image pixels per token side."""
        return self.patch_size * self.downsample

    @property
    def grid(self):
        return self.image_size // self.pixel_patch

    @property
    def token_channels(self):
        """Channels of what the patches are cut from: the image's, or the VAE latent's."""
        return self.latent_channels or self.channels

    @property
    def patch_dim(self):
        return self.token_channels * self.patch_size ** 2


def load_image(path, spec):
    """Pixels in [-1, 1] as (grid * grid, channels * pixel_patch^2): the pixels of each token
    (with a VAE, the area its latent patch covers; the VAE encodes them on the device)."""
    return patchify(read_image(path, spec.image_size, spec.channels), spec.pixel_patch)


def patchify(image, patch):
    """(..., C, H, W) -> (..., (H / p) * (W / p), C * p * p), patches in row-major order."""
    *lead, c, h, w = image.shape
    x = image.reshape(*lead, c, h // patch, patch, w // patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return x.reshape(*lead, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches, patch, channels):
    """(..., g * g, C * p * p) -> (..., C, g * p, g * p): patchify's inverse for square images."""
    *lead, tokens, _ = patches.shape
    g = math.isqrt(tokens)
    x = patches.reshape(*lead, g, g, channels, patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return x.reshape(*lead, channels, g * patch, g * patch)


def sample_timestep(generator, shift=1.0):
    """t = sigmoid(N(0, 1)), optionally shifted towards noise: s t / (1 + (s - 1) t)."""
    t = torch.sigmoid(torch.randn((), generator=generator)).item()
    return shift * t / (1 + (shift - 1) * t)
