"""The FIVES layout as a dataset: 2-D fundus PNGs, background and vessel. The raw release is read and
checked by `sraseg.data.fives` (see there for the layout, the grey conversion and the mask values).

Prepare: one row per image (an image is its own case, patient and one-slice volume): slices.parquet
(slice_id, case, patient, frame 0, phase "", split, slice 0, labeled, condition, release_split),
images.npy float32 [N,S,S] in [0,1], labels.npy uint8 [N,S,S] in {0,1}, volumes.parquet (nx, ny =
image rows, cols; nz 1; spacing 1 pixel) and prepare.json (settings, classes, counts). Resizing to
S x S: images bilinear with antialiasing, masks nearest-exact (see `sraseg.data.fives`).

Predict, per image (as prepare reads it): BT.601 grey, per-image min-max to [0,1], resized to S x S
(bilinear, antialiased); logits of the U-Net resized back to the image's own rows x cols (bilinear,
align_corners=False, as for ACDC slices); argmax; written as an 8-bit grey PNG, 0 background and 255
vessel (the release's mask values), named `<case>.png` (workflow mode, case ids such as `test_1_A`)
or with the input's own name (folder mode, `sraseg predict -i FOLDER -o OUT -m RUN`).

Evaluate, two modes (metrics_per_case.csv rows: case, class, mode, dice, jaccard, hd95, asd):
- `image` (the main report): every test image scored on its own in 2-D, in pixels, with the peer
  definitions of `sraseg.metrics` (surface = mask minus its 4-connected erosion; HD95 the
  95th percentile of the pooled distances of both surfaces; ASD the mean distance from the
  prediction's surface to the reference's). An empty prediction (or reference) has Dice and
  Jaccard 0 and HD95/ASD missing (NaN, counted in n_missing, left out of the means), not 0.
- `stacked` (the peer mode, for comparison with the paper's number): all test images stacked into
  one [H,W,N] volume and scored once with `peer_scores` in 3-D (computed by `sraseg.stacked_scores`,
  the same values with a fraction of the memory), as the reference code does (its
  HD95/ASD measure distances across unrelated images and mean little; Dice and Jaccard are pooled
  over all pixels). Needs every image at the same size; otherwise this mode is left out.

The report shows one table per mode, experiments as rows, the training curves and the full report's
figures (`full_report`): its prediction figure draws, over a few test images (`overlay_cases`), vessel
pixels found, missed and added; prepared and synthetic images are shown as stored (rows, cols), not
transposed as ACDC's [X,Y] slices are (`transpose_for_display`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sraseg.data.fives import CLASSES, iter_checked, parse_case, read_image, read_mask
from sraseg.data.fives_phantom import CONDITION_NAMES, CONDITIONS, MASK_DIR
from sraseg.data.problems import raise_problems
from sraseg.datasets.base import Cut, Dataset
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.io import portable_path, read_table
from sraseg.metrics import METRICS, dice, jaccard, peer_scores
from sraseg.stacked_scores import peer_scores_lean

__all__ = ["MODES", "resize", "predict_image", "write_mask", "ground_truth_path", "image_scores", "summarise",
           "overlay_picks", "FivesDataset", "DATASET"]  # fmt: skip

log = logging.getLogger(__name__)

MODES = ("image", "stacked")
SPLITS = ("train", "val", "test")
VESSEL = CLASSES[1]
_SUFFIX = ".png"


def resize(array: np.ndarray, size: int, kind: str) -> np.ndarray:
    """Resize one [H,W] image or mask to [size,size].

    Args:
        array: float32 image in [0,1] or uint8 mask; kind: "image" (bilinear, antialiased) or
        "label" (nearest-exact).

    Returns:
        float32 [size,size] in [0,1] for images, uint8 for labels; an exact copy when already that size.
    """
    if array.shape == (size, size):
        return array.astype(np.float32 if kind == "image" else np.uint8, copy=True)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if kind == "image":
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return out[0, 0].clamp_(0.0, 1.0).numpy()
    out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return out[0, 0].round().numpy().astype(np.uint8)


def predict_image(model: torch.nn.Module, image: np.ndarray, image_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Segment one grey image.

    Args:
        model: maps float32 [B,1,S,S] to logits [B,C,S,S]; on `device`, in eval mode.
        image: float32 [H,W] in [0,1] (as `read_image` returns it).
        image_size: S, the side the model was trained on.

    Returns:
        uint8 [H,W] labels (argmax of the logits resized back to [H,W]).
    """
    device = torch.device(device)
    batch = torch.from_numpy(resize(image, image_size, "image"))[None, None].to(device)
    with torch.inference_mode():
        logits = model(batch).float().cpu()
    if logits.shape[-2:] != image.shape:
        # resize the scores, not the labels, so boundaries are smooth at the original size
        logits = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
    return logits[0].argmax(dim=0).numpy().astype(np.uint8)


