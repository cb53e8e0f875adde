"""The train stage: one flat loop for every method; methods differ only in their per-iteration step.

Phases (global step counts all of them):
- labeled_only: "supervised", pretrain_iterations + selftrain_iterations iterations on labeled slices.
- bcp_real / bcp_synthetic / sraseg: "pretrain" (pretrain_iterations) on pairs of labeled slices mixed
  with a blend map (hard BCP box for BCP, a soft map for SRA-Seg), then "selftrain"
  (selftrain_iterations): student and a fresh EMA teacher both start from the best pre-train weights,
  with a fresh optimizer (as BCP's self-training stage).
The published model is the best-validation student of the last phase (BCP and the reference keep the
best self-training checkpoint); the pre-train best only initialises self-training.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sraseg.blend.maps import KERNELS, make_blend_maps, mix
from sraseg.device import autocast, pick_device, seed_everything
from sraseg.errors import ConfigError, DatasetError, SrasegError
from sraseg.io import staged_outputs, write_json
from sraseg.settings import check_choice, check_positive, parse_settings, settings_dict
from sraseg.train.alignment import ProjectionHead, sa_loss
from sraseg.train.checkpoint import cpu_state, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from sraseg.train.data import (
    AUGMENTATIONS,
    augment,
    load_blend,
    load_embed,
    load_prepared,
    load_synthetic,
    sample_indices,
)
from sraseg.train.losses import one_hot, soft_dice_ce
from sraseg.train.teacher import pseudo_labels, update_ema
from sraseg.train.unet import UNet, save_model

__all__ = ["METHODS", "TrainSettings", "TrainContext", "check_settings", "make_optimizer", "training_phases", "run", "validate"]

log = logging.getLogger(__name__)

METHODS = ("labeled_only", "bcp_real", "bcp_synthetic", "sraseg")
CLASS_NAMES = ("rv", "myo", "lv")
LOG_COLUMNS = (
    "phase", "iteration", "step", "loss", "dice_loss", "ce_loss", "sa_loss",
    "val_dice_rv", "val_dice_myo", "val_dice_lv", "val_dice_mean", "lr", "seconds",
)  # fmt: skip
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
        unlabeled_batch: unlabeled images (BCP) or blend-bank entries (sraseg) per self-train iteration.
        lr, momentum, weight_decay: SGD, constant learning rate.
        ema_decay: teacher EMA decay, every iteration.
        val_every: validate every this many iterations of a phase (and at each phase's end).
        checkpoint_every: write last.ckpt every this many iterations (and at the end).
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
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ema_decay: float = 0.99
    val_every: int = 200
    checkpoint_every: int = 200
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


def check_settings(cfg: TrainSettings) -> None:
    check_choice("train", "method", cfg.method, METHODS)
    check_choice("train", "blend_kernel", cfg.blend_kernel, KERNELS)
    check_choice("train", "augment", cfg.augment, AUGMENTATIONS)
    check_choice("train", "device", cfg.device, ("auto", "cpu", "cuda"))
    for name in ("pretrain_iterations", "selftrain_iterations", "sa_weight", "weight_decay", "momentum"):
        check_positive("train", name, getattr(cfg, name), allow_zero=True)
    for name in ("labeled_batch", "unlabeled_batch", "lr", "val_every", "checkpoint_every", "sa_batch", "val_batch"):
        check_positive("train", name, getattr(cfg, name))
    if cfg.method != "labeled_only" and (cfg.labeled_batch < 2 or cfg.unlabeled_batch < 2):
        raise ConfigError(f"'train.labeled_batch' and 'train.unlabeled_batch' must be >= 2 for {cfg.method}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise ConfigError(f"'train.ema_decay' must lie in [0, 1]; got {cfg.ema_decay}")
    if cfg.pretrain_iterations + cfg.selftrain_iterations == 0:
        raise ConfigError("'train.pretrain_iterations' + 'train.selftrain_iterations' must be > 0")
    if len(cfg.channels) != len(cfg.dropout) or len(cfg.channels) < 2:
        raise ConfigError(f"'train.channels' and 'train.dropout' need the same length >= 2; got {cfg.channels}, "
                          f"{cfg.dropout}")
    if cfg.blend_kernel_size < 1 or cfg.blend_kernel_size % 2 == 0:
        raise ConfigError(f"'train.blend_kernel_size' must be a positive odd number; got {cfg.blend_kernel_size}")
    if not 0.0 < cfg.blend_ratio < 1.0:
        raise ConfigError(f"'train.blend_ratio' must lie in (0, 1); got {cfg.blend_ratio}")
    if cfg.num_classes != 4:
        raise ConfigError(f"'train.num_classes' must be 4 (background, RV, MYO, LV); got {cfg.num_classes}")


# ---------------------------------------------------------------------------------------------------
# Per-iteration steps. Each gets the run context and returns its loss terms (the "loss" key is used).
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainContext:
    """Everything one training iteration reads: settings, data, models and the step counter.

    `run` builds it; `benchmarks/train_step.py` builds one the same way to time the step functions.
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

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def blend_maps(self, count: int, kind: str) -> torch.Tensor:
        # A numpy generator derived from (seed, step): resumes exactly without any state to save.
        rng = np.random.default_rng([self.seed, self.step])
        size = self.prepared.image_size
        cfg = self.cfg
        maps = make_blend_maps(count, size, size, rng, kind, cfg.blend_kernel_size, cfg.blend_sigma, cfg.blend_ratio)
        return maps.to(self.device)

    def labeled_batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented labeled slices: images float [n,1,S,S], labels long [n,S,S] on the device."""
        idx = sample_indices(len(self.prepared.labeled_images), count, self.generator)
        images = self.to_device(self.prepared.labeled_images[idx][:, None])
        labels = self.to_device(self.prepared.labeled_labels[idx][:, None].float())
        images, labels = augment(images, labels, self.generator, self.cfg.augment)
        return images, labels[:, 0].round().long()


def _loss_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    loss, dice, ce = soft_dice_ce(logits, target)
    return {"loss": loss, "dice_loss": dice, "ce_loss": ce}


def _sum_terms(*terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sum(t[k] for t in terms) for k in terms[0]}


def _supervised_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """labeled_only: Dice + CE on augmented labeled slices."""
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    return _loss_terms(ctx.student(images), one_hot(labels, ctx.cfg.num_classes))


def _pretrain_step(ctx: TrainContext, kind: str) -> dict[str, torch.Tensor]:
    """Pre-train: x = a*l_first + (1-a)*l_second, y = a*Y(l_first) + (1-a)*Y(l_second) over the two halves
    of the labeled batch (BCP's pre-training; a soft map gives a continuous label)."""
    images, labels = ctx.labeled_batch(ctx.cfg.labeled_batch)
    half = len(images) // 2
    a = ctx.blend_maps(half, kind)
    y = one_hot(labels, ctx.cfg.num_classes)
    x_mix = mix(a, images[:half], images[half : 2 * half])
    y_mix = mix(a, y[:half], y[half : 2 * half])
    return _loss_terms(ctx.student(x_mix), y_mix)


def _bcp_selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """BCP self-train, bidirectional hard copy-paste with teacher pseudo-labels of the unlabeled images:
    x1 = a*u_a + (1-a)*l_a, x2 = a*l_b + (1-a)*u_b (one fresh hard map per mixed image)."""
    cfg = ctx.cfg
    images, labels = ctx.labeled_batch(cfg.labeled_batch)
    idx = sample_indices(len(ctx.unlabeled), cfg.unlabeled_batch, ctx.generator)
    unlabeled, _ = augment(ctx.to_device(ctx.unlabeled[idx][:, None]), None, ctx.generator, cfg.augment)
    half = min(len(images), len(unlabeled)) // 2
    y_l = one_hot(labels, cfg.num_classes)
    y_u = one_hot(pseudo_labels(ctx.teacher, unlabeled, cfg.num_classes), cfg.num_classes)
    a = ctx.blend_maps(2 * half, "hard")
    a1, a2 = a[:half], a[half:]
    x1 = mix(a1, unlabeled[:half], images[:half])
    y1 = mix(a1, y_u[:half], y_l[:half])
    x2 = mix(a2, images[half : 2 * half], unlabeled[half : 2 * half])
    y2 = mix(a2, y_l[half : 2 * half], y_u[half : 2 * half])
    logits = ctx.student(torch.cat([x1, x2]))
    return _sum_terms(_loss_terms(logits[:half], y1), _loss_terms(logits[half:], y2))


def _sraseg_selftrain_step(ctx: TrainContext) -> dict[str, torch.Tensor]:
    """SRA-Seg self-train on blend-bank entries (synthetic s, its paired labeled real r, map a):
    1. augment s and r with the same transform (the pair was chosen to match);
    2. Y(s) = teacher argmax + largest component on the un-mixed s, Y(r) = true label;
    3. a-half: x1 = a*s + (1-a)*r, y1 = a*Y(s) + (1-a)*Y(r); b-half: x2 = a*r + (1-a)*s, y2 likewise;
    4. loss = L_soft(x1,y1) + L_soft(x2,y2) + sa_weight * L_SA, L_SA on the un-augmented images (their
       DINOv2 embeddings were computed without augmentation)."""
    cfg, bank, prepared = ctx.cfg, ctx.bank, ctx.prepared
    idx = sample_indices(len(bank.maps), cfg.unlabeled_batch, ctx.generator).numpy()
    syn_ids = torch.from_numpy(bank.synthetic_ids[idx])
    real_pos = torch.from_numpy(ctx.bank_real_pos[idx])
    s_raw = ctx.to_device(ctx.synthetic[syn_ids][:, None])
    r_raw = ctx.to_device(prepared.labeled_images[real_pos][:, None])
    r_label = ctx.to_device(prepared.labeled_labels[real_pos][:, None].float())
    a = ctx.to_device(bank.maps[torch.from_numpy(idx)][:, None].float())
    pair, r_label = augment(torch.cat([s_raw, r_raw], 1), r_label, ctx.generator, cfg.augment)
    s, r = pair[:, :1], pair[:, 1:]
    y_s = one_hot(pseudo_labels(ctx.teacher, s, cfg.num_classes), cfg.num_classes)
    y_r = one_hot(r_label[:, 0].round().long(), cfg.num_classes)
    half = len(idx) // 2
    x1 = mix(a[:half], s[:half], r[:half])
    y1 = mix(a[:half], y_s[:half], y_r[:half])
    x2 = mix(a[half:], r[half:], s[half:])
    y2 = mix(a[half:], y_r[half:], y_s[half:])
    logits = ctx.student(torch.cat([x1, x2]))
    terms = _sum_terms(_loss_terms(logits[:half], y1), _loss_terms(logits[half:], y2))
    if cfg.sa:
        k = min(cfg.sa_batch, len(idx))
        features = ctx.student.encode(torch.cat([s_raw[:k], r_raw[:k]]))
        embed = ctx.embed
        target_syn = embed.real[torch.from_numpy(ctx.bank_sa_rows[idx[:k]])].to(ctx.device)
        target_real = embed.real[torch.from_numpy(ctx.bank_real_embed_rows[idx[:k]])].to(ctx.device)
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
    """Mean over val volumes of the 3-D Dice of RV, MYO and LV.

    Slices of a case are stacked into its volume; a class absent from both prediction and reference
    scores 1, absent from only one scores 0.

    Args:
        images: float32 [V,S,S]; labels: uint8 [V,S,S]; cases: str [V].
    Returns:
        float64 [3] (RV, MYO, LV) in [0,1].
    """
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch][:, None].to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            preds.append(model(x).argmax(1).to("cpu", torch.uint8))
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    truth = labels.numpy()
    scores = []
    for case in np.unique(cases):
        rows = cases == case
        p, t = pred[rows], truth[rows]
        per_class = []
        for c in range(1, 4):
            pc, tc = p == c, t == c
            total = pc.sum() + tc.sum()
            per_class.append(1.0 if total == 0 else 2.0 * np.logical_and(pc, tc).sum() / total)
        scores.append(per_class)
    return np.mean(scores, axis=0)


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------


