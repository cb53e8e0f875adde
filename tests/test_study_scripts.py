"""The study scripts behind docs/studies/demo-lv.md count what they say they count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

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
    assert np.isnan(false_positive_table(tmp_path / "run", tmp_path / "raw").loc["RV", "fn"])  # no RV anywhere


def test_pseudo_label_table_scores_presence_against_the_ground_truth():
    from pseudo_label_probe import pseudo_label_table

    gt = np.zeros((4, 4, 4), np.int64)
    gt[0, 1, 1] = 3  # slice 0 has an LV; slices 1-3 have none (3 is empty of any class too)
    gt[1, 2, 2] = 1
    gt[2, 0, 0] = 2
    pl = gt.copy()
    pl[1, 3, 3] = 3  # an LV drawn on slice 1, which has none
    pl[3, 0, 0] = 3  # and on slice 3, which has no foreground at all
    conf = np.full(gt.shape, 0.9)
    conf[1, 3, 3] = 0.5
    table = pseudo_label_table(pl, conf, gt, ["RV", "MYO", "LV"], syn_pl=pl[:2], syn_conf=conf[:2])
    lv = table.loc["LV"]
    assert lv["gt_presence"] == 1 / 4 and lv["pl_presence"] == 3 / 4
    assert lv["pl_on_absent"] == 2 / 3 and lv["pl_missed"] == 0
    assert lv["pixel_dice"] == 2 * 1 / (3 + 1)
    assert np.isclose(lv["conf"], (0.9 + 0.5 + 0.9) / 3)
    assert lv["syn_presence"] == 1.0 and np.isclose(lv["syn_conf"], 0.7)
    assert table.loc["RV", "pl_on_absent"] == 0
    assert table.loc["no foreground", "gt_presence"] == 1 / 4 and table.loc["no foreground", "pl_on_absent"] == 1.0


def test_fives_real_size_measures_every_stage_and_checks_the_masks(tmp_path: Path):
    """benchmarks/fives_real_size.py on a tiny phantom: every stage timed with a peak, masks at the input size."""
    import json
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fives_real_size.py"
    cmd = [sys.executable, str(script), "--out-dir", str(tmp_path), "--size", "96", "--train", "8", "--test", "4",
           "--image-size", "32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "fives_real_size.json").read_text())
    stages = result["stages"]
    assert set(stages) == {"prepare", "predict", "evaluate", "evaluate_vessels"}
    assert [stages["prepare"][n]["images"] for n in ("all", "half")] == [12, 8]  # train 4, val 4, test 4; half
    for stage, runs in stages.items():
        assert runs["all"]["images"] > runs["half"]["images"] > 0, stage
        for name in ("all", "half"):
            assert 0 < runs[name]["wall_s"] < 600 and 50 < runs[name]["peak_mb"] < 16000, (stage, runs[name])
        full = runs["full_release"]
        assert full["images"] in (200, 800) and full["peak_mb"] >= runs["all"]["peak_mb"] > 0
    predict = stages["predict"]["all"]
    assert predict["masks"] == 4 and predict["mask_sizes"] == ["96 x 96"] and predict["binary"]
    assert len(list((tmp_path / "predictions_all").glob("*.png"))) == 4
    evaluated = json.loads((tmp_path / "evaluate_vessels_all" / "summary.json").read_text())
    assert 0 < evaluated["image"]["mean"]["dice"] < 1 and evaluated["stacked"]["n_cases"] == 4  # vessels scored
    assert "| prepare | 12 |" in (tmp_path / "fives_real_size.md").read_text()


def test_count_curve_sets_are_whole_patients_and_nested_prefixes(tmp_path: Path):
    import pandas as pd
    from count_curve import (
        blurred_set,
        collect,
        parse_variants,
        real_sets,
        realism_set,
        shuffled_set,
        synthetic_sets,
        write_table_and_figure,
    )

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    # 4 unlabeled train patients (2, 3, 1, 2 slices), one labeled, one val: only the unlabeled train ones count
    patients = ["p3"] * 2 + ["p1"] * 3 + ["p4"] + ["p2"] * 2 + ["p0", "p5"]
    pd.DataFrame({"slice_id": range(10), "patient": patients, "split": ["train"] * 9 + ["val"],
                  "labeled": [False] * 8 + [True, False]}).to_parquet(prepared / "slices.parquet")  # fmt: skip
    np.save(prepared / "images.npy", np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32))
    sets = real_sets(prepared, ["2", "all"], tmp_path / "sets")
    first_two = pd.read_parquet(sets["real_2"] / "synthetic.parquet")
    assert first_two["slice_id"].tolist() == [2, 3, 4, 6, 7]  # p1 and p2, every slice of each
    assert np.load(sets["real_2"] / "images.npy")[:, 0, 0].tolist() == [2, 3, 4, 6, 7]
    assert first_two["synthetic_id"].tolist() == list(range(5))
    assert len(pd.read_parquet(sets["real_all"] / "synthetic.parquet")) == 8

    sample = tmp_path / "sample"
    sample.mkdir()
    np.save(sample / "images.npy", np.random.default_rng(0).random((6, 2, 2), dtype=np.float32))
    pd.DataFrame({"synthetic_id": range(6), "seed": range(100, 106)}).to_parquet(sample / "synthetic.parquet")
    small, large = synthetic_sets(sample, [2, 5], tmp_path / "sets").values()
    np.testing.assert_array_equal(np.load(small / "images.npy"), np.load(large / "images.npy")[:2])
    assert pd.read_parquet(large / "synthetic.parquet")["seed"].tolist() == [100, 101, 102, 103, 104]

    shuffled = shuffled_set(large, 3, tmp_path / "sets")
    order = pd.read_parquet(shuffled / "synthetic.parquet")["source_id"].to_numpy()
    assert sorted(order) == list(range(5)) and order.tolist() != list(range(5))
    np.testing.assert_array_equal(np.load(shuffled / "images.npy"), np.load(large / "images.npy")[order])
    # a variant's SET:VALUE is checked before anything runs: one line naming the option and the value
    assert parse_variants("--blur", ["real_2:0.7"], ["real_2"], float) == [("real_2", 0.7)]
    with pytest.raises(SystemExit, match="--blur 'real_2': expected SET:FLOAT"):
        parse_variants("--blur", ["real_2"], ["real_2"], float)
    with pytest.raises(SystemExit, match="no set 'real_9'"):
        parse_variants("--shuffle", ["real_9:1"], ["real_2"], int)
    # the variants: a blurred copy, and curation keeping the images nearest the real embeddings
    blurred = np.load(blurred_set(large, 1.0, tmp_path / "sets") / "images.npy")
    assert blurred.shape == (5, 2, 2) and not np.allclose(blurred, np.load(large / "images.npy"))
    embed = large / "embed"
    embed.mkdir()
    np.save(embed / "real.npy", np.array([[1, 0, 0], [1, 0.1, 0], [1, 0, 0.1], [0.9, 0.1, 0.1], [1, 0.2, 0]], np.float32))
    pd.DataFrame({"row": range(5), "slice_id": range(5)}).to_parquet(embed / "real.parquet")
    np.save(embed / "synthetic.npy", np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0.1, 0.1], [-1, 0, 0]], np.float32))
    pd.DataFrame({"row": range(5), "synthetic_id": range(5)}).to_parquet(embed / "synthetic.parquet")
    kept = pd.read_parquet(realism_set(large, 2, tmp_path / "sets") / "synthetic.parquet")
    assert kept["source_id"].tolist() == [1, 3] and kept["synthetic_id"].tolist() == [0, 1]

    for name, dice in (("labeled_only", 0.70), ("synthetic_2", 0.74), ("real_2", 0.80), ("synthetic_5_blur1", 0.6)):
        run = tmp_path / "runs" / name / "seed1" / "eval"
        run.mkdir(parents=True)
        per_class = {c: {"dice": dice} for c in ("RV", "MYO", "LV")}
        (run / "summary.json").write_text(json.dumps({"peer": {"mean": {"dice": dice}, "per_class": per_class}}))
    frame = collect(tmp_path)
    assert dict(zip(frame["set"], frame["n_images"])) == {"labeled_only": 0, "real_2": 5, "synthetic_5_blur1": 5,
                                                          "synthetic_2": 2}  # fmt: skip
    assert dict(zip(frame["set"], frame["kind"]))["synthetic_5_blur1"] == "variant"  # off the curve
    write_table_and_figure(frame, tmp_path)
    assert "| real_2 | 5 | 80.00 | 80.00 |" in (tmp_path / "count_curve.md").read_text()
    assert (tmp_path / "count_curve.png").stat().st_size > 10_000
