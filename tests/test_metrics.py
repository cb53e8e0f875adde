"""Metrics against an independent brute-force implementation of the medpy definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sraseg import metrics

# ---------------------------------------------------------------- independent reference code


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with at least one of 6 face neighbours outside the mask or the volume."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    interior = np.ones_like(mask, dtype=bool)
    for axis in range(3):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask.astype(bool) & ~interior


def brute_directed(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Distance of every surface voxel of a to the nearest surface voxel of b (all pairs)."""
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def brute_peer(pred: np.ndarray, ref: np.ndarray) -> dict:
    inter = np.logical_and(pred, ref).sum()
    fwd, bwd = brute_directed(pred, ref), brute_directed(ref, pred)
    return dict(
        dice=2 * inter / (pred.sum() + ref.sum()),
        jaccard=inter / np.logical_or(pred, ref).sum(),
        hd95=np.percentile(np.concatenate([fwd, bwd]), 95),
        asd=fwd.mean(),
    )


def brute_mm(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """MONAI's definitions: max of directed 95th percentiles; mean of the pooled distances."""
    inter = np.logical_and(pred, ref).sum()
    fwd, bwd = brute_directed(pred, ref, spacing), brute_directed(ref, pred, spacing)
    return dict(
        dice=2 * inter / (pred.sum() + ref.sum()),
        jaccard=inter / np.logical_or(pred, ref).sum(),
        hd95=max(np.percentile(fwd, 95), np.percentile(bwd, 95)),
        asd=np.concatenate([fwd, bwd]).mean(),
    )


# ---------------------------------------------------------------- shapes


def cube(shape=(12, 12, 12), start=(3, 3, 3), side=4) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + side) for s in start)] = True
    return mask


def sphere(radius: float, shape=(18, 18, 18), centre=(8.5, 8.7, 8.3)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def assert_scores(got: dict, want: dict, tol: float = 1e-6) -> None:
    for key in metrics.METRICS:
        assert got[key] == pytest.approx(float(want[key]), abs=tol), key


# ---------------------------------------------------------------- tests


def test_surface_matches_brute_force():
    rng = np.random.default_rng(0)
    blob = rng.random((9, 10, 11)) > 0.4
    np.testing.assert_array_equal(metrics.surface(blob), brute_surface(blob))
    # A 4-cube has 4^3 - 2^3 surface voxels; a mask touching the border keeps its border voxels.
    assert metrics.surface(cube()).sum() == 56
    assert metrics.surface(np.ones((3, 3, 3), bool)).sum() == 26


def test_shifted_cube_known_values():
    pred, ref = cube(start=(4, 3, 3)), cube()
    got = metrics.peer_scores(pred, ref)
    # Overlap 3 of 4 layers: Dice 3/4, Jaccard 3/5; 20 of 56 surface voxels per side sit 1 voxel away.
    assert_scores(got, dict(dice=0.75, jaccard=0.6, hd95=1.0, asd=20 / 56))
    assert_scores(got, brute_peer(pred, ref))


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shifted_cube_matches_brute_force(shift):
    side = 6
    pred, ref = cube(start=(3 + shift, 3, 3), side=side, shape=(16, 14, 14)), cube(side=side, shape=(16, 14, 14))
    got = metrics.peer_scores(pred, ref)
    assert got["dice"] == pytest.approx((side - shift) / side)
    assert got["jaccard"] == pytest.approx((side - shift) / (side + shift))
    assert got["hd95"] == pytest.approx(shift)  # the two end layers dominate the top 5 %
    assert_scores(got, brute_peer(pred, ref))
    assert_scores(metrics.mm_scores(pred, ref, (1.0, 1.0, 1.0)), brute_mm(pred, ref, (1, 1, 1)), tol=1e-5)


def test_peer_hd95_pools_both_directions():
    # A reference with a far outlier blob: the directed percentiles differ strongly.
    ref = cube(shape=(20, 12, 12), side=4)
    ref[16:18, 5:7, 5:7] = True
    pred = cube(shape=(20, 12, 12), side=4)
    fwd, bwd = brute_directed(pred, ref), brute_directed(ref, pred)
    pooled = np.percentile(np.concatenate([fwd, bwd]), 95)
    max_directed = max(np.percentile(fwd, 95), np.percentile(bwd, 95))
    assert not math.isclose(pooled, max_directed)
    got = metrics.peer_scores(pred, ref)
    assert got["hd95"] == pytest.approx(pooled, abs=1e-6)
    assert got["asd"] == pytest.approx(fwd.mean(), abs=1e-6)  # one direction only: 0 here
    assert got["asd"] == 0.0
    assert metrics.peer_scores(ref, pred)["asd"] > 0  # the other direction is not 0


def test_sphere_vs_bigger_sphere():
    pred, ref = sphere(5.0), sphere(6.2)
    peer = metrics.peer_scores(pred, ref)
    assert_scores(peer, brute_peer(pred, ref))
    assert 0.5 < peer["hd95"] < 2.0 and 0.5 < peer["asd"] < 2.0
    assert peer["dice"] == pytest.approx(2 * pred.sum() / (pred.sum() + ref.sum()))  # pred inside ref
    mm = metrics.mm_scores(pred, ref, (1.0, 1.0, 1.0))
    assert_scores(mm, brute_mm(pred, ref, (1, 1, 1)), tol=1e-5)


def test_random_blobs_match_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3):
        pred, ref = rng.random((8, 9, 7)) > 0.6, rng.random((8, 9, 7)) > 0.5
        assert_scores(metrics.peer_scores(pred, ref), brute_peer(pred, ref))
        spacing = (1.5, 0.7, 5.0)
        assert_scores(metrics.mm_scores(pred, ref, spacing), brute_mm(pred, ref, spacing), tol=1e-5)


