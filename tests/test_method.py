"""The training method itself, pinned down on tiny tensors in-process: what each step mixes with what,
where pseudo-labels come from, the teacher's life in the real loop, model selection, which slices may
enter training, and resume for the semi-supervised methods.

The mixing tests do not depend on the loss: the student is an oracle that recognises each mixed
image it is given and predicts, for it, either the label mixed the same way as the image or the label
mixed the opposite way. Whatever loss the step uses, it must be (much) lower for the first.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_fixtures import TINY, make_all, make_blend, make_fresh_blend, patch_train

import sraseg.train.data as train_data
from sraseg.blend.maps import render_blend_maps
from sraseg.errors import SrasegError
from sraseg.settings import parse_settings
from sraseg.train import loop, validation
from sraseg.train.context import TrainContext
from sraseg.train.data import augment, augment_pair, load_blend, load_prepared, load_synthetic, sample_indices
from sraseg.train.losses import one_hot, sigmoid_rampup, soft_dice_ce, soft_dice_ce_split
from sraseg.train.methods import METHODS, bcp
from sraseg.train.methods import sraseg as sraseg_method
from sraseg.train.settings import TrainSettings
from sraseg.train.teacher import pseudo_labels, teacher_logits, update_ema
from sraseg.train.unet import UNet

LEVELS = torch.tensor([0.1, 0.8, 0.4, 0.9])  # train_fixtures.disc_slice: intensity of each class
SMALL_NET = dict(channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])
C = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("inputs"))


class IntensityTeacher(nn.Module):
    """A teacher with real structure: each pixel's class is the nearest class intensity level."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(400.0))

    def forward(self, x):
        return -self.scale * (x - LEVELS.to(x)[None, :, None, None]) ** 2


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- pseudo-labels ------------------------------------------------------------------------------------


def test_pseudo_labels_keep_the_largest_blob_of_the_teachers_argmax():
    image = torch.full((1, 1, 12, 12), float(LEVELS[0]))
    image[0, 0, 1:5, 1:5] = LEVELS[3]  # LV 16 px
    image[0, 0, 8:10, 8:10] = LEVELS[3]  # LV 4 px, a second component: dropped
    image[0, 0, 8:11, 1:3] = LEVELS[1]  # the only RV blob: kept
    teacher = IntensityTeacher()
    raw = teacher(image).argmax(1)
    assert (raw == 3).sum() == 20  # the teacher's argmax really has two LV components
    out = pseudo_labels(teacher, image, C)
    assert out.shape == (1, 12, 12) and out.dtype == torch.long
    want = raw.clone()
    want[0, 8:10, 8:10] = 0
    assert torch.equal(out, want)
    # largest_component off (FIVES's vessels): the argmax as it is, both LV blobs
    assert torch.equal(pseudo_labels(teacher, image, C, largest_component=False), raw)


def test_pseudo_labels_use_the_teacher_in_eval_mode():
    """Dropout off and BatchNorm on its running statistics: the same images give the same labels, and
    labelling does not move the teacher's statistics."""
    torch.manual_seed(0)
    teacher = UNet(channels=[4, 8], dropout=[0.5, 0.5]).train()
    before = state_of(teacher)
    images = torch.rand(3, 1, 16, 16)
    first, second = pseudo_labels(teacher, images, C), pseudo_labels(teacher, images, C)
    assert torch.equal(first, second) and same_state(state_of(teacher), before)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_teacher_train_mode_normalises_with_the_batch_and_leaves_running_statistics():
    """teacher_mode train (the reference): BatchNorm uses the statistics of the batch it is given, so the
    same image gets other logits (and here other pseudo-labels) beside other images; eval mode gives the
    same ones in any batch. Neither mode writes the running statistics, and the teacher ends in eval mode."""
    torch.manual_seed(0)
    teacher = UNet(channels=[4, 8], dropout=[0.0, 0.0])
    teacher.train()
    teacher(torch.rand(4, 1, 16, 16) * 0.2)  # running statistics unlike either batch below
    teacher.eval()
    before = state_of(teacher)
    image = torch.rand(1, 1, 16, 16)
    batch_a = torch.cat([image, torch.rand(3, 1, 16, 16)])
    batch_b = torch.cat([image, torch.rand(3, 1, 16, 16) * 3 + 1])
    for mode in ("eval", "train"):
        a, b = teacher_logits(teacher, batch_a, mode)[0], teacher_logits(teacher, batch_b, mode)[0]
        assert torch.equal(a, b) == (mode == "eval"), mode
        assert same_state(state_of(teacher), before), f"{mode} mode moved the teacher's buffers"
        assert not teacher.training and all(m.track_running_stats for m in _batch_norms(teacher))
    # train mode is exactly a forward in train() on the batch's statistics (which would move the buffers)
    plain = copy.deepcopy(teacher).train()
    torch.testing.assert_close(teacher_logits(teacher, batch_a, "train"), plain(batch_a), rtol=0, atol=0)
    assert not same_state(state_of(plain), before)
    labels = {mode: [pseudo_labels(teacher, x, C, mode)[0] for x in (batch_a, batch_b)] for mode in ("eval", "train")}
    assert torch.equal(*labels["eval"]) and not torch.equal(*labels["train"])
    with pytest.raises(ValueError, match="eval, train"):
        pseudo_labels(teacher, batch_a, C, "inference")


def test_teacher_train_mode_has_dropout_on_and_the_ema_stays_exact():
    torch.manual_seed(1)
    teacher, student = UNet(**SMALL_NET), UNet(**SMALL_NET)
    student.train()
    student(torch.rand(2, 1, 16, 16))  # the student's running statistics move
    images = torch.rand(2, 1, 16, 16)
    before = state_of(teacher)
    assert torch.equal(teacher_logits(teacher, images, "eval"), teacher_logits(teacher, images, "eval"))
    assert not torch.equal(teacher_logits(teacher, images, "train"), teacher_logits(teacher, images, "train"))
    pseudo_labels(teacher, images, C, "train")
    update_ema(teacher, student, 0.99)
    after, s = state_of(teacher), state_of(student)
    for key, value in after.items():  # exactly the EMA of what the teacher had before it labelled
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.99 * before[key] + 0.01 * s[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, s[key])


# --- augmentation ---------------------------------------------------------------------------------------


def _asymmetric_labels(count: int, size: int = 16) -> torch.Tensor:
    """Label maps with no mirror, rotation or transpose symmetry (an L shape and two blocks)."""
    labels = torch.zeros(count, 1, size, size)
    labels[:, 0, 2:12, 2:5] = 3
    labels[:, 0, 9:12, 5:10] = 3
    labels[:, 0, 2:5, 9:14] = 1
    labels[:, 0, 6:8, 11:13] = 2
    return labels


