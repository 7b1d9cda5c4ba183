"""Generation's model: a causal LM with image input layers and a velocity head (UnifiedModel), its
losses, the language model it is built on, and its checkpoint files (safetensors + JSON)."""
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from backbone import LOADING, build_empty, from_pretrained
from logs import say
from tasks.generate.patches import ImageSpec, patchify, unpatchify
from tasks.latent import load_codec
from weights import model_weights, write_pretrained, write_safetensors

SPEC_FILE = "unified.json"
WEIGHTS_FILE = "unified.safetensors"
VAE_DIR = "vae"  # with --vae: the VAE's own folder inside a checkpoint
PRESETS = {
    "qwen2-tiny": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 1024},
}


def timestep_features(t, dim=256):
    """Sinusoidal features of t * 1000 (the usual diffusion timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) /
                      half)
    angles = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sincos_2d(grid, dim):
    """Fixed 2D sin-cos position embedding of a grid x grid patch layout, (grid * grid, dim)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    out = [f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


def check_image_spec(spec, codec=None):
    """A ValueError when the images cannot be cut into whole patches, or when the VAE does not
    give the latents the patch projection is built for."""
    if not spec.latent:
        if spec.image_size % spec.patch_size:
            raise ValueError(f"--image_size {spec.image_size} is not a multiple of --patch_size "
                             f"{spec.patch_size}")
        return
    where = f"--vae {codec.folder}" if codec is not None and codec.folder else "the VAE"
    if spec.image_size % spec.downsample:
        raise ValueError(f"--image_size {spec.image_size} is not a multiple of {spec.downsample}, "
                         f"the downsampling of {where}")
    size = spec.image_size // spec.downsample
    if size % spec.patch_size:
        raise ValueError(f"{where} encodes {spec.image_size}-pixel images into {size}x{size} "
                         f"latents, not a multiple of --patch_size {spec.patch_size} (which counts "
                         f"latent pixels)")
    if codec is None:
        raise ValueError("latent image tokens need the VAE that encodes them")
    if codec.image_channels != spec.channels:
        raise ValueError(f"--image_channels {spec.channels}: {where} takes "
                         f"{codec.image_channels}-channel images")
    if (codec.latent_channels, codec.downsample) != (spec.latent_channels, spec.downsample):
        raise ValueError(
            f"{where} gives {codec.latent_channels}-channel latents at 1/{codec.downsample} size; "
            f"the patch projection takes {spec.latent_channels} channels at 1/{spec.downsample} "
            f"({spec.patch_dim} values per token)")


class UnifiedModel(nn.Module):
    """A causal LM plus the image input projection, timestep embedding and velocity head."""

    def __init__(self, lm, spec, codec=None):
        super().__init__()
        d = lm.config.hidden_size
        if d % 4:
            raise ValueError(
                f"the language model's hidden size ({d}) must be divisible by 4 for 2D positions")
        check_image_spec(spec, codec)
        self.lm, self.spec = lm, spec
        self.codec = codec  # latent.LatentCodec (frozen VAE), a plain attribute: not a submodule
        dtype = lm.dtype
        self.patch_embed = nn.Linear(spec.patch_dim, d, dtype=dtype)
        self.time_embed = nn.Sequential(nn.Linear(256, d, dtype=dtype), nn.SiLU(),
                                        nn.Linear(d, d, dtype=dtype))
        # block start, block end
        self.image_markers = nn.Parameter(torch.randn(2, d, dtype=dtype) * 0.02)
        self.velocity_head = nn.Linear(d, spec.patch_dim, dtype=dtype)
        # the first prediction is v = 0: MSE = E[(eps - x0)^2]
        nn.init.zeros_(self.velocity_head.weight)
        nn.init.zeros_(self.velocity_head.bias)
        self.register_buffer("image_positions", sincos_2d(spec.grid, d).to(dtype), persistent=False)

    def forward(self, input_ids, is_text, block, marker, noised, position_ids, attention_mask,
                images, timesteps, labels, past_key_values=None, **_):
        """Returns (text logits at positions that have a label, velocity at noised patch tokens).

        past_key_values: a transformers Cache holding keys and values of earlier tokens (sampling);
        the tokens given are appended to it and attention_mask is (rows, 1, tokens, cached +
        tokens).
        """
        embed = self.lm.get_input_embeddings()
        hidden_size = embed.weight.shape[-1]
        x = torch.zeros(*input_ids.shape, hidden_size, dtype=embed.weight.dtype,
                        device=input_ids.device)
        x[is_text] = embed(input_ids[is_text])
        # a text-only batch still runs the image layers (on nothing): DDP sees them used
        if not images.shape[0]:
            images = images.new_zeros(0, self.spec.grid ** 2, self.spec.patch_dim)
        time = self.time_embed(timestep_features(timesteps).to(x.dtype))[:, None]
        patches = self.patch_embed(images.to(x.dtype)) + self.image_positions + time
        start, end = self.image_markers[0] + time, self.image_markers[1] + time
        x[block >= 0] = torch.cat([start, patches, end], dim=1).reshape(-1, hidden_size)
        hidden = self.lm.get_decoder()(inputs_embeds=x, attention_mask=attention_mask,
                                       position_ids=position_ids, past_key_values=past_key_values,
                                       use_cache=past_key_values is not None).last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden[labels != -100])
        velocity = self.velocity_head(hidden[noised & (marker == 0)])
        return logits, velocity