def write_mask(path: Path, labels: np.ndarray) -> None:
    """Save [H,W] labels in {0,1} as an 8-bit grey PNG with 0 and 255 (the release's mask values)."""
    Image.fromarray((labels > 0).astype(np.uint8) * 255, mode="L").save(path, format="PNG")


def ground_truth_path(case: str, gt_dir: Path) -> Path | None:
    """The vessel mask of `case`: gt_dir/<case>.png (a folder of masks named by case), else, in a FIVES
    release folder, gt_dir/<release split>/Ground truth/<number>_<condition>.png."""
    direct = gt_dir / f"{case}{_SUFFIX}"
    if direct.is_file():
        return direct
    try:
        release_split, number, condition = parse_case(case)
    except ConfigError:
        return None
    path = gt_dir / release_split / MASK_DIR / f"{number}_{condition}{_SUFFIX}"
    return path if path.is_file() else None


def image_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Image-mode scores of one 2-D binary structure in pixels (see the module docstring)."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        nan = float("nan")
        return dict(dice=dice(pred, ref), jaccard=jaccard(pred, ref), hd95=nan, asd=nan)
    return peer_scores(pred, ref)


def _mean(values: pd.Series) -> float | None:
    value = values.mean(skipna=True)
    return None if value is None or math.isnan(value) else float(value)


def summarise(table: pd.DataFrame) -> dict:
    """Per mode: n_cases, per_class (vessel) means, mean (the same: one foreground class), n_missing;
    image mode adds empty_predictions and the per-image standard deviation of each metric."""
    summary: dict = {}
    for mode in MODES:
        rows = table[table["mode"] == mode]
        if rows.empty:
            continue
        sub = rows[rows["class"] == VESSEL]
        per_class = {VESSEL: {m: _mean(sub[m]) for m in METRICS}}
        entry = dict(n_cases=int(len(sub)) if mode == "image" else int(rows["n_images"].iloc[0]),
                     per_class=per_class, mean=dict(per_class[VESSEL]),
                     n_missing={VESSEL: {m: int(sub[m].isna().sum()) for m in METRICS}})  # fmt: skip
        if mode == "image":
            entry["std"] = {m: (float(sub[m].std(ddof=0)) if sub[m].notna().any() else None) for m in METRICS}
            entry["empty_predictions"] = {VESSEL: int(sub["empty_pred"].sum())}
        summary[mode] = entry
    return summary


_HEADINGS = {
    "image": "Per image ({n} test images, each scored on its own in 2-D; HD95 and ASD in pixels, an empty "
             "prediction's distances left out)",
    "stacked": "Stacked, the reference's mode ({n} test images scored as one volume; for comparison with "
               "the paper only: its HD95 and ASD measure distances across unrelated images)",
}  # fmt: skip
_COLUMNS = [("Dice (%)", "dice"), ("Jaccard (%)", "jaccard"), ("HD95 (px)", "hd95"), ("ASD (px)", "asd")]


def overlay_picks(volumes: pd.DataFrame, n: int) -> pd.DataFrame:
    """The test images the report's prediction figure shows: the first test image (in volumes.parquet
    order) of each condition in turn, so the same images every run and every condition before a second
    image of any; at most `n` rows."""
    test = volumes[volumes["split"] == "test"].copy()
    test["rank"] = test.groupby("condition", sort=False).cumcount()
    order = {c: i for i, c in enumerate(CONDITIONS)}
    test["order"] = test["condition"].map(order).fillna(len(order))
    return test.sort_values(["rank", "order"], kind="stable").head(n).drop(columns=["rank", "order"])


