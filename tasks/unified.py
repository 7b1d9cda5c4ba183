"""Unified text + image generation (BAGEL / Transfusion style, scaled down): data, model, sampling.

One Hugging Face causal LM runs over interleaved text tokens and image patch tokens:
  text token   -> the LM's own embedding table; next-token cross-entropy on assistant text
  image block  -> [start] patch_1 ... patch_N [end]; each patch token is
                  Linear(patch -> d)(x_t) + timestep embedding(t) + 2D sin-cos position,
                  and a zero-initialised Linear(d -> patch) head predicts the flow-matching
                  velocity v = eps - x0 of x_t = (1 - t) x0 + t eps, t = sigmoid(N(0, 1)).
Attention (an explicit mask): causal over text; bidirectional inside an image block; a noised
image block that carries loss is invisible to every later token (a clean copy follows it when
later turns must see the image); samples packed into one row never see each other; with
text-condition dropout a noised block does not see the text before it (classifier-free guidance).
Every block shares one RoPE position; text positions run on after it.
Latent space (a VAE, latent.py): the same, with patches cut from the frozen VAE's scaled latents
(encoded on the device per batch, each distinct image once) and samples decoded through it.

Data (JSON or JSONL, mixed freely): {"conversations": [{role, type: text|image,
content|image_path}]},
{"text_prompt", "image_path"} (text -> image) and {"image_path", "caption"} (image -> text); the
last two are a user turn followed by an assistant turn. Loss falls on assistant turns only.
"""
import json
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dataset import (DataError, EpochSampler, ignore_stop_signals, json_items, parse_spec,
                     raise_data_errors, worker_options)
from backbone import LOADING, build_empty, eval_mode, from_pretrained, restore_modes, say
from files import write_file
from preprocess import to_8bit
from tasks.latent import load_codec
from weights import model_weights, write_pretrained, write_safetensors

SPEC_FILE = "unified.json"
WEIGHTS_FILE = "unified.safetensors"
VAE_DIR = "vae"  # with --vae: the VAE's own folder inside a checkpoint
ROLES = ("system", "user", "assistant")
# evaluation noise levels, cycled over samples: low-variance image MSE
EVAL_TIMES = (0.25, 0.5, 0.75)
PRESETS = {
    "qwen2-tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
}


# ----------------------------------------------------------------------------- data files

@dataclass
class Turn:
    role: str
    kind: str  # "text" or "image"
    value: str  # the text, or the image's absolute path


@dataclass
class Conversation:
    turns: list
    source: str  # file:line, for error messages


