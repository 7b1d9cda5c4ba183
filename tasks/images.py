"""Images as the generator and the autoencoder read and write them: pixels in [-1, 1] of an image
file, a PIL image of them, and PNG grids."""
import math

import numpy as np
import torch
from PIL import Image

from dataset import DataError
from files import write_file
from preprocess import to_8bit, upright


def read_image(path, size, channels):
    """(channels, size, size) pixels in [-1, 1] of an image file (or file object); an image that
    cannot be read is a DataError."""
    try:
        with Image.open(path) as im:
            im = to_8bit(upright(im)).convert("L" if channels == 1 else "RGB")  # 16-bit scaled
            im = im.resize((size, size), Image.BICUBIC)
    except Exception as e:  # noqa: BLE001 - whatever the decoder raises names the image
        named = f" {path}" if isinstance(path, str) else ""
        raise DataError(f"cannot decode image{named}: {e}") from None
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)
    return pixels.reshape(size, size, -1).permute(2, 0, 1)


def to_pil(image):
    """(C, H, W) in [-1, 1] -> a PIL image."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(images, path, columns):
    """Images (N, C, H, W) in [-1, 1] as one PNG grid, `columns` per row."""
    tiles = [to_pil(x) for x in images]
    w, h = tiles[0].size
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new(tiles[0].mode, (columns * w, rows * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    write_file(path, lambda tmp: grid.save(tmp, format="PNG"))
