"""The index stage: a FAISS inner-product index over the real bank's unit embeddings (cosine search),
each synthetic image's k nearest real slices, FD-DINOv2 between real and synthetic against its real
floor (two patient-disjoint halves of the real train slices), hubness of each pairing rule, and a PCA plot."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.embed.common import describe_encoder
from sraseg.embed.embeddings import load_embeddings
from sraseg.embed.frechet import frechet_distance, real_floor
from sraseg.embed.pairing import pairing_hubness
from sraseg.errors import ConfigError, DatasetError
from sraseg.io import portable_path, read_json, read_table, staged_outputs, write_json
from sraseg.settings import parse_settings, settings_dict

__all__ = [
    "IndexSettings",
    "run",
    "cosine_knn",
    "faiss_has_gpu",
    "use_gpu_index",
    "search_index",
    "neighbour_table",
    "fd_summary",
    "neighbour_hubness",
    "plot_projection",
]

log = logging.getLogger(__name__)



@dataclass
class IndexSettings:
    """Settings of the index stage (config section `index`).

    Args:
        bank (`str`, "labeled"): which real slices can be neighbours: "labeled" train slices only (the
            paper's setting: blends need labels) or "all_train".
        k (`int`, 5): neighbours per synthetic image (capped at the bank size).
        device (`str`, "auto"): "auto" (a FAISS GPU index when faiss was built with GPUs and sees one),
            "cpu" or "cuda".
    """

    bank: str = "labeled"
    k: int = 5
    device: str = "auto"


def faiss_has_gpu() -> bool:
    """True when this faiss is a GPU build (faiss-gpu: StandardGpuResources exists) and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_gpu_index(device: str) -> bool:
    """Whether the search runs on a FAISS GPU index: "auto" when faiss_has_gpu(), "cuda" always, "cpu" never.

    Raises:
        ConfigError: "cuda" without a GPU build of faiss or without a GPU.
    """
    gpu = faiss_has_gpu()
    if device == "cuda" and not gpu:
        raise ConfigError(
            "'index.device' is 'cuda' but this faiss has no GPU support or sees no GPU (install faiss-gpu)"
        )
    return gpu and device != "cpu"


def search_index(index, use_gpu: bool):
    """The index the queries go through: a copy on GPU 0 (faiss-gpu), else `index` itself (the CPU one)."""
    if not use_gpu:
        return index
    import faiss

    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def cosine_knn(bank: np.ndarray, queries: np.ndarray, k: int, use_gpu: bool = False):
    """Exact cosine k-NN with FAISS (IndexFlatIP on unit vectors).

    Args:
        bank: float32 [R,D], unit rows.
        queries: float32 [M,D], unit rows.
        k: neighbours per query, 1 <= k <= R.
        use_gpu: search on GPU 0 (needs a GPU build of faiss; see use_gpu_index).

    Returns:
        (cpu_index, ids int64 [M,k] rows of `bank`, cosines float32 [M,k]); rank 0 is the nearest.
    """
    import faiss

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    cosines, ids = search_index(index, use_gpu).search(queries, k)
    return index, ids.astype(np.int64), cosines.astype(np.float32)


def _train_labeled(prepared_dir: Path, slice_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """labeled flags and patient ids of `slice_ids` from the prepared table; checks they are train slices."""
    path = Path(prepared_dir) / "slices.parquet"
    cols = ("slice_id", "split", "labeled", "patient")
    slices = read_table(path, cols, "run the prepare stage first").set_index("slice_id")
    known = slices.reindex(slice_ids)
    if known["split"].isna().any() or (known["split"] != "train").any():
        raise DatasetError(f"{path}: the embeddings name slices that are not train slices here (stale embed? rerun it)")
    return known["labeled"].to_numpy(dtype=bool), known["patient"].astype(str).to_numpy()


def plot_projection(real: np.ndarray, synthetic: np.ndarray, bank_mask: np.ndarray, path: Path, title: str) -> None:
    """2-D PCA (numpy SVD over both sets) scatter: real (bank highlighted) vs synthetic, saved as PNG."""
    from matplotlib.figure import Figure

    both = np.concatenate([real, synthetic]).astype(np.float64)
    centred = both - both.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.pad(centred @ vt[:1].T, ((0, 0), (0, 1)))
    var = sv**2 / max((sv**2).sum(), 1e-12)
    r, s = xy[: len(real)], xy[len(real) :]
    fig = Figure(figsize=(6, 5), dpi=120)
    ax = fig.add_subplot()
    ax.scatter(
        r[~bank_mask, 0],
        r[~bank_mask, 1],
        s=6,
        c="tab:blue",
        alpha=0.35,
        label=f"real, not in bank ({(~bank_mask).sum()})",
    )
    ax.scatter(r[bank_mask, 0], r[bank_mask, 1], s=8, c="tab:green", alpha=0.7, label=f"real bank ({bank_mask.sum()})")
    ax.scatter(s[:, 0], s[:, 1], s=6, c="tab:orange", alpha=0.5, marker="^", label=f"synthetic ({len(s)})")
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}% var)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}% var)" if len(var) > 1 else "PC2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


