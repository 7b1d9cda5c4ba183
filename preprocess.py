"""Fast image path of vision backbones: uint8 in the loader workers, normalisation on the device.

A DataLoader worker opens the file with Pillow, lets a JPEG decode at 1/2, 1/4 or 1/8 scale
(`Image.draft`) when the resized image is at most that fraction of it, resizes and crops in
uint8 exactly as the folder's own Hugging Face image processor defines it, and writes the
image once into its (3, H, W) slot of the batch (`Pixels`; in a worker the batch tensor lives in
shared memory, so it reaches the main process without another copy). The model multiplies by
rescale_factor / std and adds -mean / std on the device (`PixelNormalize`), in float32, and
casts to its own dtype. Batches cross from the workers to the main process and to the device in
a quarter of float32's bytes, and the per-pixel float work leaves the CPU.

Without draft the result equals the processor's output within float32 rounding (the uint8
resize and crop are the same Pillow calls). With draft the decoder scales 2x2 (4x4, 8x8)
blocks down in the DCT domain before the same resize: a smoother image, whose pixels differ
from the full decode's by 0.4-2.4 levels of 255 on average and by up to ~20 levels at the
1 % of pixels on sharp colour edges (photographs at 460-512 px resized to 224 and 128;
tests/test_preprocess.py holds mean < 3 and 99th percentile <= 20). make_loader drafts only
for augmented training by default, so evaluation matches the processor within rounding.

Processors whose output this path cannot reproduce (Qwen2-VL-style patchify, padding,
variable output sizes, unknown classes) keep the processor path: `pixel_recipe` returns None.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

# Processor classes (without the "Pil" suffix of their Pillow backend) whose pipeline is the
# Pillow backend's: resize -> centre crop -> rescale -> normalise. ConvNeXt adds crop_pct.
STANDARD_PROCESSORS = ("ViTImageProcessor", "DeiTImageProcessor", "BitImageProcessor",
                       "CLIPImageProcessor", "ChineseCLIPImageProcessor", "SiglipImageProcessor",
                       "BeitImageProcessor", "ConvNextImageProcessor")


@dataclass(frozen=True)
class PixelRecipe:
    """What an image processor does to one image, in the terms the fast path needs.

    resize: ("fixed", height, width) | ("shortest", edge) | ("crop_pct", edge, crop_pct), the
    last being ConvNeXt's rule below 384 px (shortest edge to int(edge / crop_pct), then a
    centre crop to edge x edge). crop: (height, width) of the centre crop after that, or None.
    """
    resize: tuple
    resample: int
    crop: tuple = None
    rescale: float = None  # rescale_factor, None when do_rescale is off
    mean: tuple = None  # None when do_normalize is off
    std: tuple = None
    alpha_on_white: bool = False  # do_convert_rgb: transparency composited onto white

    @property
    def output_size(self):
        """(height, width) of every image the recipe produces."""
        if self.crop is not None:
            return self.crop
        if self.resize[0] == "fixed":
            return self.resize[1:]
        return (self.resize[1], self.resize[1])  # crop_pct (shortest alone is refused)

    def resized_size(self, height, width):
        """(height, width) after the resize rule, before any crop: the processor's arithmetic."""
        if self.resize[0] == "fixed":
            return self.resize[1:]
        edge = self.resize[1] if self.resize[0] == "shortest" else int(self.resize[1] /
                                                                        self.resize[2])
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)


def pixel_recipe(image_processor):
    """The PixelRecipe of a Hugging Face image processor, or None where the fast path cannot
    reproduce it (then the processor itself runs in the loader, as before)."""
    import transformers
    name = type(image_processor).__name__
    base = name[:-3] if name.endswith("Pil") else name
    if type(image_processor) is not getattr(transformers, name, None):
        return None  # a class of a folder's own code (--trust_remote_code) under a stock name
    if base not in STANDARD_PROCESSORS or not _standard_pipeline(image_processor, base):
        return None
    p = image_processor
    resample = p.resample
    if resample is None:
        resample = Image.Resampling.BILINEAR
    if not isinstance(resample, int):  # a torchvision InterpolationMode
        return None
    size = _size(p.size) if p.do_resize else None
    if size is None or getattr(p, "do_pad", False):
        return None
    if base == "ConvNextImageProcessor":
        if "shortest_edge" not in size:
            return None
        edge = size["shortest_edge"]
        crop_pct = p.crop_pct if p.crop_pct is not None else 224 / 256
        resize = ("crop_pct", edge, crop_pct) if edge < 384 else ("fixed", edge, edge)
    elif "height" in size and "width" in size:
        resize = ("fixed", size["height"], size["width"])
    elif set(size) == {"shortest_edge"}:
        resize = ("shortest", size["shortest_edge"])
    else:
        return None
    crop = None
    if p.do_center_crop:
        crop_size = _size(p.crop_size) or {}
        if "height" not in crop_size or "width" not in crop_size:
            return None
        crop = (crop_size["height"], crop_size["width"])
    elif resize[0] == "shortest":
        return None  # output size would follow each image's aspect ratio
    mean = std = None
    if p.do_normalize:
        mean, std = _per_channel(p.image_mean), _per_channel(p.image_std)
        if mean is None or std is None:
            return None
    return PixelRecipe(resize, int(resample), crop, float(p.rescale_factor) if p.do_rescale
                       else None, mean, std, composites_alpha(p))


