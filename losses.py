"""Per-sample classification losses over masked logits.

Both return one loss per sample (float32) so that the caller can sum them and divide
by the global number of samples in the accumulated batch (exact gradient accumulation).
"""
import torch


def masked_cross_entropy(logits, targets, label_smoothing=0.0):
    """Cross-entropy per sample; label smoothing spreads its mass over the valid classes only.

    `logits` may hold -inf at masked rows (see model.mask_logits). `targets` is either the
    target row of each sample (B,) integers, or a soft target (B, num_labels) float
    distribution that lives on the sample's valid rows only (mixup / cutmix). With smoothing
    eps and K valid classes the target distribution is (1 - eps) times the hard (one-hot) or
    soft target plus eps / K on each valid class, which for hard targets is torch's label
    smoothing restricted to the valid rows; masked rows get no mass, so there is no inf * 0
    and no leak to classes the dataset lacks.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    valid = torch.isfinite(logits)
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets of shape {tuple(targets.shape)} for logits of shape "
                             f"{tuple(logits.shape)}")
        # where, not a product: 0 * -inf at masked rows would be nan
        terms = torch.where(targets > 0, targets.float() * log_probs, torch.zeros_like(log_probs))
        nll = -terms.sum(-1)
    else:
        nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if label_smoothing == 0:
        return nll
    uniform = -torch.where(valid, log_probs, torch.zeros_like(log_probs)).sum(-1) / valid.sum(-1)
    return (1 - label_smoothing) * nll + label_smoothing * uniform
