"""Training jobs on the local SLURM cluster (tests/slurm_cluster.py), run through workflow/profiles/slurm as
shipped (retries included), that SLURM stops while they train: the workflow still finishes, each job resumes
from the last.ckpt it wrote on SIGTERM, and the metrics equal an uninterrupted local run of the same config.

One workflow run serves both cases (each SLURM workflow run takes minutes): the labeled_only experiment with
two seeds, up to their evaluations. Once it has done a step, seed 1's training job is requeued (`scontrol
requeue`, what a preemption with PreemptMode=REQUEUE does) and seed 2's gets SIGTERM (`scancel
--signal=TERM`, what a time limit, the profile's `--signal` or a preemption that cancels sends first).
Training is longer than tiny.yaml's (400 iterations, some 20 s) so that the test can act while it runs, and
it keeps no periodic checkpoint: the only last.ckpt a resume can find is the one the job wrote on the
signal. Jobs get 1 thread, the node 2 CPUs and 2 pretend GPUs, so that the two seeds train side by side
(the local run: 1 thread a job too).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from slurm_cluster import Cluster, ClusterUnavailable, running_cluster
from test_slurm import PROFILE, TIMEOUT, flat, rule_logs, rule_of, tail
from workflow_run import VENV_BIN, scratch, snakemake_command, snakemake_env

CONFIG = "preempt.yaml"
# long enough that the test acts while both jobs train: 40 iterations took 2 s on an idle 2-core machine,
# and seed 2 finished before its SIGTERM could be sent
ITERATIONS = 400
SEEDS = (1, 2)
RESULTS = Path("results") / "tiny"
TARGETS = [str(RESULTS / "labeled_only" / f"seed{seed}" / "eval" / "summary.json") for seed in SEEDS]
PROGRESS = re.compile(r"train labeled_only: [1-9]\d*/\d+ it")  # a step done: SIGTERM is handled from then on
SIGNALLED = re.compile(
    rf"sraseg train: received SIGTERM at step (\d+) of {ITERATIONS}: wrote (\S+), exiting; rerun to resume"
)
# Seed 1's job is requeued, as a preemption with PreemptMode=REQUEUE does; seed 2's gets SIGTERM in its job
# steps, where the training runs (the batch shell only waits for them).
STOP = {1: ("scontrol", "requeue"), 2: ("scancel", "--signal=TERM")}
RESUMED = re.compile(rf"resuming labeled_only from (\S+) at step (\d+) of {ITERATIONS}")


def train_log(workdir: Path, seed: int) -> Path:
    return workdir / RESULTS / "logs" / f"train_labeled_only_seed{seed}.log"


def preempt_scratch(path: Path) -> Path:
    """A working directory with config/preempt.yaml: tiny.yaml with two seeds, a longer training and no
    periodic checkpoint (the one at the last step is removed when the model is published)."""
    workdir = scratch(path)
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    half = ITERATIONS // 2
    config["train"].update(pretrain_iterations=half, selftrain_iterations=ITERATIONS - half, val_every=100,
                           checkpoint_every=ITERATIONS)  # fmt: skip
    config["seeds"] = list(SEEDS)
    (workdir / "config" / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def wait_process(proc: subprocess.Popen, what: str, log: Path, workdir: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} took over {TIMEOUT} s\n{tail(log, 6000)}\n{rule_logs(workdir)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed\n{tail(log, 6000)}\n{rule_logs(workdir)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same targets run locally on 2 cores, in the background; yields a function that waits for them."""
    workdir = preempt_scratch(tmp_path_factory.mktemp("local"))
    log = workdir / "snakemake.log"
    with open(log, "w") as out:
        cmd = snakemake_command(workdir, CONFIG, "--cores", "2", "--max-threads", "1", *TARGETS)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=snakemake_env())

    def finish() -> Path:
        wait_process(proc, "the local reference run", log, workdir, TIMEOUT)
        return workdir

    try:
        yield finish
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster():
    """test_slurm.py's cluster with two pretend GPUs (and 2 CPUs): the two training jobs run side by side."""
    root = Path(tempfile.mkdtemp(prefix="sraseg-slurm-"))  # short: the MUNGE socket path has a length limit
    try:
        with contextlib.ExitStack() as stack:
            try:
                running = stack.enter_context(running_cluster(root / "cluster", gpus=2))
            except ClusterUnavailable as err:
                pytest.skip(f"no SLURM here: {err}")
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


