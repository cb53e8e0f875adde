"""The ACDC layout as a dataset: NIfTI volumes, 4 classes (background, RV, myocardium, LV), scored per
volume in peer and mm modes. The raw release is read and checked by `sraseg.data.acdc`.

Axis convention (kept by every later stage): nibabel returns volumes as [X,Y,Z]; slice z is
`volume[:, :, z]`, an [X,Y] array whose first axis becomes the row axis of the prepared [S,S] slice
(no transpose, no flip). Each volume is min-max normalised to [0,1] over the whole volume, then every
slice is resized to S x S: images bilinear (`align_corners=False`, no antialiasing), labels
nearest-exact (the same pixel-centre convention).

Predict, per case (as the peers do): normalise the original volume as prepare does; resize every
slice to S x S; predict logits in batches; resize the logits back to the original [X,Y] bilinearly;
argmax over classes; stack along Z. The prediction keeps the input image's affine and voxel size.

Evaluate: Dice, Jaccard, HD95 and ASD per class in peer and mm modes (`sraseg.metrics`);
spacing for mm mode comes from the ground truth's header.
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
from tqdm import tqdm

from sraseg.data.acdc import check_dataset, label_problem, load_case, read_nifti
from sraseg.datasets.base import Cut, Dataset
from sraseg.errors import DatasetError
from sraseg.io import portable_path
from sraseg.metrics import CLASS_NAMES, METRICS, MODES, score_case

__all__ = ["normalise", "slices_from_volume", "volume_from_slices", "predict_volume", "write_prediction",
           "find_ground_truth", "load_labels", "summarise", "AcdcDataset", "DATASET"]  # fmt: skip

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_MODES = {"image": "bilinear", "label": "nearest-exact"}
_SUFFIX = ".nii.gz"
REPORT_CLASSES = ("RV", "MYO", "LV", "mean")


def normalise(volume: np.ndarray, path: Path | str = "volume") -> np.ndarray:
    """Min-max normalise a whole volume to [0,1].

    Args:
        volume: any real array; path: named in the error.

    Returns:
        float32 array of the same shape in [0,1].

    Raises:
        DatasetError: the volume is constant (or not finite).
    """
    low, high = float(np.min(volume)), float(np.max(volume))
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        raise DatasetError(f"{path}: constant or non-finite intensities (min {low}, max {high}); cannot normalise")
    return ((volume.astype(np.float32) - low) / (high - low)).astype(np.float32)


def slices_from_volume(volume: np.ndarray, size: int, kind: str) -> np.ndarray:
    """Resize every slice `volume[:, :, z]` to size x size.

    Args:
        volume: [X,Y,Z] array; kind: "image" (bilinear) or "label" (nearest-exact).

    Returns:
        [Z,size,size]: float32 for images, uint8 for labels.
    """
    stack = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0), dtype=np.float32))[:, None]
    if kind == "image":
        out = F.interpolate(stack, size=(size, size), mode="bilinear", align_corners=False)
        return out[:, 0].clamp_(0.0, 1.0).numpy()
    out = F.interpolate(stack, size=(size, size), mode=_MODES["label"])
    return out[:, 0].round().numpy().astype(np.uint8)


def volume_from_slices(slices: np.ndarray, shape_xy: tuple[int, int], kind: str) -> np.ndarray:
    """Inverse of `slices_from_volume`: resize [Z,S,S] (or [Z,C,S,S] scores) back to [X,Y,Z] (or [C,X,Y,Z]).

    Args:
        slices: [Z,S,S] labels/images, or [Z,C,S,S] class scores; shape_xy: (nx, ny) of the NIfTI;
        kind: "image" (bilinear, also for scores/probabilities) or "label" (nearest-exact).
    """
    tensor = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[:, None]
    if kind == "image":
        out = F.interpolate(tensor, size=tuple(shape_xy), mode="bilinear", align_corners=False)
    else:
        out = F.interpolate(tensor, size=tuple(shape_xy), mode=_MODES["label"])
    out = out.numpy()
    if squeeze:
        out = np.moveaxis(out[:, 0], 0, 2)  # [X,Y,Z]
        return out.round().astype(np.uint8) if kind == "label" else out
    return np.moveaxis(out, 0, 3)  # [C,X,Y,Z]


def predict_volume(
    model: torch.nn.Module,
    volume: np.ndarray,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Segment one normalised volume slice by slice.

    Args:
        model: maps float32 [B,1,S,S] to logits [B,C,S,S]; already on `device`, in eval mode.
        volume: float32 [X,Y,Z] in [0,1].
        image_size: S, the side the model was trained on.
        device: where the model runs (fp32 everywhere: the published numbers come from here).
        batch_size: slices per forward pass.

    Returns:
        uint8 [X,Y,Z] labels (argmax of the logits resized back to [X,Y]).
    """
    device = torch.device(device)
    slices = slices_from_volume(volume, image_size, "image")  # [Z,S,S]
    logits = []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(slices[start : start + batch_size])[:, None].to(device)
            out = model(batch)
            logits.append(out.float().cpu())
    scores = torch.cat(logits).numpy()  # [Z,C,S,S]
    # Resize the logits, not the labels: bilinear scores give smooth boundaries at the original size.
    resized = volume_from_slices(scores, tuple(volume.shape[:2]), "image")  # [C,X,Y,Z]
    return resized.argmax(axis=0).astype(np.uint8)


