"""Index stage: FAISS neighbours against brute force, FD-DINOv2, outputs and input errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest
from embed_fixtures import make_embed_dir, make_prepared, unit_rows

from sraseg.embed import index as index_stage
from sraseg.embed.frechet import frechet_distance
from sraseg.errors import ConfigError, DatasetError

D = 16
# 6 labeled + 14 unlabeled train slices (slice ids 0..19), then val/test slices that are never embedded.
SPLITS = [("train", True)] * 6 + [("train", False)] * 14 + [("val", False)] * 3 + [("test", False)] * 3


@pytest.fixture
def dirs(tmp_path):
    rng = np.random.default_rng(0)
    prepared = make_prepared(tmp_path, SPLITS, size=8)
    real = unit_rows(rng, 20, D)
    syn = unit_rows(rng, 9, D, shift=0.2)
    labeled = np.array([True] * 6 + [False] * 14)
    embed = make_embed_dir(tmp_path, real, np.arange(20), labeled, syn)
    return prepared, embed, real, syn, labeled


def _brute_force(bank: np.ndarray, queries: np.ndarray, k: int):
    sims = queries.astype(np.float64) @ bank.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("bank", ["labeled", "all_train"])
def test_neighbours_equal_brute_force_cosine(dirs, bank):
    prepared, embed, real, syn, labeled = dirs
    index_stage.run(embed, prepared, embed, {"bank": bank, "k": 4, "device": "cpu"})
    got = pd.read_parquet(embed / "neighbours.parquet")
    assert list(got.columns) == ["synthetic_id", "rank", "real_id", "cosine"]
    mask = labeled if bank == "labeled" else np.ones(20, bool)
    bank_ids = np.flatnonzero(mask)
    order, sims = _brute_force(real[mask], syn, 4)
    got = got.sort_values(["synthetic_id", "rank"])
    assert got["synthetic_id"].tolist() == np.repeat(np.arange(9), 4).tolist()
    assert got["rank"].tolist() == np.tile(np.arange(4), 9).tolist()
    np.testing.assert_array_equal(got["real_id"].to_numpy().reshape(9, 4), bank_ids[order])
    np.testing.assert_allclose(got["cosine"].to_numpy().reshape(9, 4), sims, atol=1e-5)
    if bank == "labeled":
        assert set(got["real_id"]) <= set(range(6))
    else:
        assert got["real_id"].max() >= 6  # unlabeled slices do show up in the all_train bank

    info = json.loads((embed / "index.json").read_text())
    assert info["bank_size"] == mask.sum() and info["bank_slice_ids"] == bank_ids.tolist()
    # real.faiss holds the bank; its rows map back to slice ids through index.json.
    stored = faiss.read_index(str(embed / "real.faiss"))
    assert stored.ntotal == mask.sum()
    _, rows = stored.search(np.ascontiguousarray(syn), 1)
    np.testing.assert_array_equal(np.asarray(info["bank_slice_ids"])[rows[:, 0]], bank_ids[order[:, 0]])
    # Index outputs join the embed files without removing them.
    assert (embed / "real.npy").is_file() and (embed / "encoder.json").is_file()
    assert (embed / "projection.png").stat().st_size > 1000


def test_k_is_capped_at_bank_size(dirs, caplog):
    prepared, embed, *_ = dirs
    with caplog.at_level("WARNING"):
        index_stage.run(embed, prepared, embed, {"k": 50})
    got = pd.read_parquet(embed / "neighbours.parquet")
    assert got.groupby("synthetic_id").size().eq(6).all()
    assert any("k=50" in r.getMessage() for r in caplog.records)
    assert json.loads((embed / "index.json").read_text())["k_used"] == 6


def test_renormalises_unnormalised_embeddings(dirs, tmp_path):
    prepared, embed, real, syn, labeled = dirs
    np.save(embed / "real.npy", real * np.linspace(0.5, 3, 20)[:, None].astype(np.float32))
    index_stage.run(embed, prepared, tmp_path / "out", {"k": 2})
    got = pd.read_parquet(tmp_path / "out" / "neighbours.parquet")
    _, sims = _brute_force(real[labeled], syn, 2)
    np.testing.assert_allclose(got["cosine"].to_numpy().reshape(9, 2), sims, atol=1e-5)


def test_frechet_distance_self_zero_and_monotone_in_mean_shift():
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 300, D).astype(np.float64)
    y = unit_rows(rng, 40, 64).astype(np.float64)  # fewer rows than dims: singular covariance
    for data in (x, y):
        base = frechet_distance(data, data)
        scale = np.trace(np.cov(data, rowvar=False))
        assert abs(base["fd"]) < 1e-6 * scale
        shifts = [0.01, 0.05, 0.2, 1.0]
        fds = [frechet_distance(data, data + s)["fd"] for s in shifts]
        assert all(b > a for a, b in zip(fds, fds[1:]))
        # A pure mean shift changes only the mean term: ||s * 1||^2 = s^2 * D.
        np.testing.assert_allclose(fds, [s * s * data.shape[1] for s in shifts], rtol=1e-4)
    # Different covariances give a positive trace term.
    z = frechet_distance(x, 0.5 * x)
    assert z["trace_term"] > 0.1 * np.trace(np.cov(x, rowvar=False)) * 0.25
    with pytest.raises(ValueError):
        frechet_distance(x, y)


def test_fd_report(dirs):
    prepared, embed, real, syn, _ = dirs
    index_stage.run(embed, prepared, embed, {})
    fd = json.loads((embed / "fd_dinov2.json").read_text())
    assert fd["n_real"] == 20 and fd["n_synthetic"] == 9 and fd["dim"] == D and fd["real_set"] == "all_train"
    np.testing.assert_allclose(fd["fd_dinov2"], frechet_distance(real, syn)["fd"], rtol=1e-5)
    assert fd["fd_dinov2"] > 0 and fd["untrained_encoder"] is True


def _error_line(embed, prepared, out, settings=None) -> str:
    with pytest.raises(DatasetError) as info:
        index_stage.run(embed, prepared, out, settings or {})
    text = str(info.value)
    assert "\n" not in text
    assert not out.exists()
    return text


def test_input_errors_name_the_file(dirs, tmp_path):
    prepared, embed, real, syn, labeled = dirs
    out = tmp_path / "out"
    (embed / "synthetic.parquet").rename(embed / "moved.parquet")
    assert str(embed / "synthetic.parquet") in _error_line(embed, prepared, out)
    (embed / "moved.parquet").rename(embed / "synthetic.parquet")

    np.save(embed / "synthetic.npy", unit_rows(np.random.default_rng(2), 9, D + 1))
    text = _error_line(embed, prepared, out)
    assert str(embed / "synthetic.npy") in text and str(D + 1) in text

    bad = syn.copy()
    bad[3, 0] = np.nan
    np.save(embed / "synthetic.npy", bad)
    text = _error_line(embed, prepared, out)
    assert str(embed / "synthetic.npy") in text and "NaN" in text
    np.save(embed / "synthetic.npy", syn)

    slices = pd.read_parquet(prepared / "slices.parquet")
    slices["labeled"] = False
    slices.to_parquet(prepared / "slices.parquet", index=False)
    text = _error_line(embed, prepared, out)
    assert str(prepared / "slices.parquet") in text and "empty" in text
    index_stage.run(embed, prepared, out, {"bank": "all_train"})  # the all_train bank still works
    assert (out / "neighbours.parquet").is_file()


def test_neighbour_hubness_counts_the_nearest_slices():
    from sraseg.embed.index import neighbour_hubness

    neighbours = pd.DataFrame(
        {"synthetic_id": [0, 0, 1, 1, 2, 2, 3, 3], "rank": [0, 1] * 4, "real_id": [7, 8, 7, 9, 7, 8, 5, 7]}
    )
    assert neighbour_hubness(neighbours) == {"distinct_nearest": 2, "top_share": 0.75, "top_real_id": 7}


# --- FD floor and ratio; hubness of each pairing rule ---


def _hub_case(rng, m=30, n_bank=10, d=16):
    """Every synthetic embedding is nearest to bank row 0 (a hub): the synthetic cloud sits in one
    direction h, real row 0 is h itself, the other real rows spread around the real cloud's own mean."""
    h = np.zeros(d, np.float32)
    h[0] = 1.0
    syn = 2.0 * h + 0.3 * rng.standard_normal((m, d)).astype(np.float32)
    real = np.concatenate([h[None], 0.4 * h + rng.standard_normal((n_bank - 1, d)).astype(np.float32)])
    return real / np.linalg.norm(real, axis=1, keepdims=True), syn / np.linalg.norm(syn, axis=1, keepdims=True)