@torch.no_grad()
def encode_latent_batch(batch, codec, spec):
    """A batch whose images are pixel patches and whose velocity_targets are the noise of its
    noised images (GenerationDataset with a VAE) -> the same batch in latent space: each distinct
    image of the batch encoded once by the frozen VAE, noised images x_t = (1 - t) z + t eps,
    velocity targets eps - z."""
    pixels = batch["images"]
    if not pixels.shape[0]:
        return batch  # text only: the model runs its image layers on nothing
    # a clean copy after a noised image, or one image in two samples: one encoder pass
    distinct, inverse = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
    z = codec.encode(unpatchify(distinct.reshape(-1, *pixels.shape[1:]), spec.pixel_patch,
                                spec.channels))
    z = patchify(z, spec.patch_size)[inverse]
    noised = batch["image_noised"]
    t = batch["timesteps"][noised].to(z.dtype)[:, None, None]
    # (0, ...) in the pixel patches' shape when no image carries loss (captions only)
    noise = batch["velocity_targets"].to(z.dtype).reshape(-1, *z.shape[1:])
    images = z.clone()
    images[noised] = (1 - t) * z[noised] + t * noise
    return {**batch, "images": images, "velocity_targets": noise - z[noised]}


def unified_losses(model, batch):
    """(sum of text cross-entropy, sum over noised image tokens of the patch-mean squared error).
    With a VAE the batch's pixels are encoded first (encode_latent_batch)."""
    core = getattr(model, "module", model)  # under DDP, the model it wraps
    if core.codec is not None:
        batch = encode_latent_batch(batch, core.codec, core.spec)
    logits, velocity = model(**batch)
    text = F.cross_entropy(logits.float(), batch["labels"][batch["labels"] != -100],
                           reduction="sum")
    image = (velocity.float() -
             batch["velocity_targets"].reshape(velocity.shape)).pow(2).mean(-1).sum()
    return text, image


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + end of text) that needs no training corpus: for presets.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def load_language_model(name_or_path, seed=0, dtype=None, meta=False):
    """(causal LM, tokenizer) from a local folder, or preset:NAME (random init, byte-level
    tokenizer). meta: a folder's LM gets its parameters on the meta device, nothing read
    (weights.read_weights fills them after sharding); a preset is built whole.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForCausalLM,
    )
    # The explicit 4D attention mask (image blocks, packed samples) needs sdpa or eager.
    attention = LOADING.attn_implementation or "sdpa"
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"--attn_implementation {attention}: the generation model's attention "
                         "mask (bidirectional image blocks, packed samples) needs sdpa or eager")
    if name_or_path.startswith("preset:"):
        name = name_or_path.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(
                f"--model {name_or_path}: unknown preset (known: "
                f"{', '.join('preset:' + p for p in PRESETS)})"
            )
        tokenizer = byte_tokenizer()
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                             **PRESETS[name])
        config._attn_implementation = attention
        lm = Qwen2ForCausalLM(config)
        return (lm.to(dtype) if dtype else lm), tokenizer
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"--model {name_or_path}: no such folder")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=LOADING.trust_remote_code)
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(
            f"--model {name_or_path}: {type(config).__name__} is not a causal language model")
    if meta:
        lm = build_empty(AutoModelForCausalLM, name_or_path, config, dtype, attention)
    else:
        lm = from_pretrained(AutoModelForCausalLM, name_or_path, attn_implementation=attention,
                             **({"dtype": dtype} if dtype else {}))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path,
                                              trust_remote_code=LOADING.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {name_or_path}: the tokenizer has no end-of-text token")
    return lm, tokenizer


def save_unified(model, tokenizer, folder, info, rank=0):
    """The LM in its own HF format + tokenizer, the image parts in unified.safetensors,
    unified.json; with a VAE, the VAE as it was given in vae/ (the checkpoint stands alone).
    Every process calls it (model: as it holds it, FSDP2 shards too)."""
    weights = model_weights(model)
    write_pretrained(model.lm, folder, {k[len("lm."):]: v for k, v in weights.items()
                                        if k.startswith("lm.")}, rank)
    write_safetensors(os.path.join(folder, WEIGHTS_FILE),
                      {k: v for k, v in weights.items() if not k.startswith("lm.")}, rank)
    if rank != 0:
        return
    tokenizer.save_pretrained(folder)
    if model.codec is not None:
        model.codec.save(os.path.join(folder, VAE_DIR))
    with open(os.path.join(folder, SPEC_FILE), "w") as f:
        json.dump({**info, "image": vars(model.spec)}, f, indent=2)


def read_unified_info(folder):
    with open(os.path.join(folder, SPEC_FILE)) as f:
        return json.load(f)


def load_unified(folder, meta=False):
    """(UnifiedModel, tokenizer, info) from a checkpoint folder (safetensors + JSON, no pickle).
    meta: the LM's parameters on the meta device (see load_language_model)."""
    info = read_unified_info(folder)
    spec = ImageSpec(**info["image"])
    codec = load_codec(os.path.join(folder, VAE_DIR), f"{folder}:") if spec.latent else None
    lm, tokenizer = load_language_model(folder, meta=meta)
    model = UnifiedModel(lm, spec, codec)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit: missing {missing}, unexpected {unexpected}")
    say(f"loaded {folder}")
    return model, tokenizer, info
