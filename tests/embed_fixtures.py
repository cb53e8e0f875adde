"""Tiny stage inputs in the CONTRACTS.md formats for the embed and index tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_prepared(root: Path, splits: list[tuple[str, bool]], size: int = 32, seed: int = 0) -> Path:
    """A prepared dir with one slice per (split, labeled) entry; images are smooth random fields in [0,1]."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "prepared"
    out.mkdir(parents=True)
    n = len(splits)
    coarse = rng.random((n, 4, 4)).astype(np.float32)
    images = np.kron(coarse, np.ones((size // 4, size // 4), dtype=np.float32))
    images = np.clip(images + 0.05 * rng.standard_normal(images.shape).astype(np.float32), 0, 1)
    np.save(out / "images.npy", images.astype(np.float32))
    np.save(out / "labels.npy", np.zeros((n, size, size), dtype=np.uint8))
    pd.DataFrame(
        {
            "slice_id": np.arange(n, dtype=np.int64),
            "case": [f"patient{i // 4:03d}_frame01" for i in range(n)],
            "patient": [f"patient{i // 4:03d}" for i in range(n)],
            "frame": 1,
            "phase": "ED",
            "slice": np.arange(n) % 4,
            "split": [s for s, _ in splits],
            "labeled": [bool(lab) for _, lab in splits],
        }
    ).to_parquet(out / "slices.parquet", index=False)
    return out


def make_synthetic(root: Path, m: int, size: int = 32, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    out = Path(root) / "synthetic"
    out.mkdir(parents=True)
    np.save(out / "images.npy", rng.random((m, size, size), dtype=np.float32))
    pd.DataFrame({"synthetic_id": np.arange(m, dtype=np.int64), "seed": np.arange(m, dtype=np.int64) + 100}).to_parquet(
        out / "synthetic.parquet", index=False
    )
    return out


def unit_rows(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_embed_dir(root: Path, real: np.ndarray, slice_ids: np.ndarray, labeled: np.ndarray, syn: np.ndarray) -> Path:
    """An embed dir as the embed stage writes it (encoder.json included)."""
    out = Path(root) / "embed"
    out.mkdir(parents=True)
    np.save(out / "real.npy", real.astype(np.float32))
    pd.DataFrame(
        {"row": np.arange(len(real), dtype=np.int64), "slice_id": slice_ids.astype(np.int64), "labeled": labeled}
    ).to_parquet(out / "real.parquet", index=False)
    np.save(out / "synthetic.npy", syn.astype(np.float32))
    pd.DataFrame(
        {"row": np.arange(len(syn), dtype=np.int64), "synthetic_id": np.arange(len(syn), dtype=np.int64)}
    ).to_parquet(out / "synthetic.parquet", index=False)
    (out / "encoder.json").write_text('{"model": "test", "pooling": "cls", "untrained": true}\n')
    return out
