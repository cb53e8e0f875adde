"""The train stage: one flat loop for every method. The loop knows phases and steps, not methods: the
method's entry in `sraseg.train.methods.METHODS` gives its phases, each a name, a length and a step
function (one iteration's forward and loss), and the loop runs them in order (the global step counts all).

- "selftrain" is the one phase the loop treats apart: on entering it the student restarts from the best
  weights of the phase before, a fresh EMA teacher is copied from it, the switch guard validates that
  teacher (`switch.guard_switch`), and the optimizer carries on with its state (momentum buffers), as BCP's
  self-training. The teacher's EMA update follows every step once it exists.
- The published model is the best-validation student of the last phase (BCP and the reference keep the
  best self-training checkpoint); the pre-train best only initialises self-training.
- Validation (`validation`), train_log.csv and TensorBoard (`log_table`), the switch guard (`switch`) and
  publishing (`publish`) are modules of their own; last.ckpt is `checkpoint`'s.

The methods' steps and their settings: `train/methods/` and `TrainSettings` (`train/settings.py`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sraseg.device import autocast, grad_scaler, pick_device, seed_everything
from sraseg.errors import SrasegError
from sraseg.preempt import stop_on_signals
from sraseg.resume import input_identity, job_key
from sraseg.settings import settings_dict
from sraseg.train.alignment import ProjectionHead
from sraseg.train.checkpoint import (
    cpu_state,
    fresh_state,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from sraseg.train.context import TrainContext
from sraseg.train.data import check_inputs, load_inputs
from sraseg.train.log_table import LossSums, class_names, labeled_fraction, log_columns, log_row, write_val_scalars
from sraseg.train.methods import METHODS, Phase, StepFn
from sraseg.train.publish import publish
from sraseg.train.settings import TrainSettings, parse_train_settings
from sraseg.train.switch import guard_switch
from sraseg.train.teacher import update_ema
from sraseg.train.unet import UNet
from sraseg.train.validation import validate_models, validation_due

__all__ = ["CHECKPOINT_FORMAT", "make_optimizer", "training_phases", "train_iteration", "run"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def training_phases(cfg: TrainSettings) -> list[Phase]:
    """(phase name, iterations, step function) of `cfg.method` in order (`METHODS`); empty phases dropped."""
    return [p for p in METHODS[cfg.method](cfg) if p[1] > 0]


def train_iteration(ctx: TrainContext, step_fn: StepFn, optimizer: torch.optim.Optimizer,
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


def _phase_at(phases: list, step: int) -> tuple[str, int, int, StepFn]:
    """(phase name, first global step of the phase, its length, its step function) for global `step`."""
    offset = 0
    for name, length, step_fn in phases:
        if step < offset + length:
            return name, offset, length, step_fn
        offset += length
    raise IndexError(f"step {step} is past the last phase")


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


def _validate_and_log(ctx: TrainContext, state: dict, sums: LossSums, writer, log_path: Path, phase: str,
                      iteration: int, lr: float, seconds: float) -> None:
    """Validate the student (and the teacher in self-training), keep the student if it is the best so
    far, and append the train_log.csv row (the file is rewritten: watchable while training)."""
    from sraseg.io import write_csv

    names = class_names(ctx.cfg.num_classes)
    # the student picks the kept model; the teacher's Dice beside it shows who leads after the switch
    dice, teacher_dice = validate_models(ctx.prepared, ctx.device, ctx.cfg.val_batch, ctx.student,
                                         ctx.teacher if phase == "selftrain" else None)
    mean_dice = float(dice.mean())
    if mean_dice > state["best_dice"]:
        state.update(best_dice=mean_dice, best_iteration=iteration, best_state=cpu_state(ctx.student))
    row = log_row(sums.running, state["running_count"], dice, teacher_dice, names, phase=phase, iteration=iteration,
                  step=state["step"], lr=lr, seconds=seconds)
    state["log_rows"].append(row)
    sums.running.clear()
    state["running_count"] = 0
    write_val_scalars(writer, row, state["step"], names)
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
    sums = LossSums(state["running"], ctx.device, state["step"])
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
                guard_switch(ctx, state, writer, out_dir / "train_log.csv", optimizer.param_groups[0]["lr"],
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
            validating = validation_due(cfg, phase, iteration, length)
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
        settings: TrainSettings fields as a dict (unknown keys refused), the blend section's map keys under
            `blend` (`parse_train_settings`).
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
    cfg = parse_train_settings(settings)
    out_dir = Path(out_dir)
    inputs = dict(prepared_dir=prepared_dir, synthetic_dir=synthetic_dir, embed_dir=embed_dir, blend_dir=blend_dir)
    check_inputs(cfg, **inputs)
    device = pick_device(cfg.device)
    # on a CPU the numbers depend on the thread count (the workflow fixes it: config `cpu_threads`)
    log.info("%s seed %d on %s, %d torch threads", cfg.method, seed, device, torch.get_num_threads())
    seed_everything(seed)
    loaded = load_inputs(cfg, **inputs)
    fractions = labeled_fraction(loaded.prepared.labeled_labels, cfg.num_classes)
    log.info("labeled slices: class share of the pixels %s (pl_frac_* in train_log.csv: the pseudo-labels')",
             ", ".join(f"{n} {f:.4f}" for n, f in fractions.items()))

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
    publish(ctx, state, out_dir, resolved, inputs)
    return out_dir