def test_balanced_never_exceeds_cap_and_spreads_a_hub_that_nearest_keeps():
    from sraseg.embed.pairing import balanced_partners, partner_stats

    rng = np.random.default_rng(0)
    real, syn = _hub_case(rng)
    nearest = np.argmax(syn @ real.T, axis=1)
    assert partner_stats(nearest)["distinct"] == 1  # the constructed hub: nearest collapses
    for per_image in (1, 2, 3):
        partners, cap = balanced_partners(real, syn, per_image)
        assert partners.shape == (30, per_image) and cap == int(np.ceil(30 * per_image / 10))
        counts = np.bincount(partners.ravel(), minlength=10)
        assert counts.max() <= cap
        assert (counts > 0).sum() == 10  # every bank slice is used
    # Without hubness it keeps similarity: each synthetic vector is a noisy copy of one real row,
    # and the assignment finds exactly that row (a random or greedy-by-order rule would not).
    real = unit_rows(rng, 12, 32)
    perm = rng.permutation(12)
    syn = real[perm] + 0.05 * rng.standard_normal((12, 32)).astype(np.float32)
    partners, cap = balanced_partners(real, syn / np.linalg.norm(syn, axis=1, keepdims=True), 1)
    assert cap == 1
    np.testing.assert_array_equal(partners[:, 0], perm)
    # A domain gap: 8 synthetic vectors, noisy copies of 8 of 24 real rows, all carrying one shared
    # offset far larger than the signal. Raw cosine then favours the real rows nearest the offset;
    # the per-domain centring removes it and finds the true rows.
    real = unit_rows(rng, 24, 64)
    pick = rng.permutation(24)[:8]
    syn = real[pick] + 0.05 * rng.standard_normal((8, 64)) + 4.0 * unit_rows(rng, 1, 64)
    partners, _ = balanced_partners(real, syn / np.linalg.norm(syn, axis=1, keepdims=True), 1)
    np.testing.assert_array_equal(partners[:, 0], pick)


