"""Resume state: last.ckpt written atomically and read back with `weights_only=True`.

The checkpoint holds only tensors, dicts, lists, numbers, strings and None, so the safe unpickler can
read it; numpy and Python RNG states are converted to those types here.
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sraseg.errors import WeightsError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "restore_rng_state", "cpu_state", "fresh_state",
           "training_checkpoint", "restore_training"]


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """torch.save to a temporary name in the same folder, then os.replace: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint with the safe (weights_only) unpickler onto the CPU.

    Raises:
        WeightsError: the file cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: one line for the user
        raise WeightsError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a run draws from: torch (CPU and CUDA), numpy and Python globals, the run's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                   cached=float(cached)),
        python=dict(version=version, internal=list(internal), gauss_next=gauss_next),
        generator=generator.get_state(),
    )


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    generator.set_state(state["generator"])


def fresh_state() -> dict[str, Any]:
    """The loop's own state at step 0 (last.ckpt carries it): the phase reached, the best validation so
    far and its weights, the log table, the loss sums of the unfinished row and the training time."""
    return dict(step=0, phase="", best_dice=-1.0, best_iteration=0, best_state={}, log_rows=[], running={},
                running_count=0, seconds=0.0)


def training_checkpoint(ctx, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: dict[str, Any],
                        **job: Any) -> dict[str, Any]:
    """What last.ckpt holds: `job` (format, key, method, seed, settings), the loop state, the student,
    teacher and head weights, the optimizer, the fp16 gradient scaler ({} when disabled) and every RNG."""
    return dict(
        **job, **state, student=cpu_state(ctx.student), teacher=cpu_state(ctx.teacher) if ctx.teacher is not None else {},
        head=cpu_state(ctx.head) if ctx.head is not None else {}, optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(), rng=rng_state(ctx.generator),
    )  # fmt: skip


def restore_training(ckpt: dict[str, Any], ctx, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Go on from a `training_checkpoint`: the student, teacher, head, optimizer, gradient scaler and RNGs
    are loaded in place.

    Returns:
        the loop state it holds.
    """
    state = {k: ckpt[k] for k in fresh_state()}
    ctx.student.load_state_dict(ckpt["student"])
    if ckpt["teacher"]:
        ctx.teacher = copy.deepcopy(ctx.student).eval()
        ctx.teacher.load_state_dict(ckpt["teacher"])
    if ctx.head is not None:
        ctx.head.load_state_dict(ckpt["head"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # {} from a disabled (fp32, bf16) scaler or a checkpoint written before it was saved
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"], ctx.generator)
    return state
