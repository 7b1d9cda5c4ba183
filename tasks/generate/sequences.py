"""One conversation as one sequence: its parts (text ids, image blocks), the per-token arrays
the model reads, and the attention mask of a row (causal text, bidirectional image blocks,
noised blocks hidden from later tokens, packed samples apart)."""
import torch

from tasks.generate.patches import load_image
from tasks.generate.records import Turn


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


def sample_length(turns, tokenizer, spec):
    """Tokens of one conversation's sequence, without reading its images: an image block is
    grid^2 + 2 tokens (an assistant image followed by more turns appears twice)."""
    placeholder = torch.zeros(spec.grid ** 2, spec.patch_dim)
    turns = [Turn(t.role, t.kind, placeholder) if t.kind == "image" else t for t in turns]
    parts = build_parts(turns, tokenizer, spec, lambda x0: (x0, 0.0, x0))
    return sum(len(p[1]) if p[0] == "text" else p[1].shape[0] + 2 for p in parts)
