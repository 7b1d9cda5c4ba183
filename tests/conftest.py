"""Shared fixtures: real images (scikit-learn digits, scikit-image faces) and tiny Hugging Face
backbones built from configs, saved with save_pretrained and loaded back by path."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The built-in demo data (PNG files decoded by Pillow), written once per test session."""
    from dataset import make_demo
    out = tmp_path_factory.mktemp("demo")
    make_demo(str(out))
    return out


@pytest.fixture(scope="session")
def small_data(demo_dir, tmp_path_factory):
    """A small mixed subset of the demo: digits (10 classes) and faces (2 classes), odd-sized val sets."""
    out = tmp_path_factory.mktemp("small")
    files = {}
    for name, n_train, n_val in [("digits", 40, 21), ("faces", 16, 10)]:
        for split, n in [("train", n_train), ("val", n_val)]:
            rows = read_jsonl(demo_dir / name / f"{split}.jsonl")[:n]
            for row in rows:  # absolute paths: the subset files live in another folder
                row["image_path"] = str(demo_dir / name / row["image_path"])
            files[f"{name}_{split}"] = write_jsonl(out / f"{name}_{split}.jsonl", rows)
    registry = {"digits": {"num_classes": 10, "eval_ratio": 0.5}, "faces": {"num_classes": 2, "eval_ratio": 1.0}}
    files["registry"] = str(out / "datasets.json")
    with open(files["registry"], "w") as f:
        json.dump(registry, f)
    return files


def save_tiny_vit(folder, image_size=16):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=4)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A tiny ViT model folder, as a user's local model folder would look."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


def train_args(data, model, output_dir, *extra):
    return [str(a) for a in ["--model", model, "--train_jsonl", data["digits_train"], data["faces_train"],
            "--val_jsonl", data["digits_val"], data["faces_val"], "--datasets", data["registry"],
            "--output_dir", str(output_dir), "--num_workers", "0", "--batch_size", "8", "--lr", "1e-3",
            "--logging_steps", "2", *extra]]


def run_script(script, *args, torchrun=0, timeout=300):
    """Run train.py / eval.py as a user would: a real process, optionally under torchrun."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(_free_port()), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_weights(checkpoint):
    """All weights of a checkpoint (backbone + head), read without the trainer."""
    from safetensors.torch import load_file
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    weights.update({f"head.{k}": v for k, v in load_file(os.path.join(checkpoint, "head.safetensors")).items()})
    return weights


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
