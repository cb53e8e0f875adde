"""The train stage: one flat loop for every method; methods differ only in their per-iteration step.

Phases (global step counts all of them):
- labeled_only: "supervised", pretrain_iterations + selftrain_iterations iterations on labeled slices.
- bcp_real / bcp_synthetic / sraseg: "pretrain" (pretrain_iterations) on pairs of labeled slices mixed
  with a blend map (hard BCP box for BCP, a soft map for SRA-Seg), then "selftrain"
  (selftrain_iterations): student and a fresh EMA teacher both start from the best pre-train weights,
  and the optimizer carries on with its pre-training state (momentum buffers), as BCP's self-training.
- Loss: bcp_real and bcp_synthetic use BCP's region-weighted Dice + CE (`bcp_region_loss`, pseudo-labelled
  region 0.5, true-label region 1); labeled_only uses the soft Dice + CE (`soft_dice_ce`), sraseg its
  `sraseg_loss` form in both phases (`_mixed_loss`: by default BCP's region loss over the blend's shares).
The published model is the best-validation student of the last phase (BCP and the reference keep the
best self-training checkpoint); the pre-train best only initialises self-training.

Self-training's switches (defaults: what the ablations found best; README, "Why SRA-Seg fell behind BCP"):
`sraseg_loss` and `sraseg_pretrain_loss` pick sraseg's loss form, `pseudo_weight` and `unlabeled_rampup`
weigh the pseudo-labelled part, `selftrain_reduction` averages (the default) or sums sraseg's two
mixed images' losses (BCP always sums, as its paper), `teacher_mode` runs the teacher in eval or train mode while it
labels, `pair_augment` augments SRA-Seg's synthetic/real pair with one transform or two. Instruments in
train_log.csv: the teacher's validation Dice beside the student's, the loss split into its true-label and
pseudo-label parts, the pseudo-labels' class fractions (the labeled slices' own are in train.json), and
denser validation early in self-training (`dense_val_every`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sraseg.blend.maps import make_blend_maps, mix
from sraseg.device import autocast, grad_scaler, pick_device, seed_everything
from sraseg.errors import ConfigError, SrasegError
from sraseg.preempt import stop_on_signals
from sraseg.resume import input_identity, job_key
from sraseg.settings import parse_settings, settings_dict
from sraseg.train.alignment import ProjectionHead, sa_loss
from sraseg.train.checkpoint import (
    cpu_state,
    fresh_state,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from sraseg.train.data import (
    augment,
    augment_pair,
    check_inputs,
    dataset_classes,
    load_inputs,
    sample_indices,
)
from sraseg.train.losses import (
    bcp_region_loss,
    bcp_region_parts,
    one_hot,
    sigmoid_rampup,
    soft_dice_ce,
    soft_dice_ce_split,
)
from sraseg.train.teacher import pseudo_labels, update_ema
from sraseg.train.unet import UNet, save_model

__all__ = ["METHODS", "TrainSettings", "TrainContext", "make_optimizer", "training_phases", "train_iteration", "run", "validate",
           "class_names", "log_columns", "dataset_classes", "switch_record", "SWITCH_PHASE"]

log = logging.getLogger(__name__)

# the methods training_phases dispatches on (tests/test_config.py checks it equals the schema's enum); a
# literal, so importing the train stage needs no schema (benchmarks/gpu_check.py imports only torch)
METHODS = ("labeled_only", "bcp_real", "bcp_synthetic", "sraseg")
CLASS_NAMES = ("rv", "myo", "lv")  # ACDC's foreground classes (num_classes 4), as the log names them


def class_names(num_classes: int) -> tuple[str, ...]:
    """Log names of the foreground classes 1..num_classes-1: rv, myo, lv for ACDC's 4 classes, vessel
    for FIVES's 2, class1.. otherwise."""
    if num_classes == 4:
        return CLASS_NAMES
    if num_classes == 2:
        return ("vessel",)
    return tuple(f"class{c}" for c in range(1, num_classes))


def term_columns(names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, ...]:
    """The step terms a row averages over the iterations since the previous row (NaN where a phase has none)."""
    return ("loss", "dice_loss", "ce_loss", "sa_loss", "loss_true", "loss_pseudo", *(f"pl_frac_{n}" for n in names))


def log_columns(names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, ...]:
    """train_log.csv's columns, one row per validation. Columns added later go at the end, so readers by
    position still work; with ACDC's classes these are `LOG_COLUMNS`."""
    return (
        "phase", "iteration", "step", "loss", "dice_loss", "ce_loss", "sa_loss",
        *(f"val_dice_{n}" for n in names), "val_dice_mean", "lr", "seconds",
        *(f"teacher_val_dice_{n}" for n in names), "teacher_val_dice_mean",
        "loss_true", "loss_pseudo", *(f"pl_frac_{n}" for n in names),
    )  # fmt: skip


LOG_COLUMNS = log_columns(CLASS_NAMES)
SWITCH_PHASE = "switch"  # train_log.csv's row of the teacher at the switch to self-training (`_guard_switch`)
TERM_COLUMNS = term_columns(CLASS_NAMES)
CHECKPOINT_FORMAT = 1


