"""Where a model's false positives are, per class: on slices whose ground truth has no such class at all
(a structure drawn where there is none) or beside a true one (a boundary error) (issues 31 and 33).

For each run folder's test predictions (`predictions/*.nii.gz`, the predict stage's), against the raw
ground truth (`<raw>/<patient>/<case>_gt.nii.gz`, the ACDC layout), per class, as shares of the class's
ground-truth volume:

- `pred/gt`: predicted over true volume;
- `fp_on_absent`: false-positive voxels on slices whose ground truth lacks the class;
- `fp_beside`: false-positive voxels on slices that have it;
- `fn`: missed voxels;
- `absent_slices_hit`: share of the slices without the class on which the model draws it.

Run from the repository root with the venv on PATH, e.g. after `make demo`:

    python benchmarks/false_positive_slices.py results/phantom/labeled_only/seed1337 \
        results/phantom/sraseg/seed1337 --raw-dir resources/phantom/raw
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

CLASSES = {1: "RV", 2: "MYO", 3: "LV"}


def false_positive_table(run: Path, raw_dir: Path) -> pd.DataFrame:
    counts = {name: dict.fromkeys(("pred", "gt", "fp_on_absent", "fp_beside", "fn", "absent", "absent_hit"), 0)
              for name in CLASSES.values()}  # fmt: skip
    predictions = sorted((run / "predictions").glob("*.nii.gz"))
    if not predictions:
        raise SystemExit(f"{run / 'predictions'}: no predictions (run the predict stage first)")
    for path in predictions:
        case = path.name.removesuffix(".nii.gz")
        gt_path = raw_dir / case.split("_")[0] / f"{case}_gt.nii.gz"
        if not gt_path.is_file():
            raise SystemExit(f"{gt_path}: no ground truth for the prediction {path}")
        gt = np.asarray(nib.load(gt_path).dataobj).astype(np.int64)
        pred = np.asarray(nib.load(path).dataobj).astype(np.int64)
        for c, name in CLASSES.items():
            p, t = pred == c, gt == c
            absent = ~t.any(axis=(0, 1))  # slices (last axis) without the class
            fp = p & ~t
            n = counts[name]
            n["pred"] += p.sum()
            n["gt"] += t.sum()
            n["fp_on_absent"] += fp[:, :, absent].sum()
            n["fp_beside"] += fp[:, :, ~absent].sum()
            n["fn"] += (t & ~p).sum()
            n["absent"] += absent.sum()
            n["absent_hit"] += p[:, :, absent].any(axis=(0, 1)).sum()
    rows = {
        name: {
            **{key: n[part] / n["gt"] if n["gt"] else np.nan  # a class absent from every test volume: no ratio
               for key, part in (("pred/gt", "pred"), ("fp_on_absent", "fp_on_absent"), ("fp_beside", "fp_beside"),
                                 ("fn", "fn"))},
            "absent_slices_hit": n["absent_hit"] / max(n["absent"], 1),
        }
        for name, n in counts.items()
    }  # fmt: skip
    return pd.DataFrame(rows).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train-stage run folders with predictions/")
    parser.add_argument("--raw-dir", type=Path, required=True, help="the raw ACDC-layout folder (ground truth)")
    args = parser.parse_args()
    for run in args.runs:
        print(f"\n{run}")
        print(false_positive_table(run, args.raw_dir).round(3).to_string())


if __name__ == "__main__":
    main()
