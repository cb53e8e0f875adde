"""Device choice and mixed precision.

CUDA runs the networks' forward passes and losses under autocast: bf16 where the card computes it
natively (Ampere and newer), else fp16 with a gradient scaler. Everything else (augmentation,
validation, prediction, embedding) runs in fp32. The CPU runs everything in fp32, which keeps CPU runs
bit-reproducible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["pick_device", "autocast", "amp_dtype", "grad_scaler", "seed_everything", "NO_CUDA_FIX", "claim_gpu",
           "full_precision"]

log = logging.getLogger(__name__)

# What to do when torch sees no GPU on a machine that has one: the usual cause is a driver older than
# the CUDA build of the installed torch (the PyPI wheel is the CUDA 13 build, which needs driver 580+).
NO_CUDA_FIX = (
    "the installed torch {torch} (CUDA {cuda}) sees no CUDA device: check `nvidia-smi`; if the driver is "
    "older than torch's CUDA needs, install the CUDA 12 wheels (pip install torch==2.14.1 torchvision==0.29.1 "
    "--index-url https://download.pytorch.org/whl/cu126, docs/how-to/gpus.md), or set "
    "device: cpu in the config to run on the CPU on purpose"
)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` gives CUDA when available, else CPU (interactive use); `cpu`/`cuda` force one.

    Raises:
        ConfigError: an unknown name, or `cuda` when torch sees no CUDA device (one line naming the
            likely driver/CUDA mismatch and the fix).
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
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


def full_precision(device: torch.device | str):
    """fp32 inside an autocast region (for augmentation and blend maps); a no-op where autocast does not
    exist (e.g. the `meta` device the no-read-back test runs on)."""
    kind = torch.device(device).type
    if kind in ("cuda", "cpu"):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only where autocast runs in fp16 (bf16 and fp32 need none).

    A disabled scaler passes losses and steps through unchanged, so the loop can always use it.
    """
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def claim_gpu(count: int, lock_dir: Path | str | None = None, poll_s: float = 5.0) -> tuple[int, int] | None:
    """Claim one of `count` local GPUs for this process: the first whose lock file is free.

    The lock (fcntl, on lock_dir/gpu<i>.lock, machine-wide by default) is held by the returned file
    descriptor, stays held across exec and is released when the process ends, even if it is killed.
    Waits while all are taken. Returns (gpu index, lock fd), or None when count is 0.
    """
    import fcntl

    if count <= 0:
        return None
    lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"sraseg-gpu-slots-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu in range(count):
            fd = os.open(lock_dir / f"gpu{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return gpu, fd
        if not waited:
            log.warning("all %d GPUs are taken (locks in %s); waiting for one", count, lock_dir)
            waited = True
        time.sleep(poll_s)


def _run_on_one_gpu(argv: list[str]) -> None:
    """`python -m sraseg.device -- CMD ...`: run CMD with CUDA_VISIBLE_DEVICES set to one free local GPU.

    The local Snakemake profile runs up to `--resources gpu=N` GPU jobs at once; each claims its own
    card here. A CUDA_VISIBLE_DEVICES already set (by SLURM, or by hand) is kept as it is, and on a
    machine where torch sees no GPU the command runs unchanged (it then fails in one line if it asked
    for cuda).
    """
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m sraseg.device -- COMMAND [ARGS...]")
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        claimed = claim_gpu(torch.cuda.device_count())
        if claimed is not None:
            gpu, fd = claimed
            os.set_inheritable(fd, True)  # the lock lives as long as the command
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
            print(f"sraseg.device: running on GPU {gpu}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _run_on_one_gpu(sys.argv[1:])