def test_anisotropic_spacing_scales_mm_distances():
    pred, ref = cube(start=(4, 3, 3)), cube()
    iso = metrics.mm_scores(pred, ref, (1.0, 1.0, 1.0))
    assert iso["hd95"] == pytest.approx(1.0)
    # Shift along x with 2 mm along x: the end layers are 2 mm away, the interior ones 1 mm (via y/z).
    aniso = metrics.mm_scores(pred, ref, (2.0, 1.0, 1.0))
    assert aniso["hd95"] == pytest.approx(2.0)
    assert_scores(aniso, brute_mm(pred, ref, (2.0, 1.0, 1.0)), tol=1e-5)
    # A uniform 1.5 mm grid scales every distance by 1.5; Dice does not change.
    scaled = metrics.mm_scores(pred, ref, (1.5, 1.5, 1.5))
    assert scaled["hd95"] == pytest.approx(1.5 * iso["hd95"])
    assert scaled["asd"] == pytest.approx(1.5 * iso["asd"], rel=1e-5)
    assert scaled["dice"] == pytest.approx(0.75)
    # Peer mode ignores spacing entirely (voxel units).
    assert metrics.peer_scores(pred, ref)["hd95"] == pytest.approx(1.0)


def test_empty_structures():
    ref = cube()
    empty = np.zeros_like(ref)
    assert metrics.peer_scores(empty, ref) == dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0)
    mm = metrics.mm_scores(empty, ref, (1.0, 1.0, 1.0))
    assert mm["dice"] == 0.0 and mm["jaccard"] == 0.0
    assert math.isnan(mm["hd95"]) and math.isnan(mm["asd"])
    # Reference empty, prediction not: overlap 0, distances undefined.
    peer = metrics.peer_scores(ref, empty)
    assert peer["dice"] == 0.0 and math.isnan(peer["hd95"]) and math.isnan(peer["asd"])
    both = metrics.mm_scores(empty, empty, (1.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in both.values())


def test_score_case_rows_and_shape_check():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[cube()] = 3
    ref[cube(start=(3, 3, 8), side=2)] = 1
    pred = np.zeros_like(ref)
    pred[cube(start=(4, 3, 3))] = 3
    rows = metrics.score_case(pred, ref, (1.0, 1.0, 2.0))
    assert len(rows) == 6
    by_key = {(r["cls"], r["mode"]): r for r in rows}
    assert by_key["LV", "peer"]["dice"] == pytest.approx(0.75)
    assert by_key["RV", "peer"]["hd95"] == 0.0 and by_key["RV", "peer"]["empty_pred"]
    assert math.isnan(by_key["RV", "mm"]["hd95"]) and by_key["RV", "mm"]["empty_pred"]
    assert not by_key["LV", "mm"]["empty_pred"]
    with pytest.raises(ValueError, match=r"\(12, 12, 11\)"):
        metrics.score_case(pred[:, :, :11], ref, (1.0, 1.0, 1.0))
