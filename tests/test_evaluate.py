"""The evaluate stage on hand-made NIfTI volumes with known metrics, through the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from sraseg.errors import DatasetError
from sraseg.evaluate import run as evaluate

SRC = Path(__file__).resolve().parents[1] / "src"
SPACING = (1.5, 1.5, 5.0)


def write_nifti(path: Path, data: np.ndarray, spacing=SPACING, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return path


def reference_volume() -> np.ndarray:
    """LV cube 4^3 at (3..6), MYO 2^3 elsewhere, RV 2^3 elsewhere, in a 12^3 volume."""
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[3:7, 3:7, 3:7] = 3
    ref[8:10, 8:10, 8:10] = 2
    ref[1:3, 8:10, 1:3] = 1
    return ref


def prediction_volume() -> np.ndarray:
    """LV shifted by one voxel along x, MYO exact, RV missing."""
    pred = np.zeros((12, 12, 12), np.uint8)
    pred[4:8, 3:7, 3:7] = 3
    pred[8:10, 8:10, 8:10] = 2
    return pred


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "sraseg.cli", "evaluate", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_known_metrics(tmp_path):
    pred_dir, gt_dir, out_dir = tmp_path / "pred", tmp_path / "gt", tmp_path / "eval"
    # Two cases, three ground-truth layouts: <case>_gt, and the ACDC release patient folder.
    write_nifti(pred_dir / "patient001_frame01.nii.gz", prediction_volume())
    write_nifti(gt_dir / "patient001_frame01_gt.nii.gz", reference_volume())
    write_nifti(pred_dir / "patient002_frame12.nii.gz", reference_volume())
    write_nifti(gt_dir / "patient002" / "patient002_frame12_gt.nii.gz", reference_volume())

    result = cli("--pred-dir", str(pred_dir), "--gt-dir", str(gt_dir), "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr

    table = pd.read_csv(out_dir / "metrics_per_case.csv")
    assert list(table.columns) == ["case", "class", "mode", "dice", "jaccard", "hd95", "asd"]
    assert len(table) == 2 * 3 * 2
    row = table.set_index(["case", "class", "mode"])
    lv_peer = row.loc[("patient001_frame01", "LV", "peer")]
    assert lv_peer["dice"] == pytest.approx(0.75) and lv_peer["jaccard"] == pytest.approx(0.6)
    assert lv_peer["hd95"] == pytest.approx(1.0) and lv_peer["asd"] == pytest.approx(20 / 56)
    # mm: the shift is along x at 1.5 mm.
    assert row.loc[("patient001_frame01", "LV", "mm")]["hd95"] == pytest.approx(1.5)
    assert row.loc[("patient001_frame01", "RV", "peer")][["dice", "hd95"]].tolist() == [0.0, 0.0]
    assert math.isnan(row.loc[("patient001_frame01", "RV", "mm")]["hd95"])
    assert row.loc[("patient002_frame12", "MYO", "mm")]["dice"] == pytest.approx(1.0)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["peer"]["n_cases"] == 2 and summary["mm"]["n_cases"] == 2
    assert summary["peer"]["per_class"]["LV"]["dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["peer"]["per_class"]["RV"]["dice"] == pytest.approx(0.5)  # the miss counts as 0
    assert summary["mm"]["empty_predictions"] == {"RV": 1, "MYO": 0, "LV": 0}
    assert summary["mm"]["per_class"]["RV"]["hd95"] == pytest.approx(0.0)  # only the present case counts
    assert summary["mm"]["n_missing"]["RV"]["hd95"] == 1
    expected = np.mean([summary["peer"]["per_class"][c]["dice"] for c in ("RV", "MYO", "LV")])
    assert summary["peer"]["mean"]["dice"] == pytest.approx(expected)


def test_plain_case_name_ground_truth(tmp_path):
    write_nifti(tmp_path / "pred" / "c1.nii.gz", reference_volume())
    write_nifti(tmp_path / "gt" / "c1.nii.gz", reference_volume())
    summary = evaluate.run(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert summary["peer"]["mean"]["dice"] == pytest.approx(1.0)
    assert summary["mm"]["mean"]["hd95"] == pytest.approx(0.0)


def _assert_cli_error(result, needle: str, out_dir: Path) -> None:
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sraseg evaluate: error:") and needle in lines[0]
    assert not out_dir.exists()
    assert not any(p.name.startswith(".eval") for p in out_dir.parent.iterdir())


def test_cli_shape_mismatch(tmp_path):
    pred = write_nifti(tmp_path / "pred" / "patient001_frame01.nii.gz", prediction_volume()[:, :, :10])
    write_nifti(tmp_path / "gt" / "patient001_frame01_gt.nii.gz", reference_volume())
    out_dir = tmp_path / "eval"
    result = cli("--pred-dir", str(tmp_path / "pred"), "--gt-dir", str(tmp_path / "gt"), "--out-dir", str(out_dir))
    _assert_cli_error(result, str(pred), out_dir)
    assert "(12, 12, 10)" in result.stderr and "(12, 12, 12)" in result.stderr


def test_cli_missing_ground_truth(tmp_path):
    write_nifti(tmp_path / "pred" / "patient001_frame01.nii.gz", reference_volume())
    pred = write_nifti(tmp_path / "pred" / "patient003_frame01.nii.gz", reference_volume())
    write_nifti(tmp_path / "gt" / "patient001_frame01_gt.nii.gz", reference_volume())
    out_dir = tmp_path / "eval"
    result = cli("--pred-dir", str(tmp_path / "pred"), "--gt-dir", str(tmp_path / "gt"), "--out-dir", str(out_dir))
    _assert_cli_error(result, str(pred), out_dir)


def test_bad_inputs_raise_dataset_error(tmp_path):
    gt = tmp_path / "gt"
    write_nifti(gt / "a_gt.nii.gz", reference_volume())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no <case>.nii.gz"):
        evaluate.run(tmp_path / "empty", gt, tmp_path / "out")

    bad_labels = reference_volume()
    bad_labels[0, 0, 0] = 7
    path = write_nifti(tmp_path / "p1" / "a.nii.gz", bad_labels)
    with pytest.raises(DatasetError, match=r"a\.nii\.gz: label values \[7\] outside"):
        evaluate.run(tmp_path / "p1", gt, tmp_path / "out")

    broken = tmp_path / "p2" / "a.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti file at all")
    with pytest.raises(DatasetError, match="cannot read NIfTI") as info:
        evaluate.run(tmp_path / "p2", gt, tmp_path / "out")
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert path.exists()