@dataclass
class TrainSettings:
    """Training settings (defaults = the SRA-Seg / BCP reference on ACDC).

    Args:
        method: labeled_only | bcp_real | bcp_synthetic | sraseg.
        pretrain_iterations, selftrain_iterations: phase lengths (labeled_only trains for their sum).
        labeled_batch: labeled slices per iteration (pre-train mixes its two halves; BCP self-train
            mixes each half with unlabeled images). sraseg's self-train takes its real images from the
            blend bank pairs, so it does not use labeled_batch there.
        unlabeled_batch: unlabeled images (BCP) or blend-bank entries (sraseg) per self-train iteration; with
            the blend stage's `maps: fresh`, iteration j takes its draws j*B .. j*B+B-1.
        unlabeled: where bcp_synthetic's and sraseg's unlabeled images come from: synthetic (the sample
            stage) or real (the real-pool stage's unlabeled training slices, the `sraseg_real` experiment).
            The workflow hands the matching folder as --synthetic-dir; training reads it the same way.
        lr, momentum, weight_decay: SGD, constant learning rate.
        ema_decay: teacher EMA decay, every iteration.
        teacher_mode: train (the default, the reference's and BCP's: the unlabeled batch's own BatchNorm
            statistics, dropout on; running statistics left untouched) or eval (running statistics,
            dropout off) while the teacher pseudo-labels.
        largest_component: keep only each class's largest blob per slice in the pseudo-labels (the
            reference; off for structures in many pieces, such as FIVES's vessels).
        pseudo_weight: weight of the pseudo-labelled part of sraseg's self-training loss (0.5, BCP's ratio;
            1: the reference). Pixels weigh 1 - (1 - w)*m, m the pixel's pseudo-labelled share.
        unlabeled_rampup: iterations of the sigmoid ramp-up exp(-5 (1 - t)^2) that multiplies the pseudo
            part's weight (sraseg's pseudo_weight, BCP's 0.5) from self-training's first iteration; 0: none.
        selftrain_reduction: mean (the default) or sum (the reference: L(x1,y1) + L(x2,y2)) of sraseg's
            two mixed images' losses in self-training. Pre-training has one mixed term, so the sum doubles
            the step at the switch; with soft maps the student then fell (README, issue 22). BCP sums.
        pair_augment: separate (one transform each for sraseg's synthetic image and its real partner, the
            reference's) or shared.
        sraseg_loss: region (BCP's region loss over the blend's shares, the pseudo-labelled share weighted by
            pseudo_weight; the default), soft (the reference's: per-image Dice + CE over the whole mixed
            image) or batch_soft (the same with batch Dice) in sraseg's pre-training (both sources weighing
            1) and self-training (`_mixed_loss`).
        sraseg_pretrain_loss: soft (the default: the reference's soft loss whatever the self-training form;
            it pre-trains better teachers) or same (pre-training uses sraseg_loss's form).
        bcp_loss: region (BCP's own: the pseudo-labelled region weighs 0.5) or soft (the mirror ablation:
            sraseg's soft loss with its pseudo_weight on BCP's mixed images) in BCP's self-training.
        val_every: validate every this many iterations of a phase (and at each phase's end).
        dense_val_every, dense_val_iterations: also validate every dense_val_every iterations during the
            first dense_val_iterations of self-training (0: off); these validations may pick the kept
            checkpoint like any other.
        checkpoint_every: write last.ckpt every this many iterations (and at the end).
        switch_min_dice, switch_guard: the guard at the switch to self-training (`_guard_switch`): a foreground
            class whose teacher validation Dice is below switch_min_dice is named in a warning (warn) or stops
            the job before self-training (stop).
        sa, sa_weight: SRA-Seg's similarity-alignment loss and its weight in the self-train loss.
        sa_batch: un-mixed synthetic images (and as many real ones) given the extra encoder pass for SA.
        blend_kernel, blend_kernel_size, blend_sigma, blend_ratio: the on-the-fly soft maps of sraseg's
            pre-train (BCP pre-trains with hard maps of the same ratio).
        augment: rot_flip_or_rotate | none.
        device: auto | cpu | cuda.
        channels, dropout, num_classes: the U-Net.
        val_batch: slices per forward pass in validation.
    """

    method: str = "labeled_only"
    pretrain_iterations: int = 10000
    selftrain_iterations: int = 50000
    labeled_batch: int = 12
    unlabeled_batch: int = 12
    unlabeled: str = "synthetic"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ema_decay: float = 0.99
    teacher_mode: str = "train"
    largest_component: bool = True
    pseudo_weight: float = 0.5
    unlabeled_rampup: int = 0
    selftrain_reduction: str = "mean"
    pair_augment: str = "separate"
    sraseg_loss: str = "region"
    sraseg_pretrain_loss: str = "soft"
    bcp_loss: str = "region"
    val_every: int = 200
    dense_val_every: int = 0
    dense_val_iterations: int = 200
    checkpoint_every: int = 200
    switch_min_dice: float = 0.2
    switch_guard: str = "warn"
    sa: bool = True
    sa_weight: float = 0.1
    sa_batch: int = 6
    blend_kernel: str = "gaussian"
    blend_kernel_size: int = 5
    blend_sigma: float = 1.0
    blend_ratio: float = 2 / 3
    augment: str = "rot_flip_or_rotate"
    device: str = "auto"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    num_classes: int = 4
    val_batch: int = 32

    def cross_checks(self) -> None:
        """What the schema cannot say (parse_settings runs it): the method (an experiment's key, not a
        `train` one), rules across fields, and odd kernel sides.

        Raises:
            ConfigError: naming the key and the problem.
        """
        if self.method not in METHODS:
            raise ConfigError(f"'train.method' is {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.pretrain_iterations + self.selftrain_iterations == 0:
            raise ConfigError("'train.pretrain_iterations' + 'train.selftrain_iterations' must be > 0")
        if len(self.channels) != len(self.dropout):
            raise ConfigError(f"'train.channels' and 'train.dropout' need the same length; got {self.channels}, "
                              f"{self.dropout}")
        if self.blend_kernel_size % 2 == 0:
            raise ConfigError(f"'train.blend_kernel_size' is {self.blend_kernel_size!r}; must be odd")


# ---------------------------------------------------------------------------------------------------
# Per-iteration steps. Each gets the run context and returns its loss terms (the "loss" key is used).
# ---------------------------------------------------------------------------------------------------


def _on_device(value, device: torch.device, moved: dict):
    """`value` with its tensors on `device`: a tensor, or a dataclass (Prepared, BlendBank, EmbedTargets)
    copied with its tensor fields moved. `moved` keeps tensors shared between fields shared."""
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key not in moved:
            moved[key] = value.to(device)
        return moved[key]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _on_device(getattr(value, f.name), device, moved) for f in dataclasses.fields(value)
                   if isinstance(getattr(value, f.name), torch.Tensor)}
        return dataclasses.replace(value, **changes) if changes else value
    return value


_INPUT_FIELDS = ("prepared", "unlabeled", "synthetic", "bank", "embed")


