"""The fast image path against the Hugging Face processors it reproduces, on real image files."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import ROOT, read_jsonl
from dataset import RecordTable, auto_num_workers, make_loader
from backbone import load_backbone, ImageInputs
from model import MaskedClassifier
from preprocess import PixelNormalize, Pixels, center_crop, load_pixels, pixel_recipe

PROCESSORS = {  # the Pillow backends of the processors vision folders ship
    "vit": lambda: transformers.ViTImageProcessorPil(),
    "vit_odd": lambda: transformers.ViTImageProcessorPil(size={"height": 96, "width": 72},
                                                         resample=3),
    "convnext_crop_pct": lambda: transformers.ConvNextImageProcessorPil(
        size={"shortest_edge": 224}),
    "convnext_384": lambda: transformers.ConvNextImageProcessorPil(),
    "dinov2_bit": lambda: transformers.BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "siglip": lambda: transformers.SiglipImageProcessorPil(),
    "clip": lambda: transformers.CLIPImageProcessorPil(),
    "deit": lambda: transformers.DeiTImageProcessorPil(),
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_dir):
    """JPEG photographs at 384-512 px, an RGBA PNG, and demo PNGs (grayscale digits, faces)."""
    from skimage import data
    out = tmp_path_factory.mktemp("photos")
    files = []
    for name, size in [("astronaut", (512, 512)), ("coffee", (512, 384)),
                       ("chelsea", (400, 500))]:
        path = str(out / f"{name}.jpg")
        Image.fromarray(getattr(data, name)()).resize(size, Image.Resampling.BICUBIC).save(
            path, quality=90)
        files.append(path)
    rgba = Image.fromarray(data.chelsea()).resize((300, 240)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (240, 1))
    rgba.putalpha(Image.fromarray(alpha))
    files.append(str(out / "alpha.png"))
    rgba.save(files[-1])
    files += [str(demo_dir / "digits" / "images" / "00003.png"),
              str(demo_dir / "faces" / "images" / "00150.png")]
    return files


def reference(processor, path):
    """The processor's output as the project feeds it: RGB from Pillow, or the raw image where
    the processor converts itself (do_convert_rgb composites transparency onto white)."""
    image = Image.open(path)
    image = image if processor.do_convert_rgb else image.convert("RGB")
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_fast_path_equals_processor(name, photos):
    processor = PROCESSORS[name]()
    recipe = pixel_recipe(processor)
    assert recipe is not None
    normalize = PixelNormalize(recipe)
    for path in photos:
        pixels = load_pixels(path, recipe, use_draft=False)
        assert pixels.dtype == np.uint8 and pixels.shape == (3, *recipe.output_size)
        ours = normalize(torch.from_numpy(pixels)[None], torch.float32)[0]
        expected = reference(processor, path)
        assert ours.shape == expected.shape, path
        # same uint8 resize/crop: only float32 rounding of (x * scale - mean) / std, |x| <= 4
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=path)


def test_normalisation_leaves_its_input_as_it_was():
    """A float batch is normalised into a copy: the loader's or the caller's tensor is kept."""
    normalize = PixelNormalize(pixel_recipe(transformers.ViTImageProcessorPil()))
    for pixels in (torch.full((1, 3, 4, 4), 255, dtype=torch.uint8),
                   torch.full((1, 3, 4, 4), 255.0)):
        before = pixels.clone()
        out = normalize(pixels, torch.float32)
        assert torch.equal(pixels, before)
        torch.testing.assert_close(out, torch.ones(1, 3, 4, 4))  # (1 - 0.5) / 0.5


def test_draft_difference_is_bounded(photos):
    """draft() on JPEGs at least twice the resized size: smoother, within the stated bound."""
    for processor in (transformers.ViTImageProcessorPil(), transformers.CLIPImageProcessorPil(),
                      transformers.ViTImageProcessorPil(size={"height": 128, "width": 128})):
        recipe = pixel_recipe(processor)
        drafted = 0
        for path in photos:
            exact = load_pixels(path, recipe, use_draft=False).astype(np.int16)
            fast = load_pixels(path, recipe, use_draft=True).astype(np.int16)
            difference = np.abs(exact - fast)
            if not path.endswith(".jpg"):
                assert not difference.any(), path  # draft applies to JPEGs only
                continue
            drafted += bool(difference.any())
            assert difference.mean() < 3 and np.percentile(difference, 99) <= 20, path
        assert drafted >= 1  # astronaut at 512 px decodes at half scale


def test_processors_the_path_cannot_reproduce_keep_their_own():
    assert pixel_recipe(transformers.Qwen2VLImageProcessorPil()) is None  # patchify
    assert pixel_recipe(transformers.ViTImageProcessorPil(do_pad=True)) is None
    assert pixel_recipe(transformers.CLIPImageProcessorPil(do_center_crop=False)) is None
    assert ImageInputs(transformers.Qwen2VLImageProcessorPil()).pixel_normalize is None

    class ViTImageProcessor(transformers.ViTImageProcessorPil):
        """A folder's own processor (--trust_remote_code) named as a stock one: BGR output, as
        MobileViT's do_flip_channel_order. It was taken by its name for the stock one."""
        def process_image(self, *args, **kwargs):
            return np.ascontiguousarray(super().process_image(*args, **kwargs)[::-1])
    assert pixel_recipe(transformers.ViTImageProcessorPil()) is not None
    assert pixel_recipe(ViTImageProcessor()) is None


