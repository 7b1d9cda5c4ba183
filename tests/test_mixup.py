"""Soft masked loss and same-dataset Mixup / CutMix, checked against their definitions."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import masked_cross_entropy
from mixup import check_mix_args, draw_mix, mix_batch, same_dataset_partners
from model import mask_logits


def test_soft_target_loss_is_cross_entropy_over_the_valid_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 8)
    k, offsets = torch.tensor([3, 5, 2]), torch.tensor([0, 3, 6])
    masked = mask_logits(logits, k, offsets)
    soft = torch.zeros(3, 8)
    soft[0, 0], soft[0, 2] = 0.7, 0.3
    soft[1, 4], soft[1, 7 - 0] = 1.0, 0.0  # zero mass on a masked row is fine
    soft[2, 6], soft[2, 7] = 0.25, 0.75
    for eps in (0.0, 0.1):
        losses = masked_cross_entropy(masked, soft, eps)
        for i in range(3):
            z = logits[i, offsets[i]:offsets[i] + k[i]]
            target = soft[i, offsets[i]:offsets[i] + k[i]] * (1 - eps) + eps / k[i]
            ref = F.cross_entropy(z[None], target[None])  # torch's probability targets
            assert abs(losses[i].item() - ref.item()) < 1e-5


def test_one_hot_soft_targets_equal_hard_targets_with_smoothing():
    torch.manual_seed(1)
    masked = mask_logits(torch.randn(4, 6), torch.tensor([6, 2, 4, 3]))
    hard = torch.tensor([5, 1, 0, 2])
    soft = F.one_hot(hard, 6).float()
    for eps in (0.0, 0.2):
        torch.testing.assert_close(masked_cross_entropy(masked, soft, eps),
                                   masked_cross_entropy(masked, hard, eps))


def test_soft_loss_gradients_are_finite_and_zero_on_masked_rows():
    logits = torch.randn(2, 5, requires_grad=True)
    soft = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 0.1, 0.9, 0]])
    masked = mask_logits(logits, torch.tensor([2, 2]), torch.tensor([0, 2]))
    masked_cross_entropy(masked, soft, 0.1).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 2:] == 0).all() and (logits.grad[1, [0, 1, 4]] == 0).all()


def test_soft_targets_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="soft targets of shape"):
        masked_cross_entropy(torch.randn(2, 5), torch.zeros(2, 4))


def batch_of(dataset_ids, labels, dtype=torch.float32, size=16):
    torch.manual_seed(2)
    n = len(labels)
    pixels = torch.rand(n, 3, size, size) * 255
    pixels = pixels.round().to(torch.uint8) if dtype == torch.uint8 else pixels
    return {"pixel_values": pixels, "labels": torch.tensor(labels),
            "dataset_ids": torch.tensor(dataset_ids), "indices": torch.arange(100, 100 + n)}


def test_partners_are_always_of_the_same_dataset_and_a_lone_sample_is_kept():
    ids = torch.tensor([0, 1, 0, 0, 2, 1, 0, 1])
    for step in range(20):
        partner = same_dataset_partners(ids, torch.arange(8) * 7, seed=3, step=step, micro_index=0)
        assert sorted(partner) == list(range(8))  # a permutation
        assert all(ids[i] == ids[j] for i, j in enumerate(partner))
        assert partner[4] == 4  # dataset 2 has one sample in the batch


def test_pairing_depends_on_the_samples_not_on_their_place_in_the_batch():
    ids, idx = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([5, 9, 2, 7, 4])
    a = same_dataset_partners(ids, idx, 0, 4, 1)
    order = [3, 1, 4, 0, 2]  # the same samples, shuffled (e.g. on another rank)
    b = same_dataset_partners(ids[order], idx[order], 0, 4, 1)
    pairs = lambda p, ix: {(int(ix[i]), int(ix[j])) for i, j in enumerate(p)}  # noqa: E731
    assert pairs(a, idx) == pairs(b, idx[order])
    assert a == same_dataset_partners(ids, idx, 0, 4, 1)  # resume: the same draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_mixup_is_the_convex_combination_and_the_target_lives_on_the_dataset_rows(dtype):
    batch = batch_of([0, 0, 1, 1, 1, 2], [1, 3, 0, 1, 1, 0], dtype)
    offsets = torch.tensor([0, 4, 6])  # disjoint layout: 4 + 2 + 1 rows
    out, soft = mix_batch(batch, offsets, 7, mixup=0.4, cutmix=0, mix_prob=1.0, seed=0,
                          step=3, micro_index=1)
    mode, lam, _ = draw_mix(0.4, 0, 1.0, 0, 3, 1, 16, 16)
    assert mode == "mixup" and 0 < lam < 1
    partner = same_dataset_partners(batch["dataset_ids"], batch["indices"], 0, 3, 1)
    x = batch["pixel_values"].float()
    for i, j in enumerate(partner):
        w = lam if j != i else 1.0
        expected = w * x[i] + (1 - w) * x[j]
        if dtype == torch.uint8:
            assert out["pixel_values"].dtype == torch.uint8
            assert (out["pixel_values"][i].float() - expected).abs().max() <= 0.5 + 1e-4
        else:
            torch.testing.assert_close(out["pixel_values"][i], expected)
        row = int(offsets[batch["dataset_ids"][i]])
        target = torch.zeros(7)
        target[row + batch["labels"][i]] += w
        target[row + batch["labels"][j]] += 1 - w
        torch.testing.assert_close(soft[i], target)
    assert torch.equal(out["labels"], batch["labels"])  # hard accuracy keeps the original label
    assert torch.allclose(soft.sum(1), torch.ones(6))


def test_cutmix_pastes_the_partner_box_and_lambda_is_the_clipped_area():
    batch = batch_of([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    seen_clipped = False
    for step in range(30):
        out, soft = mix_batch(batch, torch.tensor([0, 0]), 3, mixup=0, cutmix=1.0, mix_prob=1.0,
                              seed=1, step=step, micro_index=0)
        mode, lam, (y0, y1, x0, x1) = draw_mix(0, 1.0, 1.0, 1, step, 0, 16, 16)
        assert mode == "cutmix"
        assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
        partner = same_dataset_partners(batch["dataset_ids"], batch["indices"], 1, step, 0)
        x, y = batch["pixel_values"], out["pixel_values"]
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        for i, j in enumerate(partner):
            assert torch.equal(y[i][:, inside], x[j][:, inside])
            assert torch.equal(y[i][:, ~inside], x[i][:, ~inside])
            own = soft[i, batch["labels"][i]]
            assert own.item() == pytest.approx(1.0 if i == j or batch["labels"][i] ==
                                               batch["labels"][j] else lam)
        seen_clipped |= y0 == 0 or x0 == 0 or y1 == 16 or x1 == 16
    assert seen_clipped  # boxes near the border were drawn, and their lambda corrected


def test_the_draws_follow_the_definition():
    draws = [draw_mix(0.8, 1.0, 0.6, 0, s, m, 32, 32) for s in range(400) for m in range(2)]
    mixed = [d for d in draws if d is not None]
    assert abs(len(mixed) / len(draws) - 0.6) < 4 * math.sqrt(0.24 / len(draws))
    cutmix = sum(d[0] == "cutmix" for d in mixed) / len(mixed)
    assert abs(cutmix - 0.5) < 4 * math.sqrt(0.25 / len(mixed))
    lams = np.array([d[1] for d in mixed if d[0] == "mixup"])
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.0962
    assert abs(lams.mean() - 0.5) < 4 * math.sqrt(0.0962 / len(lams))
    assert abs(lams.var() - 0.0962) < 0.03
    assert draws == [draw_mix(0.8, 1.0, 0.6, 0, s, m, 32, 32) for s in range(400) for m in range(2)]


def test_unmixed_batches_keep_their_pixels_and_get_one_hot_targets():
    batch = batch_of([0, 1], [2, 1])
    step = next(s for s in range(100) if draw_mix(1.0, 0, 0.3, 0, s, 0, 16, 16) is None)
    out, soft = mix_batch(batch, torch.tensor([0, 0]), 3, 1.0, 0, 0.3, 0, step, 0)
    assert out["pixel_values"] is batch["pixel_values"]
    torch.testing.assert_close(soft, F.one_hot(batch["labels"], 3).float())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--mixup must be"):
        check_mix_args(-1, 0, 1.0)
    with pytest.raises(ValueError, match="--mix_prob must be"):
        check_mix_args(0.2, 0, 1.5)
    with pytest.raises(ValueError, match="--task generate"):
        check_mix_args(0.2, 0, 1.0, task="generate")
    with pytest.raises(ValueError, match="--cutmix.*vision-language"):
        check_mix_args(0, 1.0, 1.0, token_inputs=True, model_name="Qwen2VLModel")
    with pytest.raises(ValueError, match="never mix"):
        check_mix_args(0.2, 0, 0.0)
    check_mix_args(0, 0, 1.0, task="generate", token_inputs=True)  # off: nothing to refuse


def test_patch_inputs_of_a_processor_are_refused_not_mixed_as_images():
    """SigLIP2's processor hands the backbone patches, (B, patches, 3 p p) with a patch mask:
    mixed, patch k of one image would meet patch k of another, against whole-image labels."""
    from PIL import Image
    from transformers import Siglip2ImageProcessorPil
    processor = Siglip2ImageProcessorPil(patch_size=4, max_num_patches=16)
    images = [Image.new("RGB", size, colour) for size, colour in
              [((20, 12), "red"), ((12, 20), "blue"), ((16, 16), "green")]]
    batch = {**processor(images, return_tensors="pt"), "labels": torch.tensor([0, 1, 0]),
             "dataset_ids": torch.zeros(3, dtype=torch.long), "indices": torch.arange(3)}
    assert batch["pixel_values"].dim() == 3
    with pytest.raises(ValueError, match=r"this backbone's processor gives pixel_values of shape "
                       r"\(3, 16, 48\) and a pixel_attention_mask \(patches\)"):
        mix_batch(batch, torch.tensor([0]), 2, mixup=0, cutmix=1.0, mix_prob=1.0, seed=0, step=0,
                  micro_index=0)
