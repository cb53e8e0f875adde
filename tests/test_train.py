"""The train stage: EMA teacher, pseudo-label LCC, augmentation, SA gradients, every method end to end,
published files, resume exactness and input checks, on tiny 32x32 fixtures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (
    TINY,
    interrupt_after,
    make_all,
    make_fresh_blend,
    make_prepared,
    patch_train,
    student_weights,
)

from sraseg.errors import ConfigError, DatasetError, SrasegError
from sraseg.train import loop
from sraseg.train.alignment import ProjectionHead, sa_loss
from sraseg.train.losses import soft_dice_ce
from sraseg.train.methods import METHODS
from sraseg.train.settings import TrainSettings
from sraseg.train.teacher import largest_components, update_ema
from sraseg.train.unet import UNet, load_model

SMALL_NET = dict(channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """One tiny run per method (seed 5), shared by the tests that only read outputs."""
    root = tmp_path_factory.mktemp("runs")
    return {m: loop.run(out_dir=root / m, settings=dict(TINY, method=m), seed=5, **inputs) for m in loop.METHODS}


def _params(out_dir):
    return {k: v for k, v in student_weights(out_dir).items() if "running" not in k and "num_batches" not in k}


# --- teacher --------------------------------------------------------------------------------------


def test_ema_update_is_exact():
    torch.manual_seed(0)
    teacher, student = UNet(**SMALL_NET), UNet(**SMALL_NET)
    student.train()
    student(torch.rand(2, 1, 16, 16))  # running stats and num_batches_tracked move
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = student.state_dict()
    update_ema(teacher, student, 0.99)
    after = teacher.state_dict()
    assert not teacher.training
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.99 * before_t[key] + 0.01 * s[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, s[key])
    assert not torch.equal(after["encoder.0.0.weight"], before_t["encoder.0.0.weight"])


def test_largest_component_per_class_per_slice():
    labels = np.zeros((2, 10, 10), np.int64)
    labels[0, 1:4, 1:4] = 3  # 9 px
    labels[0, 6:8, 6:8] = 3  # 4 px, dropped
    labels[0, 8, 8] = 3  # touches the 4-px blob diagonally (8-connectivity): part of it, dropped too
    labels[0, 5, 0:2] = 1  # only RV blob of slice 0: kept
    labels[1, 6:9, 6:9] = 3  # slice 1: the 9-px blob is the bottom one ...
    labels[1, 0:2, 0:2] = 3  # ... and this 4-px blob is dropped, independently of slice 0
    out = largest_components(labels, 4)
    assert (out[0] == 3).sum() == 9 and out[0, 2, 2] == 3 and out[0, 7, 7] == 0 and out[0, 8, 8] == 0
    assert (out[0] == 1).sum() == 2
    assert (out[1] == 3).sum() == 9 and out[1, 7, 7] == 3 and out[1, 0, 0] == 0
    assert set(np.unique(out)) <= {0, 1, 3}


# pseudo-labels of a two-blob teacher, augmentation of asymmetric image/label pairs: tests/test_method.py


# --- SA loss ----------------------------------------------------------------------------------------


def test_sa_loss_trains_the_encoder():
    torch.manual_seed(0)
    net, head = UNet(**SMALL_NET), ProjectionHead(32, 8)
    targets = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    features = net.encode(torch.rand(4, 1, 16, 16))
    loss = sa_loss(head, features[:2], targets[:2], features[2:], targets[2:])
    loss.backward()
    assert 0 < loss.item() < 4
    first_conv = net.encoder[0][0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0
    assert net.head.weight.grad is None  # no decoder pass needed


def test_sa_changes_the_trained_weights(inputs, runs, tmp_path):
    base = dict(TINY, method="sraseg")
    off = loop.run(out_dir=tmp_path / "off", settings=dict(base, sa=False), seed=5, **inputs)
    zero = loop.run(out_dir=tmp_path / "zero", settings=dict(base, sa_weight=0.0), seed=5, **inputs)
    on, off, zero = _params(runs["sraseg"]), _params(off), _params(zero)
    assert any(not torch.equal(on[k], off[k]) for k in on)
    # same random draws, only the SA gradient differs
    assert any(not torch.equal(on[k], zero[k]) for k in on if k.startswith("encoder"))
    rows = list(csv.DictReader(open(runs["sraseg"] / "train_log.csv")))
    assert float(rows[-1]["sa_loss"]) > 0


# --- every method end to end --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_method_publishes_outputs(method, runs, inputs):
    out = runs[method]
    for name in ("model.safetensors", "model.json", "train_log.csv", "train.json"):
        assert (out / name).is_file(), name
    assert not (out / "last.ckpt").exists()  # the resume state does not outlive the job
    assert any((out / "tensorboard").iterdir())
    model, meta = load_model(out / "model.safetensors")
    assert meta["method"] == method and meta["image_size"] == 32 and meta["num_classes"] == 4
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    phases = [r["phase"] for r in rows]
    supervised_only = [name for name, _, _ in METHODS[method](TrainSettings())] == ["supervised"]  # as labeled_only
    assert phases == (["supervised"] * 2 if supervised_only else ["pretrain", "switch", "selftrain"])
    # the switch row is the guard's validation of the teacher, with no loss of its own
    assert all(0 <= float(r["val_dice_mean"]) <= 1 and (float(r["loss"]) > 0) != (r["phase"] == "switch") for r in rows)
    saved = json.loads((out / "train.json").read_text())
    assert saved["settings"]["method"] == method and saved["seed"] == 5
    # the model loads and segments (that it is the best-val student: tests/test_method.py)
    x = torch.from_numpy(np.load(inputs["prepared_dir"] / "images.npy")[:2])[:, None]
    assert model(x).shape == (2, 4, 32, 32)


# the hard-blend bank ablation: tests/test_method.py::test_sraseg_selftrain_with_the_hard_bank


# The columns train_log.csv had before issue 22; new ones are appended after them.
FIRST_COLUMNS = ["phase", "iteration", "step", "loss", "dice_loss", "ce_loss", "sa_loss", "val_dice_rv", "val_dice_myo",
                 "val_dice_lv", "val_dice_mean", "lr", "seconds"]
INSTRUMENTS = ["teacher_val_dice_rv", "teacher_val_dice_myo", "teacher_val_dice_lv", "teacher_val_dice_mean",
               "loss_true", "loss_pseudo", "pl_frac_rv", "pl_frac_myo", "pl_frac_lv"]


@pytest.mark.parametrize("method", ["bcp_synthetic", "sraseg"])
def test_instruments_at_the_switch(method, inputs, tmp_path):
    """dense_val_every 1 for the first 2 self-training iterations, val_every 4: rows at pre-training's end,
    then at self-training iterations 1, 2 (dense) and 4; teacher Dice, loss split and pseudo-label fractions
    in self-training rows only, NaN before; the teacher's Dice in TensorBoard; the labeled slices' class
    shares in train.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = dict(TINY, method=method, selftrain_iterations=4, val_every=4, dense_val_every=1, dense_val_iterations=2)
    out = loop.run(out_dir=tmp_path, settings=settings, seed=5, **inputs)
    table = pd.read_csv(out / "train_log.csv")
    assert list(table.columns) == FIRST_COLUMNS + INSTRUMENTS + ["pl_kept"]  # pl_kept: NaN unless pseudo_min_confidence
    assert list(zip(table["phase"], table["iteration"])) == [("pretrain", 2), ("switch", 0), ("selftrain", 1),
                                                             ("selftrain", 2), ("selftrain", 4)]
    pre, self_rows = table[table["phase"] == "pretrain"], table[table["phase"] == "selftrain"]
    assert pre[INSTRUMENTS].isna().all().all() and self_rows[INSTRUMENTS].notna().all().all()
    assert self_rows.filter(like="teacher_val_dice").apply(lambda c: c.between(0, 1)).all().all()
    fractions = self_rows[["pl_frac_rv", "pl_frac_myo", "pl_frac_lv"]]
    assert (fractions >= 0).all().all() and (fractions.sum(axis=1) <= 1 + 1e-6).all()
    assert (self_rows["loss_true"] > 0).all() and (self_rows["loss_pseudo"] > 0).all()
    if method == "bcp_synthetic":  # BCP's split is its loss by the region weights
        np.testing.assert_allclose(self_rows["loss"], self_rows["loss_true"] + 0.5 * self_rows["loss_pseudo"], rtol=1e-5)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    teacher = [(e.step, e.value) for e in events.Scalars("val/teacher_dice_mean")]
    with_teacher = table[table["phase"] != "pretrain"]  # the switch row starts the teacher's curve
    assert [step for step, _ in teacher] == with_teacher["step"].tolist()
    np.testing.assert_allclose([v for _, v in teacher], with_teacher["teacher_val_dice_mean"], rtol=1e-6)
    assert len(events.Scalars("val/dice_mean")) == len(table) - 1
    assert {"train/loss_pseudo", "train/pl_frac_rv"} <= set(events.Tags()["scalars"])
    labels = np.load(inputs["prepared_dir"] / "labels.npy")[pd.read_parquet(inputs["prepared_dir"] / "slices.parquet")
                                                          ["labeled"].to_numpy()]
    shares = json.loads((out / "train.json").read_text())["labeled_fraction"]
    assert shares == pytest.approx({n: float((labels == c).mean()) for c, n in enumerate(("rv", "myo", "lv"), 1)})


