"""Generation's batches: the dataset (a conversation's noise, timesteps and condition dropout
drawn from its seed), collation into padded rows or packed rows, and the loader."""
from functools import partial

import numpy as np
import torch

from dataset import (DataError, EpochSampler, raise_data_errors, start_worker,
                     worker_options)
from tasks.generate.patches import sample_timestep
from tasks.generate.sequences import assemble, build_attention_mask, build_parts, sample_length

# evaluation noise levels, cycled over samples: low-variance image MSE
EVAL_TIMES = (0.25, 0.5, 0.75)


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
                                       pin_memory=pin_memory, worker_init_fn=start_worker,
                                       **worker_options(num_workers, persistent_workers,
                                                        prefetch_factor))


def target_counts(batch):
    """[target text tokens, noised image tokens] of a batch: what the global loss is divided by."""
    return [
        int((batch["labels"] != -100).sum()),
        batch["velocity_targets"].shape[0] * batch["velocity_targets"].shape[1]
    ]
