"""BCP (bcp_real, bcp_synthetic): bidirectional copy-paste. Pre-training mixes two labeled halves with
hard boxes; self-training pastes between labeled images and teacher-labelled unlabeled ones (the
unlabeled train slices for bcp_real, the synthetic set for bcp_synthetic), with BCP's region-weighted
Dice + CE (`bcp_region_loss`): a pseudo-labelled region weighs 0.5, a true-label one 1."""

from __future__ import annotations

import torch

from sraseg.blend.maps import mix
from sraseg.train.context import TrainContext
from sraseg.train.data import augment, sample_indices
from sraseg.train.losses import bcp_region_loss, bcp_region_parts, one_hot
from sraseg.train.methods.shared import (
    TRUE_LABEL_WEIGHT,
    mixed_labeled_halves,
    selftrain_terms,
    soft_terms,
    unlabeled_rampup,
)
from sraseg.train.settings import TrainSettings
from sraseg.train.teacher import pseudo_labels

__all__ = ["PSEUDO_LABEL_WEIGHT", "phases", "pretrain_step", "selftrain_step", "bcp_terms"]

# BCP's region weights: a pseudo-labelled region counts half as much as a true-label one.
PSEUDO_LABEL_WEIGHT = 0.5


def phases(cfg: TrainSettings) -> list:
    """Pre-training on hard-box mixes of labeled slices, then self-training with the EMA teacher."""
    return [("pretrain", cfg.pretrain_iterations, pretrain_step), ("selftrain", cfg.selftrain_iterations, selftrain_step)]


def pretrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """Pre-train on two labeled halves mixed with hard boxes (`mixed_labeled_halves`); BCP's region loss,
    both regions true labels (weights 1 and 1)."""
    a, x_mix, y_mix = mixed_labeled_halves(ctx, "hard")
    return bcp_terms(ctx.student(x_mix), y_mix, a, TRUE_LABEL_WEIGHT, TRUE_LABEL_WEIGHT)


def selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """BCP self-train, bidirectional hard copy-paste with teacher pseudo-labels of the unlabeled images:
    x1 = a*u_a + (1-a)*l_a, x2 = a*l_b + (1-a)*u_b (one fresh hard map per mixed image).
    Loss: BCP's region loss on x1 and on x2, summed (BCP's; `selftrain_reduction` is sraseg's); the unlabeled
    (pseudo-labelled) region weighs 0.5 (times the ramp-up factor when `unlabeled_rampup` is set). `bcp_loss: soft` puts sraseg's
    soft loss (pseudo-labelled share weighted by pseudo_weight) in its place."""
    cfg = ctx.cfg
    images, labels = ctx.labeled_batch(cfg.labeled_batch)
    idx = sample_indices(len(ctx.unlabeled), cfg.unlabeled_batch, ctx.generator)
    unlabeled, _ = augment(ctx.to_device(ctx.rows(ctx.unlabeled, idx)[:, None]), None, ctx.generator, cfg.augment)
    half = min(len(images), len(unlabeled)) // 2
    y_l = one_hot(labels, cfg.num_classes)
    y_u = one_hot(pseudo_labels(ctx.teacher, unlabeled, cfg.num_classes, cfg.teacher_mode,
                                     largest_component=cfg.largest_component), cfg.num_classes)
    pseudo = PSEUDO_LABEL_WEIGHT * unlabeled_rampup(ctx)
    a = ctx.blend_maps(2 * half, "hard")
    a1, a2 = a[:half], a[half:]
    x1 = mix(a1, unlabeled[:half], images[:half])
    y1 = mix(a1, y_u[:half], y_l[:half])
    x2 = mix(a2, images[half : 2 * half], unlabeled[half : 2 * half])
    y2 = mix(a2, y_l[half : 2 * half], y_u[half : 2 * half])
    logits = ctx.student(torch.cat([x1, x2]))
    if cfg.bcp_loss == "soft":
        weight = cfg.pseudo_weight * unlabeled_rampup(ctx)
        return selftrain_terms(cfg, [soft_terms(logits[:half], y1, a1, weight),
                                     soft_terms(logits[half:], y2, 1.0 - a2, weight)], y_u)
    return selftrain_terms(cfg, [bcp_terms(logits[:half], y1, a1, pseudo, TRUE_LABEL_WEIGHT, "first"),
                                 bcp_terms(logits[half:], y2, a2, TRUE_LABEL_WEIGHT, pseudo, "second")], y_u)


def bcp_terms(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, first_weight: float,
              second_weight: float, pseudo_region: str | None = None) -> dict[str, torch.Tensor]:
    """BCP's region loss; with `pseudo_region` ("first": mask = 1, "second": mask = 0) also loss_pseudo and
    loss_true, the two regions' terms before their weights (`bcp_region_parts`, no gradient), so that
    loss = w_true*loss_true + w_pseudo*loss_pseudo."""
    loss, dice, ce = bcp_region_loss(logits, target, mask, first_weight, second_weight)
    terms = {"loss": loss, "dice_loss": dice, "ce_loss": ce}
    if pseudo_region is not None:
        with torch.no_grad():
            first, second = bcp_region_parts(logits.detach(), target, mask)
        terms["loss_pseudo"], terms["loss_true"] = (first, second) if pseudo_region == "first" else (second, first)
    return terms

