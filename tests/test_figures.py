"""Training curves: one line per experiment on the global iteration axis, phases marked, no doubling back."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from sraseg.report.figures import curve_data, training_curves

EXPERIMENTS = {"labeled_only": {"method": "labeled_only"}, "bcp_real": {"method": "bcp_real"}}


def write_log(path: Path, phases: list[tuple[str, int]], val_every: int, dice_at) -> None:
    """train_log.csv as `run` writes it: iteration restarts per phase, step counts all phases."""
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=["phase", "iteration", "step", "loss", "val_dice_mean"])
        table.writeheader()
        offset = 0
        for phase, length in phases:
            for iteration in range(val_every, length + 1, val_every):
                step = offset + iteration
                table.writerow(dict(phase=phase, iteration=iteration, step=step, loss=1.0, val_dice_mean=dice_at(step)))
            offset += length


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for seed, shift in ((1, 0.0), (2, 0.1)):
        write_log(tmp_path / "labeled_only" / f"seed{seed}" / "train_log.csv", [("supervised", 300)], 50,
                  lambda s, shift=shift: s / 1000 + shift)
        # the self-training student restarts from the pre-train best: its curve drops at the switch
        write_log(tmp_path / "bcp_real" / f"seed{seed}" / "train_log.csv", [("pretrain", 100), ("selftrain", 200)], 50,
                  lambda s, shift=shift: (s if s <= 100 else s - 100) / 1000 + shift)
    return tmp_path


def test_curves_use_global_steps_and_phase_spans(results: Path):
    curves, phases = curve_data(results, EXPERIMENTS, [1, 2, 3])  # seed 3 has no log: skipped
    assert list(curves) == ["labeled_only", "bcp_real"]
    bcp = curves["bcp_real"]
    assert bcp["step"].tolist() == [50, 100, 150, 200, 250, 300]  # selftrain continues after pretrain
    assert np.all(np.diff(bcp["step"]) > 0)
    assert bcp["phase"].tolist() == ["pretrain"] * 2 + ["selftrain"] * 4
    assert np.allclose(bcp["mean"], [0.1, 0.15, 0.1, 0.15, 0.2, 0.25])  # mean of 0.05.. and 0.15..
    assert np.allclose(bcp["high"] - bcp["low"], 0.1) and (bcp["seeds"] == 2).all()
    assert phases == [("pretrain", 0, 100), ("supervised", 0, 300), ("selftrain", 100, 300)]


def test_figure_is_written(results: Path, tmp_path: Path):
    path = tmp_path / "curves.png"
    training_curves(results, EXPERIMENTS, [1, 2], path)
    assert path.stat().st_size > 5000


def write_bank(folder: Path, pairing: str, partners: list[int], n_labeled: int, cap=None) -> None:
    """blend.json + pairs.parquet as the blend stage writes them (only the columns the figure reads)."""
    import pandas as pd

    from sraseg.io import write_json

    folder.mkdir(parents=True)
    pd.DataFrame({"real_id": partners}).to_parquet(folder / "pairs.parquet")
    write_json(folder / "blend.json", {"settings": {"pairing": pairing}, "n_labeled_slices": n_labeled, "cap": cap})


def test_partner_use_counts_every_labeled_slice_once_per_rule(tmp_path: Path):
    from sraseg.report.figures import partner_use, partner_use_figure

    write_bank(tmp_path / "hub", "nearest", [7] * 8 + [3, 3], n_labeled=5)
    write_bank(tmp_path / "hub_hard", "nearest", [1] * 10, n_labeled=5)  # same rule again: not drawn twice
    write_bank(tmp_path / "spread", "balanced", [1, 1, 2, 2, 3, 3, 4, 4, 5, 7], n_labeled=7, cap=2)
    dirs = {name: tmp_path / name for name in ("hub", "hub_hard", "spread")}
    use = partner_use(dirs)
    assert list(use) == ["nearest", "balanced"]
    assert use["nearest"]["counts"].tolist() == [8, 2, 0, 0, 0] and use["nearest"]["experiment"] == "hub"
    assert use["balanced"]["counts"].tolist() == [2, 2, 2, 2, 1, 1, 0] and use["balanced"]["cap"] == 2
    path = tmp_path / "use.png"
    partner_use_figure(dirs, path)
    assert path.stat().st_size > 5000
