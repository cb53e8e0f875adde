"""Small builders for data-layer tests: a tiny phantom and split lists written into tmp folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from sraseg.data import phantom

SRC = Path(__file__).resolve().parents[1] / "src"


def make_phantom(root: Path, patients: int = 6, seed: int = 0, version: int = phantom.DEFAULT_VERSION) -> Path:
    """Write a `patients`-patient phantom to root/raw and return that folder."""
    raw = root / "raw"
    phantom.run(raw, patients=patients, seed=seed, version=version)
    return raw


def copy_dataset(raw: Path, dst: Path) -> Path:
    """A private copy of a dataset that a test may damage."""
    shutil.copytree(raw, dst)
    return dst


def write_splits(
    root: Path, train: list[str], val: list[str], test: list[str], labeled: list[str]
) -> tuple[Path, Path]:
    """Write train/val/test.txt under root/splits and labeled.txt; returns (splits_dir, labeled_path)."""
    splits = root / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (splits / f"{name}.txt").write_text("".join(f"{pid}\n" for pid in ids))
    labeled_path = splits / "labeled.txt"
    labeled_path.write_text("# labeled training patients\n" + "".join(f"{pid}\n" for pid in labeled))
    return splits, labeled_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m sraseg.cli ARGS` with src on the path; returns the completed process."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "sraseg.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
