"""Training augmentation on the fast image path: random-resized crop, horizontal flip, RandAugment.

Definitions are timm's (RandomResizedCropAndInterpolation, rand_augment_transform "rand-mM-nN"):

- crop: area uniform in crop_scale of the image's area, aspect ratio log-uniform in (3/4, 4/3),
  w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first of 10 tries that fits
  is placed uniformly; otherwise a centre crop of the whole image clamped to the ratio range.
  The crop goes straight to the processor's input size with Pillow's resize(box=...), after a
  JPEG draft when the crop is at least twice the input size.
- flip: left-right with probability 0.5, never for a dataset whose registry says hflip: false.
- RandAugment: N ops drawn uniformly with replacement from 15; each applies with probability
  0.5; magnitude M of 10; signed ops negate with probability 0.5; geometric ops use bilinear
  or bicubic (drawn) and fill with the processor's mean colour.

Every draw comes from numpy's generator seeded by (seed, epoch, sample index, repeat), so a
sample gets the same augmentation in any worker, on any rank, at any world size, after resume.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from preprocess import Pixels, draft, new_pixels, to_rgb, upright

AUGMENTS = ("none", "crop_flip", "randaugment")
CROP_RATIO = (3 / 4, 4 / 3)
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RESAMPLES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
CROP_SCALE, RANDAUGMENT_N, RANDAUGMENT_M = (0.08, 1.0), 2, 9  # the flags' defaults (timm's)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of one run; modes and hflip are per dataset id (registry order)."""
    modes: tuple
    hflip: tuple
    crop_scale: tuple = CROP_SCALE
    randaugment_n: int = RANDAUGMENT_N
    randaugment_m: float = RANDAUGMENT_M
    seed: int = 0


def check_augment_flags(crop_scale, randaugment_n, randaugment_m):
    """One clear error for --crop_scale / --randaugment_n / --randaugment_m out of range."""
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"--crop_scale {low} {high}: need 0 < MIN <= MAX <= 1")
    if isinstance(randaugment_n, bool) or not isinstance(randaugment_n, int) or randaugment_n < 0:
        raise ValueError(f"--randaugment_n must be a whole number >= 0, got {randaugment_n!r}")
    if not 0 <= randaugment_m <= 10:
        raise ValueError(f"--randaugment_m must be in [0, 10] (timm's magnitude scale), "
                         f"got {randaugment_m!r}")


def augment_config(mode, registry, inputs, crop_scale=CROP_SCALE, randaugment_n=RANDAUGMENT_N,
                   randaugment_m=RANDAUGMENT_M, seed=0):
    """The run's AugmentConfig, or None when no dataset is augmented.

    mode: --augment (None: crop_flip where the fast image path applies, else none); a
    registry entry's `augment` overrides it for that dataset. Augmentation needs the fast
    path (a vision backbone with a processor pixel_recipe understands); elsewhere (Qwen2-VL
    and other processor-path backbones) asking for it is an error, not a silent no-op. So is
    --crop_scale or --randaugment_n / _m where no dataset is augmented with it.
    """
    fast = getattr(inputs, "recipe", None) is not None
    if mode is not None and mode not in AUGMENTS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTS)}, got {mode!r}")
    default = mode if mode is not None else ("crop_flip" if fast else "none")
    modes = tuple(spec.augment or default for spec in registry.values())
    if not fast:  # asked for where it cannot run: the reason first, before any flag's
        asked = [f"--augment {mode}"] if mode not in (None, "none") else []
        asked += [f"dataset {name!r} (registry augment: {spec.augment})"
                  for name, spec in registry.items() if spec.augment not in (None, "none")]
        if asked:
            raise ValueError(
                f"{', '.join(asked)}: augmentation runs on the fast image path of vision "
                f"backbones; this model's inputs ({type(inputs).__name__}) go through its own "
                "processor (vision-language or unsupported processor). Use --augment none.")
    used = set(modes) if fast else set()
    inert = [flag for flag, given, uses in (
        ("--crop_scale", tuple(crop_scale) != CROP_SCALE, {"crop_flip", "randaugment"}),
        ("--randaugment_n", randaugment_n != RANDAUGMENT_N, {"randaugment"}),
        ("--randaugment_m", randaugment_m != RANDAUGMENT_M, {"randaugment"})) if given and
        not used & uses]
    if inert:
        per_dataset = ", ".join(f"{n} {m if fast else 'none'}" for n, m in zip(registry, modes))
        raise ValueError(f"{', '.join(inert)}: no dataset is augmented with it (augmentation: "
                         f"{per_dataset}; set --augment or the registry's augment)")
    if not fast:
        return None
    check_augment_flags(tuple(crop_scale), randaugment_n, randaugment_m)
    if all(m == "none" for m in modes):
        return None
    return AugmentConfig(modes, tuple(spec.hflip for spec in registry.values()),
                         tuple(float(s) for s in crop_scale), int(randaugment_n),
                         float(randaugment_m), int(seed))