def test_augment_moves_image_and_label_together():
    """Image = label / 3 before augmentation, so after it the label must still read off the image:
    exactly for rot90 + flip, and wherever the bilinear image sits on a class level for rotations."""
    labels = _asymmetric_labels(48)
    images = torch.cat([labels / 3, 1 - labels / 3], 1)  # two channels: both must follow the label
    out_images, out_labels = augment(images, labels, torch.Generator().manual_seed(0), "rot_flip_or_rotate")
    assert torch.equal(out_labels, out_labels.round()) and set(out_labels.unique().tolist()) <= {0, 1, 2, 3}
    dihedral = [torch.rot90(labels[0], k, (1, 2)).flip(d) for k in range(4) for d in (1, 2)]
    kinds = []
    for i in range(len(labels)):
        img, lab = out_images[i], out_labels[i]
        if torch.equal(img, images[i]):
            kinds.append("none")
            assert torch.equal(lab, labels[i])
        elif any(torch.equal(lab, d) for d in dihedral) and not torch.equal(lab, labels[i]):
            kinds.append("flip")
            assert torch.equal(img[0] * 3, lab[0]), f"sample {i}: image and label flipped differently"
            assert torch.equal(img[1], 1 - lab[0] / 3), f"sample {i}: the channels moved differently"
        else:
            kinds.append("rotate")
            inside = (img[0] + img[1] - 1).abs() < 1e-4  # away from the zero padding
            on_level = inside & ((img[0] * 3 - (img[0] * 3).round()).abs() < 1e-4)
            for channel, read in ((0, img[0] * 3), (1, 3 - img[1] * 3)):
                agree = (read.round() == lab[0])[on_level].float().mean()
                assert on_level.sum() > 100 and agree > 0.99, f"sample {i}, channel {channel}: agrees on {agree:.1%}"
            assert (lab[0] > 0).sum() > 0.8 * (labels[i] > 0).sum()
    assert {"none", "flip", "rotate"} <= set(kinds), kinds
    # every flip/rot90 variant drawn is distinct from the identity for an asymmetric shape
    assert len({tuple(out_labels[i].flatten().tolist()) for i in range(len(labels)) if kinds[i] == "flip"}) > 3
    same = augment(images, labels, torch.Generator().manual_seed(0), "none")
    assert torch.equal(same[0], images) and torch.equal(same[1], labels)


def test_augment_pair_shared_or_separate():
    """shared: one transform per row for both batches (the draws of one `augment` on the stacked channels);
    separate: the first batch's transforms, then the second's with its labels, drawn in that order."""
    labels = _asymmetric_labels(24)
    images = labels / 3  # both batches start as the same images: a shared transform keeps them equal

    def draw(pairing):
        return augment_pair(images, images.clone(), labels, torch.Generator().manual_seed(0), "rot_flip_or_rotate",
                            pairing)

    f, s, lab = draw("shared")
    assert torch.equal(f, s) and not torch.equal(f, images)
    pair, want_lab = augment(torch.cat([images, images], 1), labels, torch.Generator().manual_seed(0),
                             "rot_flip_or_rotate")
    assert torch.equal(torch.cat([f, s], 1), pair) and torch.equal(lab, want_lab)
    f, s, lab = draw("separate")
    assert sum(not torch.equal(f[i], s[i]) for i in range(len(labels))) > 6, "separate transforms differ on many rows"
    g = torch.Generator().manual_seed(0)
    want_f, _ = augment(images, None, g, "rot_flip_or_rotate")
    want_s, want_lab = augment(images, labels, g, "rot_flip_or_rotate")  # the labels follow the second batch
    assert torch.equal(f, want_f) and torch.equal(s, want_s) and torch.equal(lab, want_lab)
    with pytest.raises(ValueError, match="shared, separate"):
        draw("mixed")


# --- the steps: a context as run builds it, spies on every input of the mix ------------------------------


def make_ctx(inputs: dict, method: str, blend_dir=None, **settings) -> TrainContext:
    cfg = parse_settings(TrainSettings, dict(TINY, method=method, sa=False, **SMALL_NET, **settings), "train")
    prepared = load_prepared(inputs["prepared_dir"])
    ctx = TrainContext(cfg=cfg, seed=7, device=torch.device("cpu"), generator=torch.Generator().manual_seed(7),
                            prepared=prepared, student=None)
    if method == "bcp_real":
        ctx.unlabeled = prepared.unlabeled_images
    if method in ("bcp_synthetic", "sraseg"):
        ctx.synthetic = ctx.unlabeled = load_synthetic(inputs["synthetic_dir"], prepared.image_size)
    if method == "sraseg":
        blend_dir = blend_dir or inputs["blend_dir"]
        ctx.bank = load_blend(blend_dir, prepared.image_size, len(ctx.synthetic))
        ctx.bank_real_pos = prepared.labeled_position(ctx.bank.real_ids, blend_dir / "pairs.parquet")
        if ctx.bank.fresh:
            ctx.draws = pd.read_parquet(blend_dir / "draws.parquet")  # what the test expects (not used by the step)
    ctx.teacher = IntensityTeacher()
    ctx.step = 3
    return ctx


# sraseg's mixing tests read one soft_dice_ce call per mixed image and one transform for the pair: the
# soft loss form and shared augmentation (the defaults are the region form and separate transforms).
SOFT_SHARED = dict(sraseg_loss="soft", pseudo_weight=1.0, pair_augment="shared")


@dataclass
class Calls:
    augment: list = field(default_factory=list)  # (images in, labels in, images out, labels out)
    maps: list = field(default_factory=list)
    indices: list = field(default_factory=list)
    pseudo: list = field(default_factory=list)  # (teacher, images, pseudo-labels)
    modes: list = field(default_factory=list)  # the teacher mode of each pseudo_labels call
    largest_component: list = field(default_factory=list)  # the filter flag of each pseudo_labels call
    targets: list = field(default_factory=list)  # soft_dice_ce targets
    weights: list = field(default_factory=list)  # soft_dice_ce per-pixel weights (None: unweighted)
    shares: list = field(default_factory=list)  # soft_dice_ce_split pseudo-label shares
    batch_dice: list = field(default_factory=list)  # soft_dice_ce's batch_dice flag of each call


def spy(monkeypatch, ctx: TrainContext) -> Calls:
    calls = Calls()

    def augment_spy(images, labels, generator, mode):
        out = augment(images, labels, generator, mode)
        calls.augment.append((images.clone(), None if labels is None else labels.clone(), *out))
        return out

    def pseudo_spy(teacher, images, num_classes, mode="eval", largest_component=True):
        out = pseudo_labels(teacher, images, num_classes, mode, largest_component)
        calls.pseudo.append((teacher, images.clone(), out))
        calls.modes.append(mode)
        calls.largest_component.append(largest_component)
        return out

    def indices_spy(population, count, generator):
        out = sample_indices(population, count, generator)
        calls.indices.append(out)
        return out

    def loss_spy(logits, target, *args, **kwargs):
        calls.targets.append(target.detach().clone())
        calls.weights.append(kwargs.get("weight"))
        calls.batch_dice.append(kwargs.get("batch_dice", False))
        return soft_dice_ce(logits, target, *args, **kwargs)

    def split_spy(logits, target, pseudo_share, **kwargs):
        calls.shares.append(pseudo_share.clone())
        return soft_dice_ce_split(logits, target, pseudo_share, **kwargs)

    maps = ctx.blend_maps

    def maps_spy(count, kind):
        calls.maps.append(maps(count, kind))
        return calls.maps[-1]

    patch_train(monkeypatch, "augment", augment_spy)
    monkeypatch.setattr(train_data, "augment", augment_spy)  # augment_pair's calls (sraseg's pairs)
    patch_train(monkeypatch, "pseudo_labels", pseudo_spy)
    patch_train(monkeypatch, "sample_indices", indices_spy)
    patch_train(monkeypatch, "soft_dice_ce", loss_spy)
    patch_train(monkeypatch, "soft_dice_ce_split", split_spy)
    ctx.blend_maps = maps_spy
    return calls


