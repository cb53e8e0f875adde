"""The study scripts behind docs/studies/demo-lv.md count what they say they count."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from false_positive_slices import false_positive_table  # noqa: E402


def _write(path: Path, volume: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.astype(np.uint8), np.eye(4)), path)


def test_false_positives_are_split_by_whether_the_slice_has_the_class(tmp_path: Path):
    gt = np.zeros((8, 8, 3), np.uint8)
    gt[2:4, 2:4, 1] = 3  # an LV of 4 voxels on slice 1 only
    pred = np.zeros_like(gt)
    pred[2:4, 2:4, 1] = 3  # found
    pred[4, 2:4, 1] = 3  # 2 voxels beside it
    pred[0:2, 0:3, 0] = 3  # 6 voxels on slice 0, which has no LV
    _write(tmp_path / "raw" / "patient001" / "patient001_frame01_gt.nii.gz", gt)
    _write(tmp_path / "run" / "predictions" / "patient001_frame01.nii.gz", pred)
    lv = false_positive_table(tmp_path / "run", tmp_path / "raw").loc["LV"]
    assert lv["fp_on_absent"] == 6 / 4
    assert lv["fp_beside"] == 2 / 4
    assert lv["fn"] == 0
    assert lv["pred/gt"] == 12 / 4
    assert lv["absent_slices_hit"] == 1 / 2  # slices 0 and 2 lack an LV; one of them got one
