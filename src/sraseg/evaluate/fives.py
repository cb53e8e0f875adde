"""Predict and evaluate for 2-D datasets in the FIVES release layout (fundus PNGs, background and vessel).

The ACDC stages (`sraseg.evaluate.predict`, `sraseg.evaluate.run`) read and write NIfTI volumes; this
module is their 2-D counterpart, kept apart so the ACDC stages' code (and the workflow's code hashes
of them) stay as they are. It reuses the FIVES reader (`sraseg.data.fives`) and the metric
definitions (`sraseg.evaluate.metrics`), so an image is read, normalised and scored the same way.

predict, per image (as prepare reads it): BT.601 grey, per-image min-max to [0,1], resized to S x S
(bilinear, antialiased); logits of the U-Net resized back to the image's own rows x cols (bilinear,
align_corners=False, as for ACDC slices); argmax; written as an 8-bit grey PNG, 0 background and 255
vessel (the release's mask values), named `<case>.png` (workflow mode, case ids such as `test_1_A`)
or with the input's own name (folder mode, `sraseg predict -i FOLDER -o OUT -m RUN`).

evaluate, two modes (metrics_per_case.csv rows: case, class, mode, dice, jaccard, hd95, asd):
- `image` (the main report): every test image scored on its own in 2-D, in pixels, with the peer
  definitions of `sraseg.evaluate.metrics` (surface = mask minus its 4-connected erosion; HD95 the
  95th percentile of the pooled distances of both surfaces; ASD the mean distance from the
  prediction's surface to the reference's). An empty prediction (or reference) has Dice and
  Jaccard 0 and HD95/ASD missing (NaN, counted in n_missing, left out of the means), not 0.
- `stacked` (the peer mode, for comparison with the paper's number): all test images stacked into
  one [H,W,N] volume and scored once with `peer_scores` in 3-D, as the reference code does (its
  HD95/ASD measure distances across unrelated images and mean little; Dice and Jaccard are pooled
  over all pixels). Needs every image at the same size; otherwise this mode is left out.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sraseg.data.fives import CLASSES, parse_case, read_image, read_mask, resize
from sraseg.data.fives_phantom import MASK_DIR
from sraseg.device import pick_device
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.evaluate.metrics import METRICS, dice, jaccard, peer_scores
from sraseg.io import read_json, read_table, staged_outputs, write_json

__all__ = ["MODES", "predict_image", "write_mask", "predict_folder", "predict", "ground_truth_path", "run",
           "image_scores", "summarise", "evaluate"]  # fmt: skip

log = logging.getLogger(__name__)

MODES = ("image", "stacked")
VESSEL = CLASSES[1]
_SUFFIX = ".png"


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


def _load(model: Path | str, device: str) -> tuple[torch.nn.Module, int, torch.device, Path]:
    from sraseg.train.unet import load_model

    model = Path(model)
    weights = model / "model.safetensors" if model.is_dir() else model
    if not weights.is_file():
        raise WeightsError(f"{weights}: no trained model here (expected a results/<dataset>/<experiment>/seed<N> folder)")
    torch_device = pick_device(device)
    net, meta = load_model(weights, device=torch_device)
    if "image_size" not in meta:
        raise WeightsError(f"{weights}: model description has no image_size")
    if int(meta.get("num_classes", 2)) != len(CLASSES):
        raise WeightsError(f"{weights}: a {meta['num_classes']}-class model, not a FIVES (background, vessel) model")
    return net, int(meta["image_size"]), torch_device, weights


def predict_folder(input_path: Path | str, output_dir: Path | str, model: Path | str, device: str = "auto") -> list[str]:
    """Segment every `*.png` image in `input_path` (a folder or one file) into `output_dir/<same name>`.

    An unreadable image is named in one line and skipped (its output is not written); each output is
    written whole (temporary name, then a rename).

    Returns:
        the failure lines (empty when every image was written).

    Raises:
        DatasetError: no PNG to predict. ConfigError: the output folder is the input folder.
        WeightsError: no model, or not a 2-class model.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    if input_path.is_dir():
        inputs = sorted(p for p in input_path.iterdir() if p.is_file() and p.suffix.lower() == _SUFFIX
                        and not p.name.startswith("."))  # fmt: skip
    elif input_path.is_file() and input_path.suffix.lower() == _SUFFIX:
        inputs = [input_path]
    else:
        raise DatasetError(f"{input_path}: not a folder of .png images nor a .png file")
    if not inputs:
        raise DatasetError(f"{input_path}: no .png images to predict")
    if output_dir.resolve() == inputs[0].parent.resolve():
        raise ConfigError(f"{output_dir}: the output folder is the input folder; predictions would overwrite the images")
    net, image_size, torch_device, _ = _load(model, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d image(s) from %s at %d px on %s", len(inputs), input_path, image_size, torch_device)
    failed = []
    for src in tqdm(inputs, desc="predict", unit="image"):
        try:
            image = read_image(src)
        except DatasetError as err:
            log.error("%s", err)
            failed.append(str(err))
            continue
        tmp = output_dir / f".{src.stem}.tmp.png"
        write_mask(tmp, predict_image(net, image, image_size, torch_device))
        os.replace(tmp, output_dir / src.name)
    log.info("wrote %d mask(s) to %s; %d input(s) failed", len(inputs) - len(failed), output_dir, len(failed))
    return failed


def predict(model_path: Path | str, out_dir: Path | str, prepared_dir: Path | str | None = None, split: str = "test",
            input_path: Path | str | None = None, device: str = "auto") -> None:  # fmt: skip
    """`sraseg predict` for FIVES-layout data: a folder of PNGs (`input_path`, a failing image is named
    and skipped, exit 1 after the others) or, for the workflow, every case of `split` in the prepared
    volumes.parquet to out_dir/<case>.png, all or nothing.

    Raises:
        ConfigError: neither or both of input_path and prepared_dir; an unknown split.
        DatasetError: volumes.parquet missing or without the split; an unreadable image or one whose
            size differs from volumes.parquet; some inputs failed (folder mode).
        WeightsError: the model cannot be loaded or is not a 2-class model.
    """
    if (input_path is None) == (prepared_dir is None):
        raise ConfigError("predict takes either an input folder (-i/--input) or --prepared-dir with --split")
    if input_path is not None:
        failed = predict_folder(input_path, out_dir, model_path, device)
        if failed:
            raise DatasetError(f"{len(failed)} input(s) failed (named above); the others were written to {out_dir}")
        return
    if split not in ("train", "val", "test"):
        raise ConfigError(f"predict split must be one of train, val, test; got {split!r}")
    prepared_dir = Path(prepared_dir)
    volumes_path = prepared_dir / "volumes.parquet"
    volumes = read_table(volumes_path, ("case", "split", "image_path", "nx", "ny"), "run the prepare stage first")
    cases = volumes[volumes["split"] == split]
    if cases.empty:
        raise DatasetError(f"{volumes_path}: no cases in split {split!r}")
    prepare_json = prepared_dir / "prepare.json"
    if prepare_json.is_file() and read_json(prepare_json).get("dataset") != "fives":
        raise DatasetError(f"{prepare_json}: not a FIVES-layout prepared folder (dataset is not fives)")
    net, image_size, torch_device, _ = _load(model_path, device)
    log.info("predicting %d %s images at %d px on %s", len(cases), split, image_size, torch_device)
    with staged_outputs(out_dir) as st:
        for row in tqdm(list(cases.itertuples(index=False)), desc="predict", unit="image"):
            image = read_image(row.image_path)
            if image.shape != (int(row.nx), int(row.ny)):
                raise DatasetError(f"{row.image_path}: image size {image.shape} differs from volumes.parquet "
                                   f"{(int(row.nx), int(row.ny))}")  # fmt: skip
            write_mask(st.path(f"{row.case}{_SUFFIX}"), predict_image(net, image, image_size, torch_device))


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


def evaluate(pred_dir: Path | str, gt_dir: Path | str, out_dir: Path | str) -> dict:
    """`sraseg evaluate --dataset fives`: score pred_dir/<case>.png against the matching vessel mask.

    Writes out_dir/metrics_per_case.csv (case, class, mode, dice, jaccard, hd95, asd; one image row
    per case and one stacked row, case "stacked") and out_dir/summary.json (see `summarise`).

    Raises:
        DatasetError: no predictions, a case without ground truth, an unreadable mask, a size mismatch
            or mask values other than background/vessel (names the file).
    """
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"{pred_dir}: prediction folder does not exist")
    preds = sorted(p for p in pred_dir.iterdir() if p.suffix.lower() == _SUFFIX and not p.name.startswith("."))
    if not preds:
        raise DatasetError(f"{pred_dir}: no <case>{_SUFFIX} predictions found")
    if not gt_dir.is_dir():
        raise DatasetError(f"{gt_dir}: ground-truth folder does not exist")
    pairs = []
    for pred_path in preds:
        gt_path = ground_truth_path(pred_path.stem, gt_dir)
        if gt_path is None:
            raise DatasetError(f"{pred_path}: no ground truth for case {pred_path.stem} in {gt_dir} (looked for "
                               f"{pred_path.name} and <split>/{MASK_DIR}/<number>_<condition>.png)")  # fmt: skip
        pairs.append((pred_path.stem, pred_path, gt_path))
    rows, stack_pred, stack_ref = [], [], []
    for case, pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="image"):
        pred, ref = read_mask(pred_path), read_mask(gt_path)
        if pred.shape != ref.shape:
            raise DatasetError(f"{pred_path}: prediction size {pred.shape} differs from ground truth {gt_path} size {ref.shape}")
        p, r = pred == 1, ref == 1
        rows.append(dict(case=case, **{"class": VESSEL}, mode="image", **image_scores(p, r), empty_pred=not p.any()))
        stack_pred.append(p)
        stack_ref.append(r)
    if len({m.shape for m in stack_ref}) == 1:
        scores = peer_scores(np.stack(stack_pred, axis=-1), np.stack(stack_ref, axis=-1))
        rows.append(dict(case="stacked", **{"class": VESSEL}, mode="stacked", **scores, empty_pred=False,
                         n_images=len(stack_ref)))  # fmt: skip
    else:
        log.warning("images of different sizes: the stacked (reference) mode is left out")
    table = pd.DataFrame(rows)
    summary = summarise(table)
    with staged_outputs(out_dir) as st:
        table[["case", "class", "mode", *METRICS]].to_csv(st.path("metrics_per_case.csv"), index=False)
        write_json(st.path("summary.json"), summary)
    for mode, entry in summary.items():
        log.info("%s mode, %d images: %s", mode, entry["n_cases"], ", ".join(f"{m} {entry['mean'][m]}" for m in METRICS))
    return summary


def run(stage: str, **kwargs) -> None:
    """The command line's entry: `stage` "predict" (see `predict`) or "evaluate" (see `evaluate`)."""
    if stage == "predict":
        predict(**kwargs)
    elif stage == "evaluate":
        evaluate(**kwargs)
    else:
        raise ConfigError(f"unknown FIVES stage {stage!r} (predict or evaluate)")
