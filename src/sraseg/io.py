"""Small file helpers shared by every stage: all-or-nothing outputs, checked JSON and table readers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sraseg.errors import DatasetError

__all__ = ["StagedOutputs", "staged_outputs", "write_json", "write_csv", "read_json", "read_table", "load_array", "portable_path",
           "setup_logging"]

log = logging.getLogger(__name__)


class StagedOutputs:
    """Collects a stage's output files in a hidden temporary folder next to `out_dir`.

    Files are written under `tmp_dir` through `path(name)`; `commit()` moves each one into
    `out_dir` with an atomic rename. Nothing reaches `out_dir` unless the whole stage succeeded.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))

    def path(self, name: str) -> Path:
        """Where to write output `name` (may contain sub-folders) before the commit."""
        target = self.tmp_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(self.tmp_dir.iterdir()):
            dst = self.out_dir / src.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(src, dst)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


@contextmanager
def staged_outputs(out_dir: Path | str) -> Iterator[StagedOutputs]:
    """Context manager: write into `.path(name)`, committed to `out_dir` only on success."""
    staged = StagedOutputs(Path(out_dir))
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def _to_builtin(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def portable_path(path: Path | str, root: Path | str | None = None) -> str:
    """How an output names an input file or folder: relative to the working directory when it lies under
    it, else as written (a dataset the user named by an absolute path elsewhere stays so). Outputs then
    hold no machine's path, and a working directory copied elsewhere still names its inputs.

    `root`: the folder as the user wrote it, of which `path` is a descendant of its resolved form (the
    dataset readers resolve their folder): `path` is then named through `root` as written.
    """
    text = os.fspath(path)
    if root is not None:
        try:
            text = os.fspath(Path(root) / Path(text).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass  # not under root: named on its own
    if not os.path.isabs(text):
        return text
    cwd = os.getcwd()
    for candidate in (os.path.normpath(text), os.path.realpath(text)):
        if candidate == cwd or candidate.startswith(cwd.rstrip(os.sep) + os.sep):
            return os.path.relpath(candidate, cwd)
    return text


def write_json(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON (numpy scalars and paths converted)."""
    Path(path).write_text(json.dumps(data, indent=2, default=_to_builtin, allow_nan=True) + "\n")


def write_csv(path: Path | str, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A CSV table replaced atomically: a reader (a person watching a run) never sees half a table."""
    import csv

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        table = csv.DictWriter(handle, fieldnames=columns)
        table.writeheader()
        table.writerows(rows)
    os.replace(tmp, path)


def _need_file(path: Path | str, hint: str = "") -> Path:
    """`path` as a Path; a DatasetError naming it (and `hint`, e.g. which stage writes it) when missing."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found" + (f" ({hint})" if hint else ""))
    return path


def read_json(path: Path | str, hint: str = "") -> Any:
    """A JSON file's content.

    Raises:
        DatasetError: the file is missing or not valid JSON.
    """
    path = _need_file(path, hint)
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def read_table(path: Path | str, columns: tuple[str, ...] = (), hint: str = "") -> pd.DataFrame:
    """A parquet table that must hold `columns` (other columns are kept).

    Raises:
        DatasetError: the file is missing, unreadable, or lacks one of `columns`.
    """
    path = _need_file(path, hint)
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{path}: unreadable parquet file ({type(err).__name__}: {err})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def load_array(path: Path | str, hint: str = "", mmap: bool = True) -> np.ndarray:
    """A .npy array, memory-mapped unless `mmap` is False (shape checks stay with the caller).

    Raises:
        DatasetError: the file is missing or not a readable .npy array.
    """
    path = _need_file(path, hint)
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError) as err:
        raise DatasetError(f"{path}: not a readable .npy array ({err})") from None


def setup_logging(verbose: bool = False) -> None:
    """Console logging for people; tables and TensorBoard carry the numbers."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
