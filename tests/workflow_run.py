"""Running the repository's Snakemake workflow from tests: in a scratch working directory holding a
copy of config/, with the venv's python first on PATH (the rules call `python -m sraseg`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"


def scratch(path: Path) -> Path:
    """A working directory with a copy of the repository's config/ (configs and split lists)."""
    shutil.copytree(REPO / "config", path / "config")
    return path


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a finished run's working directory (config/, results/, resources/ and .snakemake's
    records), modification times kept, so Snakemake finds the copy as complete as the run: tests that
    change configs, code or results share one run and each change its own copy."""
    shutil.copytree(run, dest, symlinks=True)
    return dest


def snakemake_env(base: dict[str, str] | None = None) -> dict[str, str]:
    base = dict(os.environ if base is None else base)
    return dict(base, HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}{os.pathsep}{base['PATH']}")


def snakemake_command(workdir: Path, config: str, *args: str) -> list[str]:
    """`snakemake` on this repository's workflow, run in `workdir` with workdir/config/<config>."""
    return [
        str(SNAKEMAKE),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config" / config),
        *args,
    ]


def run_snakemake(workdir: Path, config: str, *args: str, cores: int = 2, check: bool = True,
                  snakefile: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the repository's workflow (or the one at `snakefile`) in `workdir`; with `check`, a failure
    fails the test with Snakemake's stderr and the tail of every job log."""
    cmd = snakemake_command(workdir, config, "--cores", str(cores), *args)
    if snakefile is not None:
        cmd[cmd.index("--snakefile") + 1] = str(snakefile)
    result = subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(), timeout=1200)
    if check and result.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted(workdir.glob("results/*/logs/*.log")))
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{result.stderr[-5000:]}\n{logs}")
    return result
