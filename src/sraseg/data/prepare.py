"""Prepare stage: check an ACDC-layout dataset and cut it into normalised, resized 2-D slices.

Axis convention (kept by every later stage): nibabel returns volumes as [X,Y,Z]; slice z is
`volume[:, :, z]`, an [X,Y] array whose first axis becomes the row axis of the prepared [S,S] slice
(no transpose, no flip). Each volume is min-max normalised to [0,1] over the whole volume, then every
slice is resized to S x S: images bilinear (`align_corners=False`, no antialiasing), labels
nearest-exact (the same pixel-centre convention). The predict stage resizes [S,S] predictions back
to [X,Y] with `volume_from_slices` and stacks them along Z in slice order.

Outputs (see the shared contracts): slices.parquet, images.npy float32 [N,S,S] in [0,1],
labels.npy uint8 [N,S,S] in {0,1,2,3}, volumes.parquet, prepare.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sraseg.data.acdc import check_dataset, load_case, read_split_list
from sraseg.errors import ConfigError, DatasetError
from sraseg.io import portable_path, staged_outputs, write_json

__all__ = ["SPLITS", "normalise", "slices_from_volume", "volume_from_slices", "run"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_MODES = {"image": "bilinear", "label": "nearest-exact"}


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


def _read_splits(splits_dir: Path, labeled_list: Path) -> tuple[dict[str, list[str]], list[str]]:
    splits = {name: read_split_list(splits_dir / f"{name}.txt") for name in SPLITS}
    labeled = read_split_list(labeled_list)
    outside = [pid for pid in labeled if pid not in set(splits["train"])]
    if outside:
        raise ConfigError(f"{labeled_list.resolve()}: labeled patients {outside} are not in {splits_dir / 'train.txt'}")
    return splits, labeled


def _write_slices(records: list, split_of: dict[str, str], labeled: set[str], size: int, images: np.ndarray,
                  labels: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Normalise and slice every volume into `images` and `labels` (slice ids in record order).

    Returns:
        the slices.parquet rows and the volumes.parquet rows.
    """
    slice_rows: list[dict] = []
    volume_rows: list[dict] = []
    start = 0
    for rec in tqdm(records, desc="prepare", unit="volume"):
        image, label, _, spacing = load_case(rec.image_path, rec.gt_path)
        nz = image.shape[2]
        images[start : start + nz] = slices_from_volume(normalise(image, rec.image_path), size, "image")
        labels[start : start + nz] = slices_from_volume(label, size, "label")
        split = split_of[rec.patient]
        for z in range(nz):
            slice_rows.append(
                dict(
                    slice_id=start + z,
                    case=rec.case,
                    patient=rec.patient,
                    frame=rec.frame,
                    phase=rec.phase,
                    slice=z,
                    split=split,
                    labeled=split == "train" and rec.patient in labeled,
                )
            )
        volume_rows.append(
            dict(
                case=rec.case,
                patient=rec.patient,
                frame=rec.frame,
                phase=rec.phase,
                split=split,
                image_path=str(rec.image_path),
                gt_path=str(rec.gt_path),
                nx=image.shape[0],
                ny=image.shape[1],
                nz=nz,
                sx=spacing[0],
                sy=spacing[1],
                sz=spacing[2],
                first_slice_id=start,
                n_slices=nz,
            )
        )
        start += nz
    return slice_rows, volume_rows


def _tables(slice_rows: list[dict], volume_rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """slices.parquet and volumes.parquet with their column types fixed."""
    slices = pd.DataFrame(slice_rows).astype(
        dict(
            slice_id="int64",
            frame="int64",
            slice="int64",
            labeled="bool",
            case=str,
            patient=str,
            phase=str,
            split=str,
        )
    )
    volumes = pd.DataFrame(volume_rows).astype(
        dict(frame="int64", nx="int64", ny="int64", nz="int64", first_slice_id="int64", n_slices="int64")
    )
    volumes = volumes.astype(dict(sx="float64", sy="float64", sz="float64"))
    return slices, volumes


def _counts(splits: dict[str, list[str]], labeled: list[str], slices: pd.DataFrame, volumes: pd.DataFrame) -> dict:
    """prepare.json's counts: patients, cases and slices per split, labeled patients and slices."""
    return dict(
        patients={name: len(ids) for name, ids in splits.items()},
        labeled_patients=len(labeled),
        cases={name: int((volumes.split == name).sum()) for name in SPLITS},
        slices={name: int((slices.split == name).sum()) for name in SPLITS},
        labeled_slices=int(slices.labeled.sum()),
        total_slices=int(len(slices)),
    )


def run(raw_dir: Path, splits_dir: Path, labeled_list: Path, image_size: int, out_dir: Path) -> None:
    """Check the dataset, normalise and slice every case of every split; all or nothing.

    Args:
        raw_dir: ACDC-layout folder; splits_dir: folder with train.txt, val.txt, test.txt;
        labeled_list: file of labeled training patients (a subset of train);
        image_size: S, the side of the prepared slices (> 0); out_dir: the prepared folder.

    Raises:
        ConfigError: bad split lists, labeled patients outside train, image_size < 1.
        DatasetError: any problem of the dataset (one line naming each file).
    """
    raw_dir, splits_dir, labeled_list, out_dir = Path(raw_dir), Path(splits_dir), Path(labeled_list), Path(out_dir)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"prepare image_size must be a positive integer; got {image_size!r}")
    splits, labeled = _read_splits(splits_dir, labeled_list)
    records = check_dataset(raw_dir, splits)
    split_of = {pid: name for name, ids in splits.items() for pid in ids}
    n_slices = sum(r.shape[2] for r in records)
    size = image_size

    with staged_outputs(out_dir) as st:
        # Written straight to disk: the full ACDC set at 256 px is about 0.5 GB of float32.
        images = np.lib.format.open_memmap(
            st.path("images.npy"), mode="w+", dtype=np.float32, shape=(n_slices, size, size)
        )
        labels = np.lib.format.open_memmap(
            st.path("labels.npy"), mode="w+", dtype=np.uint8, shape=(n_slices, size, size)
        )
        slice_rows, volume_rows = _write_slices(records, split_of, set(labeled), size, images, labels)
        for row in volume_rows:  # the files through raw_dir as written (the reader resolved it)
            row.update(image_path=portable_path(row["image_path"], raw_dir), gt_path=portable_path(row["gt_path"], raw_dir))
        images.flush()
        labels.flush()
        del images, labels

        slices, volumes = _tables(slice_rows, volume_rows)
        slices.to_parquet(st.path("slices.parquet"), index=False)
        volumes.to_parquet(st.path("volumes.parquet"), index=False)
        counts = _counts(splits, labeled, slices, volumes)
        # Settings at the top level (later stages read image_size from here), then the counts.
        write_json(
            st.path("prepare.json"),
            dict(
                raw_dir=portable_path(raw_dir),
                splits_dir=portable_path(splits_dir),
                labeled_list=portable_path(labeled_list),
                image_size=size,
                normalisation="per-volume min-max to [0,1]",
                image_interpolation="bilinear, align_corners=False",
                label_interpolation=_MODES["label"],
                slice_axis="volume[:, :, z] (nibabel [X,Y,Z])",
                labeled=labeled,
                counts=counts,
            ),
        )
    log.info(
        "prepared %s: patients train/val/test %d/%d/%d, %d slices (%s), %d labeled slices from %d patients",
        out_dir,
        *(counts["patients"][n] for n in SPLITS),
        counts["total_slices"],
        "/".join(str(counts["slices"][n]) for n in SPLITS),
        counts["labeled_slices"],
        len(labeled),
    )
