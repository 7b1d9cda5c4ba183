"""--task generate: key/value-cached sampling gives the samples of full recomputation, and packed
batches give the losses and gradients of padded ones. Real digit images, a tiny Qwen2 from a
folder, a velocity head drawn at random so that images depend on the whole context."""
import json

import pytest
import torch

from conftest import read_jsonl, write_jsonl
from dataset import DataError
from tasks.generate.batches import (GenerationDataset, check_pack_tokens, collate_packed,
                                    collate_sequences, make_generation_loader, pack_rows,
                                    padding_share, target_counts)
from tasks.generate.model import UnifiedModel, load_language_model, unified_losses
from tasks.generate.patches import ImageSpec, load_image
from tasks.generate.records import read_generation_files
from tasks.generate.sampling import generate_images, generate_text, greedy_decode
from tasks.generate.sequences import assemble, build_parts, sample_length

SPEC = ImageSpec(image_size=8, patch_size=2, channels=1)  # 16 tokens of 4 values per digit
FP32_EPS = torch.finfo(torch.float32).eps
PROMPTS = ["a 1", "a handwritten digit 2 in black ink in black ink", "seven"]


def make_model(folder):
    lm, tokenizer = load_language_model(folder)
    model = UnifiedModel(lm, SPEC)
    torch.manual_seed(1)
    # the zero-initialised head would make every velocity 0 and any two samplers agree
    torch.nn.init.normal_(model.velocity_head.weight, std=0.2)
    # sharper attention than a fresh init: outputs depend on which keys are seen and where
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model, tokenizer


@pytest.fixture(scope="module")
def records(demo_dir, tmp_path_factory):
    """Text -> image, image -> caption and two-turn conversations over 8 digits, uneven lengths."""
    rows = read_jsonl(demo_dir / "digits" / "train.jsonl")[:8]
    out = []
    for i, row in enumerate(rows):
        path = str(demo_dir / "digits" / row["image_path"])
        text = f"a handwritten digit {row['label']}" + " in black ink" * (i % 3)
        out += [{"text_prompt": text, "image_path": path}, {"image_path": path, "caption": text}]
        if i % 4 == 0:
            out.append({"conversations": [
                {"role": "user", "type": "text", "content": text},
                {"role": "assistant", "type": "image", "image_path": path},
                {"role": "user", "type": "text", "content": "which digit?"},
                {"role": "assistant", "type": "text", "content": str(row["label"])}]})
    return write_jsonl(tmp_path_factory.mktemp("gen") / "train.jsonl", out)


# ----------------------------------------------------------------------------- cached sampling

@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_image_sampling_gives_the_samples_of_full_recomputation(tiny_lm, cfg_scale):
    # Prompts of four lengths in one batch (right-padded in the cache). The two samplers differ
    # only in float rounding: the block's attention sums over another key count and shapes.
    # Bound: each velocity carries a relative rounding error of order depth * sqrt(keys) * eps
    # (~60 eps here); guidance multiplies a difference by up to 2 s + 1; Euler steps sum
    # dt * error over t in [0, 1] (total weight 1), and the samples are of order 1. So
    # atol = (2 s + 1) * 60 eps ~ 5e-5 at s = 3 (measured: 5e-7). A prompt token seen by the
    # unconditional branch, or a block position off by one, moves samples by 1e-3 or more.
    model, tokenizer = make_model(tiny_lm)
    full = generate_images(model, tokenizer, PROMPTS, 50, cfg_scale, seed=3, cache=False)
    cached = generate_images(model, tokenizer, PROMPTS, 50, cfg_scale, seed=3, cache=True)
    assert cached.shape == (len(PROMPTS), 1, 8, 8)
    atol = (2 * cfg_scale + 1) * 60 * FP32_EPS
    torch.testing.assert_close(cached, full, atol=atol, rtol=0)
    # the samples do depend on the prompt (else the test could not see a wrong prefix)
    assert (full[0] - full[1]).abs().max() > 100 * atol


@pytest.mark.parametrize("prompt", [None, "which digit is it?"])
def test_cached_captioning_gives_the_logits_and_tokens_of_full_recomputation(
        tiny_lm, demo_dir, prompt):
    model, tokenizer = make_model(tiny_lm)
    images = [load_image(demo_dir / "digits" / "images" / f"0000{i}.png", SPEC) for i in range(4)]
    fed, cached = greedy_decode(model, tokenizer, images, prompt, max_new_tokens=8, cache=True)
    # the uncached decoder fed the same tokens: the same logits at every step (logits of order
    # 1 through 2 layers: rounding of a few tens of eps; 1e-5 is ~80 eps)
    _, full = greedy_decode(model, tokenizer, images, prompt, cache=False, forced=fed)
    assert cached.shape == full.shape == (fed.shape[1], 4, len(tokenizer))
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    # and the same greedy tokens, unless a near tie (top two within 1e-4) let rounding choose
    texts, expected = (generate_text(model, tokenizer, images, prompt, 8, cache=c)
                       for c in (True, False))
    top2 = full.topk(2, dim=-1).values
    near_tie = bool(((top2[..., 0] - top2[..., 1]) < 1e-4).any())
    assert texts == expected or near_tie


