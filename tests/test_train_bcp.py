"""BCP baselines in a real `run`: BCP's region loss with the pseudo-labelled region at 0.5, the optimizer's
state carried from pre-training into self-training, and resume across that switch staying exact."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY, interrupt_after, make_all, patch_train, student_weights

from sraseg.train import loop
from sraseg.train.losses import bcp_region_loss, soft_dice_ce
from sraseg.train.methods import bcp
from sraseg.train.methods import sraseg as sraseg_method

PRETRAIN = TINY["pretrain_iterations"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """An uninterrupted bcp_real run (seed 5)."""
    return loop.run(out_dir=tmp_path_factory.mktemp("straight"), settings=dict(TINY, method="bcp_real"), seed=5,
                    **inputs)


def _momentum(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"].clone() for g in optimizer.param_groups for p in g["params"]
            if "momentum_buffer" in optimizer.state[p]]


@pytest.mark.parametrize("method", ["bcp_real", "sraseg"])
def test_momentum_carries_into_selftraining(method, inputs, tmp_path, monkeypatch):
    made, after_step, at_switch = [], [], []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):
            result = super().step(closure)
            after_step.append(_momentum(self))
            return result

    real_make = loop.make_optimizer

    def make_spy(cfg, student, head):
        optimizer = real_make(cfg, student, head)
        optimizer.__class__ = SpySGD  # same object and settings, step() now records the buffers
        made.append(optimizer)
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", make_spy)
    module = {"bcp_real": bcp, "sraseg": sraseg_method}[method]
    real_step = module.selftrain_step

    def first_selftrain_step(ctx):
        if not at_switch:  # before self-training's first optimizer step
            at_switch.append(_momentum(made[-1]))
        return real_step(ctx)

    monkeypatch.setattr(module, "selftrain_step", first_selftrain_step)
    loop.run(out_dir=tmp_path, settings=dict(TINY, method=method), seed=5, **inputs)
    assert len(made) == 1  # no second optimizer at the switch
    before = after_step[PRETRAIN - 1]  # after the last pre-train step
    assert before and any(b.abs().sum() > 0 for b in before)
    assert len(at_switch[0]) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(at_switch[0], before))
    assert len(after_step) == PRETRAIN + TINY["selftrain_iterations"]


def test_bcp_uses_region_loss_with_pseudo_region_at_half(inputs, tmp_path, monkeypatch):
    # the teacher's pseudo-labels are replaced by "all MYO", so the pseudo-labelled region is recognisable
    calls, soft_calls = [], []

    def all_myo(teacher, images, num_classes, mode="eval", largest_component=True):
        return torch.full((len(images), *images.shape[2:]), 2, dtype=torch.long)

    def spy_region(logits, target, mask, first_weight, second_weight):
        calls.append((target.detach().clone(), mask.clone(), first_weight, second_weight))
        return bcp_region_loss(logits, target, mask, first_weight, second_weight)

    patch_train(monkeypatch, "pseudo_labels", all_myo)
    monkeypatch.setattr(bcp, "bcp_region_loss", spy_region)
    patch_train(monkeypatch, "soft_dice_ce", lambda *a: soft_calls.append(1) or soft_dice_ce(*a))
    loop.run(out_dir=tmp_path, settings=dict(TINY, method="bcp_real"), seed=5, **inputs)
    assert not soft_calls  # the BCP baseline never uses SRA-Seg's soft loss
    pretrain, selftrain = calls[:PRETRAIN], calls[PRETRAIN:]
    assert len(selftrain) == 2 * TINY["selftrain_iterations"]  # x1 and x2 per iteration
    assert all((w1, w2) == (1.0, 1.0) for _, _, w1, w2 in pretrain)  # both regions true labels
    for i, (target, mask, w1, w2) in enumerate(selftrain):
        pseudo_region = (mask[:, 0] == 1) if i % 2 == 0 else (mask[:, 0] == 0)  # x1 = a*u + (1-a)*l; x2 swaps
        assert (w1, w2) == ((0.5, 1.0) if i % 2 == 0 else (1.0, 0.5))
        assert torch.all(target.argmax(1)[pseudo_region] == 2)
        assert not torch.all(target.argmax(1)[~pseudo_region] == 2)  # the true-label region is not all MYO


def test_bcp_rampup_scales_the_pseudo_region_weight(inputs, tmp_path, monkeypatch):
    """unlabeled_rampup R: the pseudo-labelled region's weight is 0.5 * exp(-5 (1 - i/R)^2) at self-training
    iteration i (0 first), the true-label region's stays 1; pre-training is untouched."""
    weights = []

    def spy_region(logits, target, mask, first_weight, second_weight):
        weights.append((first_weight, second_weight))
        return bcp_region_loss(logits, target, mask, first_weight, second_weight)

    monkeypatch.setattr(bcp, "bcp_region_loss", spy_region)
    loop.run(out_dir=tmp_path, settings=dict(TINY, method="bcp_real", selftrain_iterations=3, unlabeled_rampup=2),
             seed=5, **inputs)
    assert weights[:PRETRAIN] == [(1.0, 1.0)] * PRETRAIN
    ramp = [math.exp(-5.0), math.exp(-1.25), 1.0]  # t = 0, 1/2, 1
    want = [w for r in ramp for w in (0.5 * r, 1.0, 1.0, 0.5 * r)]  # x1's pseudo region first, x2's second
    assert [w for pair in weights[PRETRAIN:] for w in pair] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("stop_at", [PRETRAIN, PRETRAIN + 1])  # at the switch, and one step into self-training
def test_bcp_resume_across_the_switch_is_exact(stop_at, straight, inputs, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, stop_at, lambda: loop.run(out_dir=tmp_path, settings=dict(TINY, method="bcp_real"), seed=5, **inputs))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["step"] == stop_at and saved["optimizer"]["state"]  # momentum buffers are in the checkpoint
    loop.run(out_dir=tmp_path, settings=dict(TINY, method="bcp_real"), seed=5, **inputs)
    resumed, uninterrupted = student_weights(tmp_path), student_weights(straight)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # (the published weights equal only if the momentum buffers were restored: the checkpoint is gone now)
    assert not (tmp_path / "last.ckpt").exists()
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(csv.DictReader(open(tmp_path / "train_log.csv"))) == drop(
        csv.DictReader(open(straight / "train_log.csv"))
    )
