"""SRA-Seg (sraseg): pre-training mixes two labeled halves with soft-edged maps; self-training blends each
synthetic image with its paired labeled real slice from the blend bank (teacher pseudo-labels on the
synthetic side), with the soft loss of the mixed images (`shared.mixed_loss`, form `sraseg_loss`) and the
similarity-alignment loss to DINOv2 embeddings (`sa`)."""

from __future__ import annotations

import numpy as np
import torch

from sraseg.blend.maps import mix
from sraseg.train.alignment import sa_loss
from sraseg.train.context import TrainContext
from sraseg.train.data import augment_pair, sample_indices
from sraseg.train.losses import one_hot
from sraseg.train.methods.shared import (
    TRUE_LABEL_WEIGHT,
    mixed_labeled_halves,
    mixed_loss,
    selftrain_terms,
    soft_terms,
    unlabeled_rampup,
)
from sraseg.train.settings import TrainSettings
from sraseg.train.teacher import confident_pseudo_labels, pseudo_labels

__all__ = ["phases", "pretrain_step", "selftrain_step", "draws"]


def phases(cfg: TrainSettings) -> list:
    """Pre-training on soft-edged mixes of labeled slices, then self-training on the blend bank."""
    return [("pretrain", cfg.pretrain_iterations, pretrain_step), ("selftrain", cfg.selftrain_iterations, selftrain_step)]


def pretrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """Pre-train on two labeled halves mixed with `blend.kernel` maps (`mixed_labeled_halves`): the reference's
    soft loss (`sraseg_pretrain_loss: soft`, the default), or with `same` the form of the self-training
    loss (`sraseg_loss`), both sources weighing 1."""
    a, x_mix, y_mix = mixed_labeled_halves(ctx, ctx.cfg.blend.kernel)
    form = ctx.cfg.sraseg_loss if ctx.cfg.sraseg_pretrain_loss == "same" else "soft"
    return mixed_loss(ctx.student(x_mix), y_mix, a, TRUE_LABEL_WEIGHT, form)


def draws(ctx: TrainContext) -> tuple[np.ndarray, torch.Tensor]:
    """This self-training iteration's blend-bank entries (host int64 [B]) and their maps (float [B,1,S,S] on
    the device).

    bank: B entries drawn with the training seed, each with its fixed map from maps.npy.
    fresh: the blend stage's draws j*B .. j*B+B-1 (j = the self-training iteration, from the step counter, so
    a rerun and a resume read the same rows) with their maps rendered on the device from the recorded hole
    corners: a map of its own for every draw, and no generator state."""
    cfg, bank = ctx.cfg, ctx.bank
    if not bank.fresh:
        idx = sample_indices(len(bank.maps), cfg.unlabeled_batch, ctx.generator).numpy()
        return idx, ctx.to_device(ctx.rows(bank.maps, idx)[:, None].float())
    start = (ctx.step - cfg.pretrain_iterations) * cfg.unlabeled_batch
    return bank.draw_entries[start : start + cfg.unlabeled_batch], ctx.to_device(bank.render(start, cfg.unlabeled_batch))


def selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """SRA-Seg self-train on blend-bank entries (synthetic s, its paired labeled real r, map a; `draws`:
    entries drawn with the training seed with their bank maps, or the blend stage's fresh draws):
    1. augment s and r with the same transform (the pair was chosen to match; `pair_augment: separate`
       draws one for each);
    2. Y(s) = teacher argmax + largest component on the un-mixed s, Y(r) = true label;
    3. a-half: x1 = a*s + (1-a)*r, y1 = a*Y(s) + (1-a)*Y(r); b-half: x2 = a*r + (1-a)*s, y2 likewise;
    4. loss = (L_soft(x1,y1) + L_soft(x2,y2)) / 2 + sa_weight * L_SA (`selftrain_reduction: sum`, the
       reference, drops the / 2), L_SA on the un-augmented images (their
       DINOv2 embeddings were computed without augmentation). L_soft weighs the pseudo-labelled share
       (a in x1, 1-a in x2) by pseudo_weight times the ramp-up factor (1 and 1 in the reference),
       `sraseg_loss` picks its form (`soft_terms`)."""
    cfg, bank, prepared = ctx.cfg, ctx.bank, ctx.prepared
    idx, a = draws(ctx)
    syn_ids, real_pos = bank.synthetic_ids[idx], ctx.bank_real_pos[idx]  # host-side bookkeeping
    s_raw = ctx.to_device(ctx.rows(ctx.synthetic, syn_ids)[:, None])
    r_raw = ctx.to_device(ctx.rows(prepared.labeled_images, real_pos)[:, None])
    r_label = ctx.to_device(ctx.rows(prepared.labeled_labels, real_pos)[:, None].float())  # on the device
    s, r, r_label = augment_pair(s_raw, r_raw, r_label, ctx.generator, cfg.augment, cfg.pair_augment)
    keep = None  # with pseudo_min_confidence: 1 where the teacher is sure of the synthetic image's label
    if cfg.pseudo_min_confidence > 0:
        labels_s, keep = confident_pseudo_labels(ctx.teacher, s, cfg.num_classes, cfg.pseudo_min_confidence,
                                                 cfg.teacher_mode, cfg.largest_component)
    else:
        labels_s = pseudo_labels(ctx.teacher, s, cfg.num_classes, cfg.teacher_mode,
                                 largest_component=cfg.largest_component)
    y_s = one_hot(labels_s, cfg.num_classes)
    y_r = one_hot(r_label[:, 0].round().long(), cfg.num_classes)
    half = len(idx) // 2
    x1 = mix(a[:half], s[:half], r[:half])
    y1 = mix(a[:half], y_s[:half], y_r[:half])
    x2 = mix(a[half:], r[half:], s[half:])
    y2 = mix(a[half:], y_r[half:], y_s[half:])
    logits = ctx.student(torch.cat([x1, x2]))
    weight = cfg.pseudo_weight * unlabeled_rampup(ctx)
    keep1, keep2 = (None, None) if keep is None else (keep[:half], keep[half:])
    terms = selftrain_terms(cfg, [soft_terms(logits[:half], y1, a[:half], weight, cfg.sraseg_loss, keep1),
                                  soft_terms(logits[half:], y2, 1.0 - a[half:], weight, cfg.sraseg_loss, keep2)],
                            y_s, average=cfg.selftrain_reduction == "mean")
    if keep is not None:
        terms["pl_kept"] = keep.mean()
    if cfg.sa:
        k = min(cfg.sa_batch, len(idx))
        features = ctx.student.encode(torch.cat([s_raw[:k], r_raw[:k]]))
        embed = ctx.embed
        # SA target: the bank's own partner (balanced pairing), else the rank-0 neighbour
        sa_rows = ctx.bank_sa_rows if ctx.bank_sa_rows is not None else embed.neighbour_row[bank.synthetic_ids]
        target_syn = ctx.rows(embed.real, sa_rows[idx[:k]])
        target_real = ctx.rows(embed.real, ctx.bank_real_embed_rows[idx[:k]])
        terms["sa_loss"] = sa_loss(ctx.head, features[:k], target_syn, features[k:], target_real)
        terms["loss"] = terms["loss"] + cfg.sa_weight * terms["sa_loss"]
    return terms