def _standard_pipeline(image_processor, base):
    """Does the Pillow-backend class of this processor run the stock resize/crop/normalise?"""
    import transformers
    from transformers.image_processing_backends import PilBackend
    pil_class = getattr(transformers, base + "Pil", None)
    if pil_class is None or not issubclass(pil_class, PilBackend):
        return False
    methods = ("preprocess", "process_image", "center_crop", "rescale", "normalize")
    if base != "ConvNextImageProcessor":
        methods += ("_preprocess", "resize")
    return all(getattr(pil_class, m) is getattr(PilBackend, m) for m in methods)


def _size(size):
    if size is None:
        return None
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return {k: v for k, v in items if v is not None}


def _per_channel(values):
    values = [values] * 3 if isinstance(values, (int, float)) else list(values)
    return tuple(float(v) for v in values) if len(values) == 3 else None


def draft(image, width, height):
    """Let a JPEG decode at the smallest 1/2, 1/4, 1/8 scale that keeps it >= width x height.

    Returns the box of the whole original image in the decoded image's coordinates (the
    decoded size is rounded up, so the box may end a fraction of a pixel before its edge)."""
    if image.format != "JPEG":
        return None
    result = image.draft("RGB", (max(1, width), max(1, height)))
    return None if result is None else result[1]


ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture


def upright(image):
    """An opened image as it is meant to be seen: a photograph's EXIF orientation applied (the
    image loaded; transformers' load_image, and so an exported model's pipeline, does the
    same), else the image itself, unloaded (a JPEG's draft still possible)."""
    if "exif" not in image.info or image.getexif().get(ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def composites_alpha(image_processor):
    """Whether an image processor composites transparency onto white (do_convert_rgb): the fast
    path's recipe and the processor path do it before it (given an RGB image, the processor
    converts nothing)."""
    return bool(getattr(image_processor, "do_convert_rgb", False))


def decode_rgb(file, alpha_on_white=False):
    """The processor path's decode: an image file (or file object) -> an upright, loaded RGB
    image (usable once the file is closed)."""
    with Image.open(file) as image:
        return to_rgb(upright(image), alpha_on_white)


def to_rgb(image, alpha_on_white=False):
    """A decoded image file as RGB, loaded (the file may close after): with do_convert_rgb,
    transparency is composited onto white (transformers' convert_to_rgb); otherwise Pillow's
    convert, as the processor path does. Wide greyscale (16-bit, 32-bit, float) is scaled to
    8 bits first (to_8bit): Pillow's convert would clip it (a 16-bit scan turns white)."""
    image.load()  # the mode a file decodes to is final once loaded
    if image.mode in WIDE_MODES:
        white = image.info.get("transparency") if alpha_on_white else None
        return to_8bit(image, white).convert("RGB")
    if alpha_on_white and ("A" in image.getbands() or "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# Pillow's single-channel modes wider than 8 bits: 16-bit (a 16-bit greyscale PNG or TIFF),
# 32-bit integer, 32-bit float.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(image, transparent=None):
    """A wide greyscale image (WIDE_MODES) as 8-bit "L", scaled rather than clipped: integer
    pixels are 16-bit values, kept as their high byte (v >> 8, as Pillow reads 16-bit RGB
    PNGs); float pixels are [0, 1], times 255, rounded. Pixels outside that range are a
    ValueError, not a guess at what range the file meant. Pixels equal to `transparent` (a
    tRNS grey value) become white, as compositing onto white would make them. Other modes are
    returned as they are."""
    if image.mode not in WIDE_MODES:
        return image
    pixels = np.asarray(image)
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0, 0)
    if image.mode == "F":
        if not (0 <= low and high <= 1):  # also NaN
            raise ValueError(f"float pixels (mode F) from {low:g} to {high:g}: expected them "
                             "in [0, 1]")
        out = np.rint(pixels * np.float32(255)).astype(np.uint8)
    else:
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer pixels (mode {image.mode}) from {low} to {high}: "
                             "expected 16-bit values, 0 to 65535")
        out = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    if transparent is not None:
        out[pixels == transparent] = 255
    return Image.fromarray(out)


