"""Soft Dice + soft CE: equals plain Dice + CE on one-hot labels, and handles continuous labels; with per-pixel
weights (pseudo_weight, the loss split) it equals values computed by hand. BCP's region loss: equals a value
computed by hand, weighs a pseudo-labelled region half a true one, and splits into its regions. The ramp-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sraseg.train.losses import (
    DICE_EPS,
    bcp_region_loss,
    bcp_region_parts,
    one_hot,
    sigmoid_rampup,
    soft_dice_ce,
    soft_dice_ce_split,
)
from sraseg.train.methods.shared import soft_terms


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


# --- per-pixel weights: pseudo_weight and the loss split ----------------------------------------------

# Two pixels, two classes. Pixel 0 comes from the pseudo-labelled image (m = 1, label class 0, P = (1/2, 1/2));
# pixel 1 from the true-labelled one (m = 0, label class 1, P = (1/4, 3/4)).
TWO_PIXELS = dict(logits=torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2),
                  target=torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2),
                  share=torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2))


def test_pseudo_weight_half_equals_the_hand_value():
    """pseudo_weight 0.5: pixel weights (0.5, 1).
    Dice: class 0: 2 * (0.5*1/2*1) / (0.5*(1/2 + 1) + 1*(1/4 + 0)) = 0.5 / 1.0; class 1: 2 * (1*3/4*1) /
    (0.5*(1/2 + 0) + 1*(3/4 + 1)) = 1.5 / 2.0; Dice loss = 1 - (0.5 + 0.75)/2 = 0.375.
    CE: (0.5 * ln 2 + 1 * ln 4/3) / (0.5 + 1)."""
    dice = 1 - (0.5 / (1.0 + DICE_EPS) + 1.5 / (2.0 + DICE_EPS)) / 2
    ce = (0.5 * math.log(2) + math.log(4 / 3)) / 1.5
    terms = soft_terms(TWO_PIXELS["logits"], TWO_PIXELS["target"], TWO_PIXELS["share"], 0.5)
    assert terms["dice_loss"].item() == pytest.approx(dice, rel=1e-6)
    assert terms["ce_loss"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.375 + 0.422843, abs=1e-5)
    # pseudo_weight 1 is the plain soft loss, and weights all 1 give it too
    plain = soft_dice_ce(TWO_PIXELS["logits"], TWO_PIXELS["target"])[0]
    assert torch.equal(soft_terms(TWO_PIXELS["logits"], TWO_PIXELS["target"], TWO_PIXELS["share"], 1.0)["loss"],
                       plain)
    ones = soft_dice_ce(TWO_PIXELS["logits"], TWO_PIXELS["target"], weight=torch.ones(1, 1, 1, 2))[0]
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    assert plain.item() == pytest.approx(1 - (1 / 1.75 + 1.5 / 2.25) / 2 + (math.log(2) + math.log(4 / 3)) / 2, rel=1e-5)


def test_soft_loss_split_is_the_loss_on_each_source():
    """Pseudo part: pixel 0 alone: Dice 1 - (2*(1/2) / (3/2) + 0 / (1/2)) / 2 = 2/3, CE ln 2.
    True part: pixel 1 alone: Dice 1 - (0 / (1/4) + 2*(3/4) / (7/4)) / 2 = 4/7, CE ln 4/3."""
    pseudo, true = soft_dice_ce_split(TWO_PIXELS["logits"], TWO_PIXELS["target"], TWO_PIXELS["share"])
    assert pseudo.item() == pytest.approx(1 - (1 / (1.5 + DICE_EPS)) / 2 + math.log(2), rel=1e-6)
    assert true.item() == pytest.approx(1 - (1.5 / (1.75 + DICE_EPS)) / 2 + math.log(4 / 3), rel=1e-6)
    terms = soft_terms(TWO_PIXELS["logits"], TWO_PIXELS["target"], TWO_PIXELS["share"], 1.0)
    assert (terms["loss_pseudo"], terms["loss_true"]) == (pseudo, true)


# Two images of one pixel each: TWO_PIXELS' pixels as a batch of two.
TWO_IMAGES = {k: v.permute(3, 1, 2, 0) for k, v in TWO_PIXELS.items()}


def test_batch_dice_sums_over_the_batch_and_penalises_false_positives_of_an_absent_class():
    """Per-image Dice: image 0 (class 0): (2/3, 0), image 1 (class 1): (0, 6/7), loss 1 - (2/3 + 6/7)/4;
    batch Dice: class 0: 1 / (7/4), class 1: (3/2) / (9/4), loss 1 - (4/7 + 2/3)/2 (the one-image value).
    Image 0's class-1 probability (a class it lacks) is a false positive only batch Dice sees."""
    logits, target = TWO_IMAGES["logits"], TWO_IMAGES["target"]
    per_image = soft_dice_ce(logits, target)[1]
    batch = soft_dice_ce(logits, target, batch_dice=True)[1]
    assert per_image.item() == pytest.approx(1 - (2 / 3 + 6 / 7) / 4, rel=1e-5)
    assert batch.item() == pytest.approx(1 - (4 / 7 + 2 / 3) / 2, rel=1e-5)
    assert batch.item() == pytest.approx(soft_dice_ce(TWO_PIXELS["logits"], TWO_PIXELS["target"])[1].item(), rel=1e-6)
    # Three classes: image 0 (class 0) moves probability from class 2 (absent everywhere) to class 1 (image 1's
    # class) with its class-0 probability unchanged: a false positive only batch Dice sees.
    target3 = one_hot(torch.tensor([[[0]], [[1]]]), 3)
    before = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).reshape(2, 3, 1, 1)
    after = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]).reshape(2, 3, 1, 1)
    assert soft_dice_ce(after, target3)[1].item() == pytest.approx(soft_dice_ce(before, target3)[1].item(), abs=1e-7)
    assert soft_dice_ce(after, target3, batch_dice=True)[1] > soft_dice_ce(before, target3, batch_dice=True)[1] + 0.03


