"""Segmentation loss on label distributions: soft Dice + soft cross-entropy (SRA-Seg "soft loss").

With one-hot labels this is the usual Dice + CE, so every method (labeled_only, BCP with hard masks,
SRA-Seg with soft blends) uses the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PROB_FLOOR", "DICE_EPS", "one_hot", "soft_dice_ce"]

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