def test_index_reports_fd_floor_ratio_and_hubness_per_rule(tmp_path):
    rng = np.random.default_rng(1)
    real, syn = _hub_case(rng, m=30, n_bank=10)
    # 10 labeled + 10 unlabeled train slices; 4 slices per patient (make_prepared), so 5 patients.
    prepared = make_prepared(tmp_path, [("train", True)] * 10 + [("train", False)] * 10 + [("val", False)] * 2, size=8)
    real_all = np.concatenate([real, unit_rows(rng, 10, real.shape[1])])
    embed = make_embed_dir(tmp_path, real_all, np.arange(20), np.array([True] * 10 + [False] * 10), syn)
    index_stage.run(embed, prepared, embed, {"k": 3, "device": "cpu"})
    fd = json.loads((embed / "fd_dinov2.json").read_text())
    assert fd["fd_floor"] > 0 and fd["fd_ratio"] == pytest.approx(fd["fd_dinov2"] / fd["fd_floor"])
    assert sum(fd["floor_sizes"]) == 20 and min(fd["floor_sizes"]) >= 8  # whole patients, halves near equal
    rules = json.loads((embed / "index.json").read_text())["pairing_hubness"]
    assert set(rules) == {"nearest", "random", "balanced"}
    assert rules["nearest"]["distinct"] == 1 and rules["nearest"]["top_share"] == 1.0
    assert rules["balanced"]["distinct"] == 10 and rules["balanced"]["max_uses"] <= rules["balanced"]["cap"] == 3
    assert rules["nearest"]["mean_cosine"] > rules["balanced"]["mean_cosine"]  # nearest is the cosine optimum
    assert all(-1.0 <= r["mean_cosine"] <= 1.0 for r in rules.values())


def test_patient_halves_are_patient_disjoint_and_balanced():
    from sraseg.embed.frechet import patient_halves

    patients = np.repeat([f"p{i}" for i in range(9)], [3, 5, 2, 4, 4, 6, 1, 3, 4])
    half = patient_halves(patients, seed=0)
    for p in np.unique(patients):
        assert len(set(half[patients == p])) == 1  # a patient is never split
    assert abs(int(half.sum()) - int((~half).sum())) <= 6
    with pytest.raises(ValueError):
        patient_halves(np.array(["p0", "p0"]))