class SlurmRun:
    """The workflow started through the SLURM profile in the background, with what the test watches."""

    def __init__(self, slurm: Cluster, workdir: Path):
        self.cluster, self.workdir = slurm, workdir
        self.log = workdir / "snakemake.log"
        # The SLURM client programs (and the cluster's srun) first, then the venv: the rules call `python -m sraseg`.
        path = os.pathsep.join([str(slurm.bin_dir), str(VENV_BIN), slurm.env["PATH"]])
        env = dict(slurm.env, HF_HUB_OFFLINE="1", PATH=path)
        # Test-only options as in test_slurm.py (squeue for job states, first check after 1 s, logs kept),
        # and 1 thread a job, so that the two training jobs run side by side; the profile's retries stay.
        cmd = snakemake_command(workdir, CONFIG, "--workflow-profile", str(PROFILE), "--slurm-status-command", "squeue",
                                "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
                                "--max-threads", "1", *TARGETS)  # fmt: skip
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.deadline = time.monotonic() + TIMEOUT

    def diagnostics(self) -> str:
        return f"{tail(self.log, 6000)}\n{rule_logs(self.workdir)}\n{self.cluster.logs()}"

    def wait_for(self, what: str, check: Callable[[], object], interval: float = 0.2):
        """Poll `check` until it returns something true, and return that; fail if the workflow ends first."""
        while time.monotonic() < self.deadline:
            found = check()
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the workflow ended (exit {self.proc.returncode}) before {what}\n{self.diagnostics()}")
            time.sleep(interval)
        pytest.fail(f"timed out waiting for {what}\n{self.diagnostics()}")

    def train_jobs(self, seed: int, jobs: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """This run's SLURM jobs training `seed` (their logs are in its working directory), oldest first."""
        logs = self.workdir.resolve() / ".snakemake" / "slurm_logs"
        jobs = [
            j
            for j in (self.cluster.jobs() if jobs is None else jobs)
            if Path(j.get("StdOut", "/")).is_relative_to(logs)
        ]
        ours = [j for j in jobs if rule_of(j["Comment"]) == "train" and j["Comment"].endswith(f"_labeled_only_{seed}")]
        return sorted(ours, key=lambda j: int(j["JobId"]))

    def training(self) -> dict[int, str]:
        """seed -> SLURM job id of the train jobs running now whose logs show a step done."""
        found, jobs = {}, self.cluster.jobs()
        for seed in SEEDS:
            running = [j for j in self.train_jobs(seed, jobs) if j["JobState"] == "RUNNING"]
            log = train_log(self.workdir, seed)
            if running and log.exists() and PROGRESS.search(log.read_text(errors="replace")):
                found[seed] = running[0]["JobId"]
        return found

    def signalled(self, seed: int) -> re.Match | None:
        """The job's line saying it wrote last.ckpt on SIGTERM (to be read before a rerun truncates the log:
        a requeued job waits slurm_cluster.CRED_EXPIRE s to start again, a retry for its submission)."""
        log = train_log(self.workdir, seed)
        return SIGNALLED.search(log.read_text(errors="replace")) if log.exists() else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Interrupted:
    """What happened to one training job: its seed, the SLURM job stopped, and its line on the signal."""

    seed: int
    job_id: str
    signalled: re.Match


@dataclass
class InterruptedRun:
    """The finished SLURM run, its Snakemake output, and its two interrupted training jobs."""

    run: SlurmRun
    output: str
    requeued: Interrupted
    cancelled: Interrupted


@pytest.fixture(scope="module")
def interrupted_run(cluster: Cluster, reference, tmp_path_factory) -> InterruptedRun:
    """The SLURM run, started once the local reference runs beside it."""
    run = SlurmRun(cluster, preempt_scratch(tmp_path_factory.mktemp("slurm")))
    try:
        stopped, lines = {}, {}

        def interrupt() -> bool:
            """Stop each training job once it has done a step, then read its line on the signal."""
            for seed, job_id in run.training().items():
                if seed not in stopped:
                    cluster.run(*STOP[seed], job_id)
                    stopped[seed] = job_id
            for seed in stopped:
                lines[seed] = lines.get(seed) or run.signalled(seed)
            return len(stopped) == len(SEEDS) and all(lines.values())

        run.wait_for("both training jobs stopped and their checkpoints written", interrupt, interval=0.1)
        requeued, cancelled = (Interrupted(seed, stopped[seed], lines[seed]) for seed in SEEDS)
        wait_process(run.proc, "the SLURM run", run.log, run.workdir, run.deadline - time.monotonic())
        yield InterruptedRun(run, run.log.read_text(), requeued, cancelled)
    finally:
        run.stop()


def assert_resumed_and_same_metrics(workdir: Path, reference: Path, interrupted: Interrupted) -> None:
    """The job's final log resumed from the checkpoint written on the signal, and its metrics are the local run's."""
    step, ckpt = interrupted.signalled[1], interrupted.signalled[2]
    assert 0 < int(step) < ITERATIONS
    log = train_log(workdir, interrupted.seed).read_text()
    resumed = RESUMED.search(log)
    assert resumed and resumed[1] == ckpt and resumed[2] == step, tail(train_log(workdir, interrupted.seed))
    eval_dir = RESULTS / "labeled_only" / f"seed{interrupted.seed}" / "eval"
    expected = pd.read_csv(reference / eval_dir / "metrics_per_case.csv")
    got = pd.read_csv(workdir / eval_dir / "metrics_per_case.csv")
    assert len(got) == 4 * 3 * 2  # cases x classes x modes
    pd.testing.assert_frame_equal(got, expected, rtol=1e-6)
    summary = flat(json.loads((workdir / eval_dir / "summary.json").read_text()))
    expected_summary = flat(json.loads((reference / eval_dir / "summary.json").read_text()))
    assert summary == pytest.approx(expected_summary, rel=1e-6, nan_ok=True)


@pytest.mark.slow
def test_requeued_training_job_resumes_and_matches_local_run(interrupted_run: InterruptedRun, reference):
    """SLURM sends SIGTERM, the job checkpoints, SLURM runs the same job again, and it resumes: the plugin
    keeps waiting on a requeued job, so Snakemake sees one job that completed (no retry used)."""
    run, requeued = interrupted_run.run, interrupted_run.requeued
    (job,) = run.train_jobs(requeued.seed)
    assert job["JobId"] == requeued.job_id and job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    assert f"SLURM-job '{requeued.job_id}' failed" not in interrupted_run.output
    assert_resumed_and_same_metrics(run.workdir, reference(), requeued)


@pytest.mark.slow
def test_signalled_training_job_checkpoints_is_retried_and_matches_local_run(
    interrupted_run: InterruptedRun, reference
):
    """The job writes last.ckpt on SIGTERM and exits 143 (SLURM: FAILED); Snakemake's retry (the profile's
    `retries`) is a new SLURM job that resumes from it."""
    run, cancelled = interrupted_run.run, interrupted_run.cancelled
    first, retry = run.train_jobs(cancelled.seed)
    assert first["JobId"] == cancelled.job_id and first["JobState"] == "FAILED", first
    assert retry["JobState"] == "COMPLETED", retry
    # Snakemake reported the failure with the job's log (show-failed-logs): the line on the signal
    assert f"SLURM-job '{cancelled.job_id}' failed" in interrupted_run.output
    assert cancelled.signalled[0] in interrupted_run.output
    assert_resumed_and_same_metrics(run.workdir, reference(), cancelled)
