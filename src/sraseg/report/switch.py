"""The report's mark on runs whose teacher did not know a class at the switch to self-training: the train
stage's guard (`sraseg.train.switch.guard_switch`) records its finding in each run's train.json."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sraseg.errors import DatasetError
from sraseg.io import read_json

__all__ = ["MARK", "switch_warnings", "mark_experiments", "marked_name", "warning_lines"]

MARK = " ⚠"  # after the experiment's name in the tables


def switch_warnings(results_dir: Path, experiments: dict, seeds: list[int]) -> dict[str, str]:
    """experiment -> its seeds whose teacher scored a class below train.switch_min_dice at the switch, as
    one text ("seed 1337: rv 0.006"); experiments without such a seed are left out."""
    found = {}
    for name in experiments:
        weak = []
        for seed in seeds:
            path = Path(results_dir) / name / f"seed{seed}" / "train.json"
            record = read_json(path).get("switch") if path.is_file() else None
            try:
                if record and record.get("below"):
                    classes = ", ".join(f"{c} {record['teacher_val_dice'][c]:.3f}" for c in record["below"])
                    weak.append(f"seed {seed}: {classes} (threshold {record['min_dice']:g})")
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{path}: not a train record's switch entry ({err!r}); rerun train") from None
        if weak:
            found[name] = "; ".join(weak)
    return found


def mark_experiments(frame: pd.DataFrame, warnings: dict[str, str]) -> pd.DataFrame:
    """The results table with a `switch_warning` column (empty where the guard passed)."""
    return frame.assign(switch_warning=frame["experiment"].map(lambda name: warnings.get(name, "")))


def marked_name(row: pd.Series) -> str:
    """A results row's experiment name, marked when the guard found a class its teacher did not know."""
    return row["experiment"] + (MARK if row.get("switch_warning") else "")


def warning_lines(warnings: dict[str, str]) -> list[str]:
    """The report's warning bullets, one per marked experiment."""
    return [
        f"- **{name}{MARK}**: the teacher at the switch to self-training scored a class below the guard's "
        f"threshold ({text}). A class the teacher does not segment never enters a pseudo-label, so this row "
        "says little about the method: pre-train longer (`train.pretrain_iterations`) or add labeled data."
        for name, text in warnings.items()
    ]