def test_default_log_has_the_instrument_columns_and_no_dense_rows(runs):
    table = pd.read_csv(runs["sraseg"] / "train_log.csv")
    assert list(table.columns) == FIRST_COLUMNS + INSTRUMENTS + ["pl_kept"]  # pl_kept: NaN unless pseudo_min_confidence
    assert table["iteration"].tolist() == [2, 0, 2]  # val_every 2: dense validation is off by default


# --- the guard at the switch -----------------------------------------------------------------------


def _switch_row(out):
    table = pd.read_csv(out / "train_log.csv")
    return table[table["phase"] == "switch"]


def test_switch_guard_warns_on_a_class_the_teacher_does_not_know(inputs, tmp_path, caplog):
    """One pre-training iteration: the teacher at the switch does not segment the classes (Dice under 0.2),
    so the job names each with its Dice and what to change, self-trains anyway (warn), and records it in
    train_log.csv's switch row and train.json (which the report marks); the teacher it validated is the
    model self-training starts from (the switch row's step is pre-training's last)."""
    settings = dict(TINY, method="bcp_real", pretrain_iterations=1, selftrain_iterations=1)
    with caplog.at_level("WARNING", logger="sraseg.train.switch"):
        out = loop.run(out_dir=tmp_path, settings=settings, seed=5, **inputs)
    record = json.loads((out / "train.json").read_text())["switch"]
    row = _switch_row(out)
    assert len(row) == 1 and int(row["step"].iloc[0]) == 1 and row["loss"].isna().all()
    dice = {n: float(row[f"teacher_val_dice_{n}"].iloc[0]) for n in ("rv", "myo", "lv")}
    assert record["teacher_val_dice"] == pytest.approx(dice)
    assert record["below"] == [n for n, d in dice.items() if d < 0.2] and record["below"]
    assert record["min_dice"] == 0.2 and record["action"] == "warn"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    for name in record["below"]:
        assert f"{name} {dice[name]:.3f}" in warnings[0]
    assert "train.pretrain_iterations, now 1" in warnings[0] and "switch_min_dice 0.2" in warnings[0]
    assert (out / "model.safetensors").is_file()  # warn: self-training went on