def sample_rng(seed, epoch, index, repeat=0):
    """The generator of one sample's draws: the same for the same (seed, epoch, index, repeat)."""
    return np.random.default_rng([seed, epoch, index, repeat, 0x61756721])


def draw_crop(rng, width, height, scale=(0.08, 1.0), ratio=CROP_RATIO):
    """timm's random-resized-crop box (left, top, w, h) on a width x height image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_randaugment(rng, n, magnitude):
    """N ops with their arguments: [(name, argument or None, resample)], skipped ops left out.

    Four draws per layer whether or not it applies, so later draws never shift.
    """
    ops = []
    level = max(0.0, min(float(magnitude), 10.0)) / 10
    for _ in range(n):
        name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
        applies = rng.random() <= 0.5
        sign = -1 if rng.random() > 0.5 else 1
        resample = RESAMPLES[int(rng.integers(2))]
        if not applies:
            continue
        if name in ("Rotate",):
            arg = sign * level * 30.0
        elif name in ("ShearX", "ShearY"):
            arg = sign * level * 0.3
        elif name in ("TranslateXRel", "TranslateYRel"):
            arg = sign * level * 0.45
        elif name == "Posterize":
            arg = int(level * 4)
        elif name == "Solarize":
            arg = int(level * 256)
        elif name == "SolarizeAdd":
            arg = int(level * 110)
        elif name in ("Color", "Contrast", "Brightness", "Sharpness"):
            arg = level * 1.8 + 0.1
        else:
            arg = None
        ops.append((name, arg, resample))
    return ops


def apply_op(image, name, arg, resample, fill):
    """One RandAugment op on an RGB image (timm's definitions)."""
    w, h = image.size
    affine = dict(resample=resample, fillcolor=fill)
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(arg, **affine)
    if name == "Posterize":
        return image if arg >= 8 else ImageOps.posterize(image, arg)
    if name == "Solarize":
        return ImageOps.solarize(image, arg)
    if name == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return image.point(lut * 3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(image).enhance(arg)
    matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
              "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]
    return image.transform(image.size, Image.Transform.AFFINE, matrix, **affine)


def decode_augmented(path, recipe, config, dataset_id, rng, use_draft=True):
    """One training image -> preprocess.Pixels at the recipe's output size, augmented per
    config. Without RandAugment the flip is left to Pixels.write (a reversed copy into the
    batch); RandAugment's geometric ops come after it, so there Pillow flips first."""
    mode = config.modes[dataset_id]
    out_h, out_w = recipe.output_size
    with Image.open(path) as image:
        image = upright(image)  # the crop is drawn on the picture as it is seen
        width, height = image.size
        left, top, w, h = draw_crop(rng, width, height, config.crop_scale)
        flip = rng.random() < 0.5 and config.hflip[dataset_id]
        box = (left, top, left + w, top + h)
        if use_draft:
            whole = draft(image, math.ceil(width * out_w / w), math.ceil(height * out_h / h))
            if whole is not None:
                s = whole[2] / width  # decoded pixels per original pixel
                box = tuple(v * s for v in box)
        image = to_rgb(image, recipe.alpha_on_white)
        image = image.resize((out_w, out_h), recipe.resample, box=box)
    if mode != "randaugment":
        return Pixels(image, flip=flip)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mean = recipe.mean or (0.5, 0.5, 0.5)
    fill = tuple(min(255, round(255 * m)) for m in mean)
    for name, arg, resample in draw_randaugment(rng, config.randaugment_n, config.randaugment_m):
        image = apply_op(image, name, arg, resample, fill)
    return Pixels(image)


def load_augmented(path, recipe, config, dataset_id, rng, use_draft=True):
    """One training image -> (3, H, W) uint8 at the recipe's output size, augmented per config."""
    pixels = decode_augmented(path, recipe, config, dataset_id, rng, use_draft)
    out = new_pixels(pixels.size)
    pixels.write(out)
    return out
