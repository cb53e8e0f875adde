"""labeled_only: supervised training on the labeled slices alone (one phase, "supervised", of
pretrain_iterations + selftrain_iterations iterations), with the soft Dice + CE loss."""

from __future__ import annotations

import torch

from sraseg.train.context import TrainContext
from sraseg.train.losses import one_hot, soft_dice_ce
from sraseg.train.settings import TrainSettings

__all__ = ["phases", "supervised_step"]


def phases(cfg: TrainSettings) -> list:
    """One phase: the labeled slices for pretrain_iterations + selftrain_iterations iterations."""
    return [("supervised", cfg.pretrain_iterations + cfg.selftrain_iterations, supervised_step)]


def supervised_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """labeled_only: Dice + CE on augmented labeled slices."""
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    return _loss_terms(ctx.student(images), one_hot(labels, ctx.cfg.num_classes))


def _loss_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    loss, dice, ce = soft_dice_ce(logits, target)
    return {"loss": loss, "dice_loss": dice, "ce_loss": ce}