def _turns(item, folder):
    """The turns of one record in any of the three formats, or an error message."""
    def image(path, field):
        if not isinstance(path, str) or not path:
            raise ValueError(f"field '{field}': expected a non-empty string, got {path!r}")
        full = os.path.join(folder, path)
        if not os.path.isfile(full):
            raise ValueError(f"field '{field}': image file not found: {full}")
        return full

    def text(value, field):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field '{field}': expected a non-empty string, got {value!r}")
        return value

    if "conversations" in item:
        turns = item["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("field 'conversations': expected a non-empty list of turns")
        out = []
        for i, turn in enumerate(turns):
            field = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise ValueError(f"field '{field}': expected an object, got {type(turn).__name__}")
            role, kind = turn.get("role"), turn.get("type", "text")
            if role not in ROLES:
                raise ValueError(
                    f"field '{field}.role': expected one of {', '.join(ROLES)}, got {role!r}")
            if kind == "text":
                out.append(Turn(role, "text", text(turn.get("content"), f"{field}.content")))
            elif kind == "image":
                out.append(Turn(role, "image", image(turn.get("image_path"),
                                                     f"{field}.image_path")))
            else:
                raise ValueError(f"field '{field}.type': expected text or image, got {kind!r}")
        if not any(t.role == "assistant" for t in out):
            raise ValueError("field 'conversations': no assistant turn, so nothing to learn")
        return out
    if "text_prompt" in item:
        return [Turn("user", "text", text(item["text_prompt"], "text_prompt")),
                Turn("assistant", "image", image(item.get("image_path"), "image_path"))]
    if "caption" in item:
        return [Turn("user", "image", image(item.get("image_path"), "image_path")),
                Turn("assistant", "text", text(item["caption"], "caption"))]
    raise ValueError(
        "expected 'conversations', 'text_prompt' + 'image_path', or 'image_path' + 'caption'")


def read_generation_files(specs):
    """Read and check every record of every JSON / JSONL file (sources.json_items); raise one
    DataError listing what is wrong."""
    conversations, errors = [], []
    for text in specs:
        spec = parse_spec(text)
        if spec.kind != "jsonl":
            raise DataError(f"data spec {text!r}: --task generate reads JSON / JSONL records "
                            "(conversations, text_prompt + image_path, image_path + caption); "
                            f"a {spec.kind} source holds labelled images (--task classify, "
                            "autoencoder)")
        folder = os.path.dirname(os.path.abspath(spec.path))
        for _, where, item in json_items(spec.path, errors):
            try:
                conversations.append(Conversation(_turns(item, folder), where))
            except ValueError as e:
                errors.append(f"{where}: {e}")
    raise_data_errors(errors, len(conversations), specs)
    return conversations


# ----------------------------------------------------------------------------- images as patches

@dataclass
class ImageSpec:
    """How an image becomes tokens. It is resized to image_size (channels 1 or 3) and cut into
    patch_size patches: of its pixels, or with a VAE (latent_channels > 0) of its latents, whose
    pixels each cover `downsample` image pixels a side (patch_size then counts latent pixels)."""
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    latent_channels: int = 0
    downsample: int = 1

    @property
    def latent(self):
        return self.latent_channels > 0

    @property
    def pixel_patch(self):
        """Image pixels per token side."""
        return self.patch_size * self.downsample

    @property
    def grid(self):
        return self.image_size // self.pixel_patch

    @property
    def token_channels(self):
        """Channels of what the patches are cut from: the image's, or the VAE latent's."""
        return self.latent_channels or self.channels

    @property
    def patch_dim(self):
        return self.token_channels * self.patch_size ** 2


def read_image(path, size, channels):
    """(channels, size, size) pixels in [-1, 1] of an image file (or file object); an image that
    cannot be read is a DataError."""
    try:
        with Image.open(path) as im:
            im = to_8bit(im).convert("L" if channels == 1 else "RGB")  # 16-bit scaled, not clipped
            im = im.resize((size, size), Image.BICUBIC)
    except Exception as e:
        named = f" {path}" if isinstance(path, str) else ""
        raise DataError(f"cannot decode image{named}: {e}") from None
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1)
    return pixels.reshape(size, size, -1).permute(2, 0, 1)


def load_image(path, spec):
    """Pixels in [-1, 1] as (grid * grid, channels * pixel_patch^2): the pixels of each token
    (with a VAE, the area its latent patch covers; the VAE encodes them on the device)."""
    return patchify(read_image(path, spec.image_size, spec.channels), spec.pixel_patch)


