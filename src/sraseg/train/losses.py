"""Segmentation losses.

- `soft_dice_ce`: soft Dice + soft cross-entropy on label distributions (SRA-Seg's "soft loss"); with
  one-hot labels it is the usual Dice + CE (labeled_only and SRA-Seg use it).
  Optional per-pixel weights turn it into a weighted loss (`train.pseudo_weight`) or restrict it to one
  label source's pixels (`soft_dice_ce_split`, the loss_pseudo / loss_true instruments).
- `bcp_region_loss`: BCP's loss for a copy-paste image, Dice + CE per source region with a lower weight on
  the pseudo-labelled region (the bcp_real and bcp_synthetic baselines use it); `bcp_region_parts` gives
  its two regions' terms before the weights.
- `sigmoid_rampup`: the mean-teacher ramp-up exp(-5 (1 - t)^2) of the unlabeled part's weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "PROB_FLOOR",
    "DICE_EPS",
    "one_hot",
    "soft_dice_ce",
    "soft_dice_ce_split",
    "bcp_region_loss",
    "bcp_region_parts",
    "sigmoid_rampup",
]

PROB_FLOOR = 1e-7  # keeps log P finite
DICE_EPS = 1e-5


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels long [B,H,W] in [0,C) -> float32 one-hot [B,C,H,W]."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def soft_dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float = DICE_EPS,
    weight: torch.Tensor | None = None,
    batch_dice: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft Dice + soft CE (SRA-Seg), optionally with per-pixel weights w.

    1. P = clamp(softmax(z), 1e-7, 1), computed in float32 (also under bf16 autocast).
    2. soft Dice = 1 - mean over (sample, class incl. background) of 2*sum(w*P*Y) / (sum(w*(P+Y)) + eps),
       sums over pixels; with `batch_dice` the sums run over every pixel of the batch and the mean over
       classes only (BCP's and nnU-Net's batch Dice: a class absent from one image still penalises that
       image's false positives, which a per-image Dice term of an absent class, constant 1, does not).
    3. soft CE = -sum over pixels of w * sum_c Y_c log P_c, divided by sum over pixels of w (a weighted mean).
    4. loss = Dice + CE.
    Without weights (w = 1) this is the reference's soft loss, computed exactly as before weights existed.
    Both terms are unchanged when every weight is scaled by the same factor.

    Args:
        logits: float [B,C,H,W].
        target: float [B,C,H,W], each pixel a distribution over C classes (one-hot or a blend).
        eps: Dice denominator guard.
        weight: float [B,1,H,W] >= 0, or None (every pixel 1).
        batch_dice: Dice sums over the whole batch (True) or per image (False, the reference).
    Returns:
        (loss, dice, ce): float32 scalars.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if weight is not None and weight.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit logits {tuple(logits.shape)}")
    probs = torch.softmax(logits.float(), dim=1).clamp(PROB_FLOOR, 1.0)
    target = target.float()
    dims = (0, 2, 3) if batch_dice else (2, 3)
    # the unweighted path keeps the reference's operations in their order (same numbers, same gradients)
    if weight is None:
        overlap = (probs * target).sum(dim=dims)
        total = (probs + target).sum(dim=dims)
    else:
        weight = weight.float()
        overlap = (weight * probs * target).sum(dim=dims)
        total = (weight * (probs + target)).sum(dim=dims)
    dice = 1.0 - (2.0 * overlap / (total + eps)).mean()
    if weight is None:
        ce = -(target * probs.log()).sum(dim=1).mean()
    else:  # a weighted mean over the pixels; 0 when no pixel weighs
        ce = -(weight[:, 0] * (target * probs.log()).sum(dim=1)).sum() / weight.sum().clamp_min(PROB_FLOOR)
    return dice + ce, dice, ce


def soft_dice_ce_split(
    logits: torch.Tensor, target: torch.Tensor, pseudo_share: torch.Tensor, eps: float = DICE_EPS,
    batch_dice: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft loss of a mixed image split by label source: (pseudo-label part, true-label part).

    A mixed label y = m*Y(s) + (1-m)*Y(r) takes share m of each pixel from the pseudo-labelled image s and
    1-m from the true-labelled image r. Each part is the soft loss with per-pixel weights m (pseudo) or
    1-m (true), in both Dice sums and the CE's weighted mean: with a hard map, the soft loss on the
    pixels that come from that image, normalised by that region, as BCP's region loss is. Dice is not
    additive over regions, so the two parts do not sum to the soft loss; both answer "how well does the
    student fit this label source where it holds".

    Args:
        logits: float [B,C,H,W].
        target: float [B,C,H,W], the mixed label.
        pseudo_share: float [B,1,H,W] in [0,1], m: the map that took the pseudo-labelled image.
        batch_dice: as `soft_dice_ce`.
    Returns:
        (pseudo_part, true_part): float32 scalars, each a Dice + CE.
    """
    pseudo = soft_dice_ce(logits, target, eps, weight=pseudo_share, batch_dice=batch_dice)[0]
    true = soft_dice_ce(logits, target, eps, weight=1.0 - pseudo_share, batch_dice=batch_dice)[0]
    return pseudo, true