def test_normalisation_in_model_dtype_survives_casts(tiny_vit, small_data):
    """bf16 weights: one rounding of the float32 result; the affine is not rounded by .to()."""
    backbone, inputs = load_backbone(tiny_vit)
    model = MaskedClassifier(backbone, 10, inputs=inputs)
    keys = set(model.state_dict())
    model = model.to(torch.bfloat16)
    assert set(model.state_dict()) == keys  # checkpoints unchanged
    path = read_jsonl(small_data["faces_val"])[0]["image_path"]
    pixels = torch.from_numpy(load_pixels(path, inputs.recipe))[None]
    ours = inputs.pixel_normalize(pixels, torch.bfloat16)
    expected = inputs([Image.open(path).convert("RGB")], ["faces"])["pixel_values"]
    assert ours.dtype == torch.bfloat16
    # |x| <= 1 here: one bf16 rounding is at most 2^-8 relative, plus float32 rounding
    torch.testing.assert_close(ours.float(), expected, atol=2 ** -8 + 1e-6, rtol=0)
    unnormalised = MaskedClassifier(backbone, 10, inputs=inputs)
    unnormalised.pixel_normalize = None
    with pytest.raises(ValueError, match="need the processor's normalisation"):
        unnormalised(pixel_values=pixels)


def records_of(*files):
    rows = [row for f in files for row in read_jsonl(f)]
    names = ["digits", "faces"]
    return RecordTable([r["image_path"] for r in rows], [r["label"] for r in rows],
                       [names.index(r["dataset_name"]) for r in rows], ["x.jsonl"],
                       [0] * len(rows), list(range(1, len(rows) + 1)))


def test_fast_loader_gives_the_model_what_the_processor_gives(tiny_vit, small_data):
    backbone, inputs = load_backbone(tiny_vit)
    model = MaskedClassifier(backbone, 10, inputs=inputs).eval()
    records = records_of(small_data["digits_val"], small_data["faces_val"])
    order = list(range(len(records)))[::-1]
    options = dict(batch_size=8, num_workers=0)
    old = list(make_loader(records, order, inputs, ["digits", "faces"], **options))
    new = list(make_loader(records, order, inputs, ["digits", "faces"], fast_path=True, **options))
    assert len(old) == len(new)
    for a, b in zip(old, new):
        assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape[1] == 3
        assert set(a) == set(b)
        for key in ("labels", "dataset_ids", "indices"):
            assert torch.equal(a[key], b[key])
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=b["pixel_values"]),
                                       model(pixel_values=a["pixel_values"]), atol=1e-5, rtol=0)


def test_auto_num_workers(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_num_workers() == max(0, min(16, cpus - 1))
    assert auto_num_workers(cap=0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 4))
    assert auto_num_workers() == 0  # more processes than CPUs: load in the main process
    # a process pinned to one CPU (as a scheduler would pin it) gets no workers
    script = ("import os, dataset; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})"
              "; print(dataset.auto_num_workers())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "LOCAL_WORLD_SIZE": "1"}, check=True)
    assert out.stdout.strip() == "0"


def test_pixels_write_crops_and_flips_in_its_one_copy():
    """Pixels.write equals the array path it replaces: asarray, centre crops (padding where the
    image is smaller), then a left-right flip of the result, transposed to (3, H, W)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    for crops in [(), ((30, 41),), ((33, 44), (21, 20)), ((45, 41),), ((30, 60), (20, 70))]:
        for flip in (False, True):
            expected = np.asarray(image)
            for crop in crops:
                expected = center_crop(expected, *crop)
            expected = expected[:, ::-1] if flip else expected
            pixels = Pixels(image, crops, flip)
            assert pixels.size == expected.shape[:2]
            out = torch.full((3, *pixels.size), 7, dtype=torch.uint8)
            pixels.write(out)
            assert np.array_equal(out.numpy(), expected.transpose(2, 0, 1)), (crops, flip)
    flipped = Pixels(image, flip=True)  # the augmented path's flip: Pillow's
    out = np.empty((3, 37, 50), np.uint8)
    flipped.write(out)
    assert np.array_equal(out, np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                          ).transpose(2, 0, 1))


def test_a_photographs_exif_orientation_is_applied_on_every_path(tmp_path):
    """A phone photograph stored sideways with EXIF orientation 6 (turn 90 degrees): every path
    sees it upright, as transformers' load_image (an exported model's pipeline) does."""
    from skimage import data
    from augment import augment_config
    from data.loaders import ImageDataset, pixel_path
    from dataset import DatasetSpec
    from PIL import ImageOps
    stored = Image.fromarray(data.coffee()).resize((96, 64))  # 96 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = str(tmp_path / "phone.jpg")
    stored.save(photo, quality=90, exif=exif)
    with Image.open(photo) as image:
        seen = ImageOps.exif_transpose(image)  # 64 wide, 96 high
        seen.save(tmp_path / "seen.png")  # lossless: the same pixels, no tag
    assert seen.size == (64, 96)
    processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 24})
    recipe = pixel_recipe(processor)
    assert np.array_equal(load_pixels(photo, recipe), load_pixels(str(tmp_path / "seen.png"),
                                                                   recipe))
    records = RecordTable([photo], [0], [0], ["x.jsonl"], [0], [1])
    image, *_ = ImageDataset(records)[0]  # the processor path's decode
    assert image.size == (64, 96)
    inputs = ImageInputs(processor)
    config = augment_config("crop_flip", {"d": DatasetSpec("d", 2)}, inputs)
    upright = RecordTable([str(tmp_path / "seen.png")], [0], [0], ["x.jsonl"], [0], [1])
    for epoch in range(4):  # the same draws: a crop of the picture as it is seen
        a, b = (ImageDataset(table, pixels=pixel_path(inputs, True, config))[(0, epoch)][0]
                for table in (records, upright))
        out = [np.empty((3, 32, 24), np.uint8) for _ in range(2)]
        a.write(out[0])
        b.write(out[1])
        assert np.array_equal(out[0], out[1])