class Oracle(nn.Module):
    """A student that recognises each input row among the expected mixed images and predicts the label
    `expect` gives for it (log of the target distribution); rows it does not recognise are recorded."""

    def __init__(self, expect):
        super().__init__()
        self.expect = expect
        self.zero = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []
        self.unmatched = 0

    def forward(self, x):
        want_x, want_y = self.expect()
        self.inputs.append(x.detach().clone())
        rows = []
        for row in x:
            hits = [j for j in range(len(want_x)) if torch.allclose(row, want_x[j], atol=1e-6)]
            self.unmatched += not hits
            y = want_y[hits[0]] if hits else torch.full_like(want_y[0], 1 / C)
            rows.append(torch.log(y.clamp_min(1e-6)))
        return torch.stack(rows) + self.zero


def blend(a, first, second):
    return a * first + (1 - a) * second


def run_step(monkeypatch, inputs, method, step, expect, **ctx_args):
    """The step twice on the same draws: oracle predicting the label mixed as the image, then mixed the
    opposite way. Returns (calls, ctx, losses) of the first."""
    losses, first = {}, None
    for way in ("same", "opposite"):
        ctx = make_ctx(inputs, method, **ctx_args)
        calls = spy(monkeypatch, ctx)
        ctx.student = Oracle(lambda calls=calls, ctx=ctx, way=way: expect(calls, ctx)[0 if way == "same" else 1])
        losses[way] = float(step(ctx)["loss"].detach())
        assert ctx.student.inputs, "the step never ran the student"
        assert ctx.student.unmatched == 0, "the student was given images that are not the expected mixes"
        first = first or (calls, ctx)
    assert losses["same"] * 3 < losses["opposite"], f"the loss follows the label mixed the other way: {losses}"
    return (*first, losses)


def _labels(t: torch.Tensor) -> torch.Tensor:
    return one_hot(t[:, 0].round().long(), C)


def pretrain_expect(calls, ctx):
    _, _, images, labels = calls.augment[0]
    a = calls.maps[0]
    h = len(a)
    y = _labels(labels)
    x = blend(a, images[:h], images[h : 2 * h])
    return (x, blend(a, y[:h], y[h : 2 * h])), (x, blend(a, y[h : 2 * h], y[:h]))


@pytest.mark.parametrize(("method", "kind"), [("bcp_real", "hard"), ("sraseg", "soft")])
def test_pretrain_mixes_image_and_label_alike(method, kind, inputs, monkeypatch):
    name, _, step = loop.training_phases(make_ctx(inputs, method).cfg)[0]
    assert name == "pretrain"
    calls, ctx, _ = run_step(monkeypatch, inputs, method, step, pretrain_expect)
    a = calls.maps[0]
    assert len(calls.augment) == 1 and len(a) == ctx.cfg.labeled_batch // 2
    hard = torch.equal(a, a.round())
    assert hard == (kind == "hard") and 0 < a.mean() < 1
    # the labeled pool, augmented (a rot90/flip changes the slice)
    pool = ctx.prepared.labeled_images
    assert all(any(torch.equal(row[0], p) for p in pool) for row in calls.augment[0][0])
    if method == "sraseg":  # the default soft pre-training: the target is exactly the continuous label mix
        torch.testing.assert_close(torch.cat(calls.targets), pretrain_expect(calls, ctx)[0][1])
        assert calls.weights == [None] and calls.batch_dice == [False]


@pytest.mark.parametrize("form", ["soft", "batch_soft", "region"])
def test_sraseg_pretrains_with_the_form_of_its_self_training_loss(form, inputs, monkeypatch):
    """sraseg_pretrain_loss same: sraseg_loss covers pre-training too, both sources weighing 1: soft is the reference's plain soft loss, batch_soft the same with batch Dice, region
    (L(a) + L(1 - a)) / 2."""
    ctx = make_ctx(inputs, "sraseg", sraseg_loss=form, sraseg_pretrain_loss="same")
    calls = spy(monkeypatch, ctx)
    ctx.student = UNet(**SMALL_NET)
    terms = sraseg_method.pretrain_step(ctx)
    a = calls.maps[0]
    assert calls.batch_dice == {"soft": [False], "batch_soft": [True], "region": [True, True]}[form]
    if form == "region":
        torch.testing.assert_close(torch.cat(calls.weights), torch.cat([a, 1 - a]), rtol=0, atol=0)
    else:
        assert calls.weights == [None]
    assert "loss_pseudo" not in terms and terms["loss"] > 0


def test_sraseg_pretrain_loss_soft_keeps_the_references_pretraining(inputs, monkeypatch):
    """sraseg_pretrain_loss soft (the default): one plain soft loss (per-image Dice) in pre-training
    whatever sraseg_loss."""
    ctx = make_ctx(inputs, "sraseg", sraseg_loss="region")
    assert ctx.cfg.sraseg_pretrain_loss == "soft"
    calls = spy(monkeypatch, ctx)
    ctx.student = UNet(**SMALL_NET)
    sraseg_method.pretrain_step(ctx)
    assert calls.weights == [None] and calls.batch_dice == [False]


def bcp_expect(calls, ctx):
    (_, _, l_img, l_lab), (_, _, u_img, _) = calls.augment[:2]
    _, _, pseudo = calls.pseudo[0]
    a = calls.maps[0]
    h = len(a) // 2
    yl, yu = _labels(l_lab), one_hot(pseudo, C)
    a1, a2 = a[:h], a[h : 2 * h]
    x = torch.cat([blend(a1, u_img[:h], l_img[:h]), blend(a2, l_img[h : 2 * h], u_img[h : 2 * h])])
    same = torch.cat([blend(a1, yu[:h], yl[:h]), blend(a2, yl[h : 2 * h], yu[h : 2 * h])])
    opposite = torch.cat([blend(a1, yl[:h], yu[:h]), blend(a2, yu[h : 2 * h], yl[h : 2 * h])])
    return (x, same), (x, opposite)


