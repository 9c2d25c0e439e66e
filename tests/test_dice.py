"""The one Dice of hard masks (ldm/modules/dice.py): counts and scores against a per-class reference, the empty
convention, ignored pixels and out-of-range values, and the callers built on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.modules.dice import dice_counts, dice_from_counts, dice_scores


def _reference(pred, target, num_classes, ignore_index=None):
    """Per class with a Python loop over classes: (inter, predicted, truth) over the non-ignored pixels."""
    valid = np.ones_like(target, bool) if ignore_index is None else target != ignore_index
    rows = []
    for c in range(num_classes):
        p, t = (pred == c) & valid, (target == c) & valid
        rows.append(((p & t).sum(), p.sum(), t.sum()))
    return np.array(rows).T


@pytest.mark.parametrize("ignore_index", [None, 255, 0])
def test_counts_match_a_per_class_reference_pooled_and_per_case(ignore_index):
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, size=(5, 7, 6))
    pred = rng.integers(0, 4, size=(5, 7, 6))
    target[0, :2] = 255  # ignored (or out of range when nothing is ignored)
    pred[1, :3] = 9      # out of range: belongs to no class
    pred[2] = target[2]  # a perfect case
    counts = dice_counts(torch.from_numpy(pred), torch.from_numpy(target), 4, ignore_index)
    np.testing.assert_array_equal(np.stack([c.numpy() for c in counts]), _reference(pred, target, 4, ignore_index))
    per_case = dice_counts(torch.from_numpy(pred), torch.from_numpy(target), 4, ignore_index, per_case=True)
    for n in range(5):
        np.testing.assert_array_equal(np.stack([c[n].numpy() for c in per_case]),
                                      _reference(pred[n:n + 1], target[n:n + 1], 4, ignore_index))


def test_scores_and_the_empty_convention():
    target = torch.tensor([[[1, 1, 0, 0]]])
    pred = torch.tensor([[[1, 0, 0, 3]]])
    # class 0: |P|=2 (pixels 1, 2), |T|=2, inter 1 -> 0.5; class 1: 2*1/(1+2); class 2 in neither; class 3 predicted only
    nan_empty = dice_scores(pred, target, 4)
    np.testing.assert_allclose(nan_empty[[0, 1, 3]].numpy(), [0.5, 2 / 3, 0.0])
    assert torch.isnan(nan_empty[2]) and nan_empty.dtype == torch.float64
    ones = dice_scores(pred, target, 4, empty=1.0, dtype=torch.float32)
    assert ones[2] == 1.0 and ones.dtype == torch.float32
    assert dice_from_counts(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), empty=0.25)[0] == 0.25
    with pytest.raises(ValueError, match="differ in shape"):
        dice_scores(pred, target[..., :3], 4)


def test_callers_keep_their_conventions():
    from ldm.evaluation.anatomy import dice_per_case, dice_per_class
    from ldm.models.mask_autoencoder import hard_dice

    target = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    pred = np.array([[[1, 0, 0, 2]], [[0, 0, 0, 0]]])
    pooled = dice_per_class(pred, target, 3)
    np.testing.assert_allclose(pooled, [2 * 5 / (6 + 6), 2 / 3, 0.0])  # class 0: 6 predicted, 6 true, 5 shared
    per_case = dice_per_case(pred, target, 3)
    assert np.isnan(per_case[1, 1]) and np.isnan(per_case[1, 2]) and per_case[1, 0] == 1.0  # absent from both: NaN
    hard = hard_dice(torch.from_numpy(pred), torch.from_numpy(target), 3, ignore_index=255)
    assert sorted(hard) == [0, 1]  # class 2 is absent from the target: left out
    assert float(hard[1]) == pytest.approx(2 / 3)


def test_soft_dice_pooled_and_per_sample():
    from ldm.modules.anatomical_losses import soft_dice_loss

    torch.manual_seed(0)
    probs = torch.rand(2, 3, 4, 4).softmax(1)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[1, 0] = 255
    valid = (mask != 255)[:, None].float()
    onehot = torch.stack([(mask == c) for c in range(3)], 1).float() * valid
    p = probs * valid
    inter, denom = (p * onehot).sum((0, 2, 3))[1:], p.sum((0, 2, 3))[1:] + onehot.sum((0, 2, 3))[1:]
    pooled_ref = 1 - ((2 * inter + 0.5) / (denom + 0.5)).mean()
    torch.testing.assert_close(soft_dice_loss(probs, mask, 255, pooled=True, smooth=0.5), pooled_ref)
    per = [1 - ((2 * (p[b] * onehot[b]).sum((1, 2))[1:] + 1) / (p[b].sum((1, 2))[1:] + onehot[b].sum((1, 2))[1:] + 1)
                ).mean() for b in range(2)]
    torch.testing.assert_close(soft_dice_loss(probs, mask, 255), (per[0] + per[1]) / 2)
    with pytest.raises(ValueError, match="no sample_weights"):
        soft_dice_loss(probs, mask, 255, torch.ones(2), pooled=True)
