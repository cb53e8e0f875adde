"""The predict stage: segment images with a trained U-Net and write the dataset's prediction files.

Written once for every dataset: the dataset (`sraseg.datasets`, picked by `--dataset`) says how an
input is read, segmented (as prepare cut it) and written (ACDC: NIfTI volumes slice by slice, labels
with the input's affine; FIVES: fundus PNGs, PNG masks 0/255 at the input's size).

`sraseg predict -i IN -o OUT -m RUN_DIR` segments every input file in IN (nnU-Net style); the
workflow's `--prepared-dir/--split` mode predicts a split of volumes.parquet to OUT/<case><suffix>.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sraseg.datasets import get_dataset
from sraseg.device import pick_device
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.io import read_json, read_table, staged_outputs

__all__ = ["model_weights", "load_for", "predict_folder", "run"]

log = logging.getLogger(__name__)

def _image_size(meta: dict, model_path: Path, prepared_dir: Path | None) -> int:
    if "image_size" in meta:
        return int(meta["image_size"])
    prepare_json = prepared_dir / "prepare.json" if prepared_dir is not None else None
    prepared_size = read_json(prepare_json).get("image_size") if prepare_json and prepare_json.is_file() else None
    if prepared_size is not None:
        return int(prepared_size)
    where = f" (nor has {prepare_json})" if prepare_json is not None else ""
    raise WeightsError(f"{model_path}: model description has no image_size{where}")


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



def load_for(data, model: Path | str, device: str, prepared_dir: Path | None = None):
    """The model of a train-stage run, checked for the dataset `data`.

    Returns:
        (the network in eval mode on the device, S the side it was trained on, the torch device).

    Raises:
        WeightsError: no model, no image_size (in the model nor in prepared_dir/prepare.json), or a
            model the dataset refuses (FIVES: not 2 classes).
    """
    from sraseg.train.unet import load_model

    weights = model_weights(model)
    torch_device = pick_device(device)
    net, meta = load_model(weights, device=torch_device)
    image_size = _image_size(meta, weights, prepared_dir)
    data.check_model(weights, meta)
    return net, image_size, torch_device


def _inputs(data, input_path: Path) -> list[Path]:
    """The files to predict: `input_path` itself, or its files with the dataset's suffix (hidden ones left out)."""
    suffix = data.suffix
    if input_path.is_dir():
        inputs = sorted(p for p in input_path.iterdir() if p.is_file() and p.name.lower().endswith(suffix)
                        and not p.name.startswith("."))  # fmt: skip
    elif input_path.is_file() and input_path.name.lower().endswith(suffix):
        inputs = [input_path]
    else:
        raise DatasetError(f"{input_path}: not a folder of {suffix} {data.unit}s nor a {suffix} file")
    if not inputs:
        raise DatasetError(f"{input_path}: no {suffix} {data.unit}s to predict")
    return inputs


