"""Soft Dice + soft CE: equals plain Dice + CE on one-hot labels, and handles continuous labels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sraseg.train.losses import one_hot, soft_dice_ce


def test_one_hot_equals_dice_plus_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8) * 2
    labels = torch.randint(0, 4, (3, 8, 8))
    loss, dice, ce = soft_dice_ce(logits, one_hot(labels, 4))
    # independent reference: torch's cross-entropy and a per-(sample, class) Dice
    expected_ce = F.cross_entropy(logits, labels)
    probs = logits.softmax(1)
    scores = []
    for b in range(3):
        for c in range(4):
            target = (labels[b] == c).float()
            scores.append(2 * (probs[b, c] * target).sum() / (probs[b, c].sum() + target.sum() + 1e-5))
    expected_dice = 1 - torch.stack(scores).mean()
    assert torch.allclose(ce, expected_ce, atol=1e-6)
    assert torch.allclose(dice, expected_dice, atol=1e-6)
    assert torch.allclose(loss, expected_ce + expected_dice, atol=1e-6)


def test_continuous_labels_analytic():
    # P = Y = 0.5 everywhere: CE = log 2; per class 2*sum(0.25)/sum(1.0) = 0.5, so Dice loss = 0.5
    logits = torch.zeros(2, 2, 4, 4)
    target = torch.full((2, 2, 4, 4), 0.5)
    loss, dice, ce = soft_dice_ce(logits, target)
    assert ce.item() == pytest.approx(math.log(2), abs=1e-6)
    assert dice.item() == pytest.approx(0.5, abs=1e-5)


def test_soft_label_pulls_toward_blend():
    # the minimiser of the soft loss for a 0.3/0.7 label is near 0.3/0.7, not a hard class
    target = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    logit = torch.zeros(1, 2, 1, 1, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        soft_dice_ce(logit.expand(1, 2, 4, 4), target)[0].backward()
        opt.step()
    p = logit.detach().softmax(1).flatten()
    assert p[1].item() == pytest.approx(0.7, abs=0.05)


def test_extreme_logits_stay_finite_and_shape_checked():
    logits = torch.tensor([[-1e4, 1e4]]).view(1, 2, 1, 1)
    target = torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)
    loss, _, ce = soft_dice_ce(logits, target)
    assert torch.isfinite(loss) and ce.item() == pytest.approx(-math.log(1e-7), rel=1e-4)
    with pytest.raises(ValueError, match="shape"):
        soft_dice_ce(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2))
