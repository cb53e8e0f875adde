"""Prepare stage: check a dataset's raw files and cut them into normalised, resized 2-D slices.

Written once for every dataset: the dataset (`sraseg.datasets`, picked by `--dataset`) says how its raw
files are read, checked and cut (ACDC: `sraseg.datasets.acdc`, FIVES: `sraseg.datasets.fives`); this
stage reads the split lists, writes the slices and the tables, and describes them.

Outputs (see the shared contracts): slices.parquet, images.npy float32 [N,S,S] in [0,1],
labels.npy uint8 [N,S,S] in [0, number of classes), volumes.parquet, prepare.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.data.acdc import read_split_list
from sraseg.datasets import get_dataset
from sraseg.errors import ConfigError
from sraseg.io import portable_path, staged_outputs, write_json

__all__ = ["SPLITS", "run"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _read_splits(splits_dir: Path, labeled_list: Path, unit: str) -> tuple[dict[str, list[str]], list[str]]:
    splits = {name: read_split_list(splits_dir / f"{name}.txt") for name in SPLITS}
    labeled = read_split_list(labeled_list)
    outside = [name for name in labeled if name not in set(splits["train"])]
    if outside:
        raise ConfigError(f"{labeled_list.resolve()}: labeled {unit} {outside[:10]} are not in {splits_dir / 'train.txt'}")
    return splits, labeled


def _tables(slice_rows: list[dict], volume_rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """slices.parquet and volumes.parquet with their column types fixed."""
    slices = pd.DataFrame(slice_rows).astype(dict(slice_id="int64", frame="int64", slice="int64", labeled="bool",
                                                  case=str, patient=str, phase=str, split=str))  # fmt: skip
    volumes = pd.DataFrame(volume_rows).astype(
        dict(frame="int64", nx="int64", ny="int64", nz="int64", first_slice_id="int64", n_slices="int64",
             sx="float64", sy="float64", sz="float64")  # fmt: skip
    )
    return slices, volumes


def run(raw_dir: Path, splits_dir: Path, labeled_list: Path, image_size: int, out_dir: Path, dataset: str = "acdc") -> None:
    """Check the dataset, normalise and slice every case of every split; all or nothing.

    Args:
        raw_dir: the dataset's release-layout folder; splits_dir: folder with train.txt, val.txt, test.txt;
        labeled_list: file of labeled training ids (a subset of train);
        image_size: S, the side of the prepared slices (> 0); out_dir: the prepared folder;
        dataset: the layout, a name in `sraseg.datasets.DATASETS`.

    Raises:
        ConfigError: bad split lists, labeled ids outside train, image_size < 1, an unknown dataset.
        DatasetError: any problem of the dataset (one line naming each file).
    """
    data = get_dataset(dataset)
    raw_dir, splits_dir, labeled_list, out_dir = Path(raw_dir), Path(splits_dir), Path(labeled_list), Path(out_dir)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"prepare image_size must be a positive integer; got {image_size!r}")
    splits, labeled = _read_splits(splits_dir, labeled_list, data.split_unit)
    n_slices, cuts = data.cut(raw_dir, splits, image_size)
    labeled_set = set(labeled)
    size = image_size

    with staged_outputs(out_dir) as st:
        # Written straight to disk: the full ACDC set at 256 px is about 0.5 GB of float32.
        images = np.lib.format.open_memmap(st.path("images.npy"), mode="w+", dtype=np.float32, shape=(n_slices, size, size))
        labels = np.lib.format.open_memmap(st.path("labels.npy"), mode="w+", dtype=np.uint8, shape=(n_slices, size, size))
        slice_rows: list[dict] = []
        volume_rows: list[dict] = []
        start = 0
        for cut in cuts:
            n = len(cut.images)
            images[start : start + n] = cut.images
            labels[start : start + n] = cut.labels
            rows, volume = data.rows(cut, start, labeled_set, raw_dir)
            slice_rows += rows
            volume_rows.append(volume)
            start += n
        images.flush()
        labels.flush()
        del images, labels

        slices, volumes = _tables(slice_rows, volume_rows)
        slices.to_parquet(st.path("slices.parquet"), index=False)
        volumes.to_parquet(st.path("volumes.parquet"), index=False)
        counts = data.counts(splits, labeled, slices, volumes)
        inputs = dict(raw_dir=portable_path(raw_dir), splits_dir=portable_path(splits_dir),
                      labeled_list=portable_path(labeled_list), image_size=size)  # fmt: skip
        write_json(st.path("prepare.json"), data.describe(inputs, labeled, counts))
    log.info("prepared %s: %s", out_dir, data.prepared_line(counts))
