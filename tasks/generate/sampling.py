"""Sampling from a generation model: text -> image by Euler steps of the velocity (with
classifier-free guidance), image -> text by greedy decoding; both against a key/value cache of
the prompt, or recomputing the whole sequence at each step."""
from itertools import pairwise

import torch

from backbone import eval_mode, restore_modes
from tasks.generate.batches import collate_sequences
from tasks.generate.patches import patchify, unpatchify
from tasks.generate.records import Turn
from tasks.generate.sequences import assemble, build_parts, role_prefix


def euler_sample(velocity, noise, steps, shift=1.0):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 with `steps` Euler steps."""
    ts = torch.linspace(1, 0, steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    x = noise
    for t, t_next in pairwise(ts):
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


def sampling_shift(info, given=None, say=print):
    """The timestep shift to sample a checkpoint with: `given` (a flag), else the one it was
    trained with (unified.json); a checkpoint written before it was kept says so and takes 1."""
    if given is not None:
        return given
    if "timestep_shift" in info:
        return float(info["timestep_shift"])
    say("note: the checkpoint does not record the --timestep_shift it was trained with (written "
        "before it was kept): sampling with 1, as its training's default")
    return 1.0


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
