"""Device choice and mixed precision.

CUDA runs the networks' forward passes and losses under autocast: bf16 where the card computes it
natively (Ampere and newer), else fp16 with a gradient scaler. Everything else (augmentation,
validation, prediction, embedding) runs in fp32. The CPU runs everything in fp32, which keeps CPU runs
bit-reproducible.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["pick_device", "autocast", "amp_dtype", "grad_scaler", "seed_everything", "NO_CUDA_FIX"]

# What to do when torch sees no GPU on a machine that has one: the usual cause is a driver older than
# the CUDA build of the installed torch (the PyPI wheel is the CUDA 13 build, which needs driver 580+).
NO_CUDA_FIX = (
    "the installed torch {torch} (CUDA {cuda}) sees no CUDA device: check `nvidia-smi`; if the driver is "
    "older than torch's CUDA needs, install the CUDA 12 wheels (pip install torch==2.14.1 torchvision==0.29.1 "
    "--index-url https://download.pytorch.org/whl/cu126, README 'GPUs and other CUDA versions'), or set "
    "device: cpu in the config to run on the CPU on purpose"
)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` gives CUDA when available, else CPU (interactive use); `cpu`/`cuda` force one.

    Raises:
        ConfigError: an unknown name, or `cuda` when torch sees no CUDA device (one line naming the
            likely driver/CUDA mismatch and the fix).
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested not in ("cpu", "cuda"):
        from sraseg.errors import ConfigError

        raise ConfigError(f"device must be one of auto, cpu, cuda; got {requested!r}")
    if requested == "cuda":
        if not torch.cuda.is_available():
            from sraseg.errors import ConfigError

            raise ConfigError(NO_CUDA_FIX.format(torch=torch.__version__, cuda=torch.version.cuda or "none"))
        # fixed shapes throughout training and prediction: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    return torch.device(requested)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`: bf16 on cards with native bf16, fp16 on older CUDA cards, None
    (fp32, no autocast) on the CPU."""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device):
    """Mixed precision for the networks' forward and the loss only; a no-op context on the CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only where autocast runs in fp16 (bf16 and fp32 need none).

    A disabled scaler passes losses and steps through unchanged, so the loop can always use it.
    """
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
