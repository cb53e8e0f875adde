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


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path: Path):
    inputs = make_all(tmp_path / "inputs")
    # this checkout's code, not whatever sraseg the venv has installed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))

    reference = tmp_path / "reference"
    subprocess.run(train_command(inputs, reference), env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(inputs, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "last.ckpt").exists():  # killed once the first checkpoint is on disk
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint written within 2 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "last.ckpt", weights_only=True)["step"]
    assert interrupted_at < SETTINGS["pretrain_iterations"] + SETTINGS["selftrain_iterations"]
    assert not (killed / "model.safetensors").exists()  # nothing published by the killed run

    subprocess.run(train_command(inputs, killed), env=env, check=True, capture_output=True)
    resumed, uninterrupted = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert not (killed / "last.ckpt").exists()  # published: the resume state is gone


def test_sigterm_writes_checkpoint_exits_143_then_rerun_equals_uninterrupted(tmp_path: Path):
    inputs = make_all(tmp_path / "inputs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    reference = tmp_path / "reference"
    subprocess.run(train_command(inputs, reference), env=env, check=True, capture_output=True)

    stopped = tmp_path / "stopped"
    process = subprocess.Popen(train_command(inputs, stopped), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (stopped / "last.ckpt").exists():  # in the loop (handlers installed) once a checkpoint is on disk
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint written within 2 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate()[1].decode()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"sraseg train: received SIGTERM at step (\d+) of 30: wrote (.+), exiting; rerun to resume", last)
    assert match, last
    assert Path(match[2]) == stopped / "last.ckpt"
    assert torch.load(stopped / "last.ckpt", weights_only=True)["step"] == int(match[1])
    assert not (stopped / "model.safetensors").exists()

    subprocess.run(train_command(inputs, stopped), env=env, check=True, capture_output=True)
    resumed, uninterrupted = load_file(stopped / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
