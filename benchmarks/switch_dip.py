"""What happens at the switch to self-training, per run: the teacher's validation Dice (the best
pre-training checkpoint that student and teacher start from), the student's first self-training
validation, its lowest in the first 200 self-training iterations, the dip (teacher minus that
lowest), the first self-training iteration back at the teacher's level, the best validation and
the test Dice (peer mode) when the run was evaluated.

    python benchmarks/switch_dip.py results/synthetic_teaches/old results/synthetic_teaches/new
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

WINDOW = 200  # self-training iterations in which a dip is looked for
CLASSES = ("rv", "myo", "lv")


def switch_dip(run_dir: Path) -> dict:
    """The switch numbers of one training folder (train_log.csv, eval/summary.json)."""
    log = pd.read_csv(run_dir / "train_log.csv").dropna(subset=["val_dice_mean"])
    pre = log[log["phase"] == "pretrain"]
    self_ = log[log["phase"] == "selftrain"]
    teacher = float(pre["val_dice_mean"].max())
    early = self_[self_["iteration"] <= WINDOW]
    back = self_[self_["val_dice_mean"] >= teacher]
    pl = {c: float(early[f"pl_frac_{c}"].mean()) if f"pl_frac_{c}" in early else float("nan") for c in CLASSES}
    meta = run_dir / "train.json"
    labeled = json.loads(meta.read_text()).get("labeled_fraction", {}) if meta.is_file() else {}
    summary = run_dir / "eval" / "summary.json"
    test = json.loads(summary.read_text())["peer"]["mean"]["dice"] * 100 if summary.is_file() else float("nan")
    return {
        "run": str(run_dir),
        "teacher_val": teacher,
        "first_selftrain_val": float(early["val_dice_mean"].iloc[0]),
        # the teacher's own validation at that first self-training validation (the 0.05 bar)
        "teacher_at_first": float(early["teacher_val_dice_mean"].iloc[0]) if "teacher_val_dice_mean" in early else float("nan"),
        "lowest_in_200": float(early["val_dice_mean"].min()),
        "dip": teacher - float(early["val_dice_mean"].min()),
        "back_at_teacher_iteration": int(back["iteration"].iloc[0]) if len(back) else None,
        "best_selftrain_val": float(self_["val_dice_mean"].max()),
        "test_dice": test,
        "pseudo_label_share": pl,
        "labeled_share": {c: labeled.get(c, float("nan")) for c in CLASSES},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="training output folders")
    args = p.parse_args(argv)
    rows = [switch_dip(run) for run in args.runs]
    print("| run | teacher val | first self-train val (teacher's then) | lowest in 200 | dip | back at teacher (it.) | "
          "best val | test Dice | pseudo-label RV / MYO / LV % (labeled) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = " / ".join(f"{100 * r['pseudo_label_share'][c]:.1f} ({100 * r['labeled_share'][c]:.1f})" for c in CLASSES)
        print(f"| {r['run']} | {r['teacher_val']:.3f} | {r['first_selftrain_val']:.3f} ({r['teacher_at_first']:.3f}) | "
              f"{r['lowest_in_200']:.3f} | "
              f"{r['dip']:.3f} | {r['back_at_teacher_iteration']} | {r['best_selftrain_val']:.3f} | {r['test_dice']:.2f} | "
              f"{share} |")  # fmt: skip


if __name__ == "__main__":
    main()
