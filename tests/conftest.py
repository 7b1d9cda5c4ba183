"""Shared fixtures: real images (scikit-learn digits, scikit-image faces) and tiny Hugging Face
backbones built from configs, saved with save_pretrained and loaded back by path."""
import json
import os
import shutil
import subprocess
import sys

import pytest

# as train.py and eval.py run (cpu_threads.py): idle OpenMP threads sleep, also in the test
# processes that train in-process beside DataLoader workers
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

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


TIMING = ("samples_per_second", "data_wait_share", "max_memory_mb")  # differ from run to run


def comparable(rows):
    """metrics.jsonl records without what two runs of the same training log differently: timing,
    memory and their checkpoint folders."""
    return [{k: v for k, v in r.items() if k not in TIMING and "checkpoint" not in k} for r in rows]


def killed_after(checkpoint, out):
    """`out` as a run killed right after writing `checkpoint` leaves it: that checkpoint and the
    run's metrics.jsonl (a resume drops the records after the checkpoint)."""
    name = os.path.basename(os.path.normpath(checkpoint))
    os.makedirs(out)
    shutil.copytree(checkpoint, os.path.join(out, name))
    shutil.copy(os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "metrics.jsonl"),
                os.path.join(out, "metrics.jsonl"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The built-in demo data (PNG files decoded by Pillow), written once per test session."""
    from demo import make_demo
    out = tmp_path_factory.mktemp("demo")
    make_demo(str(out))
    return out


@pytest.fixture(scope="session")
def small_data(demo_dir, tmp_path_factory):
    """A small mixed subset of the demo: digits (10 classes) and faces (2 classes), odd-sized val
    sets.
    """
    out = tmp_path_factory.mktemp("small")
    files = {}
    for name, n_train, n_val in [("digits", 40, 21), ("faces", 16, 10)]:
        for split, n in [("train", n_train), ("val", n_val)]:
            rows = read_jsonl(demo_dir / name / f"{split}.jsonl")[:n]
            for row in rows:  # absolute paths: the subset files live in another folder
                row["image_path"] = str(demo_dir / name / row["image_path"])
            files[f"{name}_{split}"] = write_jsonl(out / f"{name}_{split}.jsonl", rows)
    registry = {
        "digits": {"num_classes": 10, "eval_ratio": 0.5},
        "faces": {"num_classes": 2, "eval_ratio": 1.0}
    }
    files["registry"] = str(out / "datasets.json")
    with open(files["registry"], "w") as f:
        json.dump(registry, f)
    return files


def save_tiny_vit(folder, image_size=16):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=image_size, patch_size=4)
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A tiny ViT model folder, as a user's local model folder would look."""
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


def train_args(data, model, output_dir, *extra):
    return [
        str(a) for a in [
            "--model", model, "--train_jsonl", data["digits_train"], data["faces_train"],
            "--val_jsonl", data["digits_val"], data["faces_val"], "--datasets", data["registry"],
            "--output_dir",
            str(output_dir), "--num_workers", "0", "--batch_size", "8", "--lr", "1e-3",
            "--logging_steps", "2", *extra
        ]
    ]


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


def load_weights(checkpoint, part="head"):
    """All weights of a checkpoint (backbone + head, or generation's LM + `unified` image parts),
    read without the trainer."""
    from safetensors.torch import load_file
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    weights.update({
        f"{part}.{k}": v
        for k, v in load_file(os.path.join(checkpoint, f"{part}.safetensors")).items()
    })
    return weights


def assert_same_adam_steps(a, b, lr, steps):
    """Weights after `steps` AdamW steps from one start on the same data, taken two ways (batch
    shapes, processes). Adam moves an entry by about lr * sign(g) wherever |g| is far above its
    eps, so the float summation order of the two ways can flip the sign of a near-zero gradient
    entry and move that entry by up to 2 * lr per step, on one CPU and not on another: no entry may
    differ by more than that, and all but a few entries must agree to float precision. A wrong
    loss scale moves no weight (AdamW is blind to it): compare the logged gradient norms for that.
    """
    assert a.keys() == b.keys()
    bound = 2 * lr * steps * 1.01 + 1e-6
    differ, total = 0, 0
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert diff.max().item() <= bound, f"{k}: moved {diff.max().item():.3g} > {bound:.3g}"
        differ += (diff > 1e-4 * max(lr, 1e-3) + 1e-6).sum().item()
        total += diff.numel()
    assert differ <= max(2, 0.002 * total), f"{differ} of {total} weights differ"


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


# A Qwen2-VL style chat template: a default system turn, the image as
# <|vision_start|><|image_pad|><|vision_end|>, then the text; the assistant turn opened.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' "
    "%}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ "
    "message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else "
    "%}{% for part in message['content'] %}{% if part['type'] == 'image' "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ "
    "part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if "
    "add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>"
]


def train_tokenizer(special_tokens=VISION_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                    eos_token="<|im_end|>", pad_token="<|endoftext|>", **named):
    """A byte-level BPE tokenizer trained here (nothing downloaded) that holds a family's special
    tokens (by default Qwen's vision tokens); `named`: bos_token, extra_special_tokens, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Classify this digits image.", "Classify this faces image.", "You are a helpful assistant.",
        "system user assistant", "What is in the picture?"
    ] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=313 + len(special_tokens), special_tokens=special_tokens,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, pad_token=pad_token,
                                   chat_template=chat_template, **named)


def save_tiny_vlm(folder, kind, chat_template=True):
    """A tiny Qwen2-VL / Qwen2.5-VL (2 vision blocks, 2 language layers, 64-d) with its
    tokenizer and image processor, saved as a user's model folder looks."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)
    tokenizer = train_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2,
                                                 mlp_ratio=2), **tokens)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                               num_heads=2, fullatt_block_indexes=[1], window_size=56), **tokens)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Small pixel bounds keep the tests fast: 8x8 digits become 56x56 (16 patches, 4 image tokens).
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl")


# Reliability tests carry @pytest.mark.fault("class"); the end of the run prints tried / survived
# per class.
FAULTS = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "fault(name): the class of fault a reliability test injects")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("fault")
    if marker and report.when == "call":
        report.user_properties.append(("fault", marker.args[0]))


def pytest_runtest_logreport(report):
    # Reports reach here in the process that prints the summary, also under pytest-xdist.
    for key, name in report.user_properties:
        if key == "fault" and report.when == "call":
            tried, survived = FAULTS.get(name, (0, 0))
            FAULTS[name] = (tried + 1, survived + report.passed)


def pytest_terminal_summary(terminalreporter):
    if FAULTS:
        terminalreporter.section("faults injected")
        for name, (tried, survived) in FAULTS.items():
            terminalreporter.write_line(
                f"{name}: {tried} tried, {survived} survived with nothing lost")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny random-init Qwen2 causal LM with a byte-level tokenizer, saved as a user's model
    folder.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tasks.generate.model import byte_tokenizer
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_tiny_vae(folder, channels=1, latent_channels=4, scaling_factor=1.0, shift_factor=None):
    """A random-init diffusers AutoencoderKL (two levels of 8 channels: latents at 1/2 size),
    saved with save_pretrained as a user's VAE folder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=channels, out_channels=channels,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                  latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                  scaling_factor=scaling_factor, shift_factor=shift_factor).save_pretrained(folder)
    return str(folder)
