"""A train job that receives SIGTERM (SLURM's notice before it kills or preempts a job) or SIGUSR1
(`--signal=USR1@...`) writes last.ckpt at the step it reached, exits non-zero with one line, and its
rerun resumes from that step to the weights of a run that was never interrupted (CPU, same seed)."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from train_fixtures import TINY, make_all, student_weights

from sraseg import cli
from sraseg.errors import Preempted
from sraseg.preempt import SIGNALS, stop_on_signals
from sraseg.train import loop

# checkpoints every 4 steps; the signal comes after step 6, so a periodic checkpoint would hold 4
SETTINGS = dict(TINY, method="sraseg", pretrain_iterations=3, selftrain_iterations=5, checkpoint_every=4, val_every=2)
TOTAL = SETTINGS["pretrain_iterations"] + SETTINGS["selftrain_iterations"]
SIGNAL_AT = 6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    return loop.run(out_dir=tmp_path_factory.mktemp("reference"), settings=SETTINGS, seed=5, **inputs)


def signal_at(monkeypatch, step: int, signum: int) -> list:
    """Send `signum` to this process right after training iteration `step`; returns the list of
    iterations run (one entry each)."""
    calls, real = [], loop.train_iteration

    def iteration_then_signal(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return terms

    monkeypatch.setattr(loop, "train_iteration", iteration_then_signal)
    return calls


def rows(out_dir):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(out_dir / "train_log.csv"))]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_writes_checkpoint_then_rerun_resumes_exactly(signum, inputs, reference, tmp_path, monkeypatch):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    signal_at(monkeypatch, SIGNAL_AT, signum)
    with pytest.raises(Preempted) as stopped:
        loop.run(out_dir=tmp_path, settings=SETTINGS, seed=5, **inputs)
    assert stopped.value.signum == signum
    name = signal.Signals(signum).name
    assert str(stopped.value) == (
        f"received {name} at step {SIGNAL_AT} of {TOTAL}: wrote {tmp_path / 'last.ckpt'}, exiting; rerun to resume"
    )
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == SIGNAL_AT  # not the periodic 4
    assert not (tmp_path / "model.safetensors").exists()
    assert {s: signal.getsignal(s) for s in SIGNALS} == before  # the run's handlers are gone

    calls = signal_at(monkeypatch, 0, signum)  # counts the rerun's iterations, sends nothing
    loop.run(out_dir=tmp_path, settings=SETTINGS, seed=5, **inputs)
    assert len(calls) == TOTAL - SIGNAL_AT  # resumed from the signal's step
    resumed, straight = student_weights(tmp_path), student_weights(reference)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert rows(tmp_path) == rows(reference)
    assert not (tmp_path / "last.ckpt").exists()


def test_command_line_exits_128_plus_signal_with_one_line(inputs, tmp_path, monkeypatch, capsys):
    signal_at(monkeypatch, SIGNAL_AT, signal.SIGTERM)
    argv = ["train", "--prepared", str(inputs["prepared_dir"]), "--out-dir", str(tmp_path),
            "--synthetic", str(inputs["synthetic_dir"]), "--embed-dir", str(inputs["embed_dir"]),
            "--blend-dir", str(inputs["blend_dir"]), "--seed", "5", "--settings", json.dumps(SETTINGS)]  # fmt: skip
    assert cli.main(argv) == 128 + signal.SIGTERM  # 143, what a shell reports for a job ended by SIGTERM
    err = [line for line in capsys.readouterr().err.splitlines() if "SIGTERM" in line]
    assert err == [f"sraseg train: received SIGTERM at step {SIGNAL_AT} of {TOTAL}: wrote {tmp_path / 'last.ckpt'}, "
                   "exiting; rerun to resume"]  # fmt: skip
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["step"] == SIGNAL_AT


def test_handlers_are_restored_even_when_the_loop_fails():
    def mine(signum, frame):
        pass

    previous, term = signal.signal(signal.SIGUSR1, mine), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError), stop_on_signals() as stop:
            assert all(signal.getsignal(s) not in (mine, signal.SIG_DFL) for s in SIGNALS)
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not delivered to `mine`, process lives
            assert stop.signum == signal.SIGUSR1
            raise RuntimeError
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == term
    finally:
        signal.signal(signal.SIGUSR1, previous)
