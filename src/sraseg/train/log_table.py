"""The training log: train_log.csv's columns and rows (one per validation), the TensorBoard scalars, and
the step terms summed on the device between rows.

Besides the loss and the student's validation Dice, a row holds the instruments of self-training: the
teacher's validation Dice beside the student's, the loss split into its true-label and pseudo-label parts
(loss_true, loss_pseudo), and the pseudo-labels' class fractions (pl_frac_*; the labeled slices' own are
in train.json); the switch guard adds the `switch` row of the teacher it validated."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["class_names", "term_columns", "log_columns", "LOG_COLUMNS", "log_row", "write_val_scalars",
           "labeled_fraction", "LossSums"]

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
    return ("loss", "dice_loss", "ce_loss", "sa_loss", "loss_true", "loss_pseudo", *(f"pl_frac_{n}" for n in names),
            "pl_kept")


def log_columns(names: tuple[str, ...] = CLASS_NAMES) -> tuple[str, ...]:
    """train_log.csv's columns, one row per validation. Columns added later go at the end, so readers by
    position still work; with ACDC's classes these are `LOG_COLUMNS`."""
    return (
        "phase", "iteration", "step", "loss", "dice_loss", "ce_loss", "sa_loss",
        *(f"val_dice_{n}" for n in names), "val_dice_mean", "lr", "seconds",
        *(f"teacher_val_dice_{n}" for n in names), "teacher_val_dice_mean",
        "loss_true", "loss_pseudo", *(f"pl_frac_{n}" for n in names), "pl_kept",
    )  # fmt: skip


LOG_COLUMNS = log_columns(CLASS_NAMES)
TERM_COLUMNS = term_columns(CLASS_NAMES)


def log_row(running: dict[str, torch.Tensor], count: int, dice: np.ndarray, teacher_dice: np.ndarray | None,
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


def write_val_scalars(writer, row: dict, step: int, names: tuple[str, ...] = CLASS_NAMES) -> None:
    """The row's validation Dice to TensorBoard: val/dice_* (student) and val/teacher_dice_* (self-training)."""
    for n in (*names, "mean"):
        writer.add_scalar(f"val/dice_{n}", row[f"val_dice_{n}"], step)
        if np.isfinite(row[f"teacher_val_dice_{n}"]):
            writer.add_scalar(f"val/teacher_dice_{n}", row[f"teacher_val_dice_{n}"], step)
    writer.flush()


def labeled_fraction(labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Each foreground class's share of the labeled slices' pixels: what pl_frac_* (the pseudo-labels'
    shares on the unlabeled images) would be for images like the real ones."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    return {n: float(counts[c] / counts.sum()) for c, n in enumerate(class_names(num_classes), start=1)}


class LossSums:
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