@pytest.mark.parametrize("method", ["bcp_real", "bcp_synthetic"])
def test_bcp_selftrain_mixes_both_ways_with_teacher_labels_of_unmixed_images(method, inputs, monkeypatch):
    calls, ctx, _ = run_step(monkeypatch, inputs, method, bcp.selftrain_step, bcp_expect)
    (_, _, l_img, _), (u_in, u_lab_in, u_img, _) = calls.augment[:2]
    # unlabeled rows come from the method's pool: real unlabeled slices or synthetic images
    pool = ctx.unlabeled
    assert u_lab_in is None and all(any(torch.equal(row[0], p) for p in pool) for row in u_in)
    assert not any(torch.equal(row[0], p) for row in u_in for p in ctx.prepared.labeled_images)
    # one teacher call, on the un-mixed augmented unlabeled images
    assert len(calls.pseudo) == 1
    teacher, seen, _ = calls.pseudo[0]
    assert teacher is ctx.teacher and torch.equal(seen, u_img)
    assert not torch.equal(u_img, u_in)  # augmentation did act on this draw
    a = calls.maps[0]
    assert torch.equal(a, a.round()) and len(a) == 2 * (len(l_img) // 2)  # one hard map per mixed image


def _augmented_pair(calls, ctx):
    """(s, r, r's labels) as the step augmented them: one call on the stacked pair, or one call each."""
    if ctx.cfg.pair_augment == "shared":
        _, _, pair, r_lab = calls.augment[0]
        return pair[:, :1], pair[:, 1:], r_lab
    (_, _, s, _), (_, _, r, r_lab) = calls.augment[:2]
    return s, r, r_lab


def _drawn(calls, ctx):
    """(entries, maps [B,1,S,S]) of the step's draw: bank entries drawn with the training generator and their
    maps.npy maps, or (maps: fresh) the blend stage's draws of this iteration with their rendered maps."""
    if not ctx.bank.fresh:
        idx = calls.indices[0].numpy()
        return idx, ctx.bank.maps[torch.from_numpy(idx)][:, None].float()
    start = (ctx.step - ctx.cfg.pretrain_iterations) * ctx.cfg.unlabeled_batch
    corners = torch.tensor(ctx.draws.loc[start : start + ctx.cfg.unlabeled_batch - 1, ["top", "left"]].to_numpy())
    a = render_blend_maps(corners, ctx.prepared.image_size, ctx.bank.hole, ctx.bank.kernel)
    return ctx.draws["blend_id"].to_numpy()[start : start + ctx.cfg.unlabeled_batch], a


def sraseg_expect(calls, ctx):
    idx, a = _drawn(calls, ctx)
    s, r, r_lab = _augmented_pair(calls, ctx)
    _, _, pseudo = calls.pseudo[0]
    ys, yr = one_hot(pseudo, C), _labels(r_lab)
    h = len(idx) // 2
    x = torch.cat([blend(a[:h], s[:h], r[:h]), blend(a[h:], r[h:], s[h:])])
    same = torch.cat([blend(a[:h], ys[:h], yr[:h]), blend(a[h:], yr[h:], ys[h:])])
    opposite = torch.cat([blend(a[:h], yr[:h], ys[:h]), blend(a[h:], ys[h:], yr[h:])])
    return (x, same), (x, opposite)


def _check_sraseg_sources(calls, ctx):
    idx, _ = _drawn(calls, ctx)
    pair_in, r_lab_in, pair, _ = calls.augment[0]
    bank, prepared = ctx.bank, ctx.prepared
    rows = torch.from_numpy(ctx.bank_real_pos[idx])
    # each bank entry's synthetic image, its paired labeled slice and that slice's label, one transform
    assert torch.equal(pair_in[:, 0], ctx.synthetic[torch.from_numpy(bank.synthetic_ids[idx])])
    assert torch.equal(pair_in[:, 1], prepared.labeled_images[rows])
    assert torch.equal(r_lab_in[:, 0], prepared.labeled_labels[rows].float())
    assert np.array_equal(prepared.labeled_ids[rows.numpy()], bank.real_ids[idx])
    teacher, seen, _ = calls.pseudo[0]
    assert len(calls.pseudo) == 1 and teacher is ctx.teacher and torch.equal(seen, pair[:, :1])
    assert not torch.equal(pair, pair_in)


def test_sraseg_selftrain_mixes_bank_pairs_with_teacher_labels_of_unmixed_synthetic(inputs, monkeypatch):
    calls, ctx, losses = run_step(monkeypatch, inputs, "sraseg", sraseg_method.selftrain_step, sraseg_expect,
                                  **SOFT_SHARED)
    _check_sraseg_sources(calls, ctx)
    a = ctx.bank.maps[calls.indices[0]].float()
    assert ((a > 0) & (a < 1)).any()  # soft maps: the label really is continuous
    torch.testing.assert_close(torch.cat(calls.targets), sraseg_expect(calls, ctx)[0][1])
    assert calls.weights == [None, None]  # pseudo_weight 1: the reference's unweighted soft loss


def test_sraseg_default_step_region_loss_follows_the_mixed_label(inputs, monkeypatch):
    """The defaults (region loss over the shares, separate transforms): the student that predicts the label
    mixed as the image scores far below the one that predicts it mixed the other way (run_step's check),
    and the loss holds both label sources' terms."""
    calls, ctx, _ = run_step(monkeypatch, inputs, "sraseg", sraseg_method.selftrain_step, sraseg_expect)
    assert (ctx.cfg.sraseg_loss, ctx.cfg.pair_augment, ctx.cfg.pseudo_weight) == ("region", "separate", 0.5)
    assert all(calls.batch_dice) and len(calls.batch_dice) == 4  # two weighted terms per mixed image


@pytest.fixture(scope="module")
def fresh_dir(inputs, tmp_path_factory):
    """The blend stage's `maps: fresh` folder: 6 self-training iterations of 4 draws."""
    return make_fresh_blend(tmp_path_factory.mktemp("fresh"), inputs, 24)


def test_sraseg_fresh_selftrain_mixes_each_draw_with_its_rendered_map(inputs, fresh_dir, monkeypatch):
    """maps: fresh: the step takes this iteration's rows of draws.parquet (entries and hole corners) and mixes
    with maps rendered from them; the training generator draws no entries."""
    calls, ctx, _ = run_step(monkeypatch, inputs, "sraseg", sraseg_method.selftrain_step, sraseg_expect,
                             blend_dir=fresh_dir, **SOFT_SHARED)
    assert ctx.bank.fresh and ctx.bank.maps is None and calls.indices == []
    _check_sraseg_sources(calls, ctx)
    _, a = _drawn(calls, ctx)
    assert ((a > 0) & (a < 1)).any()
    torch.testing.assert_close(torch.cat(calls.targets), sraseg_expect(calls, ctx)[0][1])


def test_sraseg_fresh_maps_follow_the_step_whatever_the_run(inputs, fresh_dir):
    """Each self-training iteration's maps are its draws' maps: the same in another run (another training
    seed and generator state: a rerun or a resume at that step), different from the other iterations', so
    every draw of a synthetic image has a map of its own."""
    settings = dict(selftrain_iterations=6)
    ctx = make_ctx(inputs, "sraseg", blend_dir=fresh_dir, **settings)
    per_image: dict[int, list[torch.Tensor]] = {}
    seen = []
    for j in range(6):
        ctx.step = ctx.cfg.pretrain_iterations + j
        idx, a = sraseg_method.draws(ctx)
        np.testing.assert_array_equal(idx, ctx.draws["blend_id"].to_numpy()[4 * j : 4 * j + 4])
        other = make_ctx(inputs, "sraseg", blend_dir=fresh_dir, **settings)
        other.generator.manual_seed(99)
        torch.rand(5, generator=other.generator)
        other.step = ctx.step
        other_idx, other_a = sraseg_method.draws(other)
        assert torch.equal(a, other_a) and np.array_equal(idx, other_idx)
        for sid, m in zip(ctx.bank.synthetic_ids[idx], a):
            per_image.setdefault(int(sid), []).append(m)
        seen.append(a)
    maps = torch.cat(seen)
    assert len({m.numpy().tobytes() for m in maps}) >= 22  # 24 draws: (almost) all maps differ
    for sid, own in per_image.items():
        assert len(own) == 3 and not torch.equal(own[0], own[1]), sid  # 8 images, once per epoch
    with pytest.raises(IndexError, match="24 self-training draws"):
        ctx.step = ctx.cfg.pretrain_iterations + 6
        sraseg_method.draws(ctx)


def test_sraseg_separate_pair_augmentation_mixes_each_image_with_its_own_transform(inputs, monkeypatch):
    calls, ctx, _ = run_step(monkeypatch, inputs, "sraseg", sraseg_method.selftrain_step, sraseg_expect,
                             **dict(SOFT_SHARED, pair_augment="separate"))
    idx = calls.indices[0].numpy()
    (s_in, s_lab_in, s, _), (r_in, r_lab_in, r, _) = calls.augment[:2]
    rows = torch.from_numpy(ctx.bank_real_pos[idx])
    assert s_lab_in is None and torch.equal(s_in[:, 0], ctx.synthetic[torch.from_numpy(ctx.bank.synthetic_ids[idx])])
    assert torch.equal(r_in[:, 0], ctx.prepared.labeled_images[rows])
    assert torch.equal(r_lab_in[:, 0], ctx.prepared.labeled_labels[rows].float())
    teacher, seen, _ = calls.pseudo[0]
    assert torch.equal(seen, s)  # the teacher labels the synthetic image as it was augmented
    torch.testing.assert_close(torch.cat(calls.targets), sraseg_expect(calls, ctx)[0][1])


TEACHER_SETTINGS = [("bcp_real", "teacher_mode", "eval", "modes"), ("bcp_real", "teacher_mode", "train", "modes"),
                    ("sraseg", "teacher_mode", "eval", "modes"), ("sraseg", "teacher_mode", "train", "modes"),
                    ("bcp_synthetic", "largest_component", True, "largest_component"),
                    ("bcp_synthetic", "largest_component", False, "largest_component"),
                    ("sraseg", "largest_component", True, "largest_component"),
                    ("sraseg", "largest_component", False, "largest_component")]  # fmt: skip


@pytest.mark.parametrize(("method", "setting", "value", "seen"), TEACHER_SETTINGS)
def test_selftrain_steps_pass_the_teacher_settings(method, setting, value, seen, inputs, monkeypatch):
    """The teacher labels in the configured mode and with the configured largest-component filter."""
    ctx = make_ctx(inputs, method, **{setting: value})
    calls = spy(monkeypatch, ctx)
    ctx.student = UNet(**SMALL_NET)
    loop.training_phases(ctx.cfg)[-1][2](ctx)
    assert getattr(calls, seen) == [value]


@pytest.mark.parametrize("rampup", [0, 4])
def test_sraseg_pseudo_weight_weighs_the_pseudo_share_of_each_pixel(rampup, inputs, monkeypatch):
    """pseudo_weight w (times the ramp-up factor r): pixel weights 1 - (1 - w*r)*m with m = a in x1 and
    1 - a in x2; the loss split gets the same shares."""
    ctx = make_ctx(inputs, "sraseg", sraseg_loss="soft", pseudo_weight=0.5, unlabeled_rampup=rampup)
    calls = spy(monkeypatch, ctx)
    ctx.student = UNet(**SMALL_NET)
    terms = sraseg_method.selftrain_step(ctx)
    a = ctx.bank.maps[calls.indices[0]].float()[:, None]
    h = len(a) // 2
    share = torch.cat([a[:h], 1 - a[h:]])
    w = 0.5 * sigmoid_rampup(ctx.step - ctx.cfg.pretrain_iterations, rampup)
    assert (w == 0.5) == (rampup == 0) and ctx.step - ctx.cfg.pretrain_iterations == 1
    torch.testing.assert_close(torch.cat(calls.weights), 1 - (1 - w) * share, rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.cat(calls.shares), share, rtol=0, atol=0)
    assert {"loss_true", "loss_pseudo", "pl_frac_rv", "pl_frac_myo", "pl_frac_lv"} <= terms.keys()


@pytest.mark.parametrize("form", ["batch_soft", "region"])
def test_sraseg_loss_forms_weigh_the_pseudo_share_with_batch_dice(form, inputs, monkeypatch):
    """sraseg_loss batch_soft: the soft loss with pixel weights 1 - (1 - w)*m and batch Dice; region: two
    batch-Dice soft losses per mixed image, weighted by m (then w) and by 1 - m, with m = a in x1 and
    1 - a in x2."""
    ctx = make_ctx(inputs, "sraseg", pseudo_weight=0.5, sraseg_loss=form)
    calls = spy(monkeypatch, ctx)
    ctx.student = UNet(**SMALL_NET)
    terms = sraseg_method.selftrain_step(ctx)
    a = ctx.bank.maps[calls.indices[0]].float()[:, None]
    h = len(a) // 2
    shares = [a[:h], 1 - a[h:]]
    assert all(calls.batch_dice) and len(calls.batch_dice) == (2 if form == "batch_soft" else 4)
    if form == "batch_soft":
        want = [1 - 0.5 * m for m in shares]
    else:
        want = [w for m in shares for w in (m, 1 - m)]
    for got, expected in zip(calls.weights, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert {"loss", "dice_loss", "ce_loss", "loss_true", "loss_pseudo"} <= terms.keys()
    if form == "region":  # loss = (0.5 * pseudo part + true part) / 2 over both mixed images
        torch.testing.assert_close(terms["loss"], (0.5 * terms["loss_pseudo"] + terms["loss_true"]) / 2)


def test_bcp_soft_loss_mirror_weighs_the_unlabeled_region_by_pseudo_weight(inputs, monkeypatch):
    """bcp_loss soft: BCP's mixed images get sraseg's soft loss, pixel weights 1 - (1 - w)*m with m = a in
    x1 (the unlabeled image where a = 1) and 1 - a in x2; the region loss is not called."""
    ctx = make_ctx(inputs, "bcp_synthetic", bcp_loss="soft", pseudo_weight=0.25)
    calls = spy(monkeypatch, ctx)
    monkeypatch.setattr(bcp, "bcp_region_loss", lambda *a: pytest.fail("region loss called"))
    ctx.student = UNet(**SMALL_NET)
    terms = bcp.selftrain_step(ctx)
    a = calls.maps[0]
    h = len(a) // 2
    share = torch.cat([a[:h], 1 - a[h:]])
    assert 0 < share.mean() < 1 and set(share.unique().tolist()) == {0.0, 1.0}  # hard masks, both regions
    torch.testing.assert_close(torch.cat(calls.weights), 1 - 0.75 * share, rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.cat(calls.shares), share, rtol=0, atol=0)
    assert {"loss_true", "loss_pseudo", "pl_frac_rv"} <= terms.keys()


def test_mean_reduction_is_half_the_sum(inputs):
    """selftrain_reduction mean (sraseg's default): every loss term exactly half the sum's (same draws;
    SA off here, it is added after the reduction); the pseudo-label fractions do not change."""
    out = {}
    for reduction in ("sum", "mean"):
        ctx = make_ctx(inputs, "sraseg", selftrain_reduction=reduction)
        torch.manual_seed(0)
        ctx.student = UNet(**SMALL_NET)
        out[reduction] = {k: v.detach() for k, v in loop.training_phases(ctx.cfg)[-1][2](ctx).items()}
    assert out["sum"].keys() == out["mean"].keys()
    for key, total in out["sum"].items():
        want = out["mean"][key] if key.startswith("pl_frac") else 2 * out["mean"][key]
        assert torch.equal(total, want), key


def test_bcp_loss_split_and_pseudo_label_fractions(inputs, monkeypatch):
    """BCP: loss = loss_true + 0.5 * loss_pseudo (each region's terms before its weight); pl_frac_* are
    the class shares of the pseudo-labels (here all MYO)."""
    ctx = make_ctx(inputs, "bcp_real")
    ctx.student = UNet(**SMALL_NET)
    patch_train(monkeypatch, "pseudo_labels", lambda t, x, c, mode="eval", **k: torch.full((len(x), *x.shape[2:]), 2))
    terms = bcp.selftrain_step(ctx)
    torch.testing.assert_close(terms["loss"], terms["loss_true"] + 0.5 * terms["loss_pseudo"])
    assert not torch.allclose(terms["loss"], 0.5 * terms["loss_true"] + terms["loss_pseudo"])
    assert (terms["pl_frac_rv"], terms["pl_frac_myo"], terms["pl_frac_lv"]) == (0.0, 1.0, 0.0)


def test_sraseg_selftrain_with_the_hard_bank(inputs, tmp_path, monkeypatch):
    """The hard-blend ablation: the step mixes with the bank's {0,1} maps, so every pixel of a mixed image
    is the synthetic or the real pixel and the target is one-hot."""
    hard = make_blend(tmp_path, inputs["prepared_dir"], inputs["synthetic_dir"], kind="hard")
    calls, ctx, _ = run_step(monkeypatch, inputs, "sraseg", sraseg_method.selftrain_step, sraseg_expect, blend_dir=hard,
                             **SOFT_SHARED)
    _check_sraseg_sources(calls, ctx)
    target = torch.cat(calls.targets)
    assert torch.equal(target, target.round()) and torch.equal(target.sum(1), torch.ones_like(target[:, 0]))
    _, _, pair, _ = calls.augment[0]
    x = torch.cat(ctx.student.inputs)
    h = len(x) // 2
    first = torch.cat([pair[:h, :1], pair[h:, 1:]])
    second = torch.cat([pair[:h, 1:], pair[h:, :1]])
    assert ((x == first) | (x == second)).all() and (x == first).float().mean() > 0.3


# --- the teacher and model selection inside the real loop ------------------------------------------------


def test_teacher_and_model_selection_in_the_loop(inputs, tmp_path, monkeypatch):
    """bcp_real, 3 + 3 iterations, validation after each with scripted Dice so that best != last in both
    phases: no teacher in pre-training; self-training starts student and teacher from the best
    pre-training weights; the EMA runs after every self-training step with the run's teacher, student and
    decay; the published model is the best self-training student, not the last."""
    settings = dict(TINY, method="bcp_real", pretrain_iterations=3, selftrain_iterations=3, val_every=1,
                    ema_decay=0.9, **SMALL_NET)
    dice = [0.2, 0.9, 0.1, 0.3, 0.8, 0.5]
    events: list[tuple] = []

    def fake_validate(model, images, labels, cases, device, batch=32):
        if guarding:  # the switch guard's look at the teacher self-training starts from
            events.append(("switch_val", state_of(model)))
            return np.full(3, 1.0)
        if any(e[0] == "self" and e[1] is model for e in events):  # the teacher's Dice, logged beside
            events.append(("teacher_val", state_of(model)))
            return np.full(3, 1.0)  # better than any student: must not be what picks the kept model
        events.append(("val", state_of(model)))
        return np.full(3, dice[sum(e[0] == "val" for e in events) - 1])

    real_pretrain, real_selftrain, real_guard = bcp.pretrain_step, bcp.selftrain_step, loop.guard_switch
    guarding = False

    def guard_spy(*args, **kwargs):
        nonlocal guarding
        guarding = True
        real_guard(*args, **kwargs)
        guarding = False

    def pretrain_spy(ctx):
        events.append(("pre", ctx.teacher))
        return real_pretrain(ctx)

    def selftrain_spy(ctx):
        events.append(("self", ctx.teacher, params_of(ctx.teacher), state_of(ctx.student), ctx.student))
        return real_selftrain(ctx)

    def ema_spy(teacher, student, decay):
        events.append(("ema", teacher, student, decay))
        update_ema(teacher, student, decay)

    patch_train(monkeypatch, "validate", fake_validate, home=True)
    monkeypatch.setattr(bcp, "pretrain_step", pretrain_spy)
    monkeypatch.setattr(bcp, "selftrain_step", selftrain_spy)
    monkeypatch.setattr(loop, "update_ema", ema_spy)
    monkeypatch.setattr(loop, "guard_switch", guard_spy)
    out = loop.run(out_dir=tmp_path / "run", settings=settings, seed=2, **inputs)

    kinds = [e[0] for e in events if e[0] not in ("val", "teacher_val")]
    assert kinds == ["pre"] * 3 + ["switch_val"] + ["self", "ema"] * 3
    # the teacher is validated right after the student at each self-training validation, as it is then
    assert [e[0] for e in events if e[0] in ("val", "teacher_val")] == ["val"] * 3 + ["val", "teacher_val"] * 3
    assert all(e[1] is None for e in events if e[0] == "pre")
    vals = [e[1] for e in events if e[0] == "val"]
    selfs = [e for e in events if e[0] == "self"]
    emas = [e for e in events if e[0] == "ema"]
    # self-training starts from pre-training iteration 2 (best), not 3 (last)
    assert not same_state(vals[1], vals[2])
    assert same_state(selfs[0][3], vals[1])
    # the guard validated that teacher, once, before the first self-training step
    assert same_state(next(e[1] for e in events if e[0] == "switch_val"), vals[1])
    assert same_state({k: v for k, v in vals[1].items() if k in selfs[0][2]}, selfs[0][2])
    # the teacher validated is the one after that iteration's EMA update
    teacher_vals = [e[1] for e in events if e[0] == "teacher_val"]
    assert same_state({k: v for k, v in teacher_vals[0].items() if k in selfs[1][2]}, selfs[1][2])
    assert same_state(teacher_vals[-1], state_of(selfs[0][1]))
    # EMA after every step, on the teacher the step used, towards the student just updated
    for k, ema in enumerate(emas):
        assert ema[1] is selfs[k][1] and ema[2] is selfs[k][4] and ema[3] == 0.9
    for k in range(2):
        before, after, student = selfs[k][2], selfs[k + 1][2], selfs[k + 1][3]
        for name in before:
            torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * student[name], rtol=1e-5, atol=1e-6)
    # published: self-training iteration 2 (Dice 0.8), not the last one
    published = load_file(str(out / "model.safetensors"))
    assert same_state(published, vals[4]) and not same_state(published, vals[5])
    best = json.loads((out / "train.json").read_text())["best"]
    assert best["phase"] == "selftrain" and best["iteration"] == 2 and best["val_dice_mean"] == pytest.approx(0.8)


def test_a_dense_validation_can_pick_the_kept_model(inputs, tmp_path, monkeypatch):
    """dense_val_every 1 for 2 iterations, val_every 4: the student is validated at self-training iterations
    1, 2 and 4; the best (iteration 1, a dense check) is the published model. The teacher is validated at
    each of them too and scores higher, yet never picks the model."""
    settings = dict(TINY, method="bcp_real", pretrain_iterations=1, selftrain_iterations=4, val_every=4,
                    dense_val_every=1, dense_val_iterations=2, **SMALL_NET)
    dice, seen = iter([0.5, 0.9, 0.2, 0.3]), []
    teachers = []
    real_selftrain = bcp.selftrain_step

    def selftrain_spy(ctx):
        teachers.append(ctx.teacher)
        return real_selftrain(ctx)

    def fake_validate(model, images, labels, cases, device, batch=32):
        if not teachers and not model.training:  # the switch guard's look at the teacher (in eval mode)
            seen.append("switch")
            return np.full(3, 1.0)
        if teachers and model is teachers[0]:
            seen.append("teacher")
            return np.full(3, 1.0)
        seen.append(state_of(model))
        return np.full(3, next(dice))

    patch_train(monkeypatch, "validate", fake_validate, home=True)
    monkeypatch.setattr(bcp, "selftrain_step", selftrain_spy)
    out = loop.run(out_dir=tmp_path / "run", settings=settings, seed=2, **inputs)
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [(r["phase"], int(r["iteration"])) for r in rows] == [("pretrain", 1), ("switch", 0), ("selftrain", 1),
                                                                 ("selftrain", 2), ("selftrain", 4)]
    assert seen.pop(1) == "switch"
    assert [x == "teacher" for x in seen] == [False] + [False, True] * 3
    assert [float(r["teacher_val_dice_mean"]) for r in rows[1:]] == [1.0] * 4  # the switch row, then self-training
    best = json.loads((out / "train.json").read_text())["best"]
    assert (best["phase"], best["iteration"]) == ("selftrain", 1)
    assert same_state(load_file(str(out / "model.safetensors")), seen[1])


# --- validation --------------------------------------------------------------------------------------------


class ReadsIntensity(nn.Module):
    """Predicts class round(3 * x) at every pixel."""

    def forward(self, x):
        return -((3 * x - torch.arange(C, dtype=x.dtype)[None, :, None, None]) ** 2) * 100


def test_validate_scores_each_volume_in_3d():
    """Case A (two slices) and case B (one), interleaved, batches crossing cases. Per volume:
    A: RV 3-D Dice 2*2/(4+4) = 0.5 (a per-slice mean would give 1/3), MYO only in the truth -> 0, LV in
    neither -> 1; B: RV exact -> 1, MYO in neither -> 1, LV only predicted -> 0. The mean over volumes
    is (0.75, 0.5, 0.5)."""
    pred = np.zeros((3, 6, 6), np.uint8)
    truth = np.zeros((3, 6, 6), np.uint8)
    truth[0, 0:2, 0:2] = 1  # A, slice 1: RV 4 px, predicted on 2 of them
    pred[0, 0:2, 0:1] = 1
    truth[0, 4:6, 4:6] = 2  # MYO in A's truth only
    truth[1, 1:3, 1:3] = 1  # B: RV predicted exactly
    pred[1, 1:3, 1:3] = 1
    pred[1, 5, 0:3] = 3  # LV predicted in B only
    pred[2, 3:5, 0] = 1  # A, slice 2: 2 RV px predicted, none true
    images = torch.from_numpy(pred.astype(np.float32) / 3)
    cases = np.array(["A", "B", "A"])
    dice = validation.validate(ReadsIntensity(), images, torch.from_numpy(truth), cases, torch.device("cpu"), batch=2)
    np.testing.assert_allclose(dice, [0.75, 0.5, 0.5])
    perfect = validation.validate(ReadsIntensity(), torch.from_numpy(truth / 3).float(), torch.from_numpy(truth), cases,
                            torch.device("cpu"), batch=2)
    np.testing.assert_allclose(perfect, [1.0, 1.0, 1.0])


# --- no val or test slice enters training --------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Every input, then val and test slices made NaN (test labels out of range) and marked labeled, so
    any training pool that takes a held-out slice gives a non-finite loss or a label error."""
    made = make_all(tmp_path_factory.mktemp("poisoned"))
    prepared = made["prepared_dir"]
    table = pd.read_parquet(prepared / "slices.parquet")
    held_out = (table["split"] != "train").to_numpy()
    images, labels = np.load(prepared / "images.npy"), np.load(prepared / "labels.npy")
    images[held_out] = np.nan
    labels[(table["split"] == "test").to_numpy()] = 9
    table.loc[held_out, "labeled"] = True
    np.save(prepared / "images.npy", images)
    np.save(prepared / "labels.npy", labels)
    table.to_parquet(prepared / "slices.parquet")
    return made


@pytest.mark.parametrize("method", METHODS)
def test_held_out_slices_never_train(method, poisoned, tmp_path, monkeypatch):
    scored = []

    def fake_validate(model, images, labels, cases, device, batch=32):
        scored.append(len(images))
        assert torch.isnan(images).all()  # validation does read the val slices, and only those
        return np.full(3, 0.5)

    patch_train(monkeypatch, "validate", fake_validate, home=True)
    settings = dict(TINY, method=method, **SMALL_NET)
    loop.run(out_dir=tmp_path / "out", settings=settings, seed=1, **poisoned)
    assert scored and set(scored) == {6}  # patient004: 2 frames x 3 slices
    # and the check itself can fail: a val slice in the labeled pool gives a NaN loss
    if method == "labeled_only":
        real = train_data.load_prepared

        def leaky(*args, **kwargs):
            prepared = real(*args, **kwargs)
            prepared.labeled_images = torch.cat([prepared.labeled_images, prepared.val_images])
            prepared.labeled_labels = torch.cat([prepared.labeled_labels, prepared.val_labels])
            return prepared

        monkeypatch.setattr(train_data, "load_prepared", leaky)
        with pytest.raises(SrasegError, match="nan"):
            loop.run(out_dir=tmp_path / "leaky", settings=dict(settings, labeled_batch=40), seed=1, **poisoned)


# --- resume -------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["bcp_real", "sraseg"])
def test_interrupted_semi_supervised_run_resumes_exactly(method, inputs, tmp_path, monkeypatch):
    """Interrupted in the middle of self-training (teacher, optimizer and RNG states all in play), then
    rerun: the published model and log equal those of a run never interrupted; only the rest is trained."""
    settings = dict(TINY, method=method, pretrain_iterations=2, selftrain_iterations=3, **SMALL_NET)
    straight = loop.run(out_dir=tmp_path / "straight", settings=settings, seed=4, **inputs)

    module = {"bcp_real": bcp, "sraseg": sraseg_method}[method]
    real_step, trained = module.selftrain_step, []

    def stop_at_step_3(ctx):
        if ctx.step == 3:
            raise _Stop
        return real_step(ctx)

    def counting(ctx):
        trained.append(ctx.step)
        return real_step(ctx)

    monkeypatch.setattr(module, "selftrain_step", stop_at_step_3)
    with pytest.raises(_Stop):
        loop.run(out_dir=tmp_path / "resumed", settings=settings, seed=4, **inputs)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(module, "selftrain_step", counting)
    resumed = loop.run(out_dir=tmp_path / "resumed", settings=settings, seed=4, **inputs)
    assert trained == [3, 4]
    a, b = load_file(str(resumed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda path: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]  # noqa: E731
    assert drop(resumed / "train_log.csv") == drop(straight / "train_log.csv")


@pytest.mark.parametrize("method", ["labeled_only", "bcp_real", "bcp_synthetic"])
def test_sraseg_settings_leave_the_other_methods_untouched(method, inputs):
    """sraseg_loss, pseudo_weight, pair_augment and selftrain_reduction are sraseg's alone (bcp_loss keeps
    the region loss, BCP sums its two terms): the other methods' steps give the same terms whatever they
    are, so their runs stand when sraseg's defaults move."""
    out = []
    for settings in ({"sraseg_loss": "soft", "pseudo_weight": 1.0, "pair_augment": "shared", "selftrain_reduction": "sum"},
                     {"sraseg_loss": "region", "pseudo_weight": 0.5, "pair_augment": "separate", "selftrain_reduction": "mean"}):
        ctx = make_ctx(inputs, method, **settings)
        torch.manual_seed(0)
        ctx.student = UNet(**SMALL_NET)
        out.append({k: v.detach() for k, v in loop.training_phases(ctx.cfg)[-1][2](ctx).items()})
    assert out[0].keys() == out[1].keys() and out[0]["loss"] > 0
    for key in out[0]:
        assert torch.equal(out[0][key], out[1][key]), key