def predict_folder(input_path: Path | str, output_dir: Path | str, model: Path | str, batch_size: int = 16,
                   device: str = "auto", dataset: str = "acdc") -> list[str]:  # fmt: skip
    """Segment every input of the dataset's kind in `input_path` (a folder or one file) into `output_dir/<same name>`.

    Each output is written whole (temporary name, then a rename) as soon as its input is done, so an
    unreadable input costs only its own output; one the dataset skips (ACDC: a 4-D series) is logged.

    Returns:
        the failure lines (empty when every input was written or skipped).

    Raises:
        DatasetError: `input_path` holds no input. ConfigError: the output folder is the input folder.
        WeightsError: no model in `model`, or one the dataset refuses.
    """
    data = get_dataset(dataset)
    _check_batch_size(batch_size)
    input_path, output_dir = Path(input_path), Path(output_dir)
    inputs = _inputs(data, input_path)
    if output_dir.resolve() == inputs[0].parent.resolve():
        raise ConfigError(f"{output_dir}: the output folder is the input folder; predictions would overwrite the images")
    net, image_size, torch_device = load_for(data, model, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("predicting %d %s(s) from %s at %d px on %s", len(inputs), data.unit, input_path, image_size, torch_device)

    failed, written = [], 0
    # per-input lines go above the progress bar, each on its own line
    with logging_redirect_tqdm():
        for src in tqdm(inputs, desc="predict", unit=data.unit):
            skipped = data.skip_input(src)
            if skipped:
                log.warning("%s: skipped, %s", src, skipped)
                continue
            try:
                image, reference = data.read_input(src)
                labels = data.segment(net, image, src, image_size, torch_device, batch_size)
            except DatasetError as err:
                log.error("%s", err)
                failed.append(str(err))
                continue
            tmp = output_dir / f".{src.name[: -len(data.suffix)]}.tmp{data.suffix}"
            tmp.unlink(missing_ok=True)  # a leftover of a killed run must not be published
            data.write_prediction(tmp, labels, reference)
            os.replace(tmp, output_dir / src.name)
            written += 1
    log.info("wrote %d prediction(s) to %s; %d input(s) failed", written, output_dir, len(failed))
    return failed


def _check_prepared(data, prepared_dir: Path) -> None:
    """A prepared folder of another dataset is refused (prepare.json's `dataset`; ACDC's predates the key)."""
    prepare_json = prepared_dir / "prepare.json"
    if prepare_json.is_file() and read_json(prepare_json).get("dataset", "acdc") != data.name:
        raise DatasetError(f"{prepare_json}: not a {data.title}-layout prepared folder (dataset is not {data.name})")


def run(
    model_path: Path | str,
    prepared_dir: Path | str | None = None,
    split: str = "test",
    out_dir: Path | str | None = None,
    batch_size: int = 16,
    input_path: Path | str | None = None,
    device: str = "auto",
    dataset: str = "acdc",
) -> None:
    """Predict with a trained model.

    Two modes: with `input_path`, every input there goes to out_dir/<same name> (a failing input is
    named and skipped); with `prepared_dir` (the workflow), every case of `split` in volumes.parquet
    goes to out_dir/<case><suffix>, all or nothing.

    Raises:
        ConfigError: batch_size < 1, an unknown split or dataset, or neither/both of input_path and prepared_dir.
        DatasetError: volumes.parquet missing or without cases of `split`; a prepared folder of another
            dataset; an image that is unreadable or whose shape differs from volumes.parquet (prepared
            mode); some inputs failed (folder mode, after the others were written).
        WeightsError: the model cannot be loaded, or the dataset refuses it.
    """
    if out_dir is None:
        raise ConfigError("predict needs an output folder (-o/--output)")
    if (input_path is None) == (prepared_dir is None):
        raise ConfigError("predict takes either an input folder (-i/--input) or --prepared-dir with --split")
    if input_path is not None:
        failed = predict_folder(input_path, out_dir, model_path, batch_size, device, dataset)
        if failed:
            raise DatasetError(f"{len(failed)} input(s) failed (named above); the others were written to {out_dir}")
        return

    data = get_dataset(dataset)
    model_path, prepared_dir, out_dir = model_weights(model_path), Path(prepared_dir), Path(out_dir)
    _check_batch_size(batch_size)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"predict split must be one of train, val, test; got {split!r}")
    volumes_path = prepared_dir / "volumes.parquet"
    volumes = read_table(volumes_path, ("case", "split", "image_path", "nx", "ny", "nz"), "run the prepare stage first")
    cases = volumes[volumes["split"] == split]
    if cases.empty:
        raise DatasetError(f"{volumes_path}: no cases in split {split!r}")
    _check_prepared(data, prepared_dir)

    model, image_size, torch_device = load_for(data, model_path, device, prepared_dir)
    log.info("predicting %d %s cases at %d px on %s", len(cases), split, image_size, torch_device)
    with staged_outputs(out_dir) as st:
        for row in tqdm(list(cases.itertuples(index=False)), desc="predict", unit=data.unit):
            src = Path(row.image_path)
            image, reference = data.read_input(src)
            expected = data.expected_shape(row)
            if image.shape != expected:
                raise DatasetError(f"{src}: image {data.shape_word} {image.shape} differs from volumes.parquet {expected}")
            labels = data.segment(model, image, src, image_size, torch_device, batch_size)
            data.write_prediction(st.path(f"{row.case}{data.suffix}"), labels, reference)