class FivesDataset(Dataset):
    """The FIVES release layout (`sraseg.data.fives`): one case per image."""

    name = "fives"
    classes = CLASSES
    suffix = _SUFFIX
    shape_word = "size"  # an image's rows x cols
    modes = MODES
    full_report = True
    # report members sraseg.datasets.base does not declare (its code is hashed by every ACDC stage):
    # prepared images are rows x cols, shown as they are
    transpose_for_display = False

    def cut(self, raw_dir: Path, splits: dict[str, list[str]], size: int) -> tuple[int, Iterator[Cut]]:
        def cases() -> Iterator[Cut]:
            problems: list[str] = []
            for split, rec, image, mask in iter_checked(Path(raw_dir).resolve(), splits, problems):
                if problems:
                    continue  # keep checking, but nothing is written once a problem is found
                yield Cut(split, rec, resize(image, size, "image")[None], resize(mask, size, "label")[None])
            if problems:
                raise_problems(problems)

        return sum(len(ids) for ids in splits.values()), cases()

    def rows(self, cut: Cut, first_slice_id: int, labeled: set[str], raw_dir: Path) -> tuple[list[dict], dict]:
        rec, split = cut.record, cut.split
        common = dict(case=rec.case, patient=rec.case, frame=0, phase="", split=split)
        extra = dict(condition=rec.condition, release_split=rec.release_split)
        slice_row = dict(slice_id=first_slice_id, **common, slice=0, labeled=split == "train" and rec.case in labeled,
                         **extra)  # fmt: skip
        volume_row = dict(**common, image_path=portable_path(rec.image_path, raw_dir),
                          gt_path=portable_path(rec.gt_path, raw_dir), nx=rec.shape[0], ny=rec.shape[1], nz=1,
                          sx=1.0, sy=1.0, sz=1.0, first_slice_id=first_slice_id, n_slices=1, **extra)  # fmt: skip
        return [slice_row], volume_row

    def counts(self, splits: dict[str, list[str]], labeled: list[str], slices: pd.DataFrame, volumes: pd.DataFrame) -> dict:
        """Cases per split, labeled cases, images per split and condition, labeled and total slices."""
        return dict(
            cases={name: len(ids) for name, ids in splits.items()},
            labeled_cases=len(labeled),
            conditions={name: {c: int(((slices.split == name) & (slices.condition == c)).sum()) for c in CONDITIONS}
                        for name in SPLITS},  # fmt: skip
            labeled_slices=int(slices.labeled.sum()),
            total_slices=int(len(slices)),
        )

    def describe(self, inputs: dict, labeled: list[str], counts: dict) -> dict:
        return dict(
            dataset="fives",
            **inputs,
            num_classes=len(CLASSES),
            classes=list(CLASSES),
            conditions=CONDITION_NAMES,
            grey="ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B), float32",
            normalisation="per-image min-max to [0,1]",
            image_interpolation="bilinear, align_corners=False, antialias=True",
            label_interpolation="nearest-exact",
            slice_axis="image rows, cols (no transpose)",
            labeled=labeled,
            counts=counts,
        )

    def prepared_line(self, counts: dict) -> str:
        cases = "/".join(str(counts["cases"][n]) for n in SPLITS)
        return f"FIVES images train/val/test {cases}, {counts['labeled_slices']} labeled"

    def check_model(self, weights: Path, meta: dict) -> None:
        if int(meta.get("num_classes", 2)) != len(CLASSES):
            raise WeightsError(f"{weights}: a {meta['num_classes']}-class model, not a FIVES (background, vessel) model")

    def read_input(self, path: Path):
        return read_image(path), None

    def expected_shape(self, row) -> tuple[int, ...]:
        return (int(row.nx), int(row.ny))

    def segment(self, model, image: np.ndarray, path: Path, image_size: int, device, batch_size: int) -> np.ndarray:
        return predict_image(model, image, image_size, device)

    def write_prediction(self, path: Path, labels: np.ndarray, reference) -> None:
        write_mask(path, labels)

    def ground_truth(self, pred_path: Path, case: str, gt_dir: Path) -> Path:
        gt_path = ground_truth_path(case, gt_dir)
        if gt_path is None:
            raise DatasetError(f"{pred_path}: no ground truth for case {case} in {gt_dir} (looked for "
                               f"{pred_path.name} and <split>/{MASK_DIR}/<number>_<condition>.png)")  # fmt: skip
        return gt_path

    def score(self, pairs: list[tuple[str, Path, Path]]) -> pd.DataFrame:
        rows, stack = [], None  # stack: the masks as [H,W,N] volumes, filled as they are read
        for index, (case, pred_path, gt_path) in enumerate(tqdm(pairs, desc="evaluate", unit="image")):
            pred, ref = read_mask(pred_path), read_mask(gt_path)
            if pred.shape != ref.shape:
                raise DatasetError(f"{pred_path}: prediction size {pred.shape} differs from ground truth {gt_path} size {ref.shape}")
            p, r = pred == 1, ref == 1
            rows.append(dict(case=case, **{"class": VESSEL}, mode="image", **image_scores(p, r), empty_pred=not p.any()))
            if index == 0:
                stack = [np.empty((*ref.shape, len(pairs)), dtype=bool) for _ in range(2)]
            if stack is not None and ref.shape != stack[1].shape[:2]:
                stack = None  # images of different sizes: no stacked mode
            if stack is not None:
                stack[0][..., index], stack[1][..., index] = p, r
        if stack is not None:
            # the stacked volume's distances with the feature transform alone (sraseg.stacked_scores)
            rows.append(dict(case="stacked", **{"class": VESSEL}, mode="stacked", **peer_scores_lean(*stack),
                             empty_pred=False, n_images=len(pairs)))  # fmt: skip
        else:
            log.warning("images of different sizes: the stacked (reference) mode is left out")
        return pd.DataFrame(rows)

    def summarise(self, table: pd.DataFrame) -> dict:
        return summarise(table)

    def summary_values(self, summary: dict, mode: str, path: Path) -> tuple[int, dict[str, float]] | None:
        """The mean of each metric over images: stems `<metric>` (dice, hd95); None for a stacked mode
        left out (images of different sizes)."""
        entry = summary.get(mode) if isinstance(summary, dict) else None
        if entry is None:
            if mode == "stacked":
                return None
            raise DatasetError(f"{path}: not a FIVES evaluate summary (no {mode!r} mode); rerun evaluate")
        return int(entry["n_cases"]), {m: np.nan if entry["mean"][m] is None else float(entry["mean"][m]) for m in METRICS}

    def report_title(self, results_dir: Path) -> str:
        return f"Results: {results_dir.name} (FIVES layout, vessel)"

    def seeds_line(self, seeds: list[int]) -> str:
        return f"Seeds: {', '.join(str(s) for s in seeds)} (mean ± std over seeds)."

    def report_tables(self, mode: str, n_cases: int) -> tuple[str, list]:
        return _HEADINGS[mode].format(n=n_cases), [(None, _COLUMNS)]

    def overlay_cases(self, results_dir: Path, experiments: list[str], seed: int, n: int = 4) -> list[tuple]:
        """What the report's prediction figure shows: `overlay_picks` of the prepared test images, each
        at its own size.

        Returns:
            [(title, image float32 [H,W] in [0,1] (grey, as predict reads it), truth bool [H,W],
            {experiment: its prediction bool [H,W], or None when results/<exp>/seed<seed>/predictions
            holds no <case>.png})].

        Raises:
            DatasetError: an unreadable image, mask or prediction, or a prediction of another size.
        """
        volumes = read_table(results_dir / "prepared" / "volumes.parquet", ("case", "split", "condition", "image_path",
                                                                            "gt_path"))  # fmt: skip
        cases = []
        for row in overlay_picks(volumes, n).itertuples():
            image, truth = read_image(row.image_path), read_mask(row.gt_path).astype(bool)
            predictions = {}
            for name in experiments:
                path = results_dir / name / f"seed{seed}" / "predictions" / f"{row.case}{_SUFFIX}"
                predictions[name] = read_mask(path).astype(bool) if path.is_file() else None
                if predictions[name] is not None and predictions[name].shape != truth.shape:
                    raise DatasetError(f"{path}: prediction size {predictions[name].shape} differs from the "
                                       f"ground truth {row.gt_path} size {truth.shape}")  # fmt: skip
            cases.append((f"{row.case} ({CONDITION_NAMES.get(row.condition, row.condition)})", image, truth, predictions))
        return cases


DATASET = FivesDataset()
