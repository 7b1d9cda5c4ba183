"""Augmentation against its definition (timm's random-resized crop, flip, RandAugment)."""
import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from augment import (RANDAUGMENT_OPS, AugmentConfig, apply_op, augment_config, draw_crop,
                     draw_randaugment, load_augmented, sample_rng)
from dataset import DatasetSpec, RecordTable, load_registry, make_loader
from backbone import load_backbone, ImageInputs
from preprocess import load_pixels


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """A 64 x 48 JPEG-free image, black on the left half and white on the right."""
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    path = str(tmp_path_factory.mktemp("halves") / "halves.png")
    Image.fromarray(pixels).save(path)
    return path


def vit_inputs(size=32):
    return ImageInputs(transformers.ViTImageProcessorPil(size={"height": size, "width": size}))


def test_crop_area_and_aspect_ranges():
    width, height, scale = 500, 375, (0.08, 1.0)
    areas, ratios = [], []
    for i in range(3000):
        left, top, w, h = draw_crop(sample_rng(0, 0, i), width, height, scale)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    # w and h are rounded to whole pixels: allow that rounding in area and ratio
    assert min(areas) >= 0.08 * (1 - 2 / math.sqrt(0.08 * width * height)) - 1e-9
    assert max(areas) <= 1.0
    assert min(areas) < 0.1 and max(areas) > 0.9  # the whole range is used
    slack = 1 / math.sqrt(0.08 * width * height / (4 / 3))  # one pixel on the short side
    assert 3 / 4 * (1 - 2 * slack) <= min(ratios) and max(ratios) <= 4 / 3 * (1 + 2 * slack)
    assert abs(np.mean(np.log(ratios))) < 0.03  # log-uniform: symmetric around ratio 1


