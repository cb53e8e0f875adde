"""Publishing a finished training: model.safetensors, train_log.csv and train.json written at once, then
last.ckpt removed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sraseg.train.checkpoint import cpu_state
from sraseg.train.context import TrainContext
from sraseg.train.log_table import class_names, labeled_fraction, log_columns
from sraseg.train.switch import switch_record
from sraseg.train.unet import UNet, save_model

__all__ = ["publish"]

log = logging.getLogger(__name__)


def publish(ctx: TrainContext, state: dict, out_dir: Path, resolved: dict, inputs: dict) -> None:
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
            labeled_fraction=labeled_fraction(ctx.prepared.labeled_labels, cfg.num_classes),
            inputs={k: v and portable_path(v) for k, v in inputs.items()},
            best=dict(phase=state["phase"], iteration=state["best_iteration"], val_dice_mean=state["best_dice"]),
            switch=switch_record(cfg, state["log_rows"]),
            seconds=state["seconds"],
        ))  # fmt: skip
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    log.info("%s: best val Dice %.4f (%s iteration %d); wrote %s", cfg.method, state["best_dice"], state["phase"],
             state["best_iteration"], out_dir)

