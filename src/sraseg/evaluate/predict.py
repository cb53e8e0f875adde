"""The predict stage: segment whole volumes slice by slice with a trained U-Net and write NIfTI labels.

`sraseg predict -i IN -o OUT -m RUN_DIR` segments every *.nii.gz in IN (nnU-Net style); the
workflow's `--prepared-dir/--split` mode predicts a split of volumes.parquet. Both go through
`predict_paths`, so a volume is read, normalised and segmented the same way in either.

Per case (as the peers do): min-max normalise the original volume to [0,1]; resize every slice
`volume[:, :, z]` to S x S (bilinear, align_corners=False, as in prepare); predict logits in batches;
resize the logits back to the original [X,Y] bilinearly; argmax over classes; stack along Z.
The prediction keeps the input image's affine and voxel size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sraseg.data.acdc import read_nifti
from sraseg.data.prepare import normalise, slices_from_volume, volume_from_slices
from sraseg.device import pick_device
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.io import read_json, read_table, staged_outputs

__all__ = ["predict_volume", "load_image", "write_prediction", "model_weights", "predict_paths", "predict_folder", "run"]

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


def _image_size(meta: dict, model_path: Path, prepared_dir: Path | None) -> int:
    if "image_size" in meta:
        return int(meta["image_size"])
    prepare_json = prepared_dir / "prepare.json" if prepared_dir is not None else None
    prepared_size = read_json(prepare_json).get("image_size") if prepare_json and prepare_json.is_file() else None
    if prepared_size is not None:
        return int(prepared_size)
    raise WeightsError(f"{model_path}: model description has no image_size (nor has {prepare_json})")


def model_weights(model: Path | str) -> Path:
    """The weights file of a train-stage run: `model` itself, or `model`/model.safetensors for a run folder.

    Raises:
        WeightsError: neither exists.
    """
    model = Path(model)
    path = model / "model.safetensors" if model.is_dir() else model
    if not path.is_file():
        raise WeightsError(f"{path}: no trained model here (expected a results/<dataset>/<experiment>/seed<N> folder)")
    return path


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"predict batch_size must be a positive integer; got {batch_size!r}")


def predict_paths(
    model: torch.nn.Module,
    image_size: int,
    jobs: list[tuple[Path, Path, tuple[int, int, int] | None]],
    device: torch.device,
    batch_size: int = 16,
    keep_going: bool = False,
    progress: bool = True,
) -> list[str]:
    """The shared loop of both predict modes: read, normalise as prepare does, segment, write.

    Args:
        jobs: (input NIfTI, output path, expected [X,Y,Z] shape or None) per volume.
        keep_going: log a failing input in one line and go on (folder mode); otherwise raise.

    Returns:
        one line per input that failed (empty when all were written). 4-D inputs are skipped
        with a warning and do not count as failures.
    """
    failed = []
    for src, dst, expected in tqdm(jobs, desc="predict", unit="volume", disable=not progress):
        shape = _shape_of(src) if keep_going else ()
        if len(shape) > 3 and any(n > 1 for n in shape[3:]):
            # a cine series (ACDC's *_4d.nii.gz) is not a frame the model was trained on
            log.warning("%s: skipped, shape %s is a 4-D series, not a 3-D frame", src, shape)
            continue
        try:
            data, image = load_image(src)
            if expected is not None and data.shape != expected:
                raise DatasetError(f"{src}: image shape {data.shape} differs from volumes.parquet {expected}")
            labels = predict_volume(model, normalise(data, src), image_size, device, batch_size)
        except DatasetError as err:
            if not keep_going:
                raise
            log.error("%s", err)
            failed.append(str(err))
            continue
        write_prediction(dst, labels, image)
    return failed


def _shape_of(path: Path) -> tuple:
    """The shape in the NIfTI header, or () when the header cannot be read (load_image names why)."""
    import nibabel as nib

    try:
        return tuple(nib.load(str(path)).shape)
    except Exception:
        return ()


def predict_folder(
    input_path: Path | str, output_dir: Path | str, model: Path | str, batch_size: int = 16, device: str = "auto"
) -> list[str]:
    """Segment every `*.nii.gz` volume in `input_path` (a folder or one file) into `output_dir/<same name>`.

    Each output is written whole (temporary name, then a rename) as soon as its volume is done, so
    an unreadable input costs only its own output. Labels 0-3 in uint8, the input's affine and zooms.

    Returns:
        the failure lines (empty when every readable 3-D volume was written).

    Raises:
        DatasetError: `input_path` holds no .nii.gz file. WeightsError: no model in `model`.
    """
    from sraseg.train.unet import load_model

    _check_batch_size(batch_size)
    input_path, output_dir = Path(input_path), Path(output_dir)
    if input_path.is_dir():
        inputs = sorted(p for p in input_path.glob("*.nii.gz") if p.is_file())
    elif input_path.is_file() and input_path.name.endswith(".nii.gz"):
        inputs = [input_path]
    else:
        raise DatasetError(f"{input_path}: not a folder of .nii.gz volumes nor a .nii.gz file")
    if not inputs:
        raise DatasetError(f"{input_path}: no .nii.gz volumes to predict")
    if output_dir.resolve() == inputs[0].parent.resolve():
        raise ConfigError(f"{output_dir}: the output folder is the input folder; predictions would overwrite the images")
    weights = model_weights(model)
    torch_device = pick_device(device)
    net, meta = load_model(weights, device=torch_device)
    image_size = _image_size(meta, weights, None)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d volume(s) from %s at %d px on %s", len(inputs), input_path, image_size, torch_device)

    failed, written = [], 0
    # per-input lines go above the progress bar, each on its own line
    with logging_redirect_tqdm():
        for src in tqdm(inputs, desc="predict", unit="volume"):
            tmp = output_dir / f".{src.name[: -len('.nii.gz')]}.tmp.nii.gz"
            tmp.unlink(missing_ok=True)  # a leftover of a killed run must not be published
            failed += predict_paths(net, image_size, [(src, tmp, None)], torch_device, batch_size, True, progress=False)
            if tmp.exists():
                os.replace(tmp, output_dir / src.name)
                written += 1
    log.info("wrote %d prediction(s) to %s; %d input(s) failed", written, output_dir, len(failed))
    return failed


def run(
    model_path: Path | str,
    prepared_dir: Path | str | None = None,
    split: str = "test",
    out_dir: Path | str | None = None,
    batch_size: int = 16,
    input_path: Path | str | None = None,
    device: str = "auto",
) -> None:
    """Predict NIfTI volumes with a trained model.

    Two modes share `predict_paths`: with `input_path`, every .nii.gz there goes to out_dir/<same
    name> (a failing input is named and skipped); with `prepared_dir` (the workflow), every case of
    `split` in volumes.parquet goes to out_dir/<case>.nii.gz, all or nothing.

    Raises:
        ConfigError: batch_size < 1, an unknown split, or neither/both of input_path and prepared_dir.
        DatasetError: volumes.parquet missing or without cases of `split`; an image that is unreadable or
            whose shape differs from volumes.parquet (prepared mode); some inputs failed (folder mode,
            after the others were written).
        WeightsError: the model cannot be loaded.
    """
    from sraseg.train.unet import load_model

    if out_dir is None:
        raise ConfigError("predict needs an output folder (-o/--output)")
    if (input_path is None) == (prepared_dir is None):
        raise ConfigError("predict takes either an input folder (-i/--input) or --prepared-dir with --split")
    if input_path is not None:
        failed = predict_folder(input_path, out_dir, model_path, batch_size, device)
        if failed:
            raise DatasetError(f"{len(failed)} input(s) failed (named above); the others were written to {out_dir}")
        return

    model_path, prepared_dir, out_dir = model_weights(model_path), Path(prepared_dir), Path(out_dir)
    _check_batch_size(batch_size)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"predict split must be one of train, val, test; got {split!r}")
    volumes_path = prepared_dir / "volumes.parquet"
    volumes = read_table(volumes_path, ("case", "split", "image_path", "nx", "ny", "nz"), "run the prepare stage first")
    cases = volumes[volumes["split"] == split]
    if cases.empty:
        raise DatasetError(f"{volumes_path}: no cases in split {split!r}")

    torch_device = pick_device(device)
    model, meta = load_model(model_path, device=torch_device)
    image_size = _image_size(meta, model_path, prepared_dir)
    log.info("predicting %d %s cases at %d px on %s", len(cases), split, image_size, torch_device)

    with staged_outputs(out_dir) as st:
        jobs = [
            (Path(row.image_path), st.path(f"{row.case}.nii.gz"), (int(row.nx), int(row.ny), int(row.nz)))
            for row in cases.itertuples(index=False)
        ]
        predict_paths(model, image_size, jobs, torch_device, batch_size, keep_going=False)
