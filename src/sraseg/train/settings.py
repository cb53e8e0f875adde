"""The train stage's settings: `TrainSettings`, whose fields are the config schema's `train` keys, and in
its `blend` field the `blend` section's keys training reads for its on-the-fly maps (`BlendMapSettings`).
The schema declares each default, choice and bound once; `parse_train_settings` fills and checks both."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sraseg.errors import ConfigError
from sraseg.settings import choices, parse_settings

__all__ = ["BlendMapSettings", "TrainSettings", "parse_train_settings"]


@dataclass
class BlendMapSettings:
    """The `blend` section's keys that training reads too, for the maps it makes itself: sraseg's soft
    pre-training maps (all four) and BCP's hard boxes (ratio). One declaration serves the blend bank and
    training, so the two cannot disagree.

    Args:
        kernel (`str`, "gaussian"): edge of sraseg's pre-training maps: gaussian, box or hard.
        kernel_size (`int`, 5): odd side of the smoothing kernel.
        sigma (`float`, 1.0): std of the Gaussian kernel in pixels.
        ratio (`float`, 2/3): side of the hole relative to the image, in (0, 1).
    """

    kernel: str = "gaussian"
    kernel_size: int = 5
    sigma: float = 1.0
    ratio: float = 2 / 3

    def cross_checks(self) -> None:
        """The kernel needs a centre pixel (the blend stage's rule for the same key)."""
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"'blend.kernel_size' is {self.kernel_size!r}; must be odd")


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
        pseudo_min_confidence: sraseg only; a synthetic image's pixel whose teacher top probability is below
            this drops out of the self-training loss; 0 (the default, the reference): every pixel counts.
        pseudo_weight: weight of the pseudo-labelled part of sraseg's self-training loss (0.5, BCP's ratio;
            1: the reference). Pixels weigh 1 - (1 - w)*m, m the pixel's pseudo-labelled share.
        unlabeled_rampup: iterations of the sigmoid ramp-up exp(-5 (1 - t)^2) that multiplies the pseudo
            part's weight (sraseg's pseudo_weight, BCP's 0.5) from self-training's first iteration; 0: none.
        selftrain_reduction: mean (the default) or sum (the reference: L(x1,y1) + L(x2,y2)) of sraseg's
            two mixed images' losses in self-training. Pre-training has one mixed term, so the sum doubles
            the step at the switch; with soft maps the student then fell (docs/studies/switch-dip.md, issue 22). BCP sums.
        pair_augment: separate (one transform each for sraseg's synthetic image and its real partner, the
            reference's) or shared.
        sraseg_loss: region (BCP's region loss over the blend's shares, the pseudo-labelled share weighted by
            pseudo_weight; the default), soft (the reference's: per-image Dice + CE over the whole mixed
            image) or batch_soft (the same with batch Dice) in sraseg's pre-training (both sources weighing
            1) and self-training (`methods.shared.mixed_loss`).
        sraseg_pretrain_loss: soft (the default: the reference's soft loss whatever the self-training form;
            it pre-trains better teachers) or same (pre-training uses sraseg_loss's form).
        bcp_loss: region (BCP's own: the pseudo-labelled region weighs 0.5) or soft (the mirror ablation:
            sraseg's soft loss with its pseudo_weight on BCP's mixed images) in BCP's self-training.
        val_every: validate every this many iterations of a phase (and at each phase's end).
        dense_val_every, dense_val_iterations: also validate every dense_val_every iterations during the
            first dense_val_iterations of self-training (0: off); these validations may pick the kept
            checkpoint like any other.
        checkpoint_every: write last.ckpt every this many iterations (and at the end).
        switch_min_dice, switch_guard: the guard at the switch to self-training (`switch.guard_switch`): a foreground
            class whose teacher validation Dice is below switch_min_dice is named in a warning (warn) or stops
            the job before self-training (stop).
        sa, sa_weight: SRA-Seg's similarity-alignment loss and its weight in the self-train loss.
        sa_batch: un-mixed synthetic images (and as many real ones) given the extra encoder pass for SA.
        blend: the blend section's kernel, kernel_size, sigma and ratio (`BlendMapSettings`): the on-the-fly
            soft maps of sraseg's pre-train (BCP pre-trains and self-trains with hard maps of the same ratio).
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
    pseudo_min_confidence: float = 0.0
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
    blend: BlendMapSettings = field(default_factory=BlendMapSettings)
    augment: str = "rot_flip_or_rotate"
    device: str = "auto"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    num_classes: int = 4
    val_batch: int = 32

    def cross_checks(self) -> None:
        """What the schema cannot say (parse_settings runs it): the method (an experiment's key, not a
        `train` one) and rules across fields.

        Raises:
            ConfigError: naming the key and the problem.
        """
        methods = choices("experiments", "method")  # the schema's enum; a test holds it equal to METHODS
        if self.method not in methods:
            raise ConfigError(f"'train.method' is {self.method!r}; allowed: {', '.join(methods)}")
        if self.pretrain_iterations + self.selftrain_iterations == 0:
            raise ConfigError("'train.pretrain_iterations' + 'train.selftrain_iterations' must be > 0")
        if len(self.channels) != len(self.dropout):
            raise ConfigError(f"'train.channels' and 'train.dropout' need the same length; got {self.channels}, "
                              f"{self.dropout}")


def parse_train_settings(data: dict | None) -> TrainSettings:
    """`TrainSettings` from the stage's settings: the `train` section's keys (and the experiment's method),
    with the blend section's map keys under `blend` (as the workflow's train rule and `sraseg train
    --config` pass them; missing keys take the schema's defaults).

    Raises:
        ConfigError: as `parse_settings`, naming `train.<key>` or `blend.<key>`.
    """
    data = dict(data or {})
    maps = parse_settings(BlendMapSettings, data.pop("blend", None), "blend")
    return dataclasses.replace(parse_settings(TrainSettings, data, "train"), blend=maps)
