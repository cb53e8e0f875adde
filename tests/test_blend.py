"""The blend stage on tiny fake prepared / synthetic / neighbours inputs in the shared formats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from sraseg.blend import run as blend
from sraseg.blend.maps import make_blend_maps, render_blend_maps
from sraseg.errors import ConfigError, DatasetError

S = 32
M = 4
LABELED = [0, 1, 2]  # train, labeled
UNLABELED = [3, 4, 5]  # train, unlabeled
VAL = [6, 7]


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    prepared, synthetic = tmp_path / "prepared", tmp_path / "synthetic"
    prepared.mkdir()
    synthetic.mkdir()
    n = 10
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    pd.DataFrame(
        dict(
            slice_id=np.arange(n, dtype=np.int64),
            case=[f"patient{i // 2 + 1:03d}_frame01" for i in range(n)],
            patient=[f"patient{i // 2 + 1:03d}" for i in range(n)],
            frame=1, phase="ED", slice=[i % 2 for i in range(n)], split=split,
            labeled=[i in LABELED for i in range(n)],
        )
    ).to_parquet(prepared / "slices.parquet")  # fmt: skip
    np.save(prepared / "images.npy", rng.random((n, S, S), dtype=np.float32))
    np.save(prepared / "labels.npy", rng.integers(0, 4, size=(n, S, S)).astype(np.uint8))
    np.save(synthetic / "images.npy", rng.random((M, S, S), dtype=np.float32))
    pd.DataFrame(dict(synthetic_id=np.arange(M, dtype=np.int64), seed=np.arange(M, dtype=np.int64) + 100)).to_parquet(
        synthetic / "synthetic.parquet"
    )
    # Ranked neighbours over the whole train bank; unlabeled ones must be skipped.
    real_by_rank = {0: [2, 4, 0, 1], 1: [4, 1, 3, 5], 2: [0, 1, 2, 3], 3: [5, 2, 1, 0]}
    rows = [(s, r, real, 0.9 - 0.1 * r) for s, reals in real_by_rank.items() for r, real in enumerate(reals)]
    neighbours = tmp_path / "neighbours.parquet"
    pd.DataFrame(rows, columns=["synthetic_id", "rank", "real_id", "cosine"]).to_parquet(neighbours)
    return dict(synthetic_dir=synthetic, prepared_dir=prepared, neighbours=neighbours, embed_dir=tmp_path)


def _run(inputs, out_dir, **settings):
    """The bank mode (maps.npy) with nearest partners, named since the defaults are fresh maps and random
    partners."""
    blend.run(**inputs, out_dir=out_dir, settings=dict(dict(maps="bank", pairing="nearest"), **settings))
    return np.load(out_dir / "maps.npy"), pd.read_parquet(out_dir / "pairs.parquet")


def test_nearest_bank_formats_and_pairing(inputs, tmp_path):
    maps, pairs = _run(inputs, tmp_path / "blend", maps_per_image=3)
    assert maps.dtype == np.float16 and maps.shape == (M * 3, S, S)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert list(pairs.columns) == ["blend_id", "synthetic_id", "real_id", "map_index", "rank", "cosine", "sa_real_id"]
    np.testing.assert_array_equal(pairs["blend_id"], np.arange(M * 3))
    assert set(pairs["real_id"]) <= set(LABELED)
    first = pairs[pairs["map_index"] == 0].set_index("synthetic_id")
    # Map 0 takes the nearest labeled neighbour: rank 0 where it is labeled, else the next labeled one.
    assert first.loc[0, "real_id"] == 2 and first.loc[0, "rank"] == 0 and first.loc[0, "cosine"] == pytest.approx(0.9)
    assert first.loc[1, "real_id"] == 1 and first.loc[1, "rank"] == 1
    # Synthetic 0 has labeled neighbours 2, 0, 1 (ranks 0, 2, 3); synthetic 1 has only 1: it wraps.
    np.testing.assert_array_equal(pairs[pairs["synthetic_id"] == 0]["real_id"], [2, 0, 1])
    np.testing.assert_array_equal(pairs[pairs["synthetic_id"] == 1]["real_id"], [1, 1, 1])
    info = json.loads((tmp_path / "blend" / "blend.json").read_text())
    assert info["settings"]["maps_per_image"] == 3 and info["settings"]["kernel"] == "gaussian"
    assert info["n_maps"] == M * 3


def test_soft_maps_exact_away_from_hole_and_hard_maps_binary(inputs, tmp_path):
    soft, _ = _run(inputs, tmp_path / "soft", seed=5)
    hard, _ = _run(inputs, tmp_path / "hard", seed=5, kernel="hard")
    assert set(np.unique(hard)) == {0.0, 1.0}
    side = round(2 / 3 * S)
    assert ((hard == 0).sum(axis=(1, 2)) == side * side).all()
    # Same seed, same holes: a 5x5 kernel reaches 2 px, beyond that the soft map equals the hard one.
    reach = np.ones((5, 5), bool)
    for h, s in zip(hard, soft):
        hole = h == 0
        far_outside = ~ndimage.binary_dilation(hole, structure=reach)
        deep_inside = ndimage.binary_erosion(hole, structure=reach, border_value=1)
        assert far_outside.any() and deep_inside.any()
        assert (s[far_outside] == 1.0).all() and (s[deep_inside] == 0.0).all()
        band = s[~far_outside & ~deep_inside]
        assert ((band > 0) & (band < 1)).any()  # a soft edge, not a hard one


def test_random_pairing_is_seeded_and_differs(inputs, tmp_path):
    maps_near, near = _run(inputs, tmp_path / "near", maps_per_image=4, seed=1)
    maps_r1, r1 = _run(inputs, tmp_path / "r1", maps_per_image=4, seed=1, pairing="random")
    _, r1_again = _run(inputs, tmp_path / "r1b", maps_per_image=4, seed=1, pairing="random")
    _, r2 = _run(inputs, tmp_path / "r2", maps_per_image=4, seed=2, pairing="random")
    pd.testing.assert_frame_equal(r1, r1_again)
    assert not np.array_equal(r1["real_id"], r2["real_id"])
    assert not np.array_equal(r1["real_id"], near["real_id"])
    assert set(r1["real_id"]) <= set(LABELED) and r1["cosine"].isna().all() and (r1["rank"] == -1).all()
    np.testing.assert_array_equal(maps_near, maps_r1)  # maps do not depend on the pairing


def test_continuous_labels_sum_to_one():
    rng = np.random.default_rng(0)
    a = make_blend_maps(3, S, S, rng)
    first = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 4, (3, S, S))), 4).permute(0, 3, 1, 2).float()
    second = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, 4, (3, S, S))), 4).permute(0, 3, 1, 2).float()
    y = blend.blend_labels(a, first, second)
    assert y.shape == (3, 4, S, S)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(3, S, S))
    assert ((y > 0) & (y < 1)).any()  # continuous on the soft edge
    far = a[:, 0] == 1
    torch.testing.assert_close(y.permute(0, 2, 3, 1)[far], first.permute(0, 2, 3, 1)[far])


def test_preview_is_a_png(inputs, tmp_path):
    import matplotlib.image

    _run(inputs, tmp_path / "blend")
    path = tmp_path / "blend" / "preview.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01


def _rewrite_neighbours(inputs, rows):
    pd.DataFrame(rows, columns=["synthetic_id", "rank", "real_id", "cosine"]).to_parquet(inputs["neighbours"])


def test_bad_neighbours(inputs, tmp_path):
    base = pd.read_parquet(inputs["neighbours"])
    rows = [tuple(r) for r in base.itertuples(index=False)]
    path = str(inputs["neighbours"])
    _rewrite_neighbours(inputs, rows + [(99, 0, 0, 0.5)])
    with pytest.raises(DatasetError, match=r"synthetic id\(s\) \[99\] not in the synthetic set") as info:
        blend.run(**inputs, out_dir=tmp_path / "out", settings={"maps": "bank"})
    assert path in str(info.value)
    _rewrite_neighbours(inputs, rows + [(0, 9, VAL[0], 0.1)])
    with pytest.raises(DatasetError, match=r"real id\(s\) \[6\] are not train slices") as info:
        blend.run(**inputs, out_dir=tmp_path / "out", settings={"maps": "bank"})
    assert path in str(info.value)
    _rewrite_neighbours(inputs, [r for r in rows if r[0] != 3] + [(3, 0, UNLABELED[0], 0.5)])
    with pytest.raises(DatasetError, match=r"\[3\] have no labeled train slice"):
        blend.run(**inputs, out_dir=tmp_path / "out", settings={"maps": "bank", "pairing": "nearest"})
    assert not (tmp_path / "out").exists()
    # only nearest pairing takes its partners from the neighbours: random pairs image 3 and takes its
    # unlabeled rank-0 neighbour as the SA target
    blend.run(**inputs, out_dir=tmp_path / "random", settings={"maps": "bank", "pairing": "random"})
    pairs = pd.read_parquet(tmp_path / "random" / "pairs.parquet")
    assert (pairs.loc[pairs["synthetic_id"] == 3, "sa_real_id"] == UNLABELED[0]).all()


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(kernel="triangle"), "blend.kernel"),
        (dict(kernel_size=4), "blend.kernel_size"),
        (dict(pairing="farthest"), "blend.pairing"),
        (dict(ratio=1.5), "blend.ratio"),
        (dict(maps_per_image=0), "blend.maps_per_image"),
        (dict(colour="red"), "unknown key"),
    ],
)
def test_bad_settings(inputs, tmp_path, settings, needle):
    with pytest.raises(ConfigError, match=needle):
        blend.run(**inputs, out_dir=tmp_path / "out", settings=settings)


def _write_embeddings(root, real, syn):
    """real.npy/.parquet for train slices 0..5 and synthetic.npy/.parquet beside neighbours.parquet."""
    np.save(root / "real.npy", real.astype(np.float32))
    pd.DataFrame(dict(row=np.arange(6), slice_id=np.arange(6), labeled=[i in LABELED for i in range(6)])).to_parquet(
        root / "real.parquet"
    )
    np.save(root / "synthetic.npy", syn.astype(np.float32))
    pd.DataFrame(dict(row=np.arange(M), synthetic_id=np.arange(M))).to_parquet(root / "synthetic.parquet")


def test_balanced_pairing_caps_every_labeled_slice_and_sets_sa_target(inputs, tmp_path):
    rng = np.random.default_rng(4)
    hub = np.eye(8, dtype=np.float32)[0]
    real = rng.standard_normal((6, 8)).astype(np.float32)
    real[2] = hub  # labeled slice 2 is every synthetic image's nearest: a hub
    syn = 3 * hub + 0.3 * rng.standard_normal((M, 8)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    syn /= np.linalg.norm(syn, axis=1, keepdims=True)
    _write_embeddings(tmp_path, real, syn)
    _, pairs = _run(inputs, tmp_path / "balanced", maps_per_image=3, pairing="balanced")
    cap = int(np.ceil(M * 3 / len(LABELED)))
    counts = pairs["real_id"].value_counts()
    assert set(counts.index) == set(LABELED) and counts.max() <= cap  # 12 entries, 3 slices, 4 each
    np.testing.assert_array_equal(pairs["sa_real_id"], pairs["real_id"])  # the SA loss targets the partner
    expected = np.einsum("ij,ij->i", syn[pairs["synthetic_id"]], real[pairs["real_id"]])
    np.testing.assert_allclose(pairs["cosine"], expected, atol=1e-5)
    info = json.loads((tmp_path / "balanced" / "blend.json").read_text())
    assert info["cap"] == cap and info["partner_stats"]["max_uses"] <= cap
    # nearest and random pairing: the SA target is the image's rank-0 neighbour, labeled or not
    rank0 = {0: 2, 1: 4, 2: 0, 3: 5}
    for pairing in ("nearest", "random"):
        _, other = _run(inputs, tmp_path / pairing, maps_per_image=3, pairing=pairing)
        assert other["sa_real_id"].tolist() == [rank0[s] for s in other["synthetic_id"]]


def test_balanced_pairing_without_embeddings_is_one_line(inputs, tmp_path):
    with pytest.raises(DatasetError, match="real.npy"):
        _run(inputs, tmp_path / "b", pairing="balanced")
    with pytest.raises(ConfigError, match="--embed-dir"):
        _run(dict(inputs, embed_dir=None), tmp_path / "b", pairing="balanced")


def test_every_image_needs_a_rank0_neighbour_for_its_sa_target(inputs, tmp_path):
    rows = [r for r in pd.read_parquet(inputs["neighbours"]).itertuples(index=False) if (r[0], r[1]) != (1, 0)]
    _rewrite_neighbours(inputs, rows)
    with pytest.raises(DatasetError, match=r"no rank-0 neighbour .*\[1\]"):
        _run(inputs, tmp_path / "b", pairing="random")


# --- maps: fresh, a map of its own for every self-training draw ----------------------------------------


def _fresh(inputs, out_dir, draws, **settings):
    blend.run(**inputs, out_dir=out_dir, settings=dict(maps="fresh", **settings), draws=draws)
    return pd.read_parquet(out_dir / "draws.parquet"), pd.read_parquet(out_dir / "pairs.parquet")


def _render(table, size, kernel="gaussian"):
    corners = torch.tensor(table[["top", "left"]].to_numpy(dtype=np.int64))
    side = round(2 / 3 * size)
    return render_blend_maps(corners, size, (side, side), kernel)[:, 0].numpy()


def test_fresh_draws_each_get_a_valid_map_of_their_own(inputs, tmp_path):
    draws, pairs = _fresh(inputs, tmp_path / "fresh", 48, maps_per_image=3, seed=3)
    out = tmp_path / "fresh"
    assert not (out / "maps.npy").exists() and (out / "preview.png").stat().st_size > 1000
    assert list(draws.columns) == ["blend_id", "synthetic_id", "real_id", "top", "left"] and len(draws) == 48
    assert dict(draws.dtypes.astype(str)) == dict(blend_id="int32", synthetic_id="int32", real_id="int32", top="int16",
                                                  left="int16")
    # each draw is an entry of pairs.parquet, with that entry's synthetic image and partner
    entry = pairs.set_index("blend_id").loc[draws["blend_id"]]
    np.testing.assert_array_equal(entry["synthetic_id"], draws["synthetic_id"])
    np.testing.assert_array_equal(entry["real_id"], draws["real_id"])
    # the synthetic set once per epoch (M = 4 draws), every entry of an image in use
    for epoch in range(48 // M):
        assert sorted(draws["synthetic_id"][epoch * M : (epoch + 1) * M]) == list(range(M))
    assert set(draws["blend_id"]) == set(pairs["blend_id"])
    # every map a valid blend map: [0,1], exactly 1 beyond the kernel's reach of the hole, exactly 0 deep
    # inside, the hole of the configured ratio
    side = round(2 / 3 * S)
    soft, hard = _render(draws, S), _render(draws, S, "hard")
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert ((hard == 0).sum(axis=(1, 2)) == side * side).all() and set(np.unique(hard)) == {0.0, 1.0}
    reach = np.ones((5, 5), bool)
    for h, s in zip(hard, soft):
        hole = h == 0
        far_outside = ~ndimage.binary_dilation(hole, structure=reach)
        deep_inside = ndimage.binary_erosion(hole, structure=reach, border_value=1)
        assert (s[far_outside] == 1.0).all() and (s[deep_inside] == 0.0).all()
        assert ((s > 0) & (s < 1)).any()
    # two draws of one synthetic image get different maps: here every one of its 12 draws its own
    for sid in range(M):
        own = soft[(draws["synthetic_id"] == sid).to_numpy()]
        assert len(own) == 12
        assert len({m.tobytes() for m in own}) >= 10
        assert not np.array_equal(own[0], own[1])
    info = json.loads((out / "blend.json").read_text())
    assert info["settings"]["maps"] == "fresh" and info["n_draws"] == info["n_maps"] == 48
    assert info["hole"] == [side, side] and info["image_size"] == S and info["n_entries"] == M * 3
    assert info["draws_per_synthetic"] == {"min": 12, "max": 12}


def test_fresh_draws_are_seeded_and_the_same_whichever_pairing(inputs, tmp_path):
    near, _ = _fresh(inputs, tmp_path / "near", 40, maps_per_image=2, seed=1, pairing="nearest")
    again, _ = _fresh(inputs, tmp_path / "again", 40, maps_per_image=2, seed=1, pairing="nearest")
    rand, _ = _fresh(inputs, tmp_path / "rand", 40, maps_per_image=2, seed=1, pairing="random")
    other, _ = _fresh(inputs, tmp_path / "other", 40, maps_per_image=2, seed=2, pairing="nearest")
    pd.testing.assert_frame_equal(near, again)  # same seed: the same draws, hence the same maps
    same = ["blend_id", "synthetic_id", "top", "left"]
    pd.testing.assert_frame_equal(near[same], rand[same])  # the pairing changes the partners only
    assert not np.array_equal(near["real_id"], rand["real_id"])
    assert not np.array_equal(near[["top", "left"]], other[["top", "left"]])
    # more draws extend the same sequence of maps (a longer self-training starts the same)
    longer, _ = _fresh(inputs, tmp_path / "longer", 80, maps_per_image=2, seed=1, pairing="nearest")
    pd.testing.assert_frame_equal(longer[:40], near)


def test_fresh_files_stay_small_at_acdc_scale(tmp_path):
    """acdc.yaml's self-training takes 50,000 x 12 = 600,000 draws at 256 px: as maps that would be 79 GB of
    float16; what the stage writes must stay under 50 MB."""
    rng = np.random.default_rng(0)
    size, n, m = 256, 6, 4
    prepared, synthetic = tmp_path / "prepared", tmp_path / "synthetic"
    prepared.mkdir()
    synthetic.mkdir()
    pd.DataFrame(dict(slice_id=np.arange(n), case=[f"patient{i:03d}_frame01" for i in range(n)],
                      patient=[f"patient{i:03d}" for i in range(n)], frame=1, phase="ED", slice=0,
                      split=["train"] * 4 + ["val", "test"], labeled=[True] * 3 + [False] * 3)
                 ).to_parquet(prepared / "slices.parquet")  # fmt: skip
    np.save(prepared / "images.npy", rng.random((n, size, size), dtype=np.float32))
    np.save(prepared / "labels.npy", rng.integers(0, 4, size=(n, size, size)).astype(np.uint8))
    np.save(synthetic / "images.npy", rng.random((m, size, size), dtype=np.float32))
    pd.DataFrame(dict(synthetic_id=np.arange(m))).to_parquet(synthetic / "synthetic.parquet")
    neighbours = tmp_path / "neighbours.parquet"  # the SA targets: rank-0 neighbours
    pd.DataFrame(dict(synthetic_id=np.arange(m), rank=0, real_id=np.arange(m) % 3, cosine=0.5)).to_parquet(neighbours)
    out = tmp_path / "blend"
    blend.run(synthetic, prepared, neighbours, out, dict(maps="fresh", pairing="random"), draws=600_000)
    written = {p.name: p.stat().st_size for p in out.iterdir()}
    assert set(written) == {"draws.parquet", "pairs.parquet", "preview.png", "blend.json"}
    assert sum(written.values()) < 50e6, written
    assert len(pd.read_parquet(out / "draws.parquet")) == 600_000


def test_fresh_needs_the_draw_count_and_replaces_a_bank(inputs, tmp_path):
    with pytest.raises(ConfigError, match="--draws"):
        blend.run(**inputs, out_dir=tmp_path / "out", settings=dict(maps="fresh"))
    with pytest.raises(ConfigError, match="blend.maps"):
        blend.run(**inputs, out_dir=tmp_path / "out", settings=dict(maps="fixed"), draws=4)
    assert not (tmp_path / "out").exists()
    # a folder switched from bank to fresh (and back) holds only the current mode's file
    _run(inputs, tmp_path / "b")
    _fresh(inputs, tmp_path / "b", 8)
    assert not (tmp_path / "b" / "maps.npy").exists()
    _run(inputs, tmp_path / "b")
    assert not (tmp_path / "b" / "draws.parquet").exists() and (tmp_path / "b" / "maps.npy").exists()
