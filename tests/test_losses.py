import math

import torch
import torch.nn.functional as F

from losses import masked_cross_entropy
from model import mask_logits


def test_label_smoothing_spreads_mass_over_valid_classes_only():
    # rows 3, 4 belong to no class of this dataset
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0, 7.0]])
    masked = mask_logits(logits, torch.tensor([3]))
    eps, target = 0.1, 1
    # by hand: softmax over the 3 valid logits, target distribution (1 - eps) one-hot + eps / 3
    z = [2.0, 0.5, -1.0]
    log_norm = math.log(sum(math.exp(v) for v in z))
    logp = [v - log_norm for v in z]
    expected = -(1 - eps) * logp[target] - eps / 3 * sum(logp)
    loss = masked_cross_entropy(masked, torch.tensor([target]), label_smoothing=eps)
    assert torch.isfinite(loss).all()
    assert abs(loss.item() - expected) < 1e-6


def test_masked_smoothing_equals_torch_smoothing_on_the_valid_slice():
    torch.manual_seed(0)
    logits = torch.randn(4, 12)
    k = torch.tensor([5, 12, 2, 7])
    targets = torch.tensor([4, 11, 0, 3])
    losses = masked_cross_entropy(mask_logits(logits, k), targets, label_smoothing=0.2)
    for i in range(4):
        ref = F.cross_entropy(logits[i:i + 1, :k[i]], targets[i:i + 1], label_smoothing=0.2)
        assert abs(losses[i].item() - ref.item()) < 1e-5


def test_without_masking_it_is_torch_cross_entropy():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 9), torch.randint(0, 9, (6,))
    for eps in (0.0, 0.1):
        ours = masked_cross_entropy(logits, targets, eps).mean()
        torch.testing.assert_close(ours, F.cross_entropy(logits, targets, label_smoothing=eps))


def test_gradients_are_finite_with_masked_rows():
    logits = torch.randn(3, 6, requires_grad=True)
    loss = masked_cross_entropy(mask_logits(logits, torch.tensor([2, 4, 6])),
                                torch.tensor([1, 3, 5]), 0.1).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 2:] == 0).all()  # masked rows get no gradient
