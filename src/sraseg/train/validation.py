"""Validation: 3-D Dice per val volume at the prepared resolution, and when the loop validates."""

from __future__ import annotations

import numpy as np
import torch

from sraseg.train.settings import TrainSettings
from sraseg.train.unet import UNet

__all__ = ["validate", "validation_due", "validate_models"]


@torch.no_grad()
def validate(model: UNet, images: torch.Tensor, labels: torch.Tensor, cases: np.ndarray, device: torch.device,
             batch: int = 32) -> np.ndarray:
    """Mean over val volumes of the 3-D Dice of each foreground class (ACDC: RV, MYO, LV; FIVES: vessel,
    an image being its own one-slice volume), in fp32 (it picks the model to keep).

    Slices of a case are stacked into its volume; a class absent from both prediction and reference
    scores 1, absent from only one scores 0. Per-slice overlap counts are computed on `device` and read
    back once.

    Args:
        images: float32 [V,S,S]; labels: uint8 [V,S,S] (on any device); cases: str [V].
    Returns:
        float64 [C-1] in [0,1], C the model's output channels (ACDC: RV, MYO, LV).
    """
    was_training = model.training
    model.eval()
    counts = []  # per slice and class: |pred & truth|, |pred|, |truth|
    for start in range(0, len(images), batch):
        x = images[start : start + batch][:, None].to(device, torch.float32, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        classes = torch.arange(1, logits.shape[1], device=device).view(1, -1, 1, 1)
        pred = logits.argmax(1, keepdim=True) == classes  # [b,C-1,S,S]
        truth = labels[start : start + batch][:, None].to(device, non_blocking=True) == classes
        counts.append(torch.stack([(pred & truth).sum((2, 3)), pred.sum((2, 3)), truth.sum((2, 3))], -1))
    model.train(was_training)
    counts = torch.cat(counts).cpu().numpy().astype(np.int64)  # [V,C-1,3]: the one read-back
    scores = []
    for case in np.unique(cases):
        both, pred_sum, truth_sum = counts[cases == case].sum(0).T
        total = pred_sum + truth_sum
        scores.append(np.where(total == 0, 1.0, 2.0 * both / np.maximum(total, 1)))
    return np.mean(scores, axis=0)


def validation_due(cfg: TrainSettings, phase: str, iteration: int, length: int) -> bool:
    """Validate at this iteration of the phase: every val_every and at the phase's end; in the first
    dense_val_iterations of self-training also every dense_val_every (the switch is where runs differ)."""
    if iteration % cfg.val_every == 0 or iteration == length:
        return True
    return (phase == "selftrain" and cfg.dense_val_every > 0 and iteration <= cfg.dense_val_iterations
            and iteration % cfg.dense_val_every == 0)


def validate_models(prepared, device: torch.device, batch: int, student: UNet,
                    teacher: UNet | None) -> tuple[np.ndarray, np.ndarray | None]:
    """`validate` of the student and, when one is given, of the teacher (None without one)."""
    scores = [validate(m, prepared.val_images, prepared.val_labels, prepared.val_cases, device, batch)
              for m in (student, teacher) if m is not None]
    return scores[0], scores[1] if len(scores) > 1 else None