def test_region_form_is_bcps_loss_on_a_hard_map_and_linear_in_the_pseudo_weight():
    torch.manual_seed(5)
    logits, target = torch.randn(2, 4, 6, 6) * 2, one_hot(torch.randint(0, 4, (2, 6, 6)), 4)
    mask = torch.ones(2, 1, 6, 6)
    mask[:, :, 1:5, 2:6] = 0
    for w in (0.5, 1.0):
        region = soft_terms(logits, target, mask, w, "region")
        bcp = bcp_region_loss(logits, target, mask, w, 1.0)
        for key, value in zip(("loss", "dice_loss", "ce_loss"), bcp):
            assert region[key].item() == pytest.approx(value.item(), rel=1e-5), (w, key)
    soft_map = torch.rand(2, 1, 6, 6)
    terms = {w: soft_terms(logits, target, soft_map, w, "region") for w in (0.0, 0.5)}
    assert (terms[0.5]["loss"] - terms[0.0]["loss"]).item() == pytest.approx(0.25 * terms[0.0]["loss_pseudo"].item(),
                                                                             rel=1e-5)
    assert terms[0.0]["loss"].item() == pytest.approx(terms[0.0]["loss_true"].item() / 2, rel=1e-6)


def test_weighted_soft_loss_is_scale_free_and_checks_shapes():
    torch.manual_seed(2)
    logits, target = torch.randn(2, 4, 6, 6), one_hot(torch.randint(0, 4, (2, 6, 6)), 4)
    weight = torch.rand(2, 1, 6, 6)
    a, b = soft_dice_ce(logits, target, weight=weight), soft_dice_ce(logits, target, weight=3 * weight)
    for x, y in zip(a, b):
        assert x.item() == pytest.approx(y.item(), rel=1e-5)
    with pytest.raises(ValueError, match="weight"):
        soft_dice_ce(logits, target, weight=torch.ones(2, 6, 6))


