"""A bad input file: the job fails with a one-line error in its log, and after the fix only it reruns."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from workflow_run import scratch, snakemake_command, snakemake_env


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the workflow on the scratch config with the default (local) profile."""
    cmd = snakemake_command(workdir, "failures.yaml", "--cores", "2", *args)
    return subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(), timeout=600)


def ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def jobs_run(output: str) -> Counter:
    """The 'Job stats' table Snakemake prints before running: rule -> number of jobs."""
    assert "Job stats:" in output, output[-3000:]
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)})


def mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_bad_ground_truth_fails_evaluate_and_only_evaluate_reruns(tmp_path: Path):
    scratch(tmp_path)
    # The tiny config with its cheapest experiment: phantom -> prepare -> train -> predict -> evaluate.
    config = yaml.safe_load((tmp_path / "config" / "tiny.yaml").read_text())
    config["experiments"] = {"base": {"method": "labeled_only"}}
    (tmp_path / "config" / "failures.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results" / "tiny"
    summary = results / "base" / "seed1" / "eval" / "summary.json"

    ok(snakemake(tmp_path, "results/tiny/base/seed1/predictions"))  # targets are relative to the workdir
    before = mtimes(results)
    assert any(p.name == "model.safetensors" for p in before)

    # One test case's ground truth is truncated (as by an interrupted copy).
    truth = sorted((tmp_path / "resources" / "tiny" / "raw" / "patient007").glob("*_gt.nii.gz"))[0]
    good = truth.read_bytes()
    truth.write_bytes(good[: len(good) // 3])

    target = str(summary.relative_to(tmp_path))
    failed = snakemake(tmp_path, target)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "Error in rule evaluate" in output
    log = results / "logs" / "evaluate_base_seed1.log"
    assert str(log.relative_to(tmp_path)) in output  # Snakemake points at the job's log
    errors = [line for line in log.read_text().splitlines() if line.startswith("sraseg evaluate: error:")]
    assert len(errors) == 1, log.read_text()[-3000:]
    assert str(truth.relative_to(tmp_path)) in errors[0]  # the path as the rule gave it, from the workdir
    assert "Traceback" not in log.read_text()
    assert not summary.parent.exists() or not any(summary.parent.iterdir())  # no partial results
    assert mtimes(results).keys() - {log} == before.keys()  # nothing else was touched

    # Fixed: the plan, and the rerun, hold the failed job only; what succeeded is not run again.
    truth.write_bytes(good)
    assert jobs_run(ok(snakemake(tmp_path, "-n", target))) == Counter(evaluate=1)
    assert jobs_run(ok(snakemake(tmp_path, target))) == Counter(evaluate=1)
    after = mtimes(results)
    assert {p: t for p, t in after.items() if p in before and p != log} == {p: t for p, t in before.items() if p != log}
    assert summary.is_file()
    assert "Nothing to be done" in ok(snakemake(tmp_path, "-n", target))