def test_fd_floor_below_fd_of_blurred_or_shifted_real_set():
    """The measure moves the right way: two patient-disjoint halves of one real set are closer than
    a half and a blurred or intensity-shifted copy of the other half (stand-in encoder features)."""
    from scipy import ndimage

    from sraseg.embed.encoder import build_encoder
    from sraseg.embed.frechet import patient_halves

    rng = np.random.default_rng(2)
    n, size = 48, 48
    yy, xx = np.mgrid[:size, :size] / size
    images, patients = [], []
    for i in range(n):  # bright discs with a dark ring on a black background, one patient per 4 slices
        cy, cx, r = 0.5 + 0.1 * rng.standard_normal(2).clip(-1, 1).tolist()[0], 0.5, 0.12 + 0.08 * rng.random()
        d = np.hypot(yy - cy, xx - cx)
        img = 0.9 * (d < r) + 0.3 * ((d >= r) & (d < r + 0.06)) + 0.05 * rng.random((size, size))
        images.append(img.astype(np.float32).clip(0, 1))
        patients.append(f"p{i // 4}")
    images, patients = np.stack(images), np.array(patients)
    half = patient_halves(patients)
    enc = build_encoder("mobilenet_v2", img_size=64)
    a = enc.embed_array(images[half])
    b = images[~half]
    floor = frechet_distance(a, enc.embed_array(b))["fd"]
    blurred = frechet_distance(a, enc.embed_array(ndimage.gaussian_filter(b, sigma=(0, 2, 2))))["fd"]
    shifted = frechet_distance(a, enc.embed_array(np.clip(b + 0.3, 0, 1)))["fd"]
    assert floor < blurred and floor < shifted, (floor, blurred, shifted)


def test_faiss_index_choice_falls_back_to_cpu_with_the_same_neighbours(monkeypatch):
    """The search goes through a FAISS GPU index only with a GPU build that sees a GPU; on the CPU build
    the chosen index is the CPU one itself, and its neighbours are the brute-force cosine ones."""
    index = index_stage
    rng = np.random.default_rng(3)
    bank, queries = (rng.standard_normal((n, 16)).astype(np.float32) for n in (40, 9))
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cpu = faiss.IndexFlatIP(16)
    cpu.add(bank)
    if not index.faiss_has_gpu():  # this machine: faiss-cpu, or no GPU
        assert not index.use_gpu_index("auto") and not index.use_gpu_index("cpu")
        with pytest.raises(ConfigError, match="faiss-gpu"):
            index.use_gpu_index("cuda")
        assert index.search_index(cpu, index.use_gpu_index("auto")) is cpu
    assert index.search_index(cpu, False) is cpu
    _, ids = index.search_index(cpu, index.use_gpu_index("auto")).search(queries, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ bank.T), axis=1, kind="stable")[:, :5])
    _, found, _ = index.cosine_knn(bank, queries, 5, use_gpu=index.use_gpu_index("auto"))
    np.testing.assert_array_equal(found, ids)
    # a faiss without the GPU classes (the CPU wheel) is told apart by hasattr alone
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    assert not index.faiss_has_gpu() and not index.use_gpu_index("auto")


def test_pairing_rules_are_shared_and_keep_their_streams():
    """sraseg.embed.pairing's rules as the blend stage and the index's hubness use them: nearest takes
    neighbour k mod n in rank order; random draws the same stream as a uniform rng.choice over the bank."""
    from sraseg.embed.pairing import nearest_partners, random_partners

    table = pd.DataFrame(dict(synthetic_id=[1, 0, 0, 1, 0], rank=[0, 2, 0, 1, 1], real_id=[7, 5, 3, 8, 4],
                              cosine=np.float32([0.9, 0.5, 0.8, 0.7, 0.6])))  # fmt: skip
    picks = nearest_partners(table, np.array([1, 0]), 4)
    assert picks["real_id"].tolist() == [7, 8, 7, 8, 3, 4, 5, 3]
    with pytest.raises(ValueError, match=r"\[2\]"):
        nearest_partners(table, np.array([2]), 1)
    bank = np.array([11, 12, 13, 14, 15])
    rows = random_partners(len(bank), 6, 3, np.random.default_rng(9))
    assert rows.shape == (6, 3)
    np.testing.assert_array_equal(bank[rows].ravel(), np.random.default_rng(9).choice(bank, size=18, replace=True))