def patchify(image, patch):
    """(..., C, H, W) -> (..., (H / p) * (W / p), C * p * p), patches in row-major order."""
    *lead, c, h, w = image.shape
    x = image.reshape(*lead, c, h // patch, patch, w // patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return x.reshape(*lead, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches, patch, channels):
    """(..., g * g, C * p * p) -> (..., C, g * p, g * p): patchify's inverse for square images."""
    *lead, tokens, _ = patches.shape
    g = math.isqrt(tokens)
    x = patches.reshape(*lead, g, g, channels, patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return x.reshape(*lead, channels, g * patch, g * patch)


def to_pil(image):
    """(C, H, W) in [-1, 1] -> a PIL image."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def sample_timestep(generator, shift=1.0):
    """t = sigmoid(N(0, 1)), optionally shifted towards noise: s t / (1 + (s - 1) t)."""
    t = torch.sigmoid(torch.randn((), generator=generator)).item()
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------- sequences

def role_prefix(role, tokenizer):
    return tokenizer(f"{role}: ", add_special_tokens=False)["input_ids"]


def newline(tokenizer):
    return tokenizer("\n", add_special_tokens=False)["input_ids"]


def build_parts(turns, tokenizer, spec, draw=None):
    """Turns -> parts of one sequence: ("text", ids, loss) and ("image", x_in, t, target).

    draw(x0) -> (x_t, t, velocity target) noises an assistant image that carries loss; without
    `draw` (sampling) an assistant image turn is not expected. Images are patch tensors or paths.
    """
    parts = []
    for i, turn in enumerate(turns):
        loss = turn.role == "assistant"
        parts.append(("text", role_prefix(turn.role, tokenizer), False))
        if turn.kind == "text":
            ids = tokenizer(turn.value, add_special_tokens=False)["input_ids"]
            parts.append(("text", ids + [tokenizer.eos_token_id], True) if loss else ("text", ids,
                                                                                      False))
            if not loss:
                parts.append(("text", newline(tokenizer), False))
            continue
        x0 = turn.value if torch.is_tensor(turn.value) else load_image(turn.value, spec)
        if loss:
            parts.append(("image", *draw(x0)))
            # later turns condition on the clean image, never on the noised one
            if i < len(turns) - 1:
                parts.append(("image", x0, 0.0, None))
        else:
            parts.append(("image", x0, 0.0, None))
        parts.append(("text", newline(tokenizer), False))
    return parts


def assemble(parts):
    """Parts -> per-token arrays of one sample, and its image blocks.

    Each block is [start, patches..., end] with one shared position; labels[i] is the token
    that position i must predict (-100: none)."""
    ids, text, block, noised, marker, position, loss = [], [], [], [], [], [], []
    images, times, targets = [], [], []
    pos = 0
    for part in parts:
        if part[0] == "text":
            _, tokens, carries_loss = part
            n = len(tokens)
            ids += tokens
            text += [True] * n
            block += [-1] * n
            noised += [False] * n
            marker += [0] * n
            position += range(pos, pos + n)
            loss += [carries_loss] * n
            pos += n
        else:
            _, x_in, t, target = part
            n = x_in.shape[0] + 2
            is_noised = target is not None
            ids += [0] * n
            text += [False] * n
            block += [len(images)] * n
            noised += [is_noised] * n
            marker += [1] + [0] * (n - 2) + [2]
            position += [pos] * n
            loss += [False] * n
            pos += 1
            images.append(x_in)
            times.append(t)
            if is_noised:
                targets.append(target)
    labels = [-100] * len(ids)
    for j in range(1, len(ids)):
        if loss[j]:
            labels[j - 1] = ids[j]
    return {"input_ids": ids, "is_text": text, "block": block, "noised": noised, "marker": marker,
            "position_ids": position, "labels": labels}, images, times, targets


def build_attention_mask(sample, block, noised, is_text, drop_text):
    """(L, L) bool, True where query i may attend to key j.

    sample: which packed sample a token belongs to (-1: padding); block: image block id unique in
    the row (-1: text); noised: token of a noised block that carries loss; drop_text: per token,
    True in noised blocks whose text condition is dropped."""
    length = sample.shape[0]
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    same_sample = (sample[:, None] == sample[None, :]) & (sample[None, :] >= 0)
    same_block = (block[:, None] == block[None, :]) & (block[None, :] >= 0)
    # causal, and a noised block is hidden from everything after it
    visible = (k <= q) & ~noised[None, :]
    allowed = same_sample & (same_block | visible)
    allowed &= ~(drop_text[:, None] & is_text[None, :])
    # padding attends to itself: no empty softmax row
    return allowed | torch.eye(length, dtype=torch.bool)


class GenerationDataset(torch.utils.data.Dataset):
    """One conversation -> one sequence. Noise, timesteps and text-condition dropout come from a
    generator seeded by (seed, epoch, index): the same sample gets the same draw whatever the
    batch size, world size or resume point. Evaluation uses fixed t values (EVAL_TIMES) instead."""

    def __init__(self, conversations, tokenizer, spec, seed=0, epoch=0, train=True, shift=1.0,
                 cond_dropout=0.0):
        self.conversations, self.tokenizer, self.spec = conversations, tokenizer, spec
        self.seed, self.epoch, self.train = seed, epoch, train
        self.shift, self.cond_dropout = shift, cond_dropout

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, key):
        # a key of dataset.EpochSampler carries its epoch (a persistent worker serves every epoch)
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        conv = self.conversations[index]
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]))

        def draw(x0):
            t = sample_timestep(g, self.shift) if self.train else EVAL_TIMES[index %
                                                                             len(EVAL_TIMES)]
            noise = torch.randn(self.spec.grid ** 2, self.spec.patch_dim, generator=g)
            if self.spec.latent:  # x0 is pixels: encode_latent_batch noises its latent
                return x0, t, noise
            return (1 - t) * x0 + t * noise, t, noise - x0

        try:
            parts = build_parts(conv.turns, self.tokenizer, self.spec, draw)
        except DataError as e:
            raise DataError(f"{conv.source}: {e}") from None
        drop = self.train and torch.rand((), generator=g).item() < self.cond_dropout
        return (*assemble(parts), drop, index)


PAD = {"input_ids": 0, "is_text": False, "block": -1, "noised": False, "marker": 0,
       "position_ids": 0, "labels": -100}


def collate_rows(rows):
    """Samples -> a batch: each row holds one or more samples (packed side by side, each with its
    own positions, blocks renumbered per row) and is padded to the longest row. Images, timesteps
    and velocity targets follow the tokens' row-major order, as the model reads them;
    image_noised marks the images that carry loss. With a VAE, images are pixel patches and
    velocity_targets the noise until encode_latent_batch makes them latents and velocities."""
    merged, images, times, targets, indices, noised = [], [], [], [], [], []
    for row in rows:
        tokens = {k: [] for k in PAD}
        sample, drop_text, blocks = [], [], 0
        for s, (t, sample_images, sample_times, sample_targets, drop, index) in enumerate(row):
            noised_blocks = {b for b, n in zip(t["block"], t["noised"]) if n}
            noised += [b in noised_blocks for b in range(len(sample_images))]
            for k in PAD:
                tokens[k] += ([b + blocks if b >= 0 else -1 for b in t[k]] if k == "block"
                              else t[k])
            sample += [s] * len(t["input_ids"])
            drop_text += [drop and is_noised for is_noised in t["noised"]]
            blocks += len(sample_images)
            images += sample_images
            times += sample_times
            targets += sample_targets
            indices.append(index)
        merged.append((tokens, sample, drop_text))
    length = max(len(sample) for _, sample, _ in merged)
    dtypes = {"is_text": torch.bool, "noised": torch.bool}
    batch = {
        k: torch.tensor([t[k] + [v] * (length - len(t[k])) for t, *_ in merged],
                        dtype=dtypes.get(k, torch.long))
        for k, v in PAD.items()
    }
    masks = []
    for row, (_, sample, drop_text) in enumerate(merged):
        pad = length - len(sample)
        masks.append(
            build_attention_mask(torch.tensor(sample + [-1] * pad), batch["block"][row],
                                 batch["noised"][row], batch["is_text"][row],
                                 torch.tensor(drop_text + [False] * pad)))
    batch["attention_mask"] = torch.stack(masks)[:, None]
    patches = images[0].shape if images else (0, 0)
    batch["images"] = torch.stack(images) if images else torch.zeros(0, *patches)
    batch["timesteps"] = torch.tensor(times, dtype=torch.float32)
    batch["velocity_targets"] = torch.stack(targets) if targets else torch.zeros(0, *patches)
    batch["image_noised"] = torch.tensor(noised, dtype=torch.bool)
    batch["indices"] = torch.tensor(indices)
    return batch


def collate_sequences(items):
    """Pad samples into a batch, one sample per row; build the attention mask per row."""
    return collate_rows([[item] for item in items])


def pack_rows(lengths, pack_tokens):
    """Greedy first-fit in the given order: each sample goes into the first row with room for it.
    Returns the rows as lists of positions into `lengths`; deterministic."""
    rows, room = [], []
    for i, n in enumerate(lengths):
        if n > pack_tokens:
            raise ValueError(f"a sample of {n} tokens cannot fit --pack_tokens {pack_tokens}")
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(pack_tokens)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


def collate_packed(items, pack_tokens):
    """Pack the batch's samples into as few rows of at most pack_tokens tokens as first-fit gives
    (the samples of a row never see each other); the batch keeps every sample and target."""
    rows = pack_rows([len(tokens["input_ids"]) for tokens, *_ in items], pack_tokens)
    return collate_rows([[items[i] for i in row] for row in rows])


def sample_length(turns, tokenizer, spec):
    """Tokens of one conversation's sequence, without reading its images: an image block is
    grid^2 + 2 tokens (an assistant image followed by more turns appears twice)."""
    placeholder = torch.zeros(spec.grid ** 2, spec.patch_dim)
    turns = [Turn(t.role, t.kind, placeholder) if t.kind == "image" else t for t in turns]
    parts = build_parts(turns, tokenizer, spec, lambda x0: (x0, 0.0, x0))
    return sum(len(p[1]) if p[0] == "text" else p[1].shape[0] + 2 for p in parts)


def check_pack_tokens(conversations, tokenizer, spec, pack_tokens):
    """Each conversation's token count; DataError naming file:line of every sample longer than
    pack_tokens (it could not be packed into any row)."""
    lengths = [sample_length(c.turns, tokenizer, spec) for c in conversations]
    errors = [f"{c.source}: {n} tokens ({spec.grid ** 2 + 2} per image), more than "
              f"--pack_tokens {pack_tokens}"
              for c, n in zip(conversations, lengths) if n > pack_tokens]
    raise_data_errors(errors, len(conversations), [])
    return lengths


def padding_share(loader):
    """Token counts over one pass of a generation loader: rows, tokens (rows x length summed over
    batches), padding tokens and their share."""
    rows = tokens = padding = 0
    for batch in loader:
        rows += batch["input_ids"].shape[0]
        tokens += batch["input_ids"].numel()
        padding += int((~batch["is_text"] & (batch["block"] < 0)).sum())
    return {"rows": rows, "tokens": tokens, "padding": padding,
            "padding_share": padding / max(tokens, 1)}


def make_generation_loader(conversations, indices, tokenizer, spec, batch_size, num_workers,
                           pin_memory=False, pack_tokens=None, epoch=0, persistent_workers=False,
                           prefetch_factor=None, **options):
    """batch_size samples per batch, padded one per row, or packed into rows of at most
    pack_tokens tokens (check_pack_tokens first: it names a sample too long for a row).
    Re-aim a loader with persistent workers with `loader.sampler.set(indices, epoch)`."""
    collate = partial(collate_packed, pack_tokens=pack_tokens) if pack_tokens else collate_sequences
    return torch.utils.data.DataLoader(GenerationDataset(conversations, tokenizer, spec, **options),
                                       batch_size=batch_size, sampler=EpochSampler(indices, epoch),
                                       collate_fn=collate, num_workers=num_workers,
                                       pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
                                       **worker_options(num_workers, persistent_workers,
                                                        prefetch_factor))


def target_counts(batch):
    """[target text tokens, noised image tokens] of a batch: what the global loss is divided by."""
    return [
        int((batch["labels"] != -100).sum()),
        batch["velocity_targets"].shape[0] * batch["velocity_targets"].shape[1]
    ]


# ----------------------------------------------------------------------------- model

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
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config,
                          Qwen2ForCausalLM)
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


# ----------------------------------------------------------------------------- sampling

def euler_sample(velocity, noise, steps, shift=1.0):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 with `steps` Euler steps."""
    ts = torch.linspace(1, 0, steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, t.item())
    return x


def _batch(rows, device):
    batch = collate_sequences([(*assemble(parts), drop, i) for i, (parts, drop) in enumerate(rows)])
    return {k: v.to(device) for k, v in batch.items()}


def _prompt_prefix(prompt, tokenizer, spec):
    """The parts a sampled image follows: the user's prompt and the assistant's role prefix."""
    return (build_parts([Turn("user", "text", prompt)], tokenizer, spec) +
            [("text", role_prefix("assistant", tokenizer), False)])


def _prefill(model, rows, device):
    """Run the parts of each row (right-padded) once into a fresh key/value cache.

    Returns (cache, the logits at each row's last token, each row's length, the position that
    follows each row); the cache holds max(length) tokens per row."""
    from transformers import DynamicCache
    items = [(*assemble(parts), False, i) for i, parts in enumerate(rows)]
    for tokens, *_ in items:
        tokens["labels"][-1] = 0  # any label: the model returns logits where there is one
    lengths = torch.tensor([len(tokens["input_ids"]) for tokens, *_ in items])
    next_position = torch.tensor([tokens["position_ids"][-1] + 1 for tokens, *_ in items])
    batch = {k: v.to(device) for k, v in collate_sequences(items).items()}
    cache = DynamicCache(config=model.lm.config)
    logits = model(**batch, past_key_values=cache)[0]
    return cache, logits, lengths, next_position


def _cached_mask(lengths, cached, visible, new):
    """(rows, 1, queries, cached + new keys) bool: the queries see each row's first `lengths`
    cached tokens where `visible` (per row), and the new keys as `new` (queries, new keys) says."""
    seen = (torch.arange(cached)[None, :] < lengths[:, None]) & visible[:, None]
    keys = torch.cat([seen[:, None, :].expand(-1, new.shape[0], -1),
                      new[None].expand(len(lengths), -1, -1)], dim=-1)
    return keys[:, None]


def _image_block_batch(x, t, positions, mask, spec):
    """The model inputs of one noised image block per row, nothing else: x (rows, patches, dim)."""
    rows, n = x.shape[0], spec.grid ** 2 + 2
    marker = torch.zeros(rows, n, dtype=torch.long)
    marker[:, 0], marker[:, -1] = 1, 2
    return {"input_ids": torch.zeros(rows, n, dtype=torch.long),
            "is_text": torch.zeros(rows, n, dtype=torch.bool),
            "block": torch.arange(rows)[:, None].expand(rows, n).contiguous(),
            "marker": marker, "noised": torch.ones(rows, n, dtype=torch.bool),
            "position_ids": positions[:, None].expand(rows, n).contiguous(),
            "attention_mask": mask, "images": x, "timesteps": torch.full((rows,), t),
            "labels": torch.full((rows, n), -100)}


def _token_batch(token, positions, mask, spec):
    """The model inputs of one text token per row that asks for its logits."""
    rows = token.shape[0]
    return {"input_ids": token[:, None], "is_text": torch.ones(rows, 1, dtype=torch.bool),
            "block": torch.full((rows, 1), -1), "marker": torch.zeros(rows, 1, dtype=torch.long),
            "noised": torch.zeros(rows, 1, dtype=torch.bool), "position_ids": positions[:, None],
            "attention_mask": mask, "images": torch.zeros(0, spec.grid ** 2, spec.patch_dim),
            "timesteps": torch.zeros(0), "labels": torch.zeros(rows, 1, dtype=torch.long)}


@torch.no_grad()
def generate_images(model, tokenizer, prompts, steps=50, cfg_scale=1.0, seed=0, shift=1.0,
                    device="cpu", cache=True):
    """Text -> image: one image per prompt, (N, C, H, W) in [-1, 1] (with a VAE, the sampled
    latents decoded). cfg_scale 1 is plain conditional sampling; above 1,
    v = v_uncond + scale (v_cond - v_uncond) with the text hidden for v_uncond.

    cache: compute each prompt's keys and values once and recompute only the image block at each
    Euler step (the block sees the cached prompt; the unconditional rows share the layout with the
    prompt hidden by the mask, as in training). False recomputes the whole sequence each step."""
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), spec.grid ** 2, spec.patch_dim, generator=g)
    guided = cfg_scale != 1
    prefixes = [_prompt_prefix(prompt, tokenizer, spec) for prompt in prompts]

    def guide(v):
        if not guided:
            return v
        cond, uncond = v[:len(prompts)], v[len(prompts):]
        return uncond + cfg_scale * (cond - uncond)

    def uncached_velocity(x, t):
        rows = [(parts + [("image", x_t, t, torch.zeros_like(x_t))], False)
                for parts, x_t in zip(prefixes, x)]
        if guided:
            rows += [(parts, True) for parts, _ in list(rows)]
        v = model(**_batch(rows, device))[1].float().cpu().reshape(len(rows), *x.shape[1:])
        return guide(v)

    if cache:
        kv, _, lengths, positions = _prefill(model, prefixes * (2 if guided else 1), device)
        cached, n = int(lengths.max()), spec.grid ** 2 + 2
        with_text = torch.arange(len(lengths)) < len(prompts)  # the unconditional rows: no text
        mask = _cached_mask(lengths, cached, with_text, torch.ones(n, n, dtype=torch.bool))

    def cached_velocity(x, t):
        rows = torch.cat([x, x]) if guided else x
        batch = _image_block_batch(rows, t, positions, mask, spec)
        v = model(**{k: v.to(device) for k, v in batch.items()}, past_key_values=kv)[1]
        kv.crop(-n)  # drop this step's block: the cache holds the prompts only
        return guide(v.float().cpu().reshape(rows.shape))

    modes = eval_mode(model)
    x = euler_sample(cached_velocity if cache else uncached_velocity, noise, steps, shift)
    images = tokens_to_images(model, x, device)
    restore_modes(modes)
    return images


