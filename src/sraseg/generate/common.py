"""Helpers shared by the generator's training and sampling stages: reading the prepared slices,
resizing image stacks, and building the diffusers UNet from a few settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from sraseg.errors import ConfigError, DatasetError
from sraseg.io import load_array, read_json, read_table

__all__ = [
    "read_slices",
    "open_images",
    "prepared_image_size",
    "resize_stack",
    "check_resolution",
    "build_unet",
    "norm_groups",
]


def read_slices(prepared_dir: Path) -> pd.DataFrame:
    """The prepared dir's slices.parquet.

    Raises:
        DatasetError: the file is missing, unreadable or lacks the split/labeled columns.
    """
    path = Path(prepared_dir) / "slices.parquet"
    return read_table(path, ("slice_id", "split", "labeled"), hint="run the prepare stage first")


def open_images(prepared_dir: Path, n_rows: int) -> np.ndarray:
    """images.npy memory-mapped (float32 [N,S,S] in [0,1]); only the rows a caller indexes are read.

    Raises:
        DatasetError: the file is missing, unreadable, not [N,S,S], or N differs from slices.parquet.
    """
    path = Path(prepared_dir) / "images.npy"
    images = load_array(path, "run the prepare stage first")
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(f"{path}: expected shape [N,S,S], got {list(images.shape)}")
    if images.shape[0] != n_rows:
        raise DatasetError(f"{path}: {images.shape[0]} images but slices.parquet has {n_rows} rows")
    return images


def prepared_image_size(prepared_dir: Path) -> int:
    """The prepared slice size S: prepare.json's image_size, else the shape of images.npy."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "prepare.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        # top level or under "settings" (the prepare stage nests its resolved settings)
        size = meta.get("image_size", (meta.get("settings") or {}).get("image_size"))
        if isinstance(size, int) and size > 0:
            return size
    path = prepared_dir / "images.npy"
    if not path.is_file():
        raise DatasetError(f"{prepared_dir}: neither prepare.json (key image_size) nor images.npy found")
    return int(load_array(path).shape[-1])


def resize_stack(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a float stack [B,1,H,W] to [B,1,size,size]: area averaging down, bilinear up."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if size < images.shape[-1]:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def check_resolution(resolution: int, block_out_channels: list[int], where: str) -> None:
    """The UNet halves the image once per level but the last: the side must survive that.

    Raises:
        ConfigError: resolution < 8 or not divisible by 2**(levels-1); `where` names the key/file.
    """
    factor = 2 ** (len(block_out_channels) - 1)
    if resolution < 8 or resolution % factor:
        raise ConfigError(
            f"{where}: resolution {resolution} must be >= 8 and divisible by {factor} "
            f"(2**(len(block_out_channels)-1) with block_out_channels={list(block_out_channels)})"
        )


def norm_groups(block_out_channels: list[int]) -> int:
    """The largest GroupNorm group count <= 32 that divides every level's channel count."""
    common = math.gcd(*block_out_channels)
    return max(d for d in range(1, 33) if common % d == 0)


def build_unet(
    resolution: int,
    block_out_channels: list[int],
    layers_per_block: int,
    attention: bool,
    mid_attention: bool,
) -> UNet2DModel:
    """An unconditional 1-channel diffusers UNet2DModel.

    Args:
        resolution: side of the square input (already checked by `check_resolution`).
        block_out_channels: channels per level, finest first.
        layers_per_block: ResNet blocks per level.
        attention: self-attention blocks at the coarsest level of the encoder and decoder.
        mid_attention: self-attention in the bottleneck block (diffusers' default).
    """
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    deepest = block_out_channels[-1]
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_groups(block_out_channels),
        # heads of 8 channels where the width allows, else one head over all channels
        attention_head_dim=8 if deepest % 8 == 0 else deepest,
        add_attention=mid_attention,
    )
