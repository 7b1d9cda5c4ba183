"""Model files written a tensor at a time (weights.write_pretrained / write_safetensors): what
save_pretrained writes, readable by safetensors and from_pretrained; and the sharded training state
in files of bounded size."""
import os

import pytest
import torch
from safetensors.torch import load_file

from state_files import MIN_FILE_BYTES, STATE_FILES, file_indices, held_bytes
from weights import Derived, model_weights, read_header, write_pretrained, write_safetensors


def tied_lm(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["vit", "qwen2_5_vl", "tied_lm"])
def test_streamed_folder_is_what_save_pretrained_writes(kind, tiny_vit, tiny_qwen2_5_vl,
                                                        tmp_path):
    # A ViT, a vision-language model whose checkpoint keys transformers renames on loading, and a
    # language model whose output layer is tied to its embeddings (one name kept).
    from transformers import AutoModel, AutoModelForCausalLM
    cls = AutoModelForCausalLM if kind == "tied_lm" else AutoModel
    source = {"vit": tiny_vit, "qwen2_5_vl": tiny_qwen2_5_vl}.get(kind) or tied_lm(tmp_path / "lm")
    model = cls.from_pretrained(source)
    model.save_pretrained(tmp_path / "saved")
    write_pretrained(model, str(tmp_path / "streamed"), model_weights(model), rank=0)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    assert streamed.keys() == saved.keys()
    assert all(torch.equal(streamed[k], saved[k]) for k in saved)
    assert sorted(os.listdir(tmp_path / "streamed")) == sorted(os.listdir(tmp_path / "saved"))
    reloaded = cls.from_pretrained(tmp_path / "streamed").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def test_streamed_file_aligns_every_tensor_and_computes_derived_ones_in_turn(tmp_path):
    made = []

    def make():
        made.append(1)
        return torch.full((3,), 2.0, dtype=torch.bfloat16)

    tensors = {"odd": torch.arange(3, dtype=torch.uint8), "bf16": Derived((3,), torch.bfloat16,
                                                                          make),
               "f64": torch.arange(5, dtype=torch.float64), "flag": torch.tensor(True)}
    path = tmp_path / "t.safetensors"
    write_safetensors(str(path), tensors, rank=0, metadata={"format": "pt"})
    start, header = read_header(str(path))
    assert start % 8 == 0 and made == [1]
    for key, entry in header.items():  # each tensor starts at a multiple of its element size
        assert entry["data_offsets"][0] % tensors[key].dtype.itemsize == 0, key
    loaded = load_file(path)
    assert torch.equal(loaded["bf16"], make()) and torch.equal(loaded["f64"], tensors["f64"])
    assert torch.equal(loaded["odd"], tensors["odd"]) and loaded["flag"].item() is True


def test_only_rank_0_writes_a_streamed_file(tmp_path):
    write_safetensors(str(tmp_path / "t.safetensors"), {"w": torch.ones(2)}, rank=1)
    assert not os.listdir(tmp_path)


def test_sharded_state_goes_into_files_of_bounded_size():
    # 96 MB in 1 MB tensors: files of at most MIN_FILE_BYTES (64 MB) -> 2 files, in key order;
    # a larger state: up to STATE_FILES files of 1/STATE_FILES of it.
    small = {"model": {f"w{i}": torch.empty(1 << 18, device="meta") for i in range(96)}}
    indices = file_indices(small)
    assert list(indices) == [f"model.w{i}" for i in range(96)]
    assert [list(indices.values()).count(n) for n in (1, 2)] == [64, 32]
    def megabyte():
        return torch.empty(1 << 18, device="meta")

    # 4 x STATE_FILES x 64 MB: files of a quarter GB, not of MIN_FILE_BYTES
    large = {"model": {f"w{i}": megabyte() for i in range(4 * 64 * STATE_FILES)},
             "optim": {"w0": {"exp_avg": megabyte(), "step": torch.tensor(1.0)}}}
    indices = file_indices(large)
    assert indices.keys() >= {"optim.w0.exp_avg", "optim.w0.step"}
    sizes = {}
    for key, index in indices.items():
        group, name = key.split(".", 1)
        value = large[group][name] if group == "model" else large["optim"]["w0"][name[3:]]
        sizes[index] = sizes.get(index, 0) + held_bytes(value)
    total = sum(sizes.values())
    assert max(sizes.values()) <= max(MIN_FILE_BYTES, total / STATE_FILES)
    assert len(sizes) == STATE_FILES + 1  # the optimizer's small tensors in one more