def tokens_to_images(model, tokens, device="cpu"):
    """(N, grid^2, patch_dim) image tokens -> (N, C, H, W) pixels in [-1, 1] on the CPU; latent
    tokens go through the VAE's decoder on `device`."""
    spec = model.spec
    x = unpatchify(tokens, spec.patch_size, spec.token_channels)
    return model.codec.decode(x.to(device)).cpu() if spec.latent else x


def image_tokens(model, images, device="cpu"):
    """Images as load_image gives them (pixel patches) -> what the model reads: the same, or
    with a VAE their latent patches (encoded on `device`, returned on the CPU)."""
    spec = model.spec
    if not spec.latent or not len(images):
        return list(images)
    pixels = unpatchify(torch.stack(list(images)), spec.pixel_patch, spec.channels)
    return list(patchify(model.codec.encode(pixels.to(device)), spec.patch_size).cpu())


@torch.no_grad()
def greedy_decode(model, tokenizer, images, prompt=None, max_new_tokens=32, device="cpu",
                  cache=True, forced=None):
    """Images (load_image's patches) -> (fed tokens (rows, steps), logits (steps, rows, vocab)),
    greedy.

    Each step feeds every row the argmax of its logits (rows that ended keep going until all have
    ended or max_new_tokens); forced (rows, steps) feeds those tokens instead, for all its steps.
    cache: the image block and prompt are computed once and each step runs one token per row
    against the key/value cache; False recomputes the whole sequence each step."""
    modes = eval_mode(model)
    images = image_tokens(model, images, device)
    rows = [build_parts([Turn("user", "image", x0)] +
                        ([Turn("user", "text", prompt)] if prompt else []), tokenizer, model.spec) +
            [("text", role_prefix("assistant", tokenizer), False)] for x0 in images]
    steps = forced.shape[1] if forced is not None else max_new_tokens
    fed, logits = torch.zeros(len(rows), 0, dtype=torch.long), []
    if cache:
        kv, step_logits, lengths, positions = _prefill(model, rows, device)
        cached, everyone = int(lengths.max()), torch.ones(len(rows), dtype=torch.bool)
    for step in range(steps):
        if not cache:
            items = []
            for parts, tokens_so_far in zip(rows, fed.tolist()):
                tokens, blocks, times, targets = assemble(parts + [("text", tokens_so_far, False)])
                # any label: the model returns logits where there is one, here the last position
                tokens["labels"][-1] = 0
                items.append((tokens, blocks, times, targets, False, 0))
            batch = {k: v.to(device) for k, v in collate_sequences(items).items()}
            step_logits = model(**batch)[0]  # one labelled position per row
        logits.append(step_logits.float().cpu())
        token = forced[:, step] if forced is not None else logits[-1].argmax(-1)
        fed = torch.cat([fed, token[:, None]], dim=1)
        ended = (fed == tokenizer.eos_token_id).any(1)
        if step == steps - 1 or (forced is None and ended.all()):
            break
        if cache:
            # the new token sees its row's prompt and every token fed so far, itself included
            mask = _cached_mask(lengths, cached, everyone, torch.ones(1, step + 1,
                                                                      dtype=torch.bool))
            step_logits = model(**{k: v.to(device) for k, v in _token_batch(
                token, positions + step, mask, model.spec).items()}, past_key_values=kv)[0]
    restore_modes(modes)
    return fed, torch.stack(logits)


def generate_text(model, tokenizer, images, prompt=None, max_new_tokens=32, device="cpu",
                  cache=True):
    """Images (load_image's patches) -> texts, greedy, each until the end-of-text token; all
    images in one batch.
    cache: decode against a key/value cache (False: recompute the whole sequence per token)."""
    fed, _ = greedy_decode(model, tokenizer, images, prompt, max_new_tokens, device, cache)
    texts = []
    for tokens in fed.tolist():
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(tokens))
    return texts


def save_grid(images, path, columns):
    """Images (N, C, H, W) in [-1, 1] as one PNG grid, `columns` per row."""
    tiles = [to_pil(x) for x in images]
    w, h = tiles[0].size
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new(tiles[0].mode, (columns * w, rows * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    write_file(path, lambda tmp: grid.save(tmp, format="PNG"))