def _comparable(settings: dict) -> dict:
    """Settings that must match to resume (the device may change), as JSON values."""
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k != "device"}


def make_optimizer(cfg: TrainSettings, student: UNet, head: ProjectionHead | None) -> torch.optim.SGD:
    params = list(student.parameters()) + (list(head.parameters()) if head is not None else [])
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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

    A rerun with the same out_dir resumes from out_dir/last.ckpt (exactly, on the CPU).

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
        ConfigError: bad settings, a missing input for the method, or a checkpoint from other settings.
        DatasetError: missing or inconsistent input files, no labeled slices.
        SrasegError: the loss became NaN or infinite.
    """
    # --- settings and inputs -------------------------------------------------------------------
    cfg = parse_settings(TrainSettings, settings, "train")
    check_settings(cfg)
    out_dir = Path(out_dir)
    needs = {"synthetic_dir": cfg.method in ("bcp_synthetic", "sraseg"), "blend_dir": cfg.method == "sraseg",
             "embed_dir": cfg.method == "sraseg" and cfg.sa}
    given = {"synthetic_dir": synthetic_dir, "embed_dir": embed_dir, "blend_dir": blend_dir}
    missing = [name for name, needed in needs.items() if needed and given[name] is None]
    if missing:
        flags = {"synthetic_dir": "--synthetic", "embed_dir": "--embed-dir", "blend_dir": "--blend-dir"}
        raise ConfigError(f"method {cfg.method} needs input(s) {', '.join(missing)} (command line "
                          f"{', '.join(flags[m] for m in missing)})")
    device = pick_device(cfg.device)
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    prepared = load_prepared(prepared_dir, cfg.num_classes)
    ctx = TrainContext(cfg=cfg, seed=seed, device=device, generator=generator, prepared=prepared, student=None)
    if cfg.method == "bcp_real":
        if len(prepared.unlabeled_images) == 0:
            raise DatasetError(f"{Path(prepared_dir) / 'slices.parquet'}: no unlabeled train slices for bcp_real")
        ctx.unlabeled = prepared.unlabeled_images
    if needs["synthetic_dir"]:
        ctx.synthetic = load_synthetic(synthetic_dir, prepared.image_size)
        ctx.unlabeled = ctx.synthetic
    if cfg.method == "sraseg":
        ctx.bank = load_blend(blend_dir, prepared.image_size, len(ctx.synthetic))
        ctx.bank_real_pos = prepared.labeled_position(ctx.bank.real_ids, Path(blend_dir) / "pairs.parquet")
        if cfg.sa:
            ctx.embed = load_embed(embed_dir, len(ctx.synthetic))
            # SA target of each entry: its pairs.parquet sa_real_id (balanced: the partner), else rank-0 neighbour
            ctx.bank_sa_rows = ctx.embed.neighbour_row[ctx.bank.synthetic_ids]
            pairs_path = Path(blend_dir) / "pairs.parquet"
            sa_ids = pd.read_parquet(pairs_path).sort_values("blend_id").get("sa_real_id")
            if sa_ids is not None and (sa_ids.to_numpy() >= 0).any():
                own = sa_ids.to_numpy() >= 0
                ctx.bank_sa_rows[own] = ctx.embed.rows_of(sa_ids.to_numpy()[own], pairs_path)
            no_neighbour = np.unique(ctx.bank.synthetic_ids[ctx.bank_sa_rows < 0])
            if len(no_neighbour):
                raise DatasetError(f"{Path(embed_dir) / 'neighbours.parquet'}: no rank-0 neighbour for synthetic "
                                  f"id(s) {no_neighbour[:5].tolist()} used by the blend bank")
            ctx.bank_real_embed_rows = ctx.embed.rows_of(ctx.bank.real_ids, Path(embed_dir) / "real.parquet")

    # --- models and optimizer ------------------------------------------------------------------
    student = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout).to(device)
    head = ProjectionHead(student.feature_dim, ctx.embed.dim).to(device) if ctx.embed is not None else None
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    ctx.student, ctx.head = student, head
    optimizer = make_optimizer(cfg, student, head)
    phases = training_phases(cfg)
    total = sum(n for _, n, _ in phases)
    resolved = settings_dict(cfg)

    # --- state, or resume from last.ckpt ----------------------------------------------------------
    state = dict(step=0, phase="", best_dice=-1.0, best_iteration=0, best_state={}, log_rows=[],
                 running={}, running_count=0, seconds=0.0)
    ckpt_path = out_dir / "last.ckpt"
    resumed = ckpt_path.exists()
    if resumed:
        ckpt = load_checkpoint(ckpt_path)
        theirs = {**_comparable(ckpt.get("settings", {})), "method": ckpt.get("method"), "seed": ckpt.get("seed")}
        ours = {**_comparable(resolved), "seed": seed}
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff or ckpt.get("format") != CHECKPOINT_FORMAT:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:4]) or "format"
            raise ConfigError(f"{ckpt_path}: written by a run with other settings ({shown}); "
                              "use another out_dir or delete the checkpoint to start over")
        state.update({k: ckpt[k] for k in state})
        student.load_state_dict(ckpt["student"])
        if ckpt["teacher"]:
            ctx.teacher = copy.deepcopy(student).eval()
            ctx.teacher.load_state_dict(ckpt["teacher"])
        if head is not None:
            head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_state(ckpt["rng"], generator)
        log.info("resuming %s from %s at step %d of %d", cfg.method, ckpt_path, state["step"], total)
    out_dir.mkdir(parents=True, exist_ok=True)

    from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["step"] if resumed else None)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, dict(
            format=CHECKPOINT_FORMAT, method=cfg.method, seed=seed, settings=resolved, **state,
            student=cpu_state(student), teacher=cpu_state(ctx.teacher) if ctx.teacher is not None else {},
            head=cpu_state(head) if head is not None else {}, optimizer=optimizer.state_dict(),
            rng=rng_state(generator),
        ))  # fmt: skip

    # --- main loop --------------------------------------------------------------------------------
    bar = tqdm(total=total, initial=state["step"], desc=f"train {cfg.method}", unit="it", dynamic_ncols=True)
    started = time.perf_counter() - state["seconds"]
    try:
        while state["step"] < total:
            # which phase; on entering self-training, restart from the best pre-train weights
            phase, offset, length, step_fn = _phase_at(phases, state["step"])
            if phase != state["phase"] and phase == "selftrain":
                if state["best_state"]:
                    student.load_state_dict(state["best_state"])
                    log.info("%s: self-training from the best %s weights", cfg.method, state["phase"])
                ctx.teacher = copy.deepcopy(student).eval()
                optimizer = make_optimizer(cfg, student, head)
                state.update(best_dice=-1.0, best_iteration=0, best_state={})
            state["phase"] = phase

            # compute losses
            ctx.step = state["step"]
            student.train()
            with autocast(device):
                terms = step_fn(ctx)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise SrasegError(f"{out_dir}: the loss became {loss.item()} at {phase} iteration "
                                  f"{state['step'] - offset + 1}; {ckpt_path.name} holds the last good state")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            # teacher EMA update
            if ctx.teacher is not None:
                update_ema(ctx.teacher, student, cfg.ema_decay)

            # bookkeeping
            state["step"] += 1
            iteration = state["step"] - offset
            values = {k: float(v.detach()) for k, v in terms.items()}
            for k, v in values.items():
                state["running"][k] = state["running"].get(k, 0.0) + v
                writer.add_scalar(f"train/{k}", v, state["step"])
            state["running_count"] += 1
            bar.update(1)
            bar.set_postfix(phase=phase, loss=f"{values['loss']:.3f}", best=f"{state['best_dice']:.3f}")

            # validation and checkpointing
            if iteration % cfg.val_every == 0 or iteration == length:
                dice = validate(student, prepared.val_images, prepared.val_labels, prepared.val_cases, device,
                                cfg.val_batch)
                mean_dice = float(dice.mean())
                if mean_dice > state["best_dice"]:
                    state.update(best_dice=mean_dice, best_iteration=iteration, best_state=cpu_state(student))
                count = max(state["running_count"], 1)
                row = dict(phase=phase, iteration=iteration, step=state["step"],
                           **{k: state["running"].get(k, float("nan")) / count
                              for k in ("loss", "dice_loss", "ce_loss", "sa_loss")},
                           **{f"val_dice_{n}": float(d) for n, d in zip(CLASS_NAMES, dice)},
                           val_dice_mean=mean_dice, lr=optimizer.param_groups[0]["lr"],
                           seconds=time.perf_counter() - started)  # fmt: skip
                state["log_rows"].append(row)
                state.update(running={}, running_count=0)
                for n, d in zip((*CLASS_NAMES, "mean"), (*dice, mean_dice)):
                    writer.add_scalar(f"val/dice_{n}", float(d), state["step"])
                log.info("%s %s iteration %d: loss %.4f, val Dice %.4f (best %.4f at %d)", cfg.method, phase,
                         iteration, row["loss"], mean_dice, state["best_dice"], state["best_iteration"])
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total:
                state["seconds"] = time.perf_counter() - started
                checkpoint()
    finally:
        bar.close()
        writer.close()

    # --- publish ----------------------------------------------------------------------------------
    final = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout)
    final.load_state_dict(state["best_state"] or cpu_state(student))
    meta = dict(image_size=prepared.image_size, method=cfg.method, seed=seed, phase=state["phase"],
                iteration=state["best_iteration"], val_dice_mean=state["best_dice"])
    with staged_outputs(out_dir) as staged:
        save_model(staged.path("model.safetensors"), final, meta)
        with open(staged.path("train_log.csv"), "w", newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
            table.writeheader()
            table.writerows(state["log_rows"])
        write_json(staged.path("train.json"), dict(
            settings=resolved, seed=seed, device=str(device), iterations=total,
            inputs=dict(prepared_dir=str(prepared_dir), synthetic_dir=synthetic_dir and str(synthetic_dir),
                        embed_dir=embed_dir and str(embed_dir), blend_dir=blend_dir and str(blend_dir)),
            best=dict(phase=state["phase"], iteration=state["best_iteration"], val_dice_mean=state["best_dice"]),
            seconds=state["seconds"],
        ))  # fmt: skip
    log.info("%s: best val Dice %.4f (%s iteration %d); wrote %s", cfg.method, state["best_dice"], state["phase"],
             state["best_iteration"], out_dir)
    return out_dir