class _FixedLogits(nn.Module):
    """A 'teacher' whose logits are given: pixel (0,0) sure of class 2, pixel (0,1) torn between 1 and 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 4, *x.shape[2:])
        logits[:, 0] = 5.0  # background, sure, everywhere else
        logits[:, :, 0, 0] = torch.tensor([0.0, 0.0, 6.0, 0.0])
        logits[:, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0, 1.1])
        return logits


def test_confident_pseudo_labels_keep_only_where_the_teacher_is_sure():
    """pseudo_min_confidence: the labels are pseudo_labels' own; keep is 0 exactly where the top
    probability is below the threshold."""
    from sraseg.train.teacher import confident_pseudo_labels

    teacher, x = _FixedLogits(), torch.rand(2, 1, 4, 4)
    labels, keep = confident_pseudo_labels(teacher, x, 4, 0.8, "eval", largest_component=False)
    assert torch.equal(labels, pseudo_labels(teacher, x, 4, "eval", largest_component=False))
    assert labels[0, 0, 0] == 2 and labels[0, 0, 1] == 3
    assert keep.shape == (2, 1, 4, 4) and keep[:, 0, 0, 1].eq(0).all()
    assert keep.sum() == 2 * 15  # every other pixel: top probability above 0.8


@pytest.mark.parametrize("form", ["region", "soft", "batch_soft"])
def test_a_dropped_pixel_teaches_nothing(form):
    """mixed_loss with keep: the target of a pixel whose pseudo-labelled share is dropped (keep 0, share 1)
    does not move the loss; the same change at a kept pixel does; keep all ones is no keep at all."""
    from sraseg.train.methods.shared import mixed_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = one_hot(torch.randint(0, 4, (2, 8, 8)), 4)
    share = torch.zeros(2, 1, 8, 8)
    share[:, :, :4] = 1.0  # the top half comes from the pseudo-labelled image
    keep = torch.ones_like(share)
    keep[0, 0, 0, 0] = 0.0
    changed = target.clone()
    changed[0, :, 0, 0] = torch.roll(target[0, :, 0, 0], 1)  # another class at the dropped pixel
    moved = target.clone()
    moved[0, :, 0, 1] = torch.roll(target[0, :, 0, 1], 1)  # and at a kept one

    def loss(t, k):
        return mixed_loss(logits, t, share, 0.5, form, k)["loss"]

    assert torch.equal(loss(target, keep), loss(changed, keep))
    assert loss(target, keep) != loss(moved, keep)
    torch.testing.assert_close(loss(target, torch.ones_like(share)), loss(target, None), rtol=1e-6, atol=1e-7)
    assert loss(target, None) != loss(changed, None)  # without keep the pixel counts


def test_pseudo_min_confidence_trains_other_weights_and_logs_the_share_kept(inputs):
    """sraseg's step with pseudo_min_confidence: the loss differs from the unfiltered step on the same draws,
    and pl_kept, the share of pixels kept, is in (0, 1]."""
    out = {}
    for threshold in (0.0, 0.9):
        ctx = make_ctx(inputs, "sraseg", pseudo_min_confidence=threshold)
        torch.manual_seed(0)
        ctx.student = UNet(**SMALL_NET)
        out[threshold] = {k: v.detach() for k, v in sraseg_method.selftrain_step(ctx).items()}
    assert "pl_kept" not in out[0.0] and 0 < out[0.9]["pl_kept"] <= 1
    assert not torch.equal(out[0.0]["loss"], out[0.9]["loss"])
