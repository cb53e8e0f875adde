"""The guard at the switch to self-training: the teacher (the best pre-trained model) is validated, its
Dice per class logged, and a class below `switch_min_dice` warned about or stopped on; `switch_record` is
the finding train.json keeps (the report marks guarded runs)."""

from __future__ import annotations

import logging
from pathlib import Path

from sraseg.errors import SrasegError
from sraseg.train.context import TrainContext
from sraseg.train.log_table import class_names, log_columns, log_row
from sraseg.train.settings import TrainSettings
from sraseg.train.validation import validate

__all__ = ["SWITCH_PHASE", "switch_record", "guard_switch"]

log = logging.getLogger(__name__)

SWITCH_PHASE = "switch"  # train_log.csv's row of the teacher at the switch to self-training (`guard_switch`)


def switch_record(cfg: TrainSettings, log_rows: list[dict]) -> dict | None:
    """The guard's finding, from train_log.csv's `switch` row: the teacher's validation Dice per class, the
    threshold, the action and the classes below it; None for a run without a switch (labeled_only)."""
    rows = [r for r in log_rows if r["phase"] == SWITCH_PHASE]
    if not rows:
        return None
    dice = {n: float(rows[-1][f"teacher_val_dice_{n}"]) for n in class_names(cfg.num_classes)}
    return dict(teacher_val_dice=dice, min_dice=cfg.switch_min_dice, action=cfg.switch_guard,
                below=[n for n, d in dice.items() if d < cfg.switch_min_dice])


def guard_switch(ctx: TrainContext, state: dict, writer, log_path: Path, lr: float, seconds: float) -> None:
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
    row = log_row({}, 0, dice, dice, names, phase=SWITCH_PHASE, iteration=0, step=state["step"], lr=lr,
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

