"""FIVES's stacked mode with less memory: `peer_scores_lean` gives `peer_scores`'s values bit for bit."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sraseg import stacked_scores
from sraseg.datasets.fives import DATASET as FIVES
from sraseg.metrics import peer_scores


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], share: float, grow: int) -> np.ndarray:
    return ndimage.binary_dilation(rng.random(shape) < share, iterations=grow)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("seed", range(6))
def test_lean_scores_equal_peer_scores_bit_for_bit(seed, monkeypatch):
    monkeypatch.setattr(stacked_scores, "_SLAB", 3)  # several slabs, one of them partial
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 30, size=3))
    pred, ref = _blobs(rng, shape, 0.02, 1), _blobs(rng, shape, 0.03, 2)
    if seed == 0:  # both surfaces in a corner: the box is cropped
        pred[:] = ref[:] = False
        pred[1:3, 2:5, 0:2] = True
        ref[2:4, 2:6, 1:3] = True
    got, want = stacked_scores.peer_scores_lean(pred, ref), peer_scores(pred, ref)
    assert _same(got, want), (got, want)
    assert got["hd95"] > 0 and 0 < got["dice"] < 1


def test_lean_scores_keep_the_empty_structure_rules_and_2d():
    ref = np.zeros((9, 9), bool)
    ref[2:6, 3:7] = True
    pred = np.roll(ref, 1, axis=0)
    assert _same(stacked_scores.peer_scores_lean(pred, ref), peer_scores(pred, ref))
    assert stacked_scores.peer_scores_lean(np.zeros_like(ref), ref) == dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0)
    empty_ref = stacked_scores.peer_scores_lean(ref, np.zeros_like(ref))
    assert empty_ref["dice"] == 0 and math.isnan(empty_ref["hd95"]) and math.isnan(empty_ref["asd"])


def _peak_mb(fn, *args) -> float:
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_lean_scores_need_a_fraction_of_the_memory():
    """scipy's distance map holds the feature transform (12 bytes a voxel in 3-D) and 36 more of offsets."""
    rng = np.random.default_rng(0)
    pred = _blobs(rng, (128, 128, 24), 0.01, 2)
    ref = np.roll(pred, 2, axis=0)
    lean, full = _peak_mb(stacked_scores.peer_scores_lean, pred, ref), _peak_mb(peer_scores, pred, ref)
    assert lean < 0.45 * full, (lean, full)  # measured: 21 against 58 bytes a voxel


def _write_masks(folder, masks: dict[str, np.ndarray]) -> list:
    folder.mkdir()
    for name, mask in masks.items():
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(folder / f"{name}.png")
    return [folder / f"{name}.png" for name in masks]


def test_fives_stacked_mode_scores_the_stacked_images(tmp_path):
    rng = np.random.default_rng(1)
    refs = {f"test_{n}_A": _blobs(rng, (40, 32), 0.03, 1) for n in (1, 2, 3)}
    preds = {case: np.roll(mask, n, axis=1) for n, (case, mask) in enumerate(refs.items())}
    pairs = list(zip(refs, _write_masks(tmp_path / "pred", preds), _write_masks(tmp_path / "gt", refs)))
    table = FIVES.score(pairs)
    stacked = table[table["mode"] == "stacked"].iloc[0]
    want = peer_scores(np.stack(list(preds.values()), axis=-1), np.stack(list(refs.values()), axis=-1))
    assert {m: stacked[m] for m in want} == want and stacked["n_images"] == 3
    assert (table["mode"] == "image").sum() == 3

    # images of different sizes: each scored on its own, no stacked row
    odd = _write_masks(tmp_path / "odd", {"test_4_A": np.pad(refs["test_1_A"], 2)})[0]
    table = FIVES.score([*pairs, ("test_4_A", odd, odd)])
    assert list(table["mode"]) == ["image"] * 4 and table["dice"].iloc[3] == 1.0
