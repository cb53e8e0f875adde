"""Reruns start clean: a resume checkpoint belongs to one job (settings, seed, input files) and is gone
once the job's outputs are published; progress in a log file is a few readable lines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_generate import TINY as GEN_TINY
from test_generate import make_prepared as make_generator_prepared
from train_fixtures import TINY, Interrupted, interrupt_after, make_all, patch_train

from sraseg.generate import train as generator
from sraseg.progress import Progress
from sraseg.resume import input_identity
from sraseg.train import loop
from sraseg.train.losses import soft_dice_ce

SRC = Path(__file__).resolve().parents[1] / "src"  # the subprocess runs this checkout's code
SMALL_NET = dict(channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])
SETTINGS = dict(TINY, method="labeled_only", **SMALL_NET)  # 4 iterations, a checkpoint after each


@pytest.fixture()
def inputs(tmp_path):
    return make_all(tmp_path / "inputs")



def _count_iterations(monkeypatch) -> list:
    calls, real_loss = [], soft_dice_ce
    patch_train(monkeypatch, "soft_dice_ce", lambda *a: calls.append(1) or real_loss(*a))
    return calls


def test_published_run_leaves_no_checkpoint_and_reruns_fresh(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    loop.run(out_dir=out, settings=SETTINGS, seed=1, **inputs)
    assert not (out / "last.ckpt").exists()
    first = load_file(str(out / "model.safetensors"))
    calls = _count_iterations(monkeypatch)
    loop.run(out_dir=out, settings=SETTINGS, seed=1, **inputs)  # what --forcerun train does
    assert len(calls) == 4  # every iteration trained again, none skipped by a stale checkpoint
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)  # and, same job, the same weights


@pytest.mark.parametrize("change", ["settings", "seed", "input"])
def test_other_jobs_checkpoint_is_ignored(change, inputs, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 3, lambda: loop.run(out_dir=out, settings=SETTINGS, seed=1, **inputs))
    assert torch.load(out / "last.ckpt", weights_only=True)["step"] == 3
    settings, seed = dict(SETTINGS), 1
    if change == "settings":
        settings["lr"] = 0.02
    elif change == "seed":
        seed = 2
    else:  # the labeled images change under the same file names (a new labeled list, say)
        images = inputs["prepared_dir"] / "images.npy"
        np.save(images, np.load(images) * 0.5)
    calls = _count_iterations(monkeypatch)
    with caplog.at_level(logging.INFO, logger="sraseg.train.loop"):
        loop.run(out_dir=out, settings=settings, seed=seed, **inputs)
    assert len(calls) == 4  # trained from the start
    assert any("starting labeled_only fresh" in r.getMessage() for r in caplog.records)
    assert not (out / "last.ckpt").exists()
    fresh = tmp_path / "fresh"
    loop.run(out_dir=fresh, settings=settings, seed=seed, **inputs)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_input_identity_follows_content_and_rewrites(tmp_path, monkeypatch):
    small = tmp_path / "d" / "a.txt"
    small.parent.mkdir()
    small.write_text("patient001\n")
    base = input_identity(small.parent)
    os.utime(small, ns=(1, 1))
    assert input_identity(small.parent) == base  # small files: by content, a touch changes nothing
    small.write_text("patient002\n")
    assert input_identity(small.parent) != base
    (small.parent / ".a.txt.tmp-1").write_text("half written")
    assert len(input_identity(small.parent)) == 1  # staging leftovers are not inputs
    monkeypatch.setattr("sraseg.resume.CONTENT_HASH_BYTES", 0)
    big = input_identity(small)
    os.utime(small, ns=(2, 2))
    assert input_identity(small) != big  # large files: by size and mtime, which a rewrite changes


def test_generator_checkpoint_of_other_settings_is_ignored(tmp_path, monkeypatch):
    prepared = make_generator_prepared(tmp_path / "prepared")
    settings = dict(GEN_TINY, steps=5, checkpoint_every=2, log_every=2)
    calls, real_step = [], generator.train_step

    def stop_at_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupted
        return real_step(*args, **kwargs)

    monkeypatch.setattr(generator, "train_step", stop_at_4)
    with pytest.raises(Interrupted):
        generator.run(prepared, tmp_path / "gen", settings)
    assert torch.load(tmp_path / "gen" / "last.ckpt", weights_only=True)["step"] == 2
    calls.clear()
    monkeypatch.setattr(generator, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    generator.run(prepared, tmp_path / "gen", dict(settings, lr=1e-3))
    assert len(calls) == 5  # all steps: the lr=2e-4 checkpoint was not continued
    assert not (tmp_path / "gen" / "last.ckpt").exists()


def test_progress_lines_off_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress(900, "train x", logger=logging.getLogger("test.progress"), terminal=False)
        for _ in range(900):
            progress.update()
            if progress.due():
                progress.report(loss=0.5)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20  # every 5 %
    assert lines[0].startswith("train x: 45/900 it (5%)") and lines[-1].startswith("train x: 900/900 it (100%)")
    assert "loss 0.5" in lines[-1]


def test_training_log_of_a_job_is_short(inputs, tmp_path):
    """A job's stderr (not a terminal): plain lines, not tqdm frames, and their number does not grow
    with the schedule (the demo's 900 iterations give the same 20 progress lines as these 100)."""
    settings = dict(SETTINGS, pretrain_iterations=50, selftrain_iterations=50, val_every=25, checkpoint_every=25,
                    labeled_batch=2)  # fmt: skip
    log_file = tmp_path / "train.log"
    command = [sys.executable, "-m", "sraseg", "train", "--prepared", str(inputs["prepared_dir"]), "--out-dir",
               str(tmp_path / "out"), "--seed", "1", "--settings", json.dumps(settings)]  # fmt: skip
    with open(log_file, "w") as handle:
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC)))  # fmt: skip
    text = log_file.read_text()
    assert "\r" not in text and "it/s]" not in text  # no bar frames
    lines = text.splitlines()
    progress = [line for line in lines if "train labeled_only: " in line]
    assert len(progress) == 20 and "100/100 it (100%)" in progress[-1]  # every 5 %
    assert sum("iteration" in line and "loss" in line for line in lines if "val Dice" in line) == 4
    assert len(lines) <= 40, text
