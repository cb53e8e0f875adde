"""The predict stage: segment whole volumes slice by slice with a trained U-Net and write NIfTI labels.

Per case (as the peers do): min-max normalise the original volume to [0,1]; resize every slice
`volume[:, :, z]` to S x S (bilinear, align_corners=False, as in prepare); predict logits in batches;
resize the logits back to the original [X,Y] bilinearly; argmax over classes; stack along Z.
The prediction keeps the input image's affine and voxel size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sraseg.data.acdc import read_nifti
from sraseg.data.prepare import normalise, slices_from_volume, volume_from_slices
from sraseg.device import pick_device
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.io import read_json, read_table, staged_outputs

__all__ = ["predict_volume", "load_image", "write_prediction", "run"]

log = logging.getLogger(__name__)


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


def load_image(path: Path | str):
    """Read an image NIfTI (checked by the dataset reader).

    Returns:
        (float32 [X,Y,Z] raw intensities, the nibabel image for its affine and header).

    Raises:
        DatasetError: missing, unreadable, truncated or not 3-D.
    """
    data, image = read_nifti(path)
    return np.asarray(data, dtype=np.float32), image


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


def _image_size(meta: dict, model_path: Path, prepared_dir: Path) -> int:
    if "image_size" in meta:
        return int(meta["image_size"])
    prepare_json = prepared_dir / "prepare.json"
    prepared_size = read_json(prepare_json).get("image_size") if prepare_json.is_file() else None
    if prepared_size is not None:
        return int(prepared_size)
    raise WeightsError(f"{model_path}: model description has no image_size (nor has {prepare_json})")


def run(
    model_path: Path | str, prepared_dir: Path | str, split: str, out_dir: Path | str, batch_size: int = 16,
    device: str = "auto",
) -> None:
    """Predict every case of `split` in prepared_dir/volumes.parquet into out_dir/<case>.nii.gz.

    Raises:
        ConfigError: batch_size < 1 or an unknown split.
        DatasetError: volumes.parquet missing or without cases of `split`; an image that is unreadable or
            whose shape differs from volumes.parquet.
        WeightsError: the model cannot be loaded.
    """
    from sraseg.train.unet import load_model

    model_path, prepared_dir, out_dir = Path(model_path), Path(prepared_dir), Path(out_dir)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"predict batch_size must be a positive integer; got {batch_size!r}")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"predict split must be one of train, val, test; got {split!r}")
    volumes_path = prepared_dir / "volumes.parquet"
    volumes = read_table(volumes_path, ("case", "split", "image_path", "nx", "ny", "nz"), "run the prepare stage first")
    cases = volumes[volumes["split"] == split]
    if cases.empty:
        raise DatasetError(f"{volumes_path}: no cases in split {split!r}")

    device = pick_device(device)
    model, meta = load_model(model_path, device=device)
    image_size = _image_size(meta, model_path, prepared_dir)
    log.info("predicting %d %s cases at %d px on %s", len(cases), split, image_size, device)

    with staged_outputs(out_dir) as st:
        for row in tqdm(cases.itertuples(index=False), total=len(cases), desc="predict", unit="case"):
            data, image = load_image(row.image_path)
            expected = (int(row.nx), int(row.ny), int(row.nz))
            if data.shape != expected:
                raise DatasetError(f"{row.image_path}: image shape {data.shape} differs from {volumes_path} {expected}")
            labels = predict_volume(model, normalise(data, row.image_path), image_size, device, batch_size)
            write_prediction(st.path(f"{row.case}.nii.gz"), labels, image)
