"""Reading the embed stage's files: real.npy + real.parquet and synthetic.npy + synthetic.parquet.

Every stage that reads embeddings (index, blend's balanced pairing, training's SA targets) goes through
here, so the files are checked the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.errors import DatasetError
from sraseg.io import load_array, read_table

__all__ = ["EMBED_HINT", "ID_COLUMNS", "read_embeddings", "load_embeddings"]

EMBED_HINT = "run the embed stage first"
ID_COLUMNS = {"real": "slice_id", "synthetic": "synthetic_id"}  # the id column of each set's table


def _unit_rows(x: np.ndarray, path: Path) -> np.ndarray:
    """Rows divided by their norms (defensive: the embed stage already wrote unit rows)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DatasetError(f"{path}: {int((norms == 0).sum())} all-zero embedding row(s)")
    return x / norms


def read_embeddings(embed_dir: Path | str, name: str, unit: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """One set's embeddings float32 [N,D] and its table (row, id column; row i describes row i).

    Args:
        name: "real" (table column slice_id) or "synthetic" (synthetic_id).
        unit: divide the rows by their norms again (index, blend) instead of taking them as written (training).

    Raises:
        DatasetError: a missing file, not a non-empty 2-D array, NaN/inf or all-zero rows (unit), or a table
            whose rows do not match the array's.
    """
    npy, table_path = Path(embed_dir) / f"{name}.npy", Path(embed_dir) / f"{name}.parquet"
    x = load_array(npy, EMBED_HINT, mmap=False)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DatasetError(f"{npy}: expected a non-empty float array [N,D]; got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DatasetError(f"{npy}: {bad.size} row(s) hold NaN/inf embeddings (first row {bad[0]})")
    if unit:
        x = _unit_rows(x, npy)
    table = read_table(table_path, ("row", ID_COLUMNS[name]), EMBED_HINT)
    if len(table) != len(x) or not np.array_equal(table["row"].to_numpy(), np.arange(len(x))):
        raise DatasetError(f"{table_path}: {len(table)} rows do not match the {len(x)} rows of {npy.name}")
    return x, table


def load_embeddings(embed_dir: Path | str) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, pd.DataFrame]:
    """real [R,D] unit rows, real table (row, slice_id, ...), synthetic [M,D] unit rows, synthetic table.

    Raises:
        DatasetError: as `read_embeddings`, or the two sets in different dimensions.
    """
    real, real_table = read_embeddings(embed_dir, "real", unit=True)
    syn, syn_table = read_embeddings(embed_dir, "synthetic", unit=True)
    if real.shape[1] != syn.shape[1]:
        raise DatasetError(
            f"{Path(embed_dir) / 'synthetic.npy'}: embedding dim {syn.shape[1]} differs from real.npy's "
            f"{real.shape[1]} (embedded with different encoders? rerun embed)"
        )
    return real, real_table, syn, syn_table
