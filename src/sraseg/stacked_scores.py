"""Peer-mode scores of one large binary volume with a fraction of the memory: FIVES's stacked mode scores
every test image as one [H,W,N] volume, 200 images of 2048 x 2048 in the release (840 million voxels).

`sraseg.metrics.peer_scores` takes the distances from scipy's distance map, which holds the int32 feature
transform, the int32 offsets and the float64 offsets of every voxel: FIVES's evaluate measured 53 bytes a
voxel, 43 GB at the release's size, against 18 with this module (docs/studies/fives-real-size.md).
`peer_scores_lean` gives the same values, bit for bit:
1. each surface (`sraseg.metrics.surface`) is computed once, not once per direction;
2. the box around both surfaces (distances inside it are unchanged) comes from per-axis projections,
   not from the coordinates of every surface voxel;
3. only the feature transform is built (`distance_transform_edt(return_indices=True)`: int32, 12 bytes
   a voxel in 3-D), and the distance of a source surface voxel is computed from its nearest target
   voxel's index there, a slab of rows at a time, with scipy's arithmetic: integer offsets, squared in
   float64 and summed over the axes in order, square root. Distances come in the same (C) order, so the
   mean (ASD) and the 95th percentile (HD95) are those of `peer_scores`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sraseg.metrics import dice, jaccard, peer_scores, surface

__all__ = ["peer_scores_lean"]

_SLAB = 64  # rows of the volume whose distances are gathered at once


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Voxel distances from every True voxel of the surface `source` to the nearest of `target` (both
    non-empty, same shape), in C order: `sraseg.metrics.surface_distances` of the masks they bound.

    Returns:
        float64 [n_source_voxels].
    """
    box = _box(source | target)
    source, target = source[box], target[box]
    nearest = ndimage.distance_transform_edt(~target, return_distances=False, return_indices=True)
    out = []
    for start in range(0, source.shape[0], _SLAB):
        rows = source[start : start + _SLAB]
        squared = np.zeros(int(rows.sum()), dtype=np.float64)
        for axis, index in enumerate(np.nonzero(rows)):
            offset = nearest[axis, start : start + _SLAB][rows] - (index + start if axis == 0 else index)
            squared += offset.astype(np.float64) ** 2
        out.append(np.sqrt(squared))
    return np.concatenate(out)


def peer_scores_lean(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """`sraseg.metrics.peer_scores` of one binary structure (same values and empty-structure rules).

    Args:
        pred, ref: bool masks of the same shape (FIVES: [H,W,N], the test images stacked).

    Returns:
        dict with dice, jaccard, hd95, asd in voxel units.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not (pred.any() and ref.any()):
        return peer_scores(pred, ref)  # its empty-structure rules: no distance is computed there
    pred_surface, ref_surface = surface(pred), surface(ref)
    forward, backward = _distances(pred_surface, ref_surface), _distances(ref_surface, pred_surface)
    hd95 = float(np.percentile(np.concatenate([forward, backward]), 95))
    return dict(dice=dice(pred, ref), jaccard=jaccard(pred, ref), hd95=hd95, asd=float(forward.mean()))
