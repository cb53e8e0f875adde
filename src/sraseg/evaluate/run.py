"""The evaluate stage: score every predicted volume against its ground truth, per class, in peer and
mm modes (see `sraseg.evaluate.metrics`), and summarise over cases."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from sraseg.data.acdc import label_problem, read_nifti
from sraseg.errors import DatasetError
from sraseg.evaluate.metrics import CLASS_NAMES, METRICS, MODES, score_case
from sraseg.io import staged_outputs, write_json

__all__ = ["run", "find_ground_truth", "load_labels", "summarise"]

log = logging.getLogger(__name__)

_SUFFIX = ".nii.gz"


def find_ground_truth(case: str, gt_dir: Path) -> Path | None:
    """The ground-truth file of `case`: gt_dir/<case>_gt.nii.gz, else gt_dir/<case>.nii.gz, else (an
    ACDC release folder) gt_dir/<patient>/<case>_gt.nii.gz with patient = the part before the first "_"."""
    patient = case.split("_", 1)[0]
    for candidate in (
        gt_dir / f"{case}_gt{_SUFFIX}",
        gt_dir / f"{case}{_SUFFIX}",
        gt_dir / patient / f"{case}_gt{_SUFFIX}",
    ):
        if candidate.is_file():
            return candidate
    return None


def _open(path: Path):
    """Open a NIfTI lazily (header only); DatasetError naming the file if it cannot be read."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DatasetError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def load_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3-D label volume.

    Returns:
        (uint8 [X,Y,Z] labels in {0..3}, voxel spacing in mm (sx, sy, sz)).

    Raises:
        DatasetError: unreadable file, not 3-D, or label values outside {0,1,2,3}.
    """
    data, image = read_nifti(path)
    problem = label_problem(data)
    if problem:
        raise DatasetError(f"{path}: {problem}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data.astype(np.uint8), zooms  # type: ignore[return-value]


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def summarise(table: pd.DataFrame) -> dict:
    """Per mode: mean over cases per class and metric (NaN left out), the mean of those over the three
    classes, n_cases, and per class the number of cases where a metric was missing; mm mode adds the
    count of empty predictions per class."""
    summary: dict = {}
    classes = list(CLASS_NAMES.values())
    for mode in MODES:
        rows = table[table["mode"] == mode]
        per_class = {}
        for name in classes:
            sub = rows[rows["class"] == name]
            per_class[name] = {
                m: _nan_to_none(sub[m].mean(skipna=True)) if sub[m].notna().any() else None for m in METRICS
            }
        overall = {}
        for m in METRICS:
            means = [per_class[c][m] for c in classes if per_class[c][m] is not None]
            overall[m] = float(np.mean(means)) if means else None
        entry = dict(
            n_cases=int(rows["case"].nunique()),
            per_class=per_class,
            mean=overall,
            n_missing={c: {m: int(rows[rows["class"] == c][m].isna().sum()) for m in METRICS} for c in classes},
        )
        if mode == "mm":
            entry["empty_predictions"] = {c: int(rows[rows["class"] == c]["empty_pred"].sum()) for c in classes}
        summary[mode] = entry
    return summary


def run(pred_dir: Path | str, gt_dir: Path | str, out_dir: Path | str) -> dict:
    """Score pred_dir/<case>.nii.gz against the matching ground truth.

    Writes out_dir/metrics_per_case.csv (case, class, mode, dice, jaccard, hd95, asd) and
    out_dir/summary.json (see `summarise`). Spacing for mm mode comes from the ground-truth header.

    Returns:
        the summary dict.

    Raises:
        DatasetError: no predictions, a case without ground truth, an unreadable file, a shape
            mismatch or label values outside {0..3} (names the file).
    """
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"{pred_dir}: prediction folder does not exist")
    preds = sorted(p for p in pred_dir.iterdir() if p.name.endswith(_SUFFIX) and not p.name.startswith("."))
    if not preds:
        raise DatasetError(f"{pred_dir}: no <case>{_SUFFIX} predictions found")
    if not gt_dir.is_dir():
        raise DatasetError(f"{gt_dir}: ground-truth folder does not exist")
    pairs = []
    for pred_path in preds:
        case = pred_path.name[: -len(_SUFFIX)]
        gt_path = find_ground_truth(case, gt_dir)
        if gt_path is None:
            raise DatasetError(
                f"{pred_path}: no ground truth for case {case} in {gt_dir} "
                f"(looked for {case}_gt{_SUFFIX}, {case}{_SUFFIX}, {case.split('_', 1)[0]}/{case}_gt{_SUFFIX})"
            )
        pairs.append((case, pred_path, gt_path))
    # Headers first: a wrong shape or an unreadable file fails before any scoring.
    for _case, pred_path, gt_path in pairs:
        pred_shape, gt_shape = (_spatial_shape(_open(p).shape) for p in (pred_path, gt_path))
        if pred_shape != gt_shape:
            raise DatasetError(
                f"{pred_path}: prediction shape {pred_shape} differs from ground truth {gt_path} shape {gt_shape}"
            )

    rows = []
    for case, pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="case"):
        pred, pred_zooms = load_labels(pred_path)
        ref, spacing = load_labels(gt_path)
        if pred.shape != ref.shape:
            raise DatasetError(
                f"{pred_path}: prediction shape {pred.shape} differs from ground truth {gt_path} shape {ref.shape}"
            )
        if not np.allclose(pred_zooms, spacing, rtol=1e-3):
            log.warning(
                "%s: spacing %s differs from ground truth %s; using the ground truth's", pred_path, pred_zooms, spacing
            )
        for row in score_case(pred, ref, spacing):
            rows.append(dict(case=case, **{("class" if k == "cls" else k): v for k, v in row.items()}))

    table = pd.DataFrame(rows)
    summary = summarise(table)
    with staged_outputs(out_dir) as st:
        table[["case", "class", "mode", *METRICS]].to_csv(st.path("metrics_per_case.csv"), index=False)
        write_json(st.path("summary.json"), summary)
    for mode in MODES:
        mean = summary[mode]["mean"]
        log.info("%s mode, %d cases: %s", mode, summary[mode]["n_cases"], ", ".join(f"{m} {mean[m]}" for m in METRICS))
    return summary
