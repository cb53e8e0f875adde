"""Segmentation losses.

- `soft_dice_ce`: soft Dice + soft cross-entropy on label distributions (SRA-Seg's "soft loss"); with
  one-hot labels it is the usual Dice + CE (labeled_only and SRA-Seg use it).
- `bcp_region_loss`: BCP's loss for a copy-paste image, Dice + CE per source region with a lower weight on
  the pseudo-labelled region (the bcp_real and bcp_synthetic baselines use it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PROB_FLOOR", "DICE_EPS", "one_hot", "soft_dice_ce", "bcp_region_loss"]

PROB_FLOOR = 1e-7  # keeps log P finite
DICE_EPS = 1e-5


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels long [B,H,W] in [0,C) -> float32 one-hot [B,C,H,W]."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def soft_dice_ce(
    logits: torch.Tensor, target: torch.Tensor, eps: float = DICE_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft Dice + soft CE (SRA-Seg).

    1. P = clamp(softmax(z), 1e-7, 1), computed in float32 (also under bf16 autocast).
    2. soft Dice = 1 - mean over (sample, class incl. background) of 2*sum(P*Y) / (sum(P+Y) + eps),
       sums over pixels.
    3. soft CE = -mean over pixels of sum_c Y_c log P_c.
    4. loss = Dice + CE.

    Args:
        logits: float [B,C,H,W].
        target: float [B,C,H,W], each pixel a distribution over C classes (one-hot or a blend).
        eps: Dice denominator guard.
    Returns:
        (loss, dice, ce): float32 scalars.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    probs = torch.softmax(logits.float(), dim=1).clamp(PROB_FLOOR, 1.0)
    target = target.float()
    overlap = (probs * target).sum(dim=(2, 3))
    total = (probs + target).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * overlap / (total + eps)).mean()
    ce = -(target * probs.log()).sum(dim=1).mean()
    return dice + ce, dice, ce


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
    dice = ce = probs.new_zeros(())
    for region, weight in ((mask.float(), first_weight), (1.0 - mask.float(), second_weight)):
        size = region.sum()
        present = (size > 0).to(probs.dtype)  # an empty region adds nothing (no host read-back to test it)
        overlap = (region * probs * target).sum(dim=(0, 2, 3))
        total = (region * (probs + target)).sum(dim=(0, 2, 3))
        dice = dice + weight * present * (1.0 - (2.0 * overlap / (total + eps)).mean())
        ce = ce + weight * (region * pixel_ce).sum() / size.clamp_min(1.0)
    dice, ce = dice / 2.0, ce / 2.0
    return dice + ce, dice, ce