def center_crop(pixels, height, width):
    """transformers' centre crop on an (H, W, 3) array: offsets floor((size - crop) / 2), and
    zero padding (ceil of half the shortfall before) where the image is smaller than the crop."""
    h, w = pixels.shape[:2]
    if h >= height and w >= width:
        top, left = (h - height) // 2, (w - width) // 2
        return pixels[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w, pixels.shape[2]), dtype=pixels.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = pixels
    top, left = (h - height) // 2 + pad_top, (w - width) // 2 + pad_left
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


class Pixels:
    """A decoded RGB image on its way into a batch: `write` copies its centre crops, flipped left
    to right where asked, into a (3, H, W) uint8 slot, a channel at a time, so the image is not
    transposed, cropped or stacked into arrays of its own first."""
    __slots__ = ("image", "crops", "flip")

    def __init__(self, image, crops=(), flip=False):
        self.image, self.crops, self.flip = image, tuple(crops), flip

    @property
    def size(self):
        """(height, width) of what `write` writes."""
        return self.crops[-1] if self.crops else self.image.size[::-1]

    def write(self, out):
        """Into `out`, a (3, H, W) uint8 numpy array or tensor (a batch's slot)."""
        out = out.numpy() if isinstance(out, torch.Tensor) else out
        image_w, image_h = self.image.size
        top, left, height, width = 0, 0, image_h, image_w
        for crop_h, crop_w in self.crops:  # offsets as transformers' centre crop takes them
            if crop_h > height or crop_w > width:  # padding: the crops of the whole array
                pixels = np.asarray(self.image)
                for crop in self.crops:
                    pixels = center_crop(pixels, *crop)
                pixels = pixels.transpose(2, 0, 1)
                return np.copyto(out, pixels[:, :, ::-1] if self.flip else pixels)
            top, left = top + (height - crop_h) // 2, left + (width - crop_w) // 2
            height, width = crop_h, crop_w
        image = self.image
        if self.flip:  # Pillow's flip of 4-byte pixels is faster than a reversed numpy copy
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = image_w - left - width
        # One channel at a time ("R", "G", "B" raw packing): each plane comes out contiguous and
        # goes into its slot as whole rows, faster than a (H, W, 3) -> (3, H, W) transpose.
        for plane, band in zip(out, "RGB"):
            whole = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(image_h, image_w)
            np.copyto(plane, whole[top:top + height, left:left + width])


def new_pixels(size):
    """An empty (3, H, W) uint8 array of `size` (height, width)."""
    return np.empty((3, *size), dtype=np.uint8)


def decode_pixels(path, recipe, use_draft=True):
    """One image file -> Pixels, as the recipe's processor would resize and crop it."""
    with Image.open(path) as image:
        image = upright(image)  # turned: loaded whole, no draft (draft is for a JPEG file)
        width, height = image.size
        new_h, new_w = recipe.resized_size(height, width)
        box = draft(image, new_w, new_h) if use_draft else None
        image = to_rgb(image, recipe.alpha_on_white)
        image = image.resize((new_w, new_h), recipe.resample, box=box)
    crops = [(recipe.resize[1], recipe.resize[1])] if recipe.resize[0] == "crop_pct" else []
    return Pixels(image, crops + ([recipe.crop] if recipe.crop is not None else []))


def load_pixels(path, recipe, use_draft=True):
    """One image file -> (3, H, W) uint8, as the recipe's processor would resize and crop it."""
    pixels = decode_pixels(path, recipe, use_draft)
    out = new_pixels(pixels.size)
    pixels.write(out)
    return out


class PixelNormalize:
    """uint8 (B, 3, H, W) -> x * rescale / std - mean / std in the model's dtype, on the device.

    A multiply and an add in float32, then one rounding to the model's dtype. The affine is kept
    as float32 tensors cached per device, not as module buffers: model.to(torch.bfloat16) would
    round buffers to bf16 (0.4 % error in 1/std); no state_dict entry either.
    """

    def __init__(self, recipe):
        scale = recipe.rescale if recipe.rescale is not None else 1.0
        mean = recipe.mean if recipe.mean is not None else (0.0,) * 3
        std = recipe.std if recipe.std is not None else (1.0,) * 3
        self.multiply = [scale / s for s in std]
        self.add = [-m / s for m, s in zip(mean, std)]
        self.cache = {}

    def __call__(self, pixels, dtype):
        affine = self.cache.get(pixels.device)
        if affine is None:
            affine = tuple(torch.tensor(v, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
                           for v in (self.multiply, self.add))
            self.cache[pixels.device] = affine
        # A float32 copy, then a multiply and an add in place: on the CPU one addcmul over the
        # broadcast affine took 16x as long (docs/performance.md).
        return pixels.to(torch.float32, copy=True).mul_(affine[0]).add_(affine[1]).to(dtype)

    def __getstate__(self):  # deepcopy / pickle without device tensors
        return {**self.__dict__, "cache": {}}
