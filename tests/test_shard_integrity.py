"""WebDataset shards damaged the ways files get damaged (cut inside a header or at a member
boundary, a garbled header, a zero block in the middle, a repeated key) are errors naming the
shard and the byte offset or key, in the index and with --streaming, before the first step;
Python's tarfile alone reads each of them as a shorter archive without a word. Also: a Parquet
source without num_classes lists its empty labels with its empty images."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import read_jsonl, run_script
from data.tar_index import INDEX_SUFFIX
from dataset import (DataError, ImageDataset, build_stream, check_classes, load_registry,
                     read_records)
from test_sources import offline_datasets_cache, write_shard  # noqa: F401 (a fixture)

REGISTRY = {"p": {"num_classes": 3, "sampling_weight": 1}}


def encoded(seed, format):
    """A real 16x16 image of noise, encoded by Pillow."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=format)
    return out.getvalue()


SAMPLES = [(f"k{i}", {"jpg" if i % 2 else "png": encoded(i, "JPEG" if i % 2 else "PNG"),
                      **({"cls": str(i % 3).encode()} if i % 3 else
                         {"json": json.dumps({"label": i % 3}).encode()})})
           for i in range(8)]


def headers(path):
    """(name, header offset) of each member, as tarfile reads an intact shard."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset) for m in tar]


def tarfile_members(path):
    """What tarfile alone makes of a shard: the members it lists, without an error."""
    with tarfile.open(path) as tar:
        return len(tar.getmembers())


@pytest.fixture
def shard(tmp_path):
    """An intact shard of 8 samples (PNG or JPEG with .cls or .json labels), its bytes and the
    header offset of sample k4's image."""
    path = write_shard(tmp_path / "good-000.tar", SAMPLES)
    data = open(path, "rb").read()
    offset = dict(headers(path))["k4.png"]
    return path, data, offset


def damaged(tmp_path, data):
    path = tmp_path / "bad-000.tar"
    path.write_bytes(data)
    return str(path)


