"""Device choice and mixed precision: CUDA when present (bf16 autocast), else the CPU in fp32."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["pick_device", "autocast", "seed_everything"]


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` gives CUDA when available, else CPU; `cpu`/`cuda` force one."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        from sraseg.errors import ConfigError

        raise ConfigError(f"device must be one of auto, cpu, cuda; got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        from sraseg.errors import ConfigError

        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(requested)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on the CPU (fp32 keeps CPU runs bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