# ----------------------------------------------------------------------------- packing

def test_pack_rows_is_first_fit_in_order():
    assert pack_rows([5, 3, 4, 2, 6, 1], 8) == [[0, 1], [2, 3, 5], [4]]
    assert pack_rows([8, 8], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="9 tokens cannot fit --pack_tokens 8"):
        pack_rows([3, 9], 8)


def test_sample_length_counts_tokens_without_reading_images(records, tiny_lm):
    _, tokenizer = load_language_model(tiny_lm)
    conversations = read_generation_files([records])
    for c in conversations:
        tokens, *_ = assemble(build_parts(c.turns, tokenizer, SPEC, lambda x0: (x0, 0.5, x0)))
        assert sample_length(c.turns, tokenizer, SPEC) == len(tokens["input_ids"]), c.source


def test_pack_tokens_shorter_than_a_sample_names_its_file_and_line(records, tiny_lm):
    _, tokenizer = load_language_model(tiny_lm)
    conversations = read_generation_files([records])
    lengths = check_pack_tokens(conversations, tokenizer, SPEC, 1000)
    longest = max(lengths)
    with pytest.raises(DataError) as e:
        check_pack_tokens(conversations, tokenizer, SPEC, longest - 1)
    where = conversations[lengths.index(longest)].source
    assert f"{where}: {longest} tokens (18 per image), more than --pack_tokens {longest - 1}" \
        in str(e.value)
    assert "1 problem(s)" in str(e.value) or lengths.count(longest) > 1


def test_packed_batch_gives_the_losses_and_gradients_of_the_padded_batch(records, tiny_lm):
    model, tokenizer = make_model(tiny_lm)
    conversations = read_generation_files([records])
    # text-condition dropout on half the images: the packed mask must carry it per sample
    dataset = GenerationDataset(conversations, tokenizer, SPEC, seed=0, cond_dropout=0.5)
    items = [dataset[i] for i in range(len(dataset))]
    lengths = [len(tokens["input_ids"]) for tokens, *_ in items]
    assert len(set(lengths)) >= 4 and any(item[4] for item in items)
    padded, packed = collate_sequences(items), collate_packed(items, 2 * max(lengths))
    assert packed["input_ids"].shape[0] < len(items) // 2
    assert sorted(packed["indices"].tolist()) == list(range(len(items)))
    assert target_counts(packed) == target_counts(padded)
    # the padded rows carry each sample's text-condition dropout into its mask
    for row, index in enumerate(padded["indices"].tolist()):
        noised, text = padded["noised"][row], padded["is_text"][row]
        if noised.any():
            sees_text = padded["attention_mask"][row, 0][noised][:, text].any().item()
            assert sees_text != items[index][4]

    def losses_and_gradients(batch):
        model.zero_grad()
        text, image = unified_losses(model, batch)
        (text + image).backward()
        return text.item(), image.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    text_a, image_a, grads_a = losses_and_gradients(padded)
    text_b, image_b, grads_b = losses_and_gradients(packed)
    assert text_b == pytest.approx(text_a, rel=1e-5) and image_b == pytest.approx(image_a, rel=1e-5)
    # sums over the same tokens in another order: rounding relative to each gradient's scale
    for name, grad in grads_a.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_b[name], grad, atol=1e-4 * scale, rtol=0,
                                   msg=lambda m: f"{name}: {m}")
    assert grads_a["velocity_head.weight"].abs().max() > 0


def test_packing_lowers_the_padding_share(records, tiny_lm):
    _, tokenizer = load_language_model(tiny_lm)
    conversations = read_generation_files([records])
    lengths = check_pack_tokens(conversations, tokenizer, SPEC, 256)
    order = list(range(len(conversations)))
    padded, packed = (padding_share(make_generation_loader(conversations, order, tokenizer, SPEC, 8,
                                                           0, pack_tokens=n))
                      for n in (None, 256))
    real = sum(lengths)
    assert padded["tokens"] - padded["padding"] == packed["tokens"] - packed["padding"] == real
    assert packed["rows"] < padded["rows"] and packed["padding_share"] < padded["padding_share"]
    assert json.dumps(packed)  # plain numbers, for a log line