HUB_WARNING_SHARE = 0.25  # one real slice as the nearest neighbour of over a quarter of the synthetic set


def neighbour_hubness(neighbours: pd.DataFrame) -> dict:
    """How concentrated the nearest (rank 0) real neighbours are: the number of distinct nearest real
    slices and the share of synthetic images whose nearest slice is the most common one. A high share
    means nearest-neighbour pairing collapses onto a few real slices (an untrained encoder, or a
    synthetic set far from every real slice)."""
    nearest = neighbours.loc[neighbours["rank"] == 0, "real_id"]
    counts = nearest.value_counts()
    return {
        "distinct_nearest": int(len(counts)),
        "top_share": float(counts.iloc[0] / len(nearest)) if len(nearest) else 0.0,
        "top_real_id": int(counts.index[0]) if len(nearest) else -1,
    }


def run(embed_dir: Path, prepared_dir: Path, out_dir: Path, settings: dict | None = None) -> None:
    """Index the real bank, find each synthetic image's k nearest real slices, compute FD-DINOv2.

    Writes to out_dir (usually the embed folder): real.faiss (CPU IndexFlatIP over the bank, row i ==
    index.json bank_slice_ids[i]), neighbours.parquet (synthetic_id, rank, real_id, cosine), fd_dinov2.json
    (fd_dinov2, fd_floor, fd_ratio), projection.png, index.json (pairing_hubness: per rule distinct
    partners, largest share, mean cosine, one partner per synthetic image).

    Raises:
        DatasetError: missing/inconsistent embed files, NaN embeddings, empty bank.
        ConfigError: bad settings, or device "cuda" without a GPU build of faiss.
    """
    import faiss

    cfg = parse_settings(IndexSettings, settings, "index")
    embed_dir = Path(embed_dir)
    real, real_table, syn, syn_table = load_embeddings(embed_dir)
    bank = _real_bank(cfg, real_table, prepared_dir)
    use_gpu = use_gpu_index(cfg.device)
    index, rows, cosines = cosine_knn(real[bank.mask], syn, bank.k, use_gpu=use_gpu)
    synthetic_ids = syn_table["synthetic_id"].to_numpy(dtype=np.int64)
    neighbours = neighbour_table(synthetic_ids, bank.ids, rows, cosines)
    encoder_path = embed_dir / "encoder.json"
    encoder = read_json(encoder_path) if encoder_path.is_file() else {}
    fd_report = fd_summary(real, syn, bank.patients, encoder)
    hubness = neighbour_hubness(neighbours)
    rules = pairing_hubness(real[bank.mask], bank.ids, syn, synthetic_ids, neighbours)
    _log_hubness(hubness, rules, len(bank.ids), encoder)

    with staged_outputs(out_dir) as st:
        faiss.write_index(index, str(st.path("real.faiss")))
        neighbours.to_parquet(st.path("neighbours.parquet"), index=False)
        write_json(st.path("fd_dinov2.json"), fd_report)
        plot_projection(real, syn, bank.mask, st.path("projection.png"), _projection_title(encoder, fd_report))
        write_json(
            st.path("index.json"),
            {
                "settings": settings_dict(cfg),
                "k_used": bank.k,
                "bank_size": int(len(bank.ids)),
                "n_real": int(len(real)),
                "n_synthetic": int(len(syn)),
                "dim": int(real.shape[1]),
                "faiss_device": "cuda" if use_gpu else "cpu",
                "faiss_version": faiss.__version__,
                "metric": "cosine (inner product of L2-normalised vectors)",
                "embed_dir": portable_path(embed_dir),
                "neighbour_hubness": hubness,
                "pairing_hubness": rules,
                "bank_slice_ids": bank.ids,
            },
        )
    floor, ratio = fd_report["fd_floor"], fd_report["fd_ratio"]
    log.info("bank %d slices, k=%d, mean top-1 cosine %.4f, FD %.4f, real floor %s, ratio %s", len(bank.ids), bank.k,
             float(cosines[:, 0].mean()), fd_report["fd_dinov2"], f"{floor:.4f}" if floor is not None else "n/a",
             f"{ratio:.2f}" if ratio is not None else "n/a")  # fmt: skip


@dataclass
class _Bank:
    """The real slices that can be neighbours."""

    mask: np.ndarray  # bool [R] over the rows of real.npy
    ids: np.ndarray  # int64 [L] their slice ids (row i of the FAISS index)
    patients: np.ndarray  # str [R] patient of every real row (the FD floor's halves)
    k: int  # neighbours per synthetic image, capped at L