@pytest.mark.parametrize("weights", [(0.5, 1.0), (1.0, 0.5), (0.25, 0.75)])
def test_bcp_region_parts_give_the_loss_by_their_weights(weights):
    torch.manual_seed(3)
    logits, target = torch.randn(2, 4, 6, 6) * 2, one_hot(torch.randint(0, 4, (2, 6, 6)), 4)
    mask = torch.ones(2, 1, 6, 6)
    mask[:, :, 1:5, 2:6] = 0
    first, second = bcp_region_parts(logits, target, mask)
    loss = bcp_region_loss(logits, target, mask, *weights)[0]
    assert loss.item() == pytest.approx(weights[0] * first.item() + weights[1] * second.item(), rel=1e-6)
    assert first.item() != pytest.approx(second.item(), rel=1e-3)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5.0)) and sigmoid_rampup(0, 100) == pytest.approx(0.0067379, abs=1e-7)
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25)) and sigmoid_rampup(50, 100) == pytest.approx(0.2865048, abs=1e-7)
    assert sigmoid_rampup(25, 100) == pytest.approx(math.exp(-5 * 0.75**2))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(5000, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0 and sigmoid_rampup(7, 0) == 1.0  # no ramp-up


# --- BCP's region loss ---------------------------------------------------------------------------


def _bcp_by_hand(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray, weights: tuple[float, float]) -> float:
    """Explicit per-region sums in float64 numpy: Dice over the region's pixels of the whole sub-batch
    per class, CE summed over the region and divided by its pixel count."""
    b, c, h, w = logits.shape
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = np.clip(e / e.sum(axis=1, keepdims=True), 1e-7, 1.0)
    total = 0.0
    for region_value, weight in zip((1, 0), weights):
        pixels = [(i, y, x) for i in range(b) for y in range(h) for x in range(w) if mask[i, y, x] == region_value]
        ce = sum(-np.log(p[i, labels[i, y, x], y, x]) for i, y, x in pixels) / len(pixels)
        dice_scores = []
        for k in range(c):
            overlap = sum(p[i, k, y, x] for i, y, x in pixels if labels[i, y, x] == k)
            size = sum(p[i, k, y, x] + (labels[i, y, x] == k) for i, y, x in pixels)
            dice_scores.append(2 * overlap / (size + 1e-5))
        total += weight * (1 - np.mean(dice_scores)) + weight * ce
    return total / 2


@pytest.mark.parametrize("weights", [(0.5, 1.0), (1.0, 0.5), (1.0, 1.0)])
def test_bcp_region_loss_equals_hand_value(weights):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (2, 3, 4, 5))
    labels = rng.integers(0, 3, (2, 4, 5))
    mask = np.ones((2, 4, 5))
    mask[0, 1:3, 1:4] = 0  # a box from the second image in each sample, like BCP's
    mask[1, 0:2, 2:5] = 0
    loss, dice, ce = bcp_region_loss(torch.tensor(logits, dtype=torch.float32), one_hot(torch.tensor(labels), 3),
                                     torch.tensor(mask[:, None], dtype=torch.float32), *weights)
    assert loss.item() == pytest.approx(_bcp_by_hand(logits, labels, mask, weights), rel=1e-5)
    assert loss.item() == pytest.approx((dice + ce).item(), rel=1e-6)


def test_bcp_region_loss_weighs_pseudo_region_half():
    # left half (mask 1) pseudo-labelled, right half (mask 0) true labels, with mirror-equal content:
    # every pixel's gradient in the pseudo half is exactly half its mirror's in the true half
    torch.manual_seed(1)
    left_logits = torch.randn(2, 4, 6, 3) * 2
    left_labels = torch.randint(0, 4, (2, 6, 3))
    logits = torch.cat([left_logits, left_logits], dim=3).requires_grad_(True)
    labels = torch.cat([left_labels, left_labels], dim=2)
    mask = torch.zeros(2, 1, 6, 6)
    mask[..., :3] = 1.0
    loss, _, _ = bcp_region_loss(logits, one_hot(labels, 4), mask, first_weight=0.5, second_weight=1.0)
    loss.backward()
    pseudo, true = logits.grad[..., :3], logits.grad[..., 3:]
    assert true.abs().sum() > 0
    assert torch.allclose(pseudo, 0.5 * true, atol=1e-7)
    # and the loss itself is 0.5 * (region loss) + 1 * (the same region loss)
    one, _, _ = bcp_region_loss(logits.detach(), one_hot(labels, 4), mask, 1.0, 0.0)
    assert loss.item() == pytest.approx(1.5 * one.item(), rel=1e-6)


def test_bcp_region_loss_refuses_soft_or_misshapen_masks():
    logits, target = torch.zeros(1, 4, 4, 4), one_hot(torch.zeros(1, 4, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="hard mask"):
        bcp_region_loss(logits, target, torch.full((1, 1, 4, 4), 0.5), 1.0, 0.5)
    with pytest.raises(ValueError, match="mask"):
        bcp_region_loss(logits, target, torch.ones(1, 4, 4), 1.0, 0.5)