def bcp_region_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    first_weight: float,
    second_weight: float,
    eps: float = DICE_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCP's loss for one kind of mixed image (a sub-batch mixed with hard masks, first where mask = 1).

    Each source region R (mask = 1: the first image's pixels, mask = 0: the second's) gets its own
    1. Dice_R = 1 - mean over classes (incl. background) of 2*sum_R(P*Y) / (sum_R(P+Y) + eps), sums over
       the region's pixels of every image in the sub-batch;
    2. CE_R = -sum_R(sum_c Y_c log P_c) / |R|, so each region is normalised by its own size;
    3. loss = (w_1*Dice_1 + w_2*Dice_2 + w_1*CE_1 + w_2*CE_2) / 2, with w = 0.5 for a pseudo-labelled
       region and 1 for a true-label one. An empty region adds nothing.

    Args:
        logits: float [B,C,H,W].
        target: float [B,C,H,W], one-hot (the mixed label: the first image's label where mask = 1).
        mask: float [B,1,H,W] with values in {0, 1} (a hard BCP mask; a soft map has no regions).
        first_weight, second_weight: weights of the mask = 1 and mask = 0 regions.
    Returns:
        (loss, dice, ce): float32 scalars, dice and ce already weighted and halved (loss = dice + ce).
    """
    (dice_first, ce_first), (dice_second, ce_second) = _bcp_regions(logits, target, mask, first_weight,
                                                                    second_weight, eps)
    dice, ce = (dice_first + dice_second) / 2.0, (ce_first + ce_second) / 2.0
    return dice + ce, dice, ce


def bcp_region_parts(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = DICE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's loss split by region before its weights: (first, second) = ((Dice_1 + CE_1) / 2,
    (Dice_2 + CE_2) / 2), so that `bcp_region_loss(..., w_1, w_2)` = w_1*first + w_2*second.

    Args: as `bcp_region_loss`.
    Returns:
        (first, second): float32 scalars, the mask = 1 and the mask = 0 region's terms.
    """
    (dice_first, ce_first), (dice_second, ce_second) = _bcp_regions(logits, target, mask, 1.0, 1.0, eps)
    return (dice_first + ce_first) / 2.0, (dice_second + ce_second) / 2.0


def _bcp_regions(logits, target, mask, first_weight: float, second_weight: float, eps: float):
    """((w_1*Dice_1, w_1*CE_1), (w_2*Dice_2, w_2*CE_2)) of `bcp_region_loss`, not yet halved."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if mask.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit logits {tuple(logits.shape)}")
    # checked on the CPU only: on a GPU the check would make the host wait for the device every step
    if mask.device.type == "cpu" and not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("BCP's loss needs a hard mask (values 0 and 1 only)")
    probs = torch.softmax(logits.float(), dim=1).clamp(PROB_FLOOR, 1.0)
    target = target.float()
    pixel_ce = -(target * probs.log()).sum(dim=1, keepdim=True)  # [B,1,H,W]
    terms = []
    for region, weight in ((mask.float(), first_weight), (1.0 - mask.float(), second_weight)):
        size = region.sum()
        present = (size > 0).to(probs.dtype)  # an empty region adds nothing (no host read-back to test it)
        overlap = (region * probs * target).sum(dim=(0, 2, 3))
        total = (region * (probs + target)).sum(dim=(0, 2, 3))
        terms.append((weight * present * (1.0 - (2.0 * overlap / (total + eps)).mean()),
                      weight * (region * pixel_ce).sum() / size.clamp_min(1.0)))
    return terms


def sigmoid_rampup(iteration: int, length: int) -> float:
    """The mean-teacher ramp-up (Laine & Aila 2017; Tarvainen & Valpola 2017): exp(-5 (1 - t)^2) with
    t = clip(iteration / length, 0, 1); 1 when `length` is 0 (no ramp-up).

    Args:
        iteration: iterations done so far (0 at the first one).
        length: ramp-up length in iterations.
    Returns:
        float in (0, 1]: exp(-5) = 0.0067 at t = 0, exp(-1.25) = 0.287 at t = 1/2, 1 from t = 1 on.
    """
    if length <= 0:
        return 1.0
    t = min(max(iteration / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)
