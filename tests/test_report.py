"""The report stage: means and spreads over seeds, and one-line errors for damaged inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_data import run_cli

from sraseg.datasets.acdc import summarise
from sraseg.errors import DatasetError
from sraseg.io import write_json
from sraseg.report.run import collect_results

EXPERIMENTS = {"labeled_only": {"method": "labeled_only"}, "sraseg": {"method": "sraseg"}}


def write_summary(results: Path, name: str, seed: int, dice: float, hd95: float) -> None:
    """summary.json as the evaluate stage writes it, from two cases with the given scores."""
    rows = [
        dict(case=case, mode=mode, **{"class": cls}, dice=dice, jaccard=dice / (2 - dice), hd95=hd95, asd=hd95 / 4,
             empty_pred=False)
        for case in ("patient101_frame01", "patient101_frame14")
        for mode in ("peer", "mm")
        for cls in ("RV", "MYO", "LV")
    ]
    path = results / name / f"seed{seed}" / "eval" / "summary.json"
    path.parent.mkdir(parents=True)
    write_json(path, summarise(pd.DataFrame(rows)))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    results = tmp_path / "results" / "phantom"
    for seed, dice, hd95 in ((1, 0.80, 2.0), (2, 0.90, 4.0)):
        write_summary(results, "labeled_only", seed, dice, hd95)
        write_summary(results, "sraseg", seed, dice - 0.1, float("nan") if seed == 1 else 6.0)
    return results


def test_mean_and_sample_std_over_seeds(results: Path):
    frame = collect_results(results, EXPERIMENTS, [1, 2]).set_index(["experiment", "mode"])
    row = frame.loc[("labeled_only", "peer")]
    assert row["n_seeds"] == 2 and row["n_cases"] == 2
    assert row["dice_mean_mean"] == pytest.approx(85.0)
    assert row["dice_LV_std"] == pytest.approx(np.std([80.0, 90.0], ddof=1))
    assert row["hd95_mean_mean"] == pytest.approx(3.0)
    # a seed whose distance is undefined is left out of the mean, not counted as zero
    sraseg = frame.loc[("sraseg", "mm")]
    assert sraseg["dice_mean_mean"] == pytest.approx(75.0)
    assert sraseg["hd95_RV_mean"] == pytest.approx(6.0) and np.isnan(sraseg["hd95_RV_std"])


def test_damaged_summary_names_the_file(results: Path):
    path = results / "sraseg" / "seed2" / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["mm"]
    path.write_text(json.dumps(summary))
    with pytest.raises(DatasetError, match=r"sraseg/seed2/eval/summary\.json: not an evaluate summary"):
        collect_results(results, EXPERIMENTS, [1, 2])
    with pytest.raises(DatasetError, match=r"seed3/eval/summary\.json: file not found \(evaluate experiment"):
        collect_results(results, EXPERIMENTS, [3])


def test_corrupt_encoder_record_is_one_line_and_writes_nothing(results: Path, tmp_path: Path):
    encoder = results / "embed" / "encoder.json"
    encoder.parent.mkdir()
    encoder.write_text('{"model": "vit_small_patch14_dinov2", "untrained": tr')  # cut off mid-write
    out_dir = results / "report"
    settings = json.dumps({"experiments": EXPERIMENTS, "seeds": [1, 2]})
    proc = run_cli("report", "--results-dir", str(results), "--out-dir", str(out_dir), "--settings", settings)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "encoder.json: not valid JSON" in error_lines[0]
    assert not out_dir.exists()
    assert [p.name for p in results.iterdir() if p.name.startswith(".")] == []


def test_a_run_whose_teacher_missed_a_class_is_marked(results: Path, monkeypatch):
    """The train stage's guard record (train.json's `switch`, as `switch.switch_record` writes it) marks the
    experiment in every table and names the seed, class and Dice under Warnings; a run that passed is not."""
    from sraseg.report import figures
    from sraseg.report.run import run as report
    from sraseg.train.settings import TrainSettings
    from sraseg.train.switch import SWITCH_PHASE, switch_record

    cfg = TrainSettings(method="sraseg")
    for seed, rv in ((1, 0.006), (2, 0.71)):
        row = {"phase": SWITCH_PHASE, "teacher_val_dice_rv": rv, "teacher_val_dice_myo": 0.66, "teacher_val_dice_lv": 0.53}
        write_json(results / "sraseg" / f"seed{seed}" / "train.json", {"switch": switch_record(cfg, [row])})
    write_json(results / "labeled_only" / "seed1" / "train.json", {"switch": None})
    monkeypatch.setattr(figures, "overlays", lambda *args: None)  # needs predictions, not this test's point
    out = results / "report"
    frame = report(results, out, {"experiments": EXPERIMENTS, "seeds": [1, 2]})
    assert frame.set_index("experiment")["switch_warning"].to_dict() == {
        "labeled_only": "", "sraseg": "seed 1: rv 0.006 (threshold 0.2)"}
    markdown = (out / "results.md").read_text()
    assert "## Warnings" in markdown and "**sraseg ⚠**" in markdown and "seed 1: rv 0.006" in markdown
    assert markdown.count("| sraseg ⚠ | sraseg |") == 4 and "| labeled_only ⚠" not in markdown  # 2 modes x 2 tables
    assert "sraseg ⚠</td>" in (out / "results.html").read_text()
    assert pd.read_csv(out / "results.csv")["switch_warning"].tolist().count("seed 1: rv 0.006 (threshold 0.2)") == 2


def test_a_damaged_switch_record_is_one_line(results: Path):
    from sraseg.report.switch import switch_warnings

    write_json(results / "sraseg" / "seed1" / "train.json", {"switch": {"below": ["rv"]}})  # no Dice
    with pytest.raises(DatasetError, match=r"sraseg/seed1/train\.json: not a train record's switch entry"):
        switch_warnings(results, EXPERIMENTS, [1, 2])