def test_crop_falls_back_to_centre_crop_in_the_ratio_range():
    # a 1000 x 100 strip cannot hold a crop of >= 99 % of its area with ratio <= 4/3
    left, top, w, h = draw_crop(sample_rng(0, 0, 0), 1000, 100, (0.99, 1.0))
    assert (left, top, w, h) == ((1000 - 133) // 2, 0, 133, 100)
    left, top, w, h = draw_crop(sample_rng(0, 0, 0), 100, 1000, (0.99, 1.0))
    assert (left, top, w, h) == (0, (1000 - 133) // 2, 100, 133)


def flipped(pixels):
    """On the halves image: is the dark half on the right?"""
    return pixels[:, :, : pixels.shape[2] // 4].mean() > pixels[:, :, -pixels.shape[2] // 4:].mean()


def test_flip_probability_and_hflip_false(halves):
    recipe = vit_inputs().recipe
    config = AugmentConfig(("crop_flip", "crop_flip"), (True, False), crop_scale=(0.9, 1.0))
    n = 240
    flips = sum(flipped(load_augmented(halves, recipe, config, 0, sample_rng(1, 0, i)))
                for i in range(n))
    assert abs(flips - n / 2) < 5 * math.sqrt(n / 4)  # binomial(240, 0.5): 5 standard deviations
    assert not any(flipped(load_augmented(halves, recipe, config, 1, sample_rng(1, 0, i)))
                   for i in range(60))


def test_same_key_same_draws_other_key_other_draws(halves):
    recipe = vit_inputs().recipe
    config = AugmentConfig(("randaugment",), (True,), randaugment_n=3)
    one = load_augmented(halves, recipe, config, 0, sample_rng(7, 2, 11))
    assert np.array_equal(one, load_augmented(halves, recipe, config, 0, sample_rng(7, 2, 11)))
    others = [load_augmented(halves, recipe, config, 0, sample_rng(*key))
              for key in ((7, 3, 11), (7, 2, 12), (8, 2, 11))]
    assert all(not np.array_equal(one, other) for other in others)
    assert one.shape == (3, 32, 32) and one.dtype == np.uint8


def test_randaugment_draws_follow_timm_magnitudes():
    expected = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateXRel": 0.405,
                "TranslateYRel": 0.405, "Posterize": 3, "Solarize": 230, "SolarizeAdd": 99,
                "Color": 1.72, "Contrast": 1.72, "Brightness": 1.72, "Sharpness": 1.72,
                "AutoContrast": None, "Equalize": None, "Invert": None}
    seen, applied, layers, signs = set(), 0, 0, set()
    for i in range(2000):
        ops = draw_randaugment(sample_rng(0, 0, i), 2, 9)
        layers += 2
        applied += len(ops)
        for name, arg, resample in ops:
            seen.add(name)
            assert resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
            if expected[name] is None:
                assert arg is None
            else:
                assert abs(abs(arg) - expected[name]) < 1e-9, name
                if arg < 0:
                    signs.add(name)
    assert seen == set(RANDAUGMENT_OPS)
    assert signs == {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert abs(applied / layers - 0.5) < 5 * math.sqrt(0.25 / layers)  # each op applies w.p. 0.5


def test_randaugment_ops_do_what_they_define():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    fill = (128, 128, 128)
    run = lambda name, arg: np.asarray(apply_op(image, name, arg,  # noqa: E731
                                                Image.Resampling.BILINEAR, fill)).astype(int)
    p = pixels.astype(int)
    assert np.array_equal(run("Invert", None), 255 - p)
    assert np.array_equal(run("Solarize", 230), np.where(p >= 230, 255 - p, p))
    assert np.array_equal(run("SolarizeAdd", 99), np.where(p < 128, np.minimum(255, p + 99), p))
    assert np.array_equal(run("Posterize", 3), p & 0b11100000)
    # translate by a whole number of pixels: out[:, x] = in[:, x + 3], the rest is fill
    shifted = run("TranslateXRel", 3 / 30)
    assert np.array_equal(shifted[:, :27], p[:, 3:])
    assert (shifted[:, 27:] == 128).all()
    shifted = run("TranslateYRel", -4 / 20)
    assert np.array_equal(shifted[4:], p[:16]) and (shifted[:4] == 128).all()
    assert np.array_equal(run("Brightness", 1.0), p) and np.array_equal(run("Rotate", 0.0), p)
    dark = run("Brightness", 0.5)  # blend with black
    assert np.abs(dark - p * 0.5).max() <= 1


def test_loader_draws_depend_on_sample_not_worker_or_batch(halves):
    """The same (seed, epoch, index) gives the same pixels with 0 or 2 workers, any batch size,
    a persistent loader re-aimed at the next epoch, or a fresh one; dataset 'none' is eval."""
    inputs = vit_inputs()
    records = RecordTable([halves] * 12, [0] * 12, [0] * 6 + [1] * 6, ["x.jsonl"], [0] * 12,
                          list(range(1, 13)))
    registry = {"a": DatasetSpec("a", 1), "b": DatasetSpec("b", 1, augment="none")}
    config = augment_config("randaugment", registry, inputs, seed=3)
    order = [5, 0, 7, 11, 2, 3, 9, 1]

    def pixels(workers, batch, epoch, loader=None):
        if loader is None:
            loader = make_loader(records, order, inputs, ["a", "b"], batch_size=batch,
                                 num_workers=workers, fast_path=True, augment=config, epoch=epoch)
        return torch.cat([b["pixel_values"] for b in loader]), loader

    reference, _ = pixels(0, 3, 1)
    assert torch.equal(pixels(2, 4, 1)[0], reference)
    persistent = make_loader(records, order, inputs, ["a", "b"], batch_size=4, num_workers=1,
                             fast_path=True, augment=config, epoch=0, persistent_workers=True)
    first, _ = pixels(None, None, 0, persistent)
    persistent.sampler.set(order, 1)
    assert torch.equal(pixels(None, None, 1, persistent)[0], reference)
    assert not torch.equal(first, reference)
    evaluation = torch.from_numpy(load_pixels(halves, inputs.recipe))
    for position, index in enumerate(order):
        assert torch.equal(reference[position], evaluation) == (index >= 6)


def test_augment_is_refused_on_the_processor_path(tiny_qwen2_vl, small_data):
    registry = load_registry(small_data["registry"])
    _, inputs = load_backbone(tiny_qwen2_vl)
    with pytest.raises(ValueError, match="--augment crop_flip: augmentation runs on the fast"):
        augment_config("crop_flip", registry, inputs)
    assert augment_config(None, registry, inputs) is None  # the default: none for VLMs
    assert augment_config("none", registry, inputs) is None
    registry["faces"].augment = "randaugment"
    with pytest.raises(ValueError, match="dataset 'faces'"):
        augment_config(None, registry, inputs)
    with pytest.raises(ValueError, match="augmentation needs the fast image path"):
        make_loader(None, [], inputs, ["digits", "faces"], batch_size=2, num_workers=0,
                    augment=AugmentConfig(("crop_flip",) * 2, (True, True)))


def test_augment_defaults_and_bad_flags():
    registry = {"a": DatasetSpec("a", 2), "b": DatasetSpec("b", 2, hflip=False)}
    config = augment_config(None, registry, vit_inputs())
    assert config.modes == ("crop_flip", "crop_flip") and config.hflip == (True, False)
    assert augment_config("none", registry, vit_inputs()) is None
    with pytest.raises(ValueError, match="--crop_scale"):
        augment_config("crop_flip", registry, vit_inputs(), crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="--randaugment_m"):
        augment_config("randaugment", registry, vit_inputs(), randaugment_m=12)
    with pytest.raises(ValueError, match="--augment must be one of"):
        augment_config("mixup", registry, vit_inputs())