def write_prediction(path: Path, labels: np.ndarray, reference) -> None:
    """Save uint8 labels [X,Y,Z] with the affine and voxel size of the `reference` nibabel image."""
    import nibabel as nib

    out = nib.Nifti1Image(labels.astype(np.uint8), reference.affine)
    out.header.set_zooms(tuple(reference.header.get_zooms()[:3]))
    # Keep the input's qform/sform codes so viewers place the labels exactly on the image.
    if hasattr(reference.header, "get_qform"):
        out.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
        out.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(path))


def find_ground_truth(case: str, gt_dir: Path) -> Path | None:
    """The ground-truth file of `case`: gt_dir/<case>_gt.nii.gz, else gt_dir/<case>.nii.gz, else (an
    ACDC release folder) gt_dir/<patient>/<case>_gt.nii.gz with patient = the part before the first "_"."""
    patient = case.split("_", 1)[0]
    for candidate in (
        gt_dir / f"{case}_gt{_SUFFIX}",
        gt_dir / f"{case}{_SUFFIX}",
        gt_dir / patient / f"{case}_gt{_SUFFIX}",
    ):
        if candidate.is_file():
            return candidate
    return None


def _open_header(path: Path):
    """Open a NIfTI lazily (header only); DatasetError naming the file if it cannot be read."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise DatasetError(f"{path}: cannot read NIfTI ({type(err).__name__}: {err})") from err


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape


def load_labels(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3-D label volume.

    Returns:
        (uint8 [X,Y,Z] labels in {0..3}, voxel spacing in mm (sx, sy, sz)).

    Raises:
        DatasetError: unreadable file, not 3-D, or label values outside {0,1,2,3}.
    """
    data, image = read_nifti(path)
    problem = label_problem(data)
    if problem:
        raise DatasetError(f"{path}: {problem}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data.astype(np.uint8), zooms  # type: ignore[return-value]


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def summarise(table: pd.DataFrame) -> dict:
    """Per mode: mean over cases per class and metric (NaN left out), the mean of those over the three
    classes, n_cases, and per class the number of cases where a metric was missing; mm mode adds the
    count of empty predictions per class."""
    summary: dict = {}
    classes = list(CLASS_NAMES.values())
    for mode in MODES:
        rows = table[table["mode"] == mode]
        per_class = {}
        for name in classes:
            sub = rows[rows["class"] == name]
            per_class[name] = {
                m: _nan_to_none(sub[m].mean(skipna=True)) if sub[m].notna().any() else None for m in METRICS
            }
        overall = {}
        for m in METRICS:
            means = [per_class[c][m] for c in classes if per_class[c][m] is not None]
            overall[m] = float(np.mean(means)) if means else None
        entry = dict(
            n_cases=int(rows["case"].nunique()),
            per_class=per_class,
            mean=overall,
            n_missing={c: {m: int(rows[rows["class"] == c][m].isna().sum()) for m in METRICS} for c in classes},
        )
        if mode == "mm":
            entry["empty_predictions"] = {c: int(rows[rows["class"] == c]["empty_pred"].sum()) for c in classes}
        summary[mode] = entry
    return summary


def _shape_of(path: Path) -> tuple:
    """The shape in the NIfTI header, or () when the header cannot be read (read_input names why)."""
    import nibabel as nib

    try:
        return tuple(nib.load(str(path)).shape)
    except Exception:
        return ()


class AcdcDataset(Dataset):
    """The ACDC release layout (`sraseg.data.acdc`): one case per ED/ES frame of a patient."""

    name = "acdc"
    classes = ("background", "RV", "MYO", "LV")
    split_unit = "patients"  # a split list names patients; each has an ED and an ES case
    unit = "volume"
    suffix = _SUFFIX
    full_report = True
    modes = MODES

    def cut(self, raw_dir: Path, splits: dict[str, list[str]], size: int) -> tuple[int, Iterator[Cut]]:
        records = check_dataset(raw_dir, splits)  # every problem raises here, before anything is written
        split_of = {pid: name for name, ids in splits.items() for pid in ids}

        def cases() -> Iterator[Cut]:
            for rec in tqdm(records, desc="prepare", unit="volume"):
                image, label, _, _ = load_case(rec.image_path, rec.gt_path)
                images = slices_from_volume(normalise(image, rec.image_path), size, "image")
                yield Cut(split_of[rec.patient], rec, images, slices_from_volume(label, size, "label"))

        return sum(r.shape[2] for r in records), cases()

    def rows(self, cut: Cut, first_slice_id: int, labeled: set[str], raw_dir: Path) -> tuple[list[dict], dict]:
        rec, split = cut.record, cut.split
        slice_rows = [
            dict(slice_id=first_slice_id + z, case=rec.case, patient=rec.patient, frame=rec.frame, phase=rec.phase,
                 slice=z, split=split, labeled=split == "train" and rec.patient in labeled)
            for z in range(len(cut.images))
        ]  # fmt: skip
        volume_row = dict(
            case=rec.case, patient=rec.patient, frame=rec.frame, phase=rec.phase, split=split,
            image_path=portable_path(rec.image_path, raw_dir), gt_path=portable_path(rec.gt_path, raw_dir),
            nx=rec.shape[0], ny=rec.shape[1], nz=rec.shape[2], sx=rec.spacing[0], sy=rec.spacing[1], sz=rec.spacing[2],
            first_slice_id=first_slice_id, n_slices=rec.shape[2],
        )  # fmt: skip
        return slice_rows, volume_row

    def counts(self, splits: dict[str, list[str]], labeled: list[str], slices: pd.DataFrame, volumes: pd.DataFrame) -> dict:
        """Patients, cases and slices per split, labeled patients and slices."""
        return dict(
            patients={name: len(ids) for name, ids in splits.items()},
            labeled_patients=len(labeled),
            cases={name: int((volumes.split == name).sum()) for name in SPLITS},
            slices={name: int((slices.split == name).sum()) for name in SPLITS},
            labeled_slices=int(slices.labeled.sum()),
            total_slices=int(len(slices)),
        )

    def describe(self, inputs: dict, labeled: list[str], counts: dict) -> dict:
        # settings at the top level (later stages read image_size from here), then the counts
        return dict(
            **inputs,
            normalisation="per-volume min-max to [0,1]",
            image_interpolation="bilinear, align_corners=False",
            label_interpolation=_MODES["label"],
            slice_axis="volume[:, :, z] (nibabel [X,Y,Z])",
            labeled=labeled,
            counts=counts,
        )

    def prepared_line(self, counts: dict) -> str:
        patients = "/".join(str(counts["patients"][n]) for n in SPLITS)
        slices = "/".join(str(counts["slices"][n]) for n in SPLITS)
        return (f"patients train/val/test {patients}, {counts['total_slices']} slices ({slices}), "
                f"{counts['labeled_slices']} labeled slices from {counts['labeled_patients']} patients")  # fmt: skip

    def skip_input(self, path: Path) -> str | None:
        shape = _shape_of(path)
        if len(shape) > 3 and any(n > 1 for n in shape[3:]):
            # a cine series (ACDC's *_4d.nii.gz) is not a frame the model was trained on
            return f"shape {shape} is a 4-D series, not a 3-D frame"
        return None

    def read_input(self, path: Path):
        """(float32 [X,Y,Z] raw intensities, the nibabel image for its affine and header)."""
        data, image = read_nifti(path)
        return np.asarray(data, dtype=np.float32), image

    def expected_shape(self, row) -> tuple[int, ...]:
        return (int(row.nx), int(row.ny), int(row.nz))

    def segment(self, model, image: np.ndarray, path: Path, image_size: int, device, batch_size: int) -> np.ndarray:
        return predict_volume(model, normalise(image, path), image_size, device, batch_size)

    def write_prediction(self, path: Path, labels: np.ndarray, reference) -> None:
        write_prediction(path, labels, reference)

    def ground_truth(self, pred_path: Path, case: str, gt_dir: Path) -> Path:
        gt_path = find_ground_truth(case, gt_dir)
        if gt_path is None:
            raise DatasetError(
                f"{pred_path}: no ground truth for case {case} in {gt_dir} "
                f"(looked for {case}_gt{_SUFFIX}, {case}{_SUFFIX}, {case.split('_', 1)[0]}/{case}_gt{_SUFFIX})"
            )
        return gt_path

    def score(self, pairs: list[tuple[str, Path, Path]]) -> pd.DataFrame:
        # headers first: a wrong shape or an unreadable file fails before any scoring
        for _case, pred_path, gt_path in pairs:
            pred_shape, gt_shape = (_spatial_shape(_open_header(p).shape) for p in (pred_path, gt_path))
            if pred_shape != gt_shape:
                raise DatasetError(
                    f"{pred_path}: prediction shape {pred_shape} differs from ground truth {gt_path} shape {gt_shape}"
                )
        rows = []
        for case, pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="case"):
            pred, pred_zooms = load_labels(pred_path)
            ref, spacing = load_labels(gt_path)
            if pred.shape != ref.shape:
                raise DatasetError(
                    f"{pred_path}: prediction shape {pred.shape} differs from ground truth {gt_path} shape {ref.shape}"
                )
            if not np.allclose(pred_zooms, spacing, rtol=1e-3):
                log.warning(
                    "%s: spacing %s differs from ground truth %s; using the ground truth's", pred_path, pred_zooms, spacing
                )
            for row in score_case(pred, ref, spacing):
                rows.append(dict(case=case, **{("class" if k == "cls" else k): v for k, v in row.items()}))
        return pd.DataFrame(rows)

    def summarise(self, table: pd.DataFrame) -> dict:
        return summarise(table)

    def summary_values(self, summary: dict, mode: str, path: Path) -> tuple[int, dict[str, float]]:
        """Per metric, each class and the mean over classes: stems `<metric>_<class>` (dice_RV, dice_mean)."""
        values = {}
        try:
            entry = summary[mode]
            for metric in METRICS:
                for cls in REPORT_CLASSES[:-1]:
                    values[f"{metric}_{cls}"] = entry["per_class"][cls][metric]
                values[f"{metric}_mean"] = entry["mean"][metric]
            return int(entry["n_cases"]), {key: (np.nan if v is None else float(v)) for key, v in values.items()}
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: not an evaluate summary (no usable {mode!r} metrics: {err!r}); rerun evaluate") from None

    def report_tables(self, mode: str, n_cases: int) -> tuple[str, list]:
        if mode == "peer":
            heading = f"Peer mode ({n_cases} test volumes; HD95/ASD in voxels, a missed class scores 0)"
        else:
            heading = f"mm mode ({n_cases} test volumes; HD95/ASSD in mm, an empty prediction is left out)"
        overall = [(name.upper() if name in ("hd95", "asd") else name.capitalize(), f"{name}_mean") for name in METRICS]
        per_class = [(f"Dice {c}", f"dice_{c}") for c in REPORT_CLASSES[:-1]]
        return heading, [("Dice and Jaccard in %, mean over RV, MYO and LV:", overall), ("Dice per class (%):", per_class)]


DATASET = AcdcDataset()
