"""The tiny workflow on a real single-node SLURM cluster, through workflow/profiles/slurm, against a local run.

The cluster (tests/slurm_cluster.py) is brought up on this machine; Debian's packages are installed when
missing (root), else the test skips. The profile is used as shipped, GPU requests included: the node offers
a pretend GPU (a `gpu` GRES backed by /dev/null), so `--gpus=1` jobs are scheduled like on a GPU cluster and
then find no CUDA device and run on the CPU. Test-only command-line options: job states from `squeue`
(there is no accounting database), first status check after 1 s, SLURM logs kept, at most 2 threads per
job (the node has 2 CPUs; the local run gets the same 2 threads), and no retries.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from slurm_cluster import Cluster, ClusterUnavailable, running_cluster
from workflow_run import REPO, VENV_BIN, scratch, snakemake_command, snakemake_env

PROFILE = REPO / "workflow" / "profiles" / "slurm"
TIMEOUT = 15 * 60
# Rules whose jobs ask SLURM for a GPU: the rules declare gpu=1, the profile's set-resources tune them.
GPU_RULES = {
    rule
    for rule, res in yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"].items()
    if res.get("gpu")
}


def tail(path: Path, size: int = 4000) -> str:
    return f"== {path}\n{path.read_text(errors='replace')[-size:]}" if path.exists() else f"== {path} (missing)"


def rule_logs(workdir: Path) -> str:
    return "\n".join(tail(p, 2000) for p in sorted(workdir.glob("results/*/logs/*.log")))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same config run locally on 2 cores, in the background while the SLURM run works.

    Yields a function that waits for the run and returns its working directory.
    """
    workdir = scratch(tmp_path_factory.mktemp("local"))
    env = snakemake_env()
    log = workdir / "snakemake.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            snakemake_command(workdir, "tiny.yaml", "--cores", "2"), stdout=out, stderr=subprocess.STDOUT, env=env
        )

    def finish() -> Path:
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the local reference run took over {TIMEOUT} s\n{tail(log)}")
        if proc.returncode != 0:
            pytest.fail(f"the local reference run failed\n{tail(log)}\n{rule_logs(workdir)}")
        return workdir

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """A running single-node cluster, torn down (jobs cancelled, daemons stopped, state removed) afterwards."""
    root = Path(tempfile.mkdtemp(prefix="sraseg-slurm-"))  # short: the MUNGE socket path has a length limit
    try:
        with contextlib.ExitStack() as stack:
            try:
                running = stack.enter_context(running_cluster(root / "cluster"))
            except ClusterUnavailable as err:
                pytest.skip(f"no SLURM here: {err}")
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def planned_jobs(output: str) -> Counter:
    """The 'Job stats' table Snakemake prints before running: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)})


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested JSON object as one level of "a/b/c" keys, null as NaN (for pytest.approx)."""
    items = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}/"))
        else:
            items[f"{prefix}{key}"] = float("nan") if value is None else value
    return items


def rule_of(comment: str) -> str:
    """The rule of a SLURM job, from the comment the executor gives it: rule_<rule>[_wildcards_<values>]."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment)
    assert match, comment
    return match[1]


def test_profile_asks_a_gpu_for_exactly_the_rules_that_declare_one():
    from test_envs import workflow_rules

    declared = {rule.name for rule in workflow_rules() if rule.resources.get("gpu").value == 1}
    assert declared and GPU_RULES == declared


def test_profile_plans_the_workflow_without_a_cluster(tmp_path: Path):
    """A dry run reads the profile (executor, resources, limits) and needs no SLURM."""
    env = snakemake_env()
    cmd = snakemake_command(scratch(tmp_path), "tiny.yaml", "--workflow-profile", str(PROFILE), "-n")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"workflow specific profile {PROFILE}" in output
    assert planned_jobs(output)["train"] == 2


@pytest.mark.slow
def test_tiny_workflow_on_slurm_matches_local_run(cluster: Cluster, local_run, tmp_path: Path):
    workdir = scratch(tmp_path)
    # The SLURM client programs (and the cluster's srun) first, then the venv: the rules call `python -m sraseg`.
    path = os.pathsep.join([str(cluster.bin_dir), str(VENV_BIN), cluster.env["PATH"]])
    env = dict(cluster.env, HF_HUB_OFFLINE="1", PATH=path)
    cmd = snakemake_command(
        workdir,
        "tiny.yaml",
        "--workflow-profile",
        str(PROFILE),
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
        "--max-threads",
        "2",
        "--retries",
        "0",
    )
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the SLURM run took over {TIMEOUT} s\n{(err.stderr or b'')[-5000:]!r}\n{cluster.logs()}")
    output = run.stdout + run.stderr
    if run.returncode != 0:
        pytest.fail(f"the SLURM run failed\n{output[-6000:]}\n{rule_logs(workdir)}\n{cluster.logs()}")
    assert f"workflow specific profile {PROFILE}" in output

    # Every planned job (but the local `all`) ran as a SLURM job that completed, GPU stages on a GPU.
    planned = planned_jobs(output)
    planned.pop("all", None)
    jobs = cluster.jobs()
    assert Counter(rule_of(job["Comment"]) for job in jobs) == planned
    # embed_real_pool is planned only when an experiment trains on real unlabeled slices (train.unlabeled: real).
    assert GPU_RULES - {"embed_real_pool"} <= set(planned)
    for job in jobs:
        rule = rule_of(job["Comment"])
        assert job["JobState"] == "COMPLETED", job
        assert ("gpu:1" in job.get("TresPerJob", "")) == (rule in GPU_RULES), job
        # The job's own log, kept under .snakemake/slurm_logs, shows Snakemake ran the rule inside it.
        log = Path(job["StdOut"])
        assert log.is_relative_to(workdir.resolve() / ".snakemake" / "slurm_logs") and log.name == f"{job['JobId']}.log"
        assert f"(Rule: {rule})" in log.read_text(), tail(log)

    # The same numbers as a local run: same seeds, same thread count, same CPU code.
    reference = local_run() / "results" / "tiny"
    results = workdir / "results" / "tiny"
    for exp in ("labeled_only", "sraseg"):
        eval_dir = Path(exp) / "seed1" / "eval"
        expected = pd.read_csv(reference / eval_dir / "metrics_per_case.csv")
        got = pd.read_csv(results / eval_dir / "metrics_per_case.csv")
        assert len(got) == 4 * 3 * 2  # cases x classes x modes
        pd.testing.assert_frame_equal(got, expected, rtol=1e-6)
        summary = flat(json.loads((results / eval_dir / "summary.json").read_text()))
        expected_summary = flat(json.loads((reference / eval_dir / "summary.json").read_text()))
        assert summary == pytest.approx(expected_summary, rel=1e-6, nan_ok=True)
    # A GPU stage's output, not only the end result: the synthetic images from the diffusion generator.
    synthetic = np.load(results / "synthetic" / "images.npy")
    assert synthetic.std() > 0
    np.testing.assert_allclose(synthetic, np.load(reference / "synthetic" / "images.npy"), rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(
        pd.read_csv(results / "report" / "results.csv"), pd.read_csv(reference / "report" / "results.csv"), rtol=1e-6
    )
