"""The evaluate stage: score every prediction against its ground truth and summarise over cases.

Written once for every dataset: the dataset (`sraseg.datasets`, picked by `--dataset`) says where a
case's ground truth is and how a case is scored (ACDC: per class in peer and mm modes, see
`sraseg.metrics`; FIVES: per image in pixels and stacked, the reference's mode).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sraseg.datasets import get_dataset
from sraseg.errors import DatasetError
from sraseg.io import staged_outputs, write_json
from sraseg.metrics import METRICS

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(pred_dir: Path | str, gt_dir: Path | str, out_dir: Path | str, dataset: str = "acdc") -> dict:
    """Score pred_dir/<case><suffix> against the matching ground truth in gt_dir.

    Writes out_dir/metrics_per_case.csv (case, class, mode, dice, jaccard, hd95, asd) and
    out_dir/summary.json (the dataset's `summarise`).

    Returns:
        the summary dict.

    Raises:
        DatasetError: no predictions, a case without ground truth, an unreadable file, a shape
            mismatch or label values the dataset does not have (names the file).
        ConfigError: an unknown dataset.
    """
    data = get_dataset(dataset)
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    suffix = data.suffix
    if not pred_dir.is_dir():
        raise DatasetError(f"{pred_dir}: prediction folder does not exist")
    preds = sorted(p for p in pred_dir.iterdir() if p.name.lower().endswith(suffix) and not p.name.startswith("."))
    if not preds:
        raise DatasetError(f"{pred_dir}: no <case>{suffix} predictions found")
    if not gt_dir.is_dir():
        raise DatasetError(f"{gt_dir}: ground-truth folder does not exist")
    pairs = []
    for pred_path in preds:
        case = pred_path.name[: -len(suffix)]
        pairs.append((case, pred_path, data.ground_truth(pred_path, case, gt_dir)))
    table = data.score(pairs)
    summary = data.summarise(table)
    with staged_outputs(out_dir) as st:
        table[["case", "class", "mode", *METRICS]].to_csv(st.path("metrics_per_case.csv"), index=False)
        write_json(st.path("summary.json"), summary)
    for mode, entry in summary.items():
        log.info("%s mode, %d cases: %s", mode, entry["n_cases"], ", ".join(f"{m} {entry['mean'][m]}" for m in METRICS))
    return summary
