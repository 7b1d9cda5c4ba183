"""Image folders as users keep them (issue 28): symlinked data (followed, each folder once: a
loop is refused), links to nothing, class folders without images, integer class folders (the
integer is the label, as in JSONL), and 16-bit greyscale scans (scaled to 8 bits on every decode
path, not clipped to white)."""
import os

import numpy as np
import pytest
from PIL import Image

import train
from conftest import train_args, write_jsonl
from data.loaders import FastPixels
from dataset import DataError, ImageDataset, load_registry, read_records
from preprocess import pixel_recipe, to_rgb


def write_png(path, value, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)
    return str(path)


def faces_folder(root, n=3):
    """root/background and root/face, n images each."""
    for c, cls in enumerate(("background", "face")):
        for i in range(n):
            write_png(root / cls / f"{i}.png", 100 * c + i)
    return root


def read(root, training=False, say=None, registry=None):
    return read_records([f"f={root}"], load_registry(registry or {"f": {}}), training=training,
                        say=say or (lambda m: None))


def test_a_symlink_loop_is_refused_naming_the_link(tmp_path):
    root = faces_folder(tmp_path / "faces")
    assert len(read(root)) == 6
    os.symlink("..", root / "face" / "loop")  # the user's case: every image again, as a face
    with pytest.raises(DataError) as e:
        read(root)
    text = str(e.value)
    assert f"{root}/face/loop (a link to {root}): the same folder as {root}" in text
    assert "a link to a folder above it is a loop" in text
    os.remove(root / "face" / "loop")
    os.symlink(".", root / "face" / "self")  # the class folder itself, deeper down
    with pytest.raises(DataError) as e:
        read(root)
    assert f"{root}/face/self (a link to {root}/face): the same folder as {root}/face" in str(
        e.value)


def test_links_to_folders_elsewhere_are_read_once_each(tmp_path):
    root = faces_folder(tmp_path / "faces")
    more = tmp_path / "elsewhere" / "more_faces"
    for i in range(2):
        write_png(more / f"m{i}.png", 200 + i)
    backgrounds = tmp_path / "elsewhere" / "backgrounds"
    write_png(backgrounds / "b.png", 7)
    os.symlink(more, root / "face" / "more")  # a linked subfolder
    os.symlink(backgrounds, root / "sky")  # a linked class folder
    records = read(root)
    paths = [records[i].image_path for i in range(len(records))]
    labels = dict(zip(paths, records.labels.tolist()))
    assert len(records) == 9
    assert labels[f"{root}/face/more/m1.png"] == 1 and labels[f"{root}/sky/b.png"] == 2
    assert paths.index(f"{root}/face/2.png") < paths.index(f"{root}/face/more/m0.png")
    # a second link to a folder read already: its images would count twice, under two classes
    os.symlink(more, root / "background" / "again")
    with pytest.raises(DataError) as e:
        read(root)
    assert (f"{root}/face/more (a link to {more}): the same folder as {root}/background/again "
            f"(a link to {more}), read already") in str(e.value)


def test_a_dangling_link_is_refused_up_front(tmp_path):
    root = faces_folder(tmp_path / "faces")
    os.symlink(tmp_path / "gone.png", root / "face" / "x.png")
    os.symlink(tmp_path / "unmounted", root / "background" / "more")  # a folder, maybe
    os.symlink(tmp_path / "lost", root / "sky")  # a class folder
    with pytest.raises(DataError) as e:
        read(root)
    text = str(e.value)
    assert text.startswith("3 problem(s)")
    for link, target in [("face/x.png", "gone.png"), ("background/more", "unmounted"),
                         ("sky", "lost")]:
        assert (f"{root}/{link}: a link to {tmp_path}/{target}, which cannot be read (No such "
                "file or directory)") in text


def test_an_empty_class_folder_is_a_note_and_refused_in_training(tmp_path, tiny_vit, capsys):
    root = faces_folder(tmp_path / "faces")
    (root / "sky").mkdir()
    (root / "sky" / "readme.txt").write_text("not an image")
    said = []
    records = read(root, say=said.append)  # a validation split may lack a class
    assert len(records) == 6
    assert any(f"1 class folder(s) without any image ({root}/sky): their class has no samples "
               "in dataset 'f'" in s for s in said), said
    with pytest.raises(DataError) as e:
        read(root, training=True)
    assert (f"{root}/sky): their class has no samples in dataset 'f'; training data needs "
            "samples of every class: add them, or remove the empty folder(s)") in str(e.value)
    # train.py reads --train_data as training data: refused before the first step
    data = {"digits_train": f"f={root}", "faces_train": f"f={root}",
            "digits_val": f"f={root}", "faces_val": f"f={root}", "registry": "f=3"}
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data, tiny_vit, tmp_path / "run", "--max_steps", 1))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{root}/sky): their class has no samples" in err