def _real_bank(cfg: IndexSettings, real_table: pd.DataFrame, prepared_dir: Path) -> _Bank:
    """The bank of `cfg.bank` ("labeled" train slices or "all_train") and k capped at its size.

    Raises:
        DatasetError: slices that are not train slices here, or an empty bank.
    """
    labeled, patients = _train_labeled(prepared_dir, real_table["slice_id"].to_numpy())
    mask = labeled if cfg.bank == "labeled" else np.ones(len(real_table), dtype=bool)
    if not mask.any():
        raise DatasetError(
            f"{Path(prepared_dir) / 'slices.parquet'}: no labeled train slices, the '{cfg.bank}' bank is empty"
        )
    ids = real_table["slice_id"].to_numpy(dtype=np.int64)[mask]
    k = min(cfg.k, len(ids))
    if k < cfg.k:
        log.warning("index.k=%d is larger than the bank (%d slices); using k=%d", cfg.k, len(ids), k)
    return _Bank(mask, ids, patients, k)


def neighbour_table(synthetic_ids: np.ndarray, bank_ids: np.ndarray, rows: np.ndarray, cosines: np.ndarray
                    ) -> pd.DataFrame:  # fmt: skip
    """neighbours.parquet: (synthetic_id, rank, real_id, cosine), k rows per synthetic image in rank order.

    Args:
        rows: int64 [M,k] bank rows found for each synthetic image; cosines: float32 [M,k].
    """
    k = rows.shape[1]
    return pd.DataFrame(
        {
            "synthetic_id": np.repeat(synthetic_ids, k),
            "rank": np.tile(np.arange(k, dtype=np.int64), len(synthetic_ids)),
            "real_id": bank_ids[rows.ravel()],
            "cosine": cosines.ravel(),
        }
    )


def fd_summary(real: np.ndarray, syn: np.ndarray, patients: np.ndarray, encoder: dict) -> dict:
    """fd_dinov2.json: FD-DINOv2 between every real train embedding (the real distribution, not just the
    bank) and the synthetic set, against the floor of two patient-disjoint real halves (null with one patient)."""
    fd = frechet_distance(real, syn)
    try:
        floor = real_floor(real, patients)
    except ValueError:
        floor = None
        log.warning("fewer than two train patients: no FD floor, fd_ratio is null")
    if fd["n_a"] <= fd["dim"] or fd["n_b"] <= fd["dim"]:
        log.warning("FD-DINOv2 from %d real / %d synthetic vectors in %d dims: covariances are singular, "
                    "the value is only comparable at equal set sizes", fd["n_a"], fd["n_b"], fd["dim"])  # fmt: skip
    return {
        "fd_dinov2": fd["fd"],
        "fd_floor": floor["fd"] if floor is not None else None,
        "fd_ratio": fd["fd"] / floor["fd"] if floor is not None and floor["fd"] > 0 else None,
        "floor_set": "two patient-disjoint halves of the real train slices" if floor is not None else None,
        "floor_sizes": [floor["n_a"], floor["n_b"]] if floor is not None else None,
        "mean_term": fd["mean_term"],
        "trace_term": fd["trace_term"],
        "eps_used": fd["eps_used"],
        "real_set": "all_train",
        "n_real": fd["n_a"],
        "n_synthetic": fd["n_b"],
        "dim": fd["dim"],
        "model": encoder.get("model"),
        "encoder": describe_encoder(encoder) if encoder else None,
        "pooling": encoder.get("pooling"),
        "untrained_encoder": encoder.get("untrained"),
    }


def _log_hubness(hubness: dict, rules: dict, bank_size: int, encoder: dict) -> None:
    """One line per pairing rule; a warning when nearest-neighbour pairing collapses onto a few slices."""
    for rule, stats in rules.items():
        log.info("pairing %-8s: %d distinct partners, largest share %.1f%%, mean cosine %.4f",
                 rule, stats["distinct"], 100 * stats["top_share"], stats["mean_cosine"])  # fmt: skip
    if hubness["top_share"] > HUB_WARNING_SHARE:
        log.warning(
            "%.0f%% of the synthetic images have the same nearest real slice (%d distinct nearest slices in a "
            "bank of %d): nearest-neighbour pairing will show the segmenter very few real slices%s",
            100 * hubness["top_share"],
            hubness["distinct_nearest"],
            bank_size,
            " (the encoder is UNTRAINED)" if encoder.get("untrained") else "",
        )


def _projection_title(encoder: dict, fd_report: dict) -> str:
    title = f"{encoder.get('model', 'encoder')} ({encoder.get('pooling', '?')}), FD = {fd_report['fd_dinov2']:.4f}"
    if fd_report["fd_ratio"] is not None:
        title += f" = {fd_report['fd_ratio']:.2f} x real floor"
    if encoder.get("untrained"):
        title += "  [UNTRAINED ENCODER]"
    return title
