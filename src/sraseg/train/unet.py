"""The segmentation network: the 2-D U-Net of BCP / SRA-Seg, plus save and load.

Encoder levels have channels 16-32-64-128-256; each level is one block
Conv3x3-BN-LeakyReLU-Dropout-Conv3x3-BN-LeakyReLU (encoder dropout 0.05/0.1/0.2/0.3/0.5), with a 2x2
max-pool between levels. The decoder reduces channels with a 1x1 conv, upsamples bilinearly, concatenates
the skip and runs a block without dropout; a 3x3 conv gives the class logits. About 1.8 M parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sraseg.errors import WeightsError

__all__ = ["ConvBlock", "UNet", "build_unet", "save_model", "load_model", "model_meta_path"]

log = logging.getLogger(__name__)

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
DEFAULT_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    """Conv3x3-BN-LeakyReLU-Dropout-Conv3x3-BN-LeakyReLU, spatial size kept."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """1x1 conv to the skip's width, bilinear x2 upsampling, concat with the skip, ConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, skip_channels, 1)
        self.block = ConvBlock(2 * skip_channels, skip_channels, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.block(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """2-D U-Net returning class logits.

    Args:
        in_channels (`int`, 1): input channels (grey MRI).
        num_classes (`int`, 4): output classes (0 background, 1 RV, 2 MYO, 3 LV).
        channels (`Sequence[int]`, 16-32-64-128-256): width of each encoder level.
        dropout (`Sequence[float]`, 0.05/0.1/0.2/0.3/0.5): dropout of each encoder level's block.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        dropout: Sequence[float] = DEFAULT_DROPOUT,
    ):
        super().__init__()
        if len(channels) != len(dropout) or len(channels) < 2:
            raise ValueError(f"channels {list(channels)} and dropout {list(dropout)} need the same length >= 2")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.channels, self.dropout = [int(c) for c in channels], [float(d) for d in dropout]
        widths = [in_channels, *self.channels]
        self.encoder = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], self.dropout[i]) for i in range(len(channels)))
        self.decoder = nn.ModuleList(
            UpBlock(self.channels[i], self.channels[i - 1]) for i in range(len(channels) - 1, 0, -1)
        )
        self.head = nn.Conv2d(self.channels[0], num_classes, 3, padding=1)

    @property
    def feature_dim(self) -> int:
        """Width of the pooled bottleneck features returned by `encode`."""
        return self.channels[-1]

    def _encode_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i > 0 else x)
            levels.append(x)
        return levels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder only (no decoder pass): the global-average-pooled bottleneck.

        Args:
            x: float [B,in_channels,H,W], H and W divisible by 2**(levels-1).
        Returns:
            float [B,channels[-1]].
        """
        return self._encode_levels(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Args:
            x: float [B,in_channels,H,W] in [0,1].
            return_features: also return the pooled bottleneck [B,channels[-1]].
        Returns:
            logits float [B,num_classes,H,W], or (logits, features).
        """
        levels = self._encode_levels(x)
        y = levels[-1]
        for up, skip in zip(self.decoder, reversed(levels[:-1])):
            y = up(y, skip)
        logits = self.head(y)
        if return_features:
            return logits, levels[-1].mean(dim=(2, 3))
        return logits


def build_unet(meta: dict) -> UNet:
    """A fresh U-Net from a model.json dict (keys in_channels, num_classes, channels, dropout)."""
    return UNet(meta["in_channels"], meta["num_classes"], meta["channels"], meta["dropout"])


def model_meta_path(path: Path | str) -> Path:
    """The model.json that describes weights file `path` (same folder, same stem)."""
    return Path(path).with_suffix(".json")


def save_model(path: Path | str, model: UNet, meta: dict | None = None) -> None:
    """Write the weights as safetensors at `path` and a JSON description beside it (`model.json` for
    `model.safetensors`) with channels, dropout, in_channels, num_classes plus `meta` (image_size, method).
    """
    from safetensors.torch import save_file  # file tools imported on use: the network needs only torch

    from sraseg.io import write_json

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    description = dict(
        channels=model.channels, dropout=model.dropout, in_channels=model.in_channels, num_classes=model.num_classes
    )
    description.update(meta or {})
    write_json(model_meta_path(path), description)


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Rebuild a saved U-Net.

    Returns:
        (model in eval mode on `device`, meta dict from model.json).
    Raises:
        WeightsError: missing weights or model.json, or weights that do not fit the described net.
    """
    from safetensors.torch import load_file

    from sraseg.io import read_json

    path = Path(path)
    meta_path = model_meta_path(path)
    for needed in (path, meta_path):
        if not needed.is_file():
            raise WeightsError(f"{needed}: file not found")
    meta = read_json(meta_path)
    missing = [k for k in ("channels", "dropout", "in_channels", "num_classes") if k not in meta]
    if missing:
        raise WeightsError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    model = build_unet(meta)
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as err:
        message = " ".join(str(err).split())[:300]
        raise WeightsError(f"{path}: weights do not match the U-Net described in {meta_path.name}: {message}") from None
    return model.to(device).eval(), meta