def test_integer_class_folders_are_their_labels_as_in_jsonl(tmp_path):
    root = tmp_path / "digits"
    rows = []
    for c in range(11):  # as strings, "10" would sort before "2"
        for i in range(2):
            path = write_png(root / str(c) / f"{i}.png", 20 * c + i)
            rows.append({"image_path": path, "label": c, "dataset_name": "d"})
    registry = {}
    folder = read_records([f"d={root}"], registry, fixed=False, say=lambda m: None)
    assert registry["d"].labels == [str(c) for c in range(11)]
    assert registry["d"].num_classes == 11
    jsonl = read_records([write_jsonl(tmp_path / "d.jsonl", rows)],
                         load_registry({"d": {"num_classes": 11}}))
    def labels(records):
        return {records[i].image_path: int(records.labels[i]) for i in range(len(records))}
    assert labels(folder) == labels(jsonl) == {r["image_path"]: r["label"] for r in rows}
    assert len(folder) == len(jsonl) == 22
    # a validation folder maps onto the training folder's classes by name
    val = tmp_path / "val"
    write_png(val / "10" / "v.png", 1)
    write_png(val / "2" / "v.png", 2)
    records = read_records([f"d={val}"], registry, say=lambda m: None)
    assert records.labels.tolist() == [10, 2]


def test_integer_class_folders_with_a_gap_or_a_clash(tmp_path):
    root = tmp_path / "d"
    for c in ("00", "01", "03"):
        write_png(root / c / "a.png", 1)
    said, registry = [], {}
    records = read_records([f"d={root}"], registry, fixed=False, say=said.append)
    assert registry["d"].labels == ["00", "01", "02", "03"]  # the gap is class 2, named "02"
    assert records.labels.tolist() == [0, 1, 3]
    assert any("1 class(es) without a folder (the class folders are integers, each the label, "
               "so 02 are classes too): their class has no samples" in s for s in said), said
    with pytest.raises(DataError, match="02 are classes too.*give the dataset's `labels`"):
        read_records([f"d={root}"], {}, fixed=False, training=True)
    write_png(root / "1" / "a.png", 1)
    with pytest.raises(DataError, match="class folders '01' and '1' are the same integer, 1"):
        read_records([f"d={root}"], {}, fixed=False)
    # a name that is not an integer: all sorted by name, as before
    write_png(root / "x" / "a.png", 1)
    registry = {}
    read_records([f"d={root}"], registry, fixed=False)
    assert registry["d"].labels == ["00", "01", "03", "1", "x"]


def gradient16(tmp_path):
    """A 16-bit greyscale PNG (Pillow reads it as mode I;16): a gradient over the whole range."""
    values = (np.arange(4 * 256, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)
    path = tmp_path / "scan" / "a" / "g16.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16" and np.array_equal(np.asarray(im), values)
    return path, (values >> 8).astype(np.uint8)


def test_a_16bit_png_decodes_to_its_8bit_values_not_white(tmp_path):
    path, expected = gradient16(tmp_path)
    assert expected.min() == 0 and expected.max() == 255 and len(np.unique(expected)) == 256
    records = read(tmp_path / "scan", registry={"f": {"labels": ["a"]}})
    image = ImageDataset(records)[0][0]  # the processor path of training and evaluation
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], expected)
    from transformers import ViTImageProcessorPil
    recipe = pixel_recipe(ViTImageProcessorPil(size={"height": 4, "width": 256}))
    fast = ImageDataset(records, pixels=FastPixels(recipe, draft=False))[0][0]  # the fast path
    out = np.empty((3, 4, 256), dtype=np.uint8)
    fast.write(out)
    for channel in range(3):
        assert np.array_equal(out[channel], expected)
    from tasks.images import read_image  # the generator's and autoencoder's path
    grey = read_image(str(path), 8, 1)
    with Image.open(path) as im:
        resized = np.asarray(to_rgb(im).convert("L").resize((8, 8), Image.BICUBIC))
    assert np.allclose(grey[0].numpy(), resized / 127.5 - 1)
    assert grey.min() < -0.9  # a clipped decode is all white: +1


def test_wide_modes_scaled_and_refused_outside_their_range(tmp_path):
    ints = np.array([[0, 255, 256, 40000, 65535]], dtype=np.int32)
    Image.fromarray(ints).save(tmp_path / "i.tif")  # mode I
    floats = np.array([[0, 0.25, 0.5, 1]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "f.tif")  # mode F
    Image.fromarray(floats * 255).save(tmp_path / "f255.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
        assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [0, 0, 1, 156, 255]
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "F"
        assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [0, 64, 128, 255]
    with Image.open(tmp_path / "f255.tif") as im, pytest.raises(
            ValueError, match=r"float pixels \(mode F\) from 0 to 255: expected them in \[0, 1\]"):
        to_rgb(im)
    # a 16-bit PNG's transparent grey value is composited onto white where the recipe asks
    values = np.array([[0, 1000, 30000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "t.png", transparency=1000)
    with Image.open(tmp_path / "t.png") as im:
        assert im.info["transparency"] == 1000
        assert np.asarray(to_rgb(im, alpha_on_white=True))[0, :, 0].tolist() == [0, 255, 117]
        assert np.asarray(to_rgb(im))[0, :, 0].tolist() == [0, 3, 117]
    # the 8-bit RGB path: the image itself, loaded, no copy
    write_png(tmp_path / "rgb.png", 9)
    Image.open(tmp_path / "rgb.png").convert("RGB").save(tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as im:
        assert to_rgb(im) is im
    assert np.asarray(im)[0, 0].tolist() == [9, 9, 9]  # decoded before the file closed