@dataclass
class TrainContext:
    """Everything one training iteration reads: settings, data, models and the step counter.

    `run` builds it; `benchmarks/train_step.py` builds one the same way to time the step functions.
    The inputs (prepared slices, unlabeled pool, synthetic images, blend bank, embedding targets) live on
    `device`: assigning one moves its tensors there once (labels stay uint8), so a batch is gathered on
    the device and nothing is copied per step but the CPU generator's indices and draws.
    """

    cfg: TrainSettings
    seed: int
    device: torch.device
    generator: torch.Generator
    prepared: object
    student: UNet
    teacher: UNet | None = None
    head: ProjectionHead | None = None
    unlabeled: torch.Tensor | None = None  # bcp self-train pool, float32 [U,S,S]
    synthetic: torch.Tensor | None = None  # float32 [M,S,S]
    bank: object = None
    bank_real_pos: np.ndarray | None = None  # row in the labeled arrays of each bank entry's real slice
    embed: object = None
    bank_real_embed_rows: np.ndarray | None = None  # row in real.npy of each bank entry's real slice
    bank_sa_rows: np.ndarray | None = None  # row in real.npy of each bank entry's SA target
    step: int = 0
    _moved: dict = field(default_factory=dict, init=False, repr=False)
    _map_generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __setattr__(self, name: str, value) -> None:
        if name in _INPUT_FIELDS and value is not None and "_moved" in self.__dict__:
            value = _on_device(value, self.device, self._moved)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        for name in _INPUT_FIELDS:  # _moved exists only now: place what __init__ assigned
            setattr(self, name, getattr(self, name))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move (non-blocking: a small host tensor is staged without waiting for the device) and use
        channels-last for image batches on CUDA."""
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def rows(self, data: torch.Tensor, index) -> torch.Tensor:
        """data[index] gathered on data's device; `index` a CPU tensor or numpy array of rows."""
        index = torch.as_tensor(index)
        return data[index.to(data.device, non_blocking=True)]

    def blend_maps(self, count: int, kind: str) -> torch.Tensor:
        """`count` fresh maps built on the device from a generator seeded by (seed, step): the same maps on
        a rerun and after a resume, with no generator state to save."""
        if self._map_generator is None:
            self._map_generator = torch.Generator(device=self.device)
        self._map_generator.manual_seed(int(np.random.SeedSequence([self.seed, self.step]).generate_state(1, np.uint64)[0]))
        size = self.prepared.image_size
        cfg = self.cfg
        maps = make_blend_maps(count, size, size, self._map_generator, kind, cfg.blend_kernel_size, cfg.blend_sigma,
                               cfg.blend_ratio)
        return self.to_device(maps)

    def labeled_batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented labeled slices: images float [n,1,S,S], labels long [n,S,S] on the device."""
        idx = sample_indices(len(self.prepared.labeled_images), count, self.generator)
        images = self.to_device(self.rows(self.prepared.labeled_images, idx)[:, None])
        labels = self.to_device(self.rows(self.prepared.labeled_labels, idx)[:, None].float())  # on the device
        images, labels = augment(images, labels, self.generator, self.cfg.augment)
        return images, labels[:, 0].round().long()


def _loss_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    loss, dice, ce = soft_dice_ce(logits, target)
    return {"loss": loss, "dice_loss": dice, "ce_loss": ce}


def _bcp_terms(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, first_weight: float,
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


# BCP's region weights: a pseudo-labelled region counts half as much as a true-label one.
TRUE_LABEL_WEIGHT, PSEUDO_LABEL_WEIGHT = 1.0, 0.5


def _sum_terms(*terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sum(t[k] for t in terms) for k in terms[0]}


def _mixed_loss(logits: torch.Tensor, target: torch.Tensor, share: torch.Tensor, first_weight: float,
                form: str) -> dict[str, torch.Tensor]:
    """SRA-Seg's loss (loss, dice_loss, ce_loss) of mixed images whose first source holds share m = `share`
    [B,1,H,W] of each pixel (self-training: the pseudo-labelled image, weighted w = `first_weight`;
    pre-training: a labeled image, w = 1). form (`train.sraseg_loss`), in both phases:
    - soft: the reference's soft loss; w = 1 is the reference's call as ever, any other w weighs each pixel
      1 - (1 - w)*m in the Dice sums and the CE mean;
    - batch_soft: the same with batch Dice (sums over the sub-batch's pixels, BCP's Dice);
    - region: BCP's region loss over the shares, (w*L(m) + L(1-m)) / 2 with L(m) the batch-Dice soft loss
      weighted by m: each source's pixels normalised by their own mass. With a hard map it is exactly
      `bcp_region_loss` with weights w and 1."""
    batch_dice = form != "soft"
    if form == "region":
        first = soft_dice_ce(logits, target, weight=share, batch_dice=True)
        second = soft_dice_ce(logits, target, weight=1.0 - share, batch_dice=True)
        return {key: (first_weight * f + s) / 2.0 for key, f, s in zip(("loss", "dice_loss", "ce_loss"), first, second)}
    if first_weight == 1.0:
        loss, dice, ce = soft_dice_ce(logits, target, batch_dice=batch_dice)
    else:
        loss, dice, ce = soft_dice_ce(logits, target, weight=1.0 - (1.0 - first_weight) * share, batch_dice=batch_dice)
    return {"loss": loss, "dice_loss": dice, "ce_loss": ce}


def _soft_terms(logits: torch.Tensor, target: torch.Tensor, pseudo_share: torch.Tensor,
                pseudo_weight: float, form: str = "soft") -> dict[str, torch.Tensor]:
    """SRA-Seg's self-training loss of mixed images whose pseudo-labelled image holds share m =
    `pseudo_share` of each pixel (`_mixed_loss`), and its parts loss_pseudo, loss_true
    (`soft_dice_ce_split`, no gradient; batch Dice for batch_soft and region, as the loss)."""
    terms = _mixed_loss(logits, target, pseudo_share, pseudo_weight, form)
    with torch.no_grad():
        terms["loss_pseudo"], terms["loss_true"] = soft_dice_ce_split(logits.detach(), target, pseudo_share,
                                                                      batch_dice=form != "soft")
    return terms


def _unlabeled_rampup(ctx: TrainContext) -> float:
    """The ramp-up factor of the pseudo-labelled part at this self-training step (1 without a ramp-up):
    a host float from the step counter, so the step reads nothing back."""
    return sigmoid_rampup(ctx.step - ctx.cfg.pretrain_iterations, ctx.cfg.unlabeled_rampup)


def _selftrain_terms(cfg: TrainSettings, per_image: list[dict[str, torch.Tensor]],
                     pseudo: torch.Tensor, average: bool = False) -> dict[str, torch.Tensor]:
    """The terms of a self-train step: the mixed images' terms summed (BCP, the reference) or averaged
    (`average`), and pl_frac_<class>, each class's share of the pseudo-labels' pixels
    (`pseudo`: one-hot float [B,C,H,W]), kept on the device like the losses."""
    terms = _sum_terms(*per_image)
    if average:
        terms = {k: v / len(per_image) for k, v in terms.items()}
    fractions = pseudo.detach().float().mean(dim=(0, 2, 3))
    terms.update({f"pl_frac_{name}": fractions[c] for c, name in enumerate(class_names(cfg.num_classes), start=1)})
    return terms


def _supervised_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """labeled_only: Dice + CE on augmented labeled slices."""
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    return _loss_terms(ctx.student(images), one_hot(labels, ctx.cfg.num_classes))


def _pretrain_step(ctx: TrainContext, kind: str) -> dict[str, torch.Tensor]:
    """Pre-train: x = a*l_first + (1-a)*l_second, y = a*Y(l_first) + (1-a)*Y(l_second) over the two halves
    of the labeled batch (BCP's pre-training; a soft map gives a continuous label).
    BCP methods: BCP's region loss, both regions true labels (weights 1 and 1); sraseg: the reference's soft
    loss (`sraseg_pretrain_loss: soft`, the default), or with `same` the form of its self-training loss
    (`sraseg_loss`), both sources weighing 1."""
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    half = len(images) // 2
    a = ctx.blend_maps(half, kind)
    y = one_hot(labels, ctx.cfg.num_classes)
    x_mix = mix(a, images[:half], images[half : 2 * half])
    y_mix = mix(a, y[:half], y[half : 2 * half])
    if ctx.cfg.method.startswith("bcp"):
        return _bcp_terms(ctx.student(x_mix), y_mix, a, TRUE_LABEL_WEIGHT, TRUE_LABEL_WEIGHT)
    form = ctx.cfg.sraseg_loss if ctx.cfg.sraseg_pretrain_loss == "same" else "soft"
    return _mixed_loss(ctx.student(x_mix), y_mix, a, TRUE_LABEL_WEIGHT, form)


def _bcp_selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """BCP self-train, bidirectional hard copy-paste with teacher pseudo-labels of the unlabeled images:
    x1 = a*u_a + (1-a)*l_a, x2 = a*l_b + (1-a)*u_b (one fresh hard map per mixed image).
    Loss: BCP's region loss on x1 and on x2, summed (BCP's; `selftrain_reduction` is sraseg's); the unlabeled (pseudo-labelled) region
    weighs 0.5 (times the ramp-up factor when `unlabeled_rampup` is set). `bcp_loss: soft` puts sraseg's
    soft loss (pseudo-labelled share weighted by pseudo_weight) in its place."""
    cfg = ctx.cfg
    images, labels = ctx.labeled_batch(cfg.labeled_batch)
    idx = sample_indices(len(ctx.unlabeled), cfg.unlabeled_batch, ctx.generator)
    unlabeled, _ = augment(ctx.to_device(ctx.rows(ctx.unlabeled, idx)[:, None]), None, ctx.generator, cfg.augment)
    half = min(len(images), len(unlabeled)) // 2
    y_l = one_hot(labels, cfg.num_classes)
    y_u = one_hot(pseudo_labels(ctx.teacher, unlabeled, cfg.num_classes, cfg.teacher_mode,
                                     largest_component=cfg.largest_component), cfg.num_classes)
    pseudo = PSEUDO_LABEL_WEIGHT * _unlabeled_rampup(ctx)
    a = ctx.blend_maps(2 * half, "hard")
    a1, a2 = a[:half], a[half:]
    x1 = mix(a1, unlabeled[:half], images[:half])
    y1 = mix(a1, y_u[:half], y_l[:half])
    x2 = mix(a2, images[half : 2 * half], unlabeled[half : 2 * half])
    y2 = mix(a2, y_l[half : 2 * half], y_u[half : 2 * half])
    logits = ctx.student(torch.cat([x1, x2]))
    if cfg.bcp_loss == "soft":
        weight = cfg.pseudo_weight * _unlabeled_rampup(ctx)
        return _selftrain_terms(cfg, [_soft_terms(logits[:half], y1, a1, weight),
                                      _soft_terms(logits[half:], y2, 1.0 - a2, weight)], y_u)
    return _selftrain_terms(cfg, [_bcp_terms(logits[:half], y1, a1, pseudo, TRUE_LABEL_WEIGHT, "first"),
                                  _bcp_terms(logits[half:], y2, a2, TRUE_LABEL_WEIGHT, pseudo, "second")], y_u)


def _sraseg_draws(ctx: TrainContext) -> tuple[np.ndarray, torch.Tensor]:
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


def _sraseg_selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """SRA-Seg self-train on blend-bank entries (synthetic s, its paired labeled real r, map a; `_sraseg_draws`:
    entries drawn with the training seed with their bank maps, or the blend stage's fresh draws):
    1. augment s and r with the same transform (the pair was chosen to match; `pair_augment: separate`
       draws one for each);
    2. Y(s) = teacher argmax + largest component on the un-mixed s, Y(r) = true label;
    3. a-half: x1 = a*s + (1-a)*r, y1 = a*Y(s) + (1-a)*Y(r); b-half: x2 = a*r + (1-a)*s, y2 likewise;
    4. loss = (L_soft(x1,y1) + L_soft(x2,y2)) / 2 + sa_weight * L_SA (`selftrain_reduction: sum`, the
       reference, drops the / 2), L_SA on the un-augmented images (their
       DINOv2 embeddings were computed without augmentation). L_soft weighs the pseudo-labelled share
       (a in x1, 1-a in x2) by pseudo_weight times the ramp-up factor (1 and 1 in the reference),
       `sraseg_loss` picks its form (`_soft_terms`)."""
    cfg, bank, prepared = ctx.cfg, ctx.bank, ctx.prepared
    idx, a = _sraseg_draws(ctx)
    syn_ids, real_pos = bank.synthetic_ids[idx], ctx.bank_real_pos[idx]  # host-side bookkeeping
    s_raw = ctx.to_device(ctx.rows(ctx.synthetic, syn_ids)[:, None])
    r_raw = ctx.to_device(ctx.rows(prepared.labeled_images, real_pos)[:, None])
    r_label = ctx.to_device(ctx.rows(prepared.labeled_labels, real_pos)[:, None].float())  # on the device
    s, r, r_label = augment_pair(s_raw, r_raw, r_label, ctx.generator, cfg.augment, cfg.pair_augment)
    y_s = one_hot(pseudo_labels(ctx.teacher, s, cfg.num_classes, cfg.teacher_mode,
                                     largest_component=cfg.largest_component), cfg.num_classes)
    y_r = one_hot(r_label[:, 0].round().long(), cfg.num_classes)
    half = len(idx) // 2
    x1 = mix(a[:half], s[:half], r[:half])
    y1 = mix(a[:half], y_s[:half], y_r[:half])
    x2 = mix(a[half:], r[half:], s[half:])
    y2 = mix(a[half:], y_r[half:], y_s[half:])
    logits = ctx.student(torch.cat([x1, x2]))
    weight = cfg.pseudo_weight * _unlabeled_rampup(ctx)
    terms = _selftrain_terms(cfg, [_soft_terms(logits[:half], y1, a[:half], weight, cfg.sraseg_loss),
                                   _soft_terms(logits[half:], y2, 1.0 - a[half:], weight, cfg.sraseg_loss)], y_s,
                             average=cfg.selftrain_reduction == "mean")
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


def training_phases(cfg: TrainSettings) -> list[tuple[str, int, Callable[[TrainContext], dict]]]:
    """(phase name, iterations, step function) in order; empty phases dropped."""
    pretrain_kind = "hard" if cfg.method.startswith("bcp") else cfg.blend_kernel
    table = {
        "labeled_only": [("supervised", cfg.pretrain_iterations + cfg.selftrain_iterations, _supervised_step)],
        "bcp_real": [("pretrain", cfg.pretrain_iterations, lambda c: _pretrain_step(c, pretrain_kind)),
                     ("selftrain", cfg.selftrain_iterations, _bcp_selftrain_step)],
        "sraseg": [("pretrain", cfg.pretrain_iterations, lambda c: _pretrain_step(c, pretrain_kind)),
                   ("selftrain", cfg.selftrain_iterations, _sraseg_selftrain_step)],
    }
    table["bcp_synthetic"] = table["bcp_real"]
    return [p for p in table[cfg.method] if p[1] > 0]


def train_iteration(ctx: TrainContext, step_fn: Callable[[TrainContext], dict], optimizer: torch.optim.Optimizer,
                    scaler) -> dict[str, torch.Tensor]:
    """One training iteration as run() does it (and benchmarks/gpu_check.py times it): the step's
    forward and loss under autocast, backward and optimizer step through the grad scaler, then the
    teacher's EMA update. Returns the step's loss terms, still on the device."""
    ctx.student.train()
    with autocast(ctx.device):
        terms = step_fn(ctx)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    if ctx.teacher is not None:
        update_ema(ctx.teacher, ctx.student, ctx.cfg.ema_decay)
    return terms


def _phase_at(phases: list, step: int) -> tuple[str, int, int, Callable[[TrainContext], dict]]:
    """(phase name, first global step of the phase, its length, its step function) for global `step`."""
    offset = 0
    for name, length, step_fn in phases:
        if step < offset + length:
            return name, offset, length, step_fn
        offset += length
    raise IndexError(f"step {step} is past the last phase")


# ---------------------------------------------------------------------------------------------------
# Validation: 3-D Dice per val volume at the prepared resolution.
# ---------------------------------------------------------------------------------------------------


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


def _validation_due(cfg: TrainSettings, phase: str, iteration: int, length: int) -> bool:
    """Validate at this iteration of the phase: every val_every and at the phase's end; in the first
    dense_val_iterations of self-training also every dense_val_every (the switch is where runs differ)."""
    if iteration % cfg.val_every == 0 or iteration == length:
        return True
    return (phase == "selftrain" and cfg.dense_val_every > 0 and iteration <= cfg.dense_val_iterations
            and iteration % cfg.dense_val_every == 0)


def _validate_models(prepared, device: torch.device, batch: int, student: UNet,
                     teacher: UNet | None) -> tuple[np.ndarray, np.ndarray | None]:
    """`validate` of the student and, when one is given, of the teacher (None without one)."""
    scores = [validate(m, prepared.val_images, prepared.val_labels, prepared.val_cases, device, batch)
              for m in (student, teacher) if m is not None]
    return scores[0], scores[1] if len(scores) > 1 else None


# ---------------------------------------------------------------------------------------------------
# The log table and TensorBoard.
# ---------------------------------------------------------------------------------------------------


def _log_row(running: dict[str, torch.Tensor], count: int, dice: np.ndarray, teacher_dice: np.ndarray | None,
             names: tuple[str, ...] = CLASS_NAMES, **fields) -> dict:
    """One train_log.csv row.

    Args:
        running: step-term sums since the previous row, on the device (read back here, in one sync).
        count: iterations they sum over.
        dice, teacher_dice: val Dice per foreground class of the student and of the teacher (None before it exists).
        names: the classes' log names (`class_names`); fields: phase, iteration, step, lr, seconds.
    Returns:
        {column: value} for `log_columns(names)`; NaN for a term the phase has not and for the teacher's Dice in
        pre-training.
    """
    terms = term_columns(names)
    present = [k for k in terms if k in running]
    sums = torch.stack([running[k] for k in present]).tolist() if present else []
    means = dict(zip(present, (s / max(count, 1) for s in sums)))
    teacher_dice = np.full(len(names), np.nan) if teacher_dice is None else teacher_dice
    row = dict(fields, **{k: means.get(k, float("nan")) for k in terms})
    for prefix, values in (("val_dice", dice), ("teacher_val_dice", teacher_dice)):
        row.update({f"{prefix}_{n}": float(d) for n, d in zip(names, values)})
        row[f"{prefix}_mean"] = float(values.mean())
    return row


def _write_val_scalars(writer, row: dict, step: int, names: tuple[str, ...] = CLASS_NAMES) -> None:
    """The row's validation Dice to TensorBoard: val/dice_* (student) and val/teacher_dice_* (self-training)."""
    for n in (*names, "mean"):
        writer.add_scalar(f"val/dice_{n}", row[f"val_dice_{n}"], step)
        if np.isfinite(row[f"teacher_val_dice_{n}"]):
            writer.add_scalar(f"val/teacher_dice_{n}", row[f"teacher_val_dice_{n}"], step)
    writer.flush()


def _labeled_fraction(labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Each foreground class's share of the labeled slices' pixels: what pl_frac_* (the pseudo-labels'
    shares on the unlabeled images) would be for images like the real ones."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    return {n: float(counts[c] / counts.sum()) for c, n in enumerate(class_names(num_classes), start=1)}


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------


def _comparable(settings: dict) -> dict:
    """Settings that must match to resume (the device may change), as JSON values."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k != "device"}


def make_optimizer(cfg: TrainSettings, student: UNet, head: ProjectionHead | None) -> torch.optim.SGD:
    params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _build_context(cfg: TrainSettings, seed: int, device: torch.device, inputs) -> TrainContext:
    """The run's context: its inputs (moved to `device`) and the student, with the projection head when
    SA trains (its inputs carry embeddings); the models are drawn from the global RNG, seeded before."""
    ctx = TrainContext(cfg=cfg, seed=seed, device=device, generator=torch.Generator().manual_seed(seed), student=None,
                       **{f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)})
    student = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout).to(device)
    head = ProjectionHead(student.feature_dim, ctx.embed.dim).to(device) if ctx.embed is not None else None
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    ctx.student, ctx.head = student, head
    return ctx


def _resume(ckpt_path: Path, key: str, ctx: TrainContext, optimizer: torch.optim.Optimizer, scaler) -> dict | None:
    """The loop state of this job's last.ckpt, with models, optimizer, scaler and RNGs restored; None when
    there is none or it was written for another job (`key`: settings, seed and input files)."""
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None and ckpt.get("key") != key:
        log.info("%s: written for other settings or inputs; starting %s fresh", ckpt_path, ctx.cfg.method)
        return None
    return restore_training(ckpt, ctx, optimizer, scaler) if ckpt is not None else None


class _LossSums:
    """The step terms summed on the device (no host sync per step): `running` since the last log-table
    row, `window` since the last read-back (log, validation and checkpoint steps only)."""

    def __init__(self, running: dict[str, float], device: torch.device, step: int):
        self.running = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in running.items()}
        self.window: dict[str, torch.Tensor] = {}
        self.window_start = step

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.running[k] = self.running[k] + v if k in self.running else v
            self.window[k] = self.window[k] + v if k in self.window else v

    def read_back(self, step: int) -> dict[str, float]:
        """Mean terms of the window as floats (one host sync for all terms); starts the next window."""
        count = step - self.window_start
        sums = torch.stack(list(self.window.values())).tolist() if count else []
        values = {k: s / count for k, s in zip(self.window, sums)}
        self.window = {}
        return values


def _enter_phase(ctx: TrainContext, state: dict, phase: str) -> None:
    """On entering self-training, restart from the best pre-train weights with a fresh EMA teacher and
    keep the optimizer (its momentum buffers carry on, as in BCP; last.ckpt holds them for a resume)."""
    if phase != state["phase"] and phase == "selftrain":
        if state["best_state"]:
            ctx.student.load_state_dict(state["best_state"])
            log.info("%s: self-training from the best %s weights", ctx.cfg.method, state["phase"])
        ctx.teacher = copy.deepcopy(ctx.student).eval()
        state.update(best_dice=-1.0, best_iteration=0, best_state={})
    state["phase"] = phase


def switch_record(cfg: TrainSettings, log_rows: list[dict]) -> dict | None:
    """The guard's finding, from train_log.csv's `switch` row: the teacher's validation Dice per class, the
    threshold, the action and the classes below it; None for a run without a switch (labeled_only)."""
    rows = [r for r in log_rows if r["phase"] == SWITCH_PHASE]
    if not rows:
        return None
    dice = {n: float(rows[-1][f"teacher_val_dice_{n}"]) for n in class_names(cfg.num_classes)}
    return dict(teacher_val_dice=dice, min_dice=cfg.switch_min_dice, action=cfg.switch_guard,
                below=[n for n, d in dice.items() if d < cfg.switch_min_dice])


def _guard_switch(ctx: TrainContext, state: dict, writer, log_path: Path, lr: float, seconds: float) -> None:
    """At the switch to self-training: validate the teacher (the best pre-trained model, which the student
    equals here), log its Dice per class (train_log.csv's `switch` row, TensorBoard, the job's log) and warn,
    or stop with `switch_guard: stop`, when a foreground class is below switch_min_dice. A class the teacher
    does not segment never enters a pseudo-label, so self-training would teach the student to leave it out.

    Raises:
        SrasegError: switch_guard is stop and a class is below switch_min_dice.
    """
    from sraseg.io import write_csv

    cfg = ctx.cfg
    names = class_names(cfg.num_classes)
    prepared = ctx.prepared
    dice = validate(ctx.teacher, prepared.val_images, prepared.val_labels, prepared.val_cases, ctx.device,
                    cfg.val_batch)
    row = _log_row({}, 0, dice, dice, names, phase=SWITCH_PHASE, iteration=0, step=state["step"], lr=lr,
                   seconds=seconds)
    state["log_rows"].append(row)
    write_csv(log_path, state["log_rows"], log_columns(names))
    for name in (*names, "mean"):
        writer.add_scalar(f"val/teacher_dice_{name}", row[f"teacher_val_dice_{name}"], state["step"])
    record = switch_record(cfg, state["log_rows"])
    log.info("%s seed %d: the teacher at the switch to self-training, val Dice %s", cfg.method, ctx.seed,
             ", ".join(f"{n} {d:.3f}" for n, d in record["teacher_val_dice"].items()))
    if not record["below"]:
        return
    weak = ", ".join(f"{n} {record['teacher_val_dice'][n]:.3f}" for n in record["below"])
    message = (f"{cfg.method} seed {ctx.seed}: the teacher at the switch to self-training has val Dice {weak}, "
               f"below train.switch_min_dice {cfg.switch_min_dice:g}: its pseudo-labels will hardly hold "
               f"{'that class' if len(record['below']) == 1 else 'those classes'} and self-training teaches the "
               f"student to leave {'it' if len(record['below']) == 1 else 'them'} out; pre-train longer "
               f"(train.pretrain_iterations, now {cfg.pretrain_iterations}) or add labeled data")
    if cfg.switch_guard == "stop":
        raise SrasegError(message + " (train.switch_guard: stop; warn self-trains anyway)")
    log.warning("%s (train.switch_guard: warn, so self-training goes on; the report marks this run)", message)


def _validate_and_log(ctx: TrainContext, state: dict, sums: _LossSums, writer, log_path: Path, phase: str,
                      iteration: int, lr: float, seconds: float) -> None:
    """Validate the student (and the teacher in self-training), keep the student if it is the best so
    far, and append the train_log.csv row (the file is rewritten: watchable while training)."""
    from sraseg.io import write_csv

    names = class_names(ctx.cfg.num_classes)
    # the student picks the kept model; the teacher's Dice beside it shows who leads after the switch
    dice, teacher_dice = _validate_models(ctx.prepared, ctx.device, ctx.cfg.val_batch, ctx.student,
                                          ctx.teacher if phase == "selftrain" else None)
    mean_dice = float(dice.mean())
    if mean_dice > state["best_dice"]:
        state.update(best_dice=mean_dice, best_iteration=iteration, best_state=cpu_state(ctx.student))
    row = _log_row(sums.running, state["running_count"], dice, teacher_dice, names, phase=phase, iteration=iteration,
                   step=state["step"], lr=lr, seconds=seconds)
    state["log_rows"].append(row)
    sums.running.clear()
    state["running_count"] = 0
    _write_val_scalars(writer, row, state["step"], names)
    write_csv(log_path, state["log_rows"], log_columns(names))
    log.info("%s %s iteration %d: loss %.4f, val Dice %.4f (teacher %.4f; best %.4f at %d)", ctx.cfg.method,
             phase, iteration, row["loss"], mean_dice, row["teacher_val_dice_mean"], state["best_dice"],
             state["best_iteration"])


def _train(ctx: TrainContext, optimizer: torch.optim.Optimizer, scaler, state: dict, out_dir: Path,
           job: dict, resumed: bool) -> None:
    """Train from `state["step"]` to the end of the last phase; `state` holds the result.

    Reads values back only at validation, progress-report and checkpoint steps; writes last.ckpt every
    checkpoint_every steps, at the end and when SIGTERM/SIGUSR1 arrives (then raises Preempted).
    """
    from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

    from sraseg.progress import Progress

    cfg = ctx.cfg
    phases = training_phases(cfg)
    total = sum(n for _, n, _ in phases)
    ckpt_path = out_dir / "last.ckpt"
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["step"] if resumed else None)
    sums = _LossSums(state["running"], ctx.device, state["step"])
    progress = Progress(total, f"train {cfg.method}", initial=state["step"], logger=log)
    started = time.perf_counter() - state["seconds"]
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(writer.close)
        cleanup.callback(progress.close)
        while state["step"] < total:
            phase, offset, length, step_fn = _phase_at(phases, state["step"])
            switching = phase == "selftrain" and state["phase"] != "selftrain"
            _enter_phase(ctx, state, phase)
            if switching:
                _guard_switch(ctx, state, writer, out_dir / "train_log.csv", optimizer.param_groups[0]["lr"],
                              time.perf_counter() - started)

            # one optimisation step of the student, then the teacher's EMA update
            ctx.step = state["step"]
            terms = train_iteration(ctx, step_fn, optimizer, scaler)

            # bookkeeping on the device; a non-finite loss is caught at the next read-back
            state["step"] += 1
            iteration = state["step"] - offset
            sums.add(terms)
            state["running_count"] += 1
            progress.update()

            # validation, progress line and checkpoint: the only steps that read values back
            validating = _validation_due(cfg, phase, iteration, length)
            checkpointing = state["step"] % cfg.checkpoint_every == 0 or state["step"] == total
            # SIGTERM/SIGUSR1 (a preemption): finish this step's validation, then checkpoint and stop
            stopping = stop.signum is not None
            reporting = progress.due()
            if not (validating or checkpointing or reporting or stopping):
                continue
            first = sums.window_start
            values = sums.read_back(state["step"])
            if not all(np.isfinite(v) for v in values.values()):
                bad = ", ".join(f"{k} {v}" for k, v in values.items() if not np.isfinite(v))
                raise SrasegError(f"{out_dir}: the loss became non-finite ({bad}) in {phase} iterations "
                                  f"{first - offset + 1}-{state['step'] - offset}; {ckpt_path.name} holds the "
                                  "last good state")
            for k, v in values.items():
                writer.add_scalar(f"train/{k}", v, state["step"])
            sums.window_start = state["step"]
            if validating:
                _validate_and_log(ctx, state, sums, writer, out_dir / "train_log.csv", phase, iteration,
                                  optimizer.param_groups[0]["lr"], time.perf_counter() - started)
            if reporting:
                progress.report(phase=phase, loss=f"{values.get('loss', float('nan')):.4f}",
                                best=f"{state['best_dice']:.3f}")  # fmt: skip
            if checkpointing or stopping:
                state["seconds"] = time.perf_counter() - started
                running = {k: float(v) for k, v in sums.running.items()}
                save_checkpoint(ckpt_path, training_checkpoint(ctx, optimizer, scaler, dict(state, running=running),
                                                               **job))
            if stopping:
                raise stop.stop(f"step {state['step']} of {total}", ckpt_path)


def _publish(ctx: TrainContext, state: dict, out_dir: Path, resolved: dict, inputs: dict) -> None:
    """model.safetensors (the best student of the last phase), train_log.csv and train.json, all at once;
    then last.ckpt goes: the job is done and a rerun (e.g. --forcerun) trains anew."""
    from sraseg.io import portable_path, staged_outputs, write_csv, write_json

    cfg = ctx.cfg
    final = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout)
    final.load_state_dict(state["best_state"] or cpu_state(ctx.student))
    meta = dict(image_size=ctx.prepared.image_size, method=cfg.method, seed=ctx.seed, phase=state["phase"],
                iteration=state["best_iteration"], val_dice_mean=state["best_dice"])
    with staged_outputs(out_dir) as staged:
        save_model(staged.path("model.safetensors"), final, meta)
        write_csv(staged.path("train_log.csv"), state["log_rows"], log_columns(class_names(cfg.num_classes)))
        write_json(staged.path("train.json"), dict(
            settings=resolved, seed=ctx.seed, device=str(ctx.device), threads=torch.get_num_threads(),
            iterations=state["step"],
            labeled_fraction=_labeled_fraction(ctx.prepared.labeled_labels, cfg.num_classes),
            inputs={k: v and portable_path(v) for k, v in inputs.items()},
            best=dict(phase=state["phase"], iteration=state["best_iteration"], val_dice_mean=state["best_dice"]),
            switch=switch_record(cfg, state["log_rows"]),
            seconds=state["seconds"],
        ))  # fmt: skip
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    log.info("%s: best val Dice %.4f (%s iteration %d); wrote %s", cfg.method, state["best_dice"], state["phase"],
             state["best_iteration"], out_dir)


def run(
    prepared_dir: Path | str,
    out_dir: Path | str,
    settings: dict | None = None,
    seed: int = 1337,
    synthetic_dir: Path | str | None = None,
    embed_dir: Path | str | None = None,
    blend_dir: Path | str | None = None,
) -> Path:
    """Train one method and publish model.safetensors (best val), model.json, train_log.csv, train.json.

    A rerun of the same job (same settings, seed and input files) resumes from out_dir/last.ckpt
    (exactly, on the CPU); a checkpoint of any other job is ignored and training starts fresh. The
    checkpoint is deleted once the outputs are published. train_log.csv grows at each validation.

    Args:
        prepared_dir: prepare stage output.
        out_dir: results/{ds}/{exp}/seed{seed}.
        settings: TrainSettings fields as a dict (unknown keys refused).
        seed: the run's seed.
        synthetic_dir: sample output (bcp_synthetic, sraseg).
        embed_dir: embed + index output (sraseg with sa).
        blend_dir: blend bank (sraseg).
    Returns:
        out_dir.
    Raises:
        ConfigError: bad settings or a missing input for the method.
        DatasetError: missing or inconsistent input files, no labeled slices.
        SrasegError: the loss became NaN or infinite (checked at each log, validation and checkpoint step).
        Preempted: SIGTERM or SIGUSR1 arrived; last.ckpt holds the step reached and a rerun resumes from it.
    """
    # inputs: settings checked, the method's input folders given, then read (after seeding, as always)
    cfg = parse_settings(TrainSettings, settings, "train")
    out_dir = Path(out_dir)
    inputs = dict(prepared_dir=prepared_dir, synthetic_dir=synthetic_dir, embed_dir=embed_dir, blend_dir=blend_dir)
    check_inputs(cfg, **inputs)
    device = pick_device(cfg.device)
    # on a CPU the numbers depend on the thread count (the workflow fixes it: config `cpu_threads`)
    log.info("%s seed %d on %s, %d torch threads", cfg.method, seed, device, torch.get_num_threads())
    seed_everything(seed)
    loaded = load_inputs(cfg, **inputs)
    labeled_fraction = _labeled_fraction(loaded.prepared.labeled_labels, cfg.num_classes)
    log.info("labeled slices: class share of the pixels %s (pl_frac_* in train_log.csv: the pseudo-labels')",
             ", ".join(f"{n} {f:.4f}" for n, f in labeled_fraction.items()))

    # models: the student (and SA's head), the optimizer and the fp16 gradient scaler
    ctx = _build_context(cfg, seed, device, loaded)
    optimizer = make_optimizer(cfg, ctx.student, ctx.head)
    scaler = grad_scaler(device)  # active only for fp16 autocast (CUDA cards without bf16)

    # resume: last.ckpt belongs to one job: these settings, this seed and these input files. Any other
    # job (changed settings or inputs, or a rerun after the outputs were published) starts fresh.
    resolved = settings_dict(cfg)
    key = job_key(_comparable(resolved), input_identity(*inputs.values()), seed=seed, format=CHECKPOINT_FORMAT)
    state = _resume(out_dir / "last.ckpt", key, ctx, optimizer, scaler)
    resumed = state is not None
    if resumed:
        log.info("resuming %s from %s at step %d of %d", cfg.method, out_dir / "last.ckpt", state["step"],
                 sum(n for _, n, _ in training_phases(cfg)))
    else:
        state = fresh_state()
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)  # another job's curves
    out_dir.mkdir(parents=True, exist_ok=True)

    # the loop, then publish the best student of the last phase
    job = dict(format=CHECKPOINT_FORMAT, key=key, method=cfg.method, seed=seed, settings=resolved)
    _train(ctx, optimizer, scaler, state, out_dir, job, resumed)
    _publish(ctx, state, out_dir, resolved, inputs)
    return out_dir
