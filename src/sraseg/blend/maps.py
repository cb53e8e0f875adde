"""Blend maps: the BCP copy-paste mask, hard or with a soft edge.

A blend map `a` is float32 [B,1,H,W] in [0,1]: 1 keeps the first image of a pair, 0 takes the
second. Mixing (SRA-Seg, after BCP): x = a * x_first + (1 - a) * x_second, and the same for labels,
so a soft edge gives a continuous label.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sraseg.device import full_precision
from sraseg.errors import ConfigError

__all__ = ["KERNELS", "hole_size", "box_masks", "box_masks_at", "smoothing_kernel", "soften", "make_blend_maps",
           "render_blend_maps", "mix"]

KERNELS = ("gaussian", "box", "hard")


def hole_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """(rows, columns) of the BCP hole: round(ratio*H) x round(ratio*W), at least 1 x 1."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"blend ratio must lie in (0, 1); got {ratio}")
    return max(1, round(ratio * height)), max(1, round(ratio * width))


def box_masks_at(tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int, hole: tuple[int, int]) -> torch.Tensor:
    """BCP masks with their holes at given corners, built on the corners' device (no host work, no read-back).

    Args:
        tops, lefts: integer [count] (or [count,1]) top-left corners of the holes, inside the image.
        hole: (rows, columns) of the hole.
    Returns:
        float32 [count,1,H,W]: 0 inside each hole, 1 elsewhere.
    """
    tops, lefts = tops.reshape(-1, 1), lefts.reshape(-1, 1)
    rows, cols = torch.arange(height, device=tops.device), torch.arange(width, device=tops.device)
    in_rows = (rows >= tops) & (rows < tops + hole[0])  # [count,H]
    in_cols = (cols >= lefts) & (cols < lefts + hole[1])  # [count,W]
    return (~(in_rows[:, :, None] & in_cols[:, None, :])).float()[:, None]


def box_masks(
    count: int, height: int, width: int, ratio: float, rng: np.random.Generator | torch.Generator
) -> torch.Tensor:
    """BCP masks: all ones with one zero rectangle of round(ratio*H) x round(ratio*W) at a random
    position fully inside the image.

    Args:
        rng: a numpy generator (masks built on the CPU), or a torch generator: positions drawn from it
            and masks built on its device, without any host work per mask.
    Returns:
        float32 [count,1,H,W] with values in {0, 1}.
    """
    hole_h, hole_w = hole_size(height, width, ratio)
    if isinstance(rng, torch.Generator):
        device = rng.device
        tops = torch.randint(0, height - hole_h + 1, (count, 1), generator=rng, device=device)
        lefts = torch.randint(0, width - hole_w + 1, (count, 1), generator=rng, device=device)
        return box_masks_at(tops, lefts, height, width, (hole_h, hole_w))
    masks = torch.ones(count, 1, height, width)
    tops = rng.integers(0, height - hole_h + 1, size=count)
    lefts = rng.integers(0, width - hole_w + 1, size=count)
    for i, (top, left) in enumerate(zip(tops, lefts)):
        masks[i, 0, top : top + hole_h, left : left + hole_w] = 0.0
    return masks


def smoothing_kernel(kind: str, size: int, sigma: float, device: torch.device | str | None = None) -> torch.Tensor:
    """A normalised 2-D kernel [size,size]: a Gaussian of std `sigma`, or a box (`sigma` unused)."""
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"blend kernel_size must be a positive odd number; got {size}")
    if kind == "gaussian":
        if sigma <= 0:
            raise ConfigError(f"blend sigma must be > 0 for the gaussian kernel; got {sigma}")
        # built on the target device: no host-to-device copy per call
        offsets = torch.arange(size, dtype=torch.float64, device=device) - size // 2
        profile = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = torch.outer(profile, profile)
    elif kind == "box":
        kernel = torch.ones(size, size, dtype=torch.float64, device=device)
    else:
        raise ConfigError(f"smoothing kernel must be 'gaussian' or 'box'; got {kind!r}")
    return (kernel / kernel.sum()).float()


def soften(masks: torch.Tensor, kind: str, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Smooth hard masks [B,1,H,W] into soft blend maps.

    1. Pad by reflection (the reference pads with zeros, which wrongly darkens the image border).
    2. Convolve the mask and its complement (the hole) with the normalised kernel.
    3. Where no hole pixel is within reach the map is exactly 1, where no kept pixel is within
       reach exactly 0; floating-point kernel sums would otherwise leave 1 - 1e-7.
    """
    if kind not in KERNELS:
        raise ConfigError(f"blend kernel must be one of {', '.join(KERNELS)}; got {kind!r}")
    if kind == "hard":
        return masks.clone()
    kernel = smoothing_kernel(kind, size, sigma, masks.device).to(masks.dtype)[None, None]
    pad = size // 2
    both = torch.cat([masks, 1.0 - masks], dim=0)
    with full_precision(masks.device):  # maps in fp32 also inside a training step
        smoothed = F.conv2d(F.pad(both, (pad, pad, pad, pad), mode="reflect"), kernel)
    soft, hole_reach = smoothed[: len(masks)], smoothed[len(masks) :]
    soft = torch.where(hole_reach == 0, torch.ones_like(soft), soft)
    return soft.clamp_(0.0, 1.0)


def make_blend_maps(
    count: int,
    height: int,
    width: int,
    rng: np.random.Generator | torch.Generator,
    kind: str = "gaussian",
    size: int = 5,
    sigma: float = 1.0,
    ratio: float = 2 / 3,
) -> torch.Tensor:
    """`count` fresh blend maps, float32 [count,1,H,W] in [0,1]; on the torch generator's device when
    `rng` is a torch generator, else on the CPU."""
    return soften(box_masks(count, height, width, ratio, rng), kind, size, sigma)


def render_blend_maps(
    corners: torch.Tensor, size: int, hole: tuple[int, int], kind: str = "gaussian", kernel_size: int = 5,
    sigma: float = 1.0,
) -> torch.Tensor:
    """Blend maps from recorded hole corners (the blend stage's `maps: fresh` draws), rendered on the
    corners' device: the training step and the blend stage's preview call this same function.

    Args:
        corners: integer [count,2] (top, left) of each hole.
        size: image side S; hole: (rows, columns) of the hole.
    Returns:
        float32 [count,1,S,S] in [0,1], exactly 1 away from the hole.
    """
    return soften(box_masks_at(corners[:, 0], corners[:, 1], size, size, hole), kind, kernel_size, sigma)


def mix(blend: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """a * first + (1 - a) * second; `blend` [B,1,H,W] broadcasts over image or label channels."""
    return blend * first + (1.0 - blend) * second
