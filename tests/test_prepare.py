"""The prepare stage: slices, normalisation, the labeled subset and the all-or-nothing CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_data import copy_dataset, make_phantom, run_cli, write_splits

from sraseg.data import acdc
from sraseg.datasets import acdc as acdc_dataset
from sraseg.datasets import prepare
from sraseg.errors import ConfigError, DatasetError
from sraseg.io import read_json

TRAIN, VAL, TEST = ["patient003", "patient001", "patient005"], ["patient002"], ["patient004"]
LABELED = ["patient001"]
SIZE = 48
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("prep"), patients=6, seed=7)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    splits_dir, labeled = write_splits(root, TRAIN, VAL, TEST, LABELED)
    out = root / "prepared"
    prepare.run(raw, splits_dir, labeled, SIZE, out)
    return out


def test_outputs_shapes_ranges_dtypes(prepared):
    images = np.load(prepared / "images.npy")
    labels = np.load(prepared / "labels.npy")
    slices = pd.read_parquet(prepared / "slices.parquet")
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    assert images.shape == labels.shape == (len(slices), SIZE, SIZE)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.05
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert slices.slice_id.tolist() == list(range(len(slices)))
    assert str(slices.slice_id.dtype) == "int64" and slices.labeled.dtype == bool
    assert set(slices.columns) == {"slice_id", "case", "patient", "frame", "phase", "slice", "split", "labeled"}
    assert sorted(slices.patient.unique()) == sorted(TRAIN + VAL + TEST)  # patient006 is in no split
    assert slices.groupby("patient").split.first().to_dict() == {
        **dict.fromkeys(TRAIN, "train"),
        **dict.fromkeys(VAL, "val"),
        **dict.fromkeys(TEST, "test"),
    }


def test_labeled_subset_is_the_id_list(prepared):
    slices = pd.read_parquet(prepared / "slices.parquet")
    assert sorted(slices[slices.labeled].patient.unique()) == LABELED
    assert slices[slices.patient.isin(LABELED)].labeled.all()
    assert not slices[slices.split != "train"].labeled.any()
    info = read_json(prepared / "prepare.json")
    assert info["counts"]["labeled_slices"] == int(slices.labeled.sum()) > 0
    assert info["image_size"] == SIZE and info["labeled"] == LABELED


def test_volumes_table_matches_nifti(prepared, raw):
    volumes = pd.read_parquet(prepared / "volumes.parquet")
    slices = pd.read_parquet(prepared / "slices.parquet")
    assert len(volumes) == 2 * len(TRAIN + VAL + TEST)
    assert set(volumes[volumes.split.isin(["val", "test"])].patient) == set(VAL + TEST)
    labels = np.load(prepared / "labels.npy")
    for row in volumes.itertuples():
        image, label, _, spacing = acdc.load_case(row.image_path, row.gt_path)
        assert (row.nx, row.ny, row.nz) == image.shape and row.n_slices == row.nz
        assert (row.sx, row.sy, row.sz) == pytest.approx(spacing)
        part = slices.iloc[row.first_slice_id : row.first_slice_id + row.n_slices]
        assert (part.case == row.case).all() and part.slice.tolist() == list(range(row.nz))
        # Resizing the prepared labels back restores the original volume closely.
        back = acdc_dataset.volume_from_slices(
            labels[row.first_slice_id : row.first_slice_id + row.nz], (row.nx, row.ny), "label"
        )
        assert back.shape == label.shape and (back == label).mean() > 0.97


def test_per_volume_minmax():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) * 10 + 100
    out = acdc_dataset.normalise(volume)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
    with pytest.raises(DatasetError, match="constant"):
        acdc_dataset.normalise(np.full((4, 4, 2), 7.0), "x.nii.gz")


def test_labeled_not_in_train(raw, tmp_path):
    splits_dir, labeled = write_splits(tmp_path, TRAIN, VAL, TEST, ["patient002"])
    with pytest.raises(ConfigError) as err:
        prepare.run(raw, splits_dir, labeled, SIZE, tmp_path / "out")
    assert str(labeled.resolve()) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_empty_split_file(raw, tmp_path):
    splits_dir, labeled = write_splits(tmp_path, TRAIN, [], TEST, LABELED)
    with pytest.raises(ConfigError, match="empty"):
        prepare.run(raw, splits_dir, labeled, SIZE, tmp_path / "out")


def test_cli_corrupt_nifti_exits_1_and_writes_nothing(raw, tmp_path):
    broken = copy_dataset(raw, tmp_path / "raw")
    bad = broken / "patient002" / "patient002_frame01.nii.gz"
    bad.write_bytes(bad.read_bytes()[:5000])
    splits_dir, labeled = write_splits(tmp_path, TRAIN, VAL, TEST, LABELED)
    out = tmp_path / "prepared"
    proc = run_cli(
        "prepare", "--raw-dir", str(broken), "--splits-dir", str(splits_dir), "--labeled", str(labeled),
        "--image-size", str(SIZE), "--out-dir", str(out),
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("sraseg prepare: error:"), proc.stderr
    assert str(bad) in errors[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no staging left over


def test_acdc_split_lists():
    folder = REPO / "config" / "splits" / "acdc"
    lists = {name: acdc.read_split_list(folder / f"{name}.txt") for name in ("train", "val", "test", "labeled_7")}
    assert [len(lists[n]) for n in ("train", "val", "test")] == [70, 10, 20]
    everyone = lists["train"] + lists["val"] + lists["test"]
    assert len(set(everyone)) == 100 and set(everyone) == {f"patient{i:03d}" for i in range(1, 101)}
    assert lists["labeled_7"] == lists["train"][:7]