def test_an_intact_shard_indexes_every_sample_and_label(shard):
    path, _, _ = shard
    records = read_records([f"p={path}"], load_registry(REGISTRY))
    assert [records.member(i) for i in range(len(records))] == [
        f"k{i}.{'jpg' if i % 2 else 'png'}" for i in range(8)]
    assert records.labels.tolist() == [i % 3 for i in range(8)]
    images = ImageDataset(records)
    for i, (_, fields) in enumerate(SAMPLES):
        data = fields["jpg" if i % 2 else "png"]
        with Image.open(io.BytesIO(data)) as im:
            assert np.array_equal(np.asarray(images[i][0]), np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("damage", ["cut inside a header", "cut at a member boundary",
                                    "garbled header", "zero block in the middle",
                                    "cut inside the end blocks"])
def test_a_damaged_shard_is_named_with_its_byte_offset(shard, tmp_path, damage):
    _, data, offset = shard
    end = len(data.rstrip(b"\0"))  # the last member's data ends here; the end blocks follow
    end += -end % 512
    broken, message = {
        "cut inside a header": (data[:offset + 100],
                                f"cut off inside the header at byte {offset}"),
        "cut at a member boundary": (data[:offset], f"cut off after member k3.json: it ends "
                                                    f"at byte {offset} without the end-of-"),
        "garbled header": (data[:offset + 20] + b"garbled" + data[offset + 27:],
                           rf"damaged header at byte {offset} \(bad checksum\)"),
        "zero block in the middle": (data[:offset] + bytes(512) + data[offset:],
                                     f"a zero block at byte {offset} .* but data again at byte "
                                     f"{offset + 512}"),
        "cut inside the end blocks": (data[:end + 512], f"cut off after member k7.cls: it ends "
                                                        f"at byte {end + 512} inside the end-of-"
                                                        f"archive blocks that start at byte {end}"),
    }[damage]
    path = damaged(tmp_path, broken)
    # tarfile alone: the members up to the damage (all 16 but where the end blocks are cut)
    assert tarfile_members(path) == (16 if damage.endswith("end blocks") else 8)
    with pytest.raises(DataError, match=f"bad-000.tar: {message}"):
        read_records([f"p={path}"], load_registry(REGISTRY))


def test_an_index_cached_by_the_old_code_is_built_again(shard, tmp_path):
    """The first version took a cut shard's first half for the whole: its cached index must not
    be trusted now."""
    _, data, offset = shard
    path = damaged(tmp_path, data[:offset])
    with tarfile.open(path) as tar:  # as version 1 cached it: k0..k3, no error
        members = [m for m in tar if m.name.endswith(".png") or m.name.endswith(".jpg")]
    stat = (tmp_path / "bad-000.tar").stat()
    np.savez(path + INDEX_SUFFIX, stamp=np.array([1, stat.st_size, stat.st_mtime_ns]),
             members=np.array([m.name.encode() for m in members]),
             offsets=np.array([m.offset_data for m in members]),
             sizes=np.array([m.size for m in members]), labels=np.array([0, 1, 2, 0]))
    with pytest.raises(DataError, match="bad-000.tar: cut off after member k3.json"):
        read_records([f"p={path}"], load_registry(REGISTRY))


def test_a_repeated_key_names_the_shard_the_key_and_both_members(tmp_path):
    again = write_shard(tmp_path / "again-000.tar",
                        SAMPLES[:3] + [("k1", {"png": encoded(9, "PNG"), "cls": b"2"})])
    offsets = [offset for name, offset in headers(again) if name.startswith("k1.")]
    with pytest.raises(DataError, match=f"again-000.tar: key 'k1' again at member k1.png "
                                        rf"\(byte {offsets[2]}\) after other keys; its first "
                                        rf"member is k1.jpg \(byte {offsets[0]}\)"):
        read_records([f"p={again}"], load_registry(REGISTRY))
    twice = write_shard(tmp_path / "twice-000.tar",
                        [("a", {"png": encoded(1, "PNG")}), ("a", {"png": encoded(2, "PNG"),
                                                                   "cls": b"1"})])
    second = headers(twice)[1][1]
    with pytest.raises(DataError, match=r"twice-000.tar: key 'a' has .png twice: members a.png "
                                        rf"\(byte 0\) and a.png \(byte {second}\)"):
        read_records([f"p={twice}"], load_registry(REGISTRY))


def stream(spec, skip=False, registry=REGISTRY):
    """The training stream of one spec, built as train.py builds it (nothing iterated)."""
    return build_stream([spec], load_registry(registry), True, seed=0, rank=0, world_size=1,
                        buffer=1, skip_bad_images=skip)


def test_streaming_refuses_damaged_local_shards_before_reading(shard, tmp_path):
    path, data, offset = shard
    stream(f"p={path}")  # intact: indexed, and an index is left beside it
    assert (tmp_path / ("good-000.tar" + INDEX_SUFFIX)).is_file()
    damaged(tmp_path, data[:offset + 20] + b"garbled" + data[offset + 27:])
    with pytest.raises(DataError, match=f"bad-000.tar: damaged header at byte {offset}"):
        stream(f"p={tmp_path}/*-000.tar")  # the intact shard and the damaged one
    again = write_shard(tmp_path / "again-001.tar", SAMPLES[:2] + [SAMPLES[0]])
    with pytest.raises(DataError, match="again-001.tar: key 'k0' again at member k0.png"):
        stream(f"p={again}")
    # the first sample without a label: datasets would say its files "don't share the same
    # prefix"; a sample without an image is left to --on_bad_image skip
    holes = write_shard(tmp_path / "holes-000.tar",
                        [("a", {"png": encoded(1, "PNG")}), ("b", {"cls": b"1"}),
                         *SAMPLES[:2]])
    with pytest.raises(DataError) as e:
        stream(f"p={holes}")
    assert "holes-000.tar:a.png: no label" in str(e.value)
    assert "holes-000.tar:b: no image member" in str(e.value)
    with pytest.raises(DataError) as e:
        stream(f"p={holes}", skip=True)
    assert "holes-000.tar:a.png: no label" in str(e.value) and "no image" not in str(e.value)
    # a class name as the label: datasets' tar reader would fail on int('face') mid-stream
    named = write_shard(tmp_path / "named-000.tar", [("a", {"png": encoded(1, "PNG"),
                                                            "cls": b"face"})])
    with pytest.raises(DataError, match="named-000.tar:a.png: its label is the class name 'face'"
                                        ": --streaming reads class indices only"):
        stream(f"p={named}")


def test_a_streaming_run_on_a_damaged_shard_stops_before_its_first_step(shard, tiny_vit,
                                                                        tmp_path):
    _, data, offset = shard
    damaged(tmp_path, data[:offset])  # cut at a member boundary: tarfile reads 4 samples
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(REGISTRY))
    out = tmp_path / "out"
    result = run_script("train.py", "--model", tiny_vit, "--train_data",
                        f"p={tmp_path}/bad-000.tar", "--datasets", registry, "--streaming",
                        "--output_dir", out, "--batch_size", 2, "--max_steps", 4,
                        "--save_steps", 1, "--logging_steps", 1, "--num_workers", 0)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"bad-000.tar: cut off after member k3.json: it ends at byte {offset}" in result.stderr
    assert not list(out.glob("checkpoint-*"))
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_jsonl(metrics) if r["event"] == "train"]


def test_a_parquet_source_without_num_classes_lists_empty_labels_and_images(tmp_path):
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    image = {"bytes": encoded(0, "PNG"), "path": None}
    path = str(tmp_path / "ints.parquet")
    datasets.Dataset.from_dict({"image": [image, None, image], "label": [0, 1, None]},
                               features=features).to_parquet(path)
    with pytest.raises(DataError) as e:
        read_records([f"q={path}"], load_registry({"q": {}}))
    assert "ints.parquet:1: column 'image' holds no image" in str(e.value)
    assert "ints.parquet:2: no label" in str(e.value)
    clean = str(tmp_path / "clean.parquet")
    datasets.Dataset.from_dict({"image": [image] * 2, "label": [0, 1]},
                               features=features).to_parquet(clean)
    registry = load_registry({"q": {}})
    records = read_records([f"q={clean}"], registry)
    with pytest.raises(DataError, match=r"dataset 'q': no num_classes in the registry, and its "
                                        r"sources \(Parquet files with an integer label column, "
                                        r"not a ClassLabel\) do not say"):
        check_classes(registry, [records])
