"""The dataset interface: what a dataset layout says, so that prepare, predict, evaluate and report are
written once (`sraseg.datasets.prepare`, `sraseg.evaluate.predict`, `sraseg.evaluate.run`, `sraseg.report.run`).

A dataset module defines one subclass of `Dataset` and is named in the table of `sraseg.datasets`.
The prepared files every later stage reads are the same for every dataset: `images.npy` float32
[N,S,S] in [0,1], `labels.npy` uint8 [N,S,S] in [0, number of classes), one `slices.parquet` row per
2-D slice and one `volumes.parquet` row per case (a 2-D image is a one-slice volume), and `prepare.json`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Cut", "Dataset"]


@dataclass
class Cut:
    """One case cut into prepared slices.

    Attributes:
        split: "train", "val" or "test"; record: the dataset's description of the case (its reader's record).
        images: float32 [n,S,S] in [0,1]; labels: uint8 [n,S,S].
    """

    split: str
    record: Any
    images: np.ndarray
    labels: np.ndarray


class Dataset:
    """One dataset layout. Subclasses set the attributes and implement the methods below.

    Attributes:
        name: the `--dataset` value and the table key ("acdc"); `title` is its name in messages ("ACDC").
        classes: class names, background first (their count is the models' class count).
        split_unit: what a split list names, in messages ("patients", "cases").
        suffix: the file suffix of a folder input and of a prediction (".nii.gz", ".png").
        unit: one input in messages and progress bars ("volume", "image").
        shape_word: the word for an image's array shape in messages ("shape", "size").
        full_report: the report adds the synthetic-data provenance, the content stage's findings, an
            HTML page and the figures beyond the training curves (`sraseg.report.run`).
    """

    name = ""
    classes: tuple[str, ...] = ()
    split_unit = "cases"
    suffix = ""
    unit = "image"
    shape_word = "shape"
    full_report = False

    @property
    def title(self) -> str:
        return self.name.upper()

    # ---- raw files -> prepared files (the prepare stage) ----

    def cut(self, raw_dir: Path, splits: dict[str, list[str]], size: int) -> tuple[int, Iterator[Cut]]:
        """Check the raw files of every listed case and cut them into S x S slices.

        Returns:
            (the number of slices to allocate, an iterator of `Cut` in split order then list order).
            A problem found before the iterator runs raises here; one found while it runs raises from it
            (after it has checked every case), so nothing is published.
        """
        raise NotImplementedError

    def rows(self, cut: Cut, first_slice_id: int, labeled: set[str], raw_dir: Path) -> tuple[list[dict], dict]:
        """(slices.parquet rows, the volumes.parquet row) of one cut case, its slices numbered from `first_slice_id`.
        Paths are written with `sraseg.io.portable_path(path, raw_dir)`."""
        raise NotImplementedError

    def counts(self, splits: dict[str, list[str]], labeled: list[str], slices: pd.DataFrame, volumes: pd.DataFrame) -> dict:
        """prepare.json's `counts`."""
        raise NotImplementedError

    def describe(self, inputs: dict, labeled: list[str], counts: dict) -> dict:
        """prepare.json: `inputs` (raw_dir, splits_dir, labeled_list, image_size), how the files were read
        and cut, the labeled ids and `counts`."""
        raise NotImplementedError

    def prepared_line(self, counts: dict) -> str:
        """One log line saying what was prepared."""
        raise NotImplementedError

    # ---- predictions (the predict stage) ----

    def check_model(self, weights: Path, meta: dict) -> None:
        """Refuse a model that cannot segment this dataset (WeightsError); default: accept."""

    def skip_input(self, path: Path) -> str | None:
        """Why a folder input is not a case to predict (logged, not a failure), or None."""
        return None

    def read_input(self, path: Path) -> tuple[np.ndarray, Any]:
        """(the image as predict needs it, what `write_prediction` needs of the input); DatasetError when unreadable."""
        raise NotImplementedError

    def expected_shape(self, row: Any) -> tuple[int, ...]:
        """The image shape a volumes.parquet row records."""
        raise NotImplementedError

    def segment(self, model, image: np.ndarray, path: Path, image_size: int, device, batch_size: int) -> np.ndarray:
        """uint8 labels of `image` (as `read_input` returned it, from `path`) at its own size."""
        raise NotImplementedError

    def write_prediction(self, path: Path, labels: np.ndarray, reference: Any) -> None:
        raise NotImplementedError

    # ---- scoring (the evaluate stage) ----

    def ground_truth(self, pred_path: Path, case: str, gt_dir: Path) -> Path:
        """The reference of `case` in `gt_dir`; DatasetError naming what was looked for when there is none."""
        raise NotImplementedError

    def score(self, pairs: list[tuple[str, Path, Path]]) -> pd.DataFrame:
        """metrics_per_case rows (case, class, mode, dice, jaccard, hd95, asd and what `summarise` needs) of
        (case, prediction, ground truth) pairs; DatasetError naming a file that cannot be scored."""
        raise NotImplementedError

    def summarise(self, table: pd.DataFrame) -> dict:
        """summary.json: per mode, n_cases and the means of the metrics."""
        raise NotImplementedError

    # ---- the report ----

    modes: tuple[str, ...] = ()

    def summary_values(self, summary: dict, mode: str, path: Path) -> tuple[int, dict[str, float]] | None:
        """(n_cases, {column stem: value}) of one mode of one summary.json, None when the mode is left out
        (the report then leaves its table out); DatasetError when the file is not this dataset's summary."""
        raise NotImplementedError

    def report_title(self, results_dir: Path) -> str:
        return f"Results: {results_dir.name}"

    def seeds_line(self, seeds: list[int]) -> str:
        return f"- seeds: {', '.join(map(str, seeds))}; values are mean ± std over seeds"

    def report_tables(self, mode: str, n_cases: int) -> tuple[str, list[tuple[str | None, list[tuple[str, str]]]]]:
        """(the mode's heading, [(table caption or None, [(column header, column stem)])])."""
        raise NotImplementedError