def test_switch_guard_stop_refuses_to_self_train(inputs, tmp_path):
    settings = dict(TINY, method="sraseg", pretrain_iterations=1, selftrain_iterations=1, switch_guard="stop")
    with pytest.raises(SrasegError, match=r"sraseg seed 5: the teacher at the switch .* below train.switch_min_dice"):
        loop.run(out_dir=tmp_path, settings=settings, seed=5, **inputs)
    assert not (tmp_path / "model.safetensors").exists()


def test_switch_guard_off_logs_the_teacher_without_a_warning(inputs, tmp_path, caplog):
    """The same short pre-training with the threshold off (0): no warning, nothing below, the Dice still logged."""
    settings = dict(TINY, method="bcp_real", pretrain_iterations=1, selftrain_iterations=1, switch_min_dice=0.0)
    with caplog.at_level("WARNING", logger="sraseg.train.switch"):
        out = loop.run(out_dir=tmp_path, settings=settings, seed=5, **inputs)
    record = json.loads((out / "train.json").read_text())["switch"]
    assert record["below"] == [] and len(_switch_row(out)) == 1
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_labeled_only_has_no_switch(runs):
    assert json.loads((runs["labeled_only"] / "train.json").read_text())["switch"] is None


# --- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["labeled_only", "sraseg"])
def test_interrupted_run_resumes_exactly(method, runs, inputs, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 3, lambda: loop.run(out_dir=tmp_path, settings=dict(TINY, method=method), seed=5, **inputs))
    assert not (tmp_path / "model.safetensors").exists()  # nothing published before the end
    calls, real_loss = [], soft_dice_ce
    patch_train(monkeypatch, "soft_dice_ce", lambda *a, **k: calls.append(1) or real_loss(*a, **k))
    loop.run(out_dir=tmp_path, settings=dict(TINY, method=method), seed=5, **inputs)
    # only iteration 4 was trained again (sraseg's region loss: two weighted terms per mixed image)
    assert len(calls) == {"labeled_only": 1, "sraseg": 4}[method]
    resumed, straight = student_weights(tmp_path), student_weights(runs[method])
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    a, b = load_file(str(tmp_path / "model.safetensors")), load_file(str(runs[method] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(csv.DictReader(open(tmp_path / "train_log.csv"))) == drop(
        csv.DictReader(open(runs[method] / "train_log.csv"))
    )


def test_fresh_maps_rerun_and_resume_exactly(inputs, tmp_path, monkeypatch):
    """blend maps: fresh: the same blend folder and seed give the same weights on a rerun and after a
    resume in self-training; a table with fewer draws than self-training takes is refused."""
    fresh = dict(inputs, blend_dir=make_fresh_blend(tmp_path, inputs, 8))  # TINY: 2 iterations x 4
    settings = dict(TINY, method="sraseg")
    straight = loop.run(out_dir=tmp_path / "straight", settings=settings, seed=5, **fresh)
    again = loop.run(out_dir=tmp_path / "again", settings=settings, seed=5, **fresh)
    interrupt_after(monkeypatch, 3, lambda: loop.run(out_dir=tmp_path / "resumed", settings=settings, seed=5, **fresh))
    calls, real_loss = [], soft_dice_ce
    patch_train(monkeypatch, "soft_dice_ce", lambda *a, **k: calls.append(1) or real_loss(*a, **k))
    resumed = loop.run(out_dir=tmp_path / "resumed", settings=settings, seed=5, **fresh)
    patch_train(monkeypatch, "soft_dice_ce", real_loss)
    assert len(calls) == 4  # resumed at step 3: only self-training iteration 2 (draws 4-7) was trained again
    want = student_weights(straight)
    for out in (again, resumed):
        got = student_weights(out)
        assert all(torch.equal(got[k], want[k]) for k in want)
    bank = student_weights(loop.run(out_dir=tmp_path / "bank", settings=settings, seed=5, **inputs))
    assert any(not torch.equal(bank[k], want[k]) for k in want)  # the fresh maps are what it trained on
    with pytest.raises(DatasetError, match="8 self-training draws, training needs 12"):
        loop.run(out_dir=tmp_path / "short", settings=dict(settings, selftrain_iterations=3), seed=5, **fresh)


# --- input and settings checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "drop", "missing"),
    [("bcp_synthetic", "synthetic_dir", "synthetic_dir"), ("sraseg", "blend_dir", "blend_dir"),
     ("sraseg", "embed_dir", "embed_dir")],
)
def test_missing_inputs_named(method, drop, missing, inputs, tmp_path):
    given = {k: v for k, v in inputs.items() if k != drop}
    with pytest.raises(ConfigError, match=f"{method}.*{missing}"):
        loop.run(out_dir=tmp_path, settings=dict(TINY, method=method), seed=0, **given)


def test_bad_settings_refused(inputs, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        loop.run(out_dir=tmp_path, settings=dict(TINY, method="fixmatch"), seed=0, **inputs)
    with pytest.raises(ConfigError, match="unknown"):
        loop.run(out_dir=tmp_path, settings=dict(TINY, learning_rate=0.1), seed=0, **inputs)


def test_no_labeled_slices(tmp_path):
    prepared = make_prepared(tmp_path)
    table = pd.read_parquet(prepared / "slices.parquet")
    table["labeled"] = False
    table.to_parquet(prepared / "slices.parquet")
    with pytest.raises(DatasetError, match="no labeled"):
        loop.run(prepared_dir=prepared, out_dir=tmp_path / "out", settings=TINY, seed=0)


def test_nan_loss_aborts(inputs, tmp_path, monkeypatch):
    def nan_loss(logits, target):
        nan = logits.sum() * float("nan")
        return nan, nan, nan

    patch_train(monkeypatch, "soft_dice_ce", nan_loss)
    with pytest.raises(SrasegError, match="nan"):
        loop.run(out_dir=tmp_path, settings=TINY, seed=0, **inputs)


def test_fp16_grad_scaler_state_is_checkpointed_and_resumed(inputs, tmp_path, monkeypatch):
    """last.ckpt carries the gradient scaler (on a CUDA card without bf16 it is the fp16 loss scale), and a
    resume goes on with it: here a CPU scaler, enabled on purpose, doubles its scale at every step."""
    from sraseg.train.checkpoint import load_checkpoint

    scalers = []

    def doubling_scaler(device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=1.0, growth_factor=2.0, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(loop, "grad_scaler", doubling_scaler)
    settings = dict(TINY, method="labeled_only", **SMALL_NET)
    run = lambda: loop.run(out_dir=tmp_path, settings=settings, seed=5, **inputs)  # noqa: E731
    real_save, saved = loop.save_checkpoint, {}
    monkeypatch.setattr(loop, "save_checkpoint", lambda path, state: saved.update(state) or real_save(path, state))
    interrupt_after(monkeypatch, 3, run)
    assert load_checkpoint(tmp_path / "last.ckpt")["scaler"]["scale"] == 8.0  # three steps, three doublings
    run()
    assert scalers[-1].get_scale() == 16.0  # went on from 8, not from a fresh 1
    assert saved["scaler"]["scale"] == 16.0
