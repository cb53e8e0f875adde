"""A training process killed with SIGKILL, or stopped by SIGTERM as SLURM stops a job, and started
again ends with the weights of a run that was never interrupted (CPU, same seed): the command-line
path Snakemake takes after a crash or a preemption."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY, make_all

SETTINGS = dict(TINY, method="sraseg", pretrain_iterations=6, selftrain_iterations=24, checkpoint_every=4, val_every=8)


def train_command(inputs: dict[str, Path], out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "sraseg", "train", "--prepared", str(inputs["prepared_dir"]), "--out-dir", str(out_dir),
        "--synthetic", str(inputs["synthetic_dir"]), "--embed-dir", str(inputs["embed_dir"]),
        "--blend-dir", str(inputs["blend_dir"]), "--seed", "3", "--settings", json.dumps(SETTINGS),
    ]  # fmt: skip


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code


def start_until_checkpoint(inputs: dict, out_dir: Path) -> subprocess.Popen:
    """A training subprocess, returned once its first last.ckpt is on disk (its signal handlers are in place)."""
    process = subprocess.Popen(train_command(inputs, out_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out_dir / "last.ckpt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint written within 2 minutes"
        time.sleep(0.05)
    return process


def rerun_equals_reference(inputs: dict, out_dir: Path, reference: Path) -> None:
    """Rerun the interrupted job to its end: its published weights equal the uninterrupted run's."""
    subprocess.run(train_command(inputs, out_dir), env=ENV, check=True, capture_output=True)
    resumed, uninterrupted = load_file(out_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert not (out_dir / "last.ckpt").exists()  # published: the resume state is gone


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The inputs and one uninterrupted run of them."""
    root = tmp_path_factory.mktemp("kill_resume")
    inputs = make_all(root / "inputs")
    subprocess.run(train_command(inputs, root / "reference"), env=ENV, check=True, capture_output=True)
    return inputs, root / "reference"


def test_sigkill_then_rerun_equals_uninterrupted(reference_run, tmp_path: Path):
    inputs, reference = reference_run
    killed = tmp_path / "killed"
    process = start_until_checkpoint(inputs, killed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "last.ckpt", weights_only=True)["step"]
    assert interrupted_at < SETTINGS["pretrain_iterations"] + SETTINGS["selftrain_iterations"]
    assert not (killed / "model.safetensors").exists()  # nothing published by the killed run
    rerun_equals_reference(inputs, killed, reference)


def test_sigterm_writes_checkpoint_exits_143_then_rerun_equals_uninterrupted(reference_run, tmp_path: Path):
    inputs, reference = reference_run
    stopped = tmp_path / "stopped"
    process = start_until_checkpoint(inputs, stopped)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate()[1].decode()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"sraseg train: received SIGTERM at step (\d+) of 30: wrote (.+), exiting; rerun to resume", last)
    assert match, last
    assert Path(match[2]) == stopped / "last.ckpt"
    assert torch.load(stopped / "last.ckpt", weights_only=True)["step"] == int(match[1])
    assert not (stopped / "model.safetensors").exists()
    rerun_equals_reference(inputs, stopped, reference)
