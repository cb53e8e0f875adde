"""The GPU path, proven on the CPU: the device-side component filter and blend maps, fp32 where it matters,
no host read-back in the step functions, and a one-line failure when CUDA is asked for but absent."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sraseg.blend.maps import box_masks, make_blend_maps, soften
from sraseg.device import claim_gpu, pick_device
from sraseg.errors import ConfigError
from sraseg.train import loop, teacher
from sraseg.train.context import INPUT_FIELDS
from sraseg.train.data import augment
from sraseg.train.teacher import largest_components, largest_components_torch, update_ema
from sraseg.train.validation import validate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import build_inputs, make_bench  # noqa: E402

# --- component filter: the torch route equals the scipy route ---------------------------------------


def _both(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return largest_components(labels, 4, route="scipy"), largest_components(labels, 4, route="torch")


def _serpentine(size: int) -> np.ndarray:
    """One corridor winding down the slice (full even rows joined at alternate ends): a single component
    whose geodesic length is about size^2/2, the hard case for propagation-style labelling."""
    grid = np.zeros((size, size), np.int64)
    grid[::2] = 1
    for row in range(1, size, 2):
        grid[row, size - 1 if row % 4 == 1 else 0] = 1
    return grid


@pytest.mark.parametrize("seed", range(6))
def test_component_filter_routes_agree_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 4, size=(3, 19, 23))  # many tiny blobs, many ties
    blobs = (rng.random((2, 40, 33)) < 0.5).astype(np.int64) * rng.integers(1, 4, size=(2, 1, 1))  # percolation
    for labels in (dense, blobs):
        scipy_out, torch_out = _both(labels)
        assert np.array_equal(scipy_out, torch_out)
        assert (scipy_out != labels).any() and scipy_out.any()  # the filter did remove blobs, and kept some


def test_component_filter_routes_agree_on_constructed_cases():
    labels = np.zeros((4, 12, 12), np.int64)
    labels[0, 1, 1] = labels[0, 2, 2] = labels[0, 3, 3] = 1  # diagonal chain: one 8-connected blob of 3
    labels[0, 8:10, 8:10] = 1  # a 2x2 blob of 4 wins over it
    labels[1, 0:2, 0:2] = 2  # two equal blobs: the first in raster order wins
    labels[1, 5:7, 5:7] = 2
    labels[2, 0:3, 0:3] = 3  # slice 2 and 3 hold the same blob: no connection across slices
    labels[3, 0:3, 0:3] = 3
    labels[3, 11, 11] = 3
    scipy_out, torch_out = _both(labels)
    assert np.array_equal(scipy_out, torch_out)
    assert scipy_out[0, 8, 8] == 1 and scipy_out[0, 1, 1] == 0
    assert scipy_out[1, 0, 0] == 2 and scipy_out[1, 5, 5] == 0
    assert scipy_out[2, 0, 0] == 3 and scipy_out[3, 0, 0] == 3 and scipy_out[3, 11, 11] == 0

    long_paths = np.stack([_serpentine(48), _serpentine(48) * 2])
    long_paths[1, 30, 20] = 0  # cut the corridor: two long arms, the upper one longer
    scipy_out, torch_out = _both(long_paths)
    assert np.array_equal(scipy_out, torch_out)
    assert np.array_equal(scipy_out[0], long_paths[0])  # the whole corridor is one component
    assert scipy_out[1, :30].all() == (long_paths[1, :30] != 0).all() and not scipy_out[1, 40:].any()


def test_long_corridor_needs_the_rounds_the_filter_runs():
    """The serpentine is a case where too few hooking rounds give wrong labels (so the tests above bite);
    the round count the filter uses has a margin over what it needs."""
    corridor = torch.from_numpy(_serpentine(48)[None] * 3)
    corridor[0, 0, 0] = 0  # the first pixel off: a speck elsewhere must not win
    corridor[0, 47, 47] = 3
    want = torch.from_numpy(largest_components(corridor.numpy(), 4, route="scipy"))
    assert not torch.equal(largest_components_torch(corridor, 4, rounds=4), want)
    assert torch.equal(largest_components_torch(corridor, 4, rounds=12), want)  # the default runs 22


def test_component_filter_keeps_tensor_type_and_device():
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 4, size=(2, 9, 9)))
    out = largest_components(labels, 4, route="torch")
    assert out.dtype == labels.dtype and out.device == labels.device
    assert torch.equal(out, largest_components(labels, 4))  # auto on the CPU: the scipy route


# --- blend maps built from a torch generator ---------------------------------------------------------


def test_device_blend_maps_are_bcp_boxes_and_seeded():
    gen = torch.Generator().manual_seed(5)
    masks = box_masks(16, 30, 24, 2 / 3, gen)
    assert masks.shape == (16, 1, 30, 24) and masks.dtype == torch.float32
    for mask in masks[:, 0]:
        rows, cols = torch.nonzero(mask == 0, as_tuple=True)
        assert len(rows) == 20 * 16  # one hole of round(2/3 * 30) x round(2/3 * 24), fully inside
        assert rows.max() - rows.min() == 19 and cols.max() - cols.min() == 15
    tops = {int(torch.nonzero(m[0] == 0)[0, 0]) for m in masks}
    assert len(tops) > 1  # positions vary
    again = box_masks(16, 30, 24, 2 / 3, torch.Generator().manual_seed(5))
    assert torch.equal(masks, again)
    soft = make_blend_maps(4, 30, 24, torch.Generator().manual_seed(5), "gaussian")
    hard = box_masks(4, 30, 24, 2 / 3, torch.Generator().manual_seed(5))
    assert torch.equal(soft, soften(hard, "gaussian"))  # the same soft edge as before
    assert ((soft > 0) & (soft < 1)).any() and (soft == 0).any()


def test_context_blend_maps_depend_on_seed_and_step_only(tmp_path):
    bench = make_bench("b", build_inputs(16, labeled=4, unlabeled=4, synthetic=4, embed_dim=8), torch.device("cpu"),
                       method="bcp_real", labeled_batch=2, unlabeled_batch=2)
    ctx = bench.ctx
    ctx.step = 7
    first = ctx.blend_maps(3, "gaussian")
    ctx.step = 8
    other = ctx.blend_maps(3, "gaussian")
    ctx.step = 7
    assert torch.equal(first, ctx.blend_maps(3, "gaussian")) and not torch.equal(first, other)


# --- fp32 outside the networks -------------------------------------------------------------------------


def test_augment_and_maps_stay_fp32_under_autocast():
    images = torch.rand(8, 2, 24, 24)
    labels = torch.randint(0, 4, (8, 1, 24, 24)).float()
    plain = augment(images, labels, torch.Generator().manual_seed(3), "rot_flip_or_rotate")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = augment(images, labels, torch.Generator().manual_seed(3), "rot_flip_or_rotate")
        maps = make_blend_maps(2, 24, 24, torch.Generator().manual_seed(1), "gaussian")
    assert mixed[0].dtype == torch.float32 and maps.dtype == torch.float32
    assert torch.equal(plain[0], mixed[0]) and torch.equal(plain[1], mixed[1])
    assert torch.equal(maps, make_blend_maps(2, 24, 24, torch.Generator().manual_seed(1), "gaussian"))


def test_validate_matches_a_numpy_dice():
    class Threshold(torch.nn.Module):
        def forward(self, x):  # class = intensity quartile
            return torch.cat([-(x - c).abs() for c in (0.125, 0.375, 0.625, 0.875)], 1)

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((6, 8, 8), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 4, (6, 8, 8)).astype(np.uint8))
    labels[:3][labels[:3] == 1] = 0  # case a has no RV in the reference
    cases = np.array(["a"] * 3 + ["b"] * 3)
    got = validate(Threshold(), images, labels, cases, torch.device("cpu"), batch=4)
    pred = np.clip((images.numpy() * 4).astype(int), 0, 3)
    want = []
    for case in ("a", "b"):
        p, t = pred[cases == case], labels.numpy()[cases == case]
        want.append([2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum()) for c in (1, 2, 3)])
    assert np.allclose(got, np.mean(want, axis=0), rtol=0, atol=1e-12)
    assert 0 < got.min() < 1


# --- the step under the new placement, and without host read-back ---------------------------------------


@pytest.fixture(scope="module")
def inputs():
    return build_inputs(24, labeled=6, unlabeled=6, synthetic=6, embed_dim=8, seed=1)


def _one_step(bench, route: str, monkeypatch) -> dict:
    monkeypatch.setattr(teacher, "largest_components", lambda labels, n: largest_components(labels, n, route=route))
    bench.ctx.student.train()
    terms = bench.step_fn(bench.ctx)
    terms["loss"].backward()
    return {k: v.detach() for k, v in terms.items()}


@pytest.mark.parametrize("method", ["bcp_real", "sraseg"])
def test_step_loss_is_the_same_on_both_component_routes(method, inputs, monkeypatch):
    losses = []
    for route in ("scipy", "torch"):
        bench = make_bench(method, inputs, torch.device("cpu"), seed=4, method=method, labeled_batch=4,
                           unlabeled_batch=4, sa_batch=2)
        bench.ctx.step = 3
        with torch.no_grad():  # a teacher that finds several blobs per class, so the filter has work
            for p in bench.ctx.teacher.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        losses.append(_one_step(bench, route, monkeypatch))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key


# issue 22's self-training switches, all away from their defaults
ABLATIONS = dict(teacher_mode="train", pair_augment="separate", pseudo_weight=0.5, unlabeled_rampup=10,
                 selftrain_reduction="mean")


def fresh_bank(inputs, draws: int = 40, seed: int = 0):
    """`inputs.bank` as the blend stage's `maps: fresh` gives it: the same entries, no maps, and `draws`
    self-training draws (an entry and a hole corner each)."""
    rng = np.random.default_rng(seed)
    size = inputs.prepared.image_size
    side = round(2 / 3 * size)
    return dataclasses.replace(
        inputs.bank, maps=None, draw_entries=rng.integers(0, len(inputs.bank.synthetic_ids), draws),
        draw_corners=torch.from_numpy(rng.integers(0, size - side + 1, (draws, 2))), hole=(side, side),
        maps_size=size,
    )  # fmt: skip


@pytest.mark.parametrize("ablations", [{}, ABLATIONS], ids=["defaults", "ablations"])
@pytest.mark.parametrize("method", ["labeled_only", "bcp_real", "sraseg", "sraseg_fresh"])
def test_step_functions_read_nothing_back_from_the_device(method, ablations, inputs):
    """Run every phase's step on the `meta` device, whose tensors hold no values: any read-back to the host
    (.item(), float(), .cpu(), .numpy(), bool(), a data-dependent shape) raises there, as it would sync a GPU.
    The instruments (loss split, pseudo-label fractions) are step terms and must pass the same test.
    sraseg_fresh: blend maps: fresh, the maps rendered on the device from the draws' hole corners."""
    fresh = method == "sraseg_fresh"
    method = "sraseg" if fresh else method
    if fresh:
        inputs = dataclasses.replace(inputs, bank=fresh_bank(inputs))
    cpu = make_bench(method, inputs, torch.device("cpu"), method=method, labeled_batch=4, unlabeled_batch=4,
                     sa_batch=2, **ablations)
    meta = torch.device("meta")
    ctx = copy.copy(cpu.ctx)
    object.__setattr__(ctx, "device", meta)
    object.__setattr__(ctx, "_moved", {})
    for name in INPUT_FIELDS:
        value = getattr(cpu.ctx, name)
        if value is not None:
            setattr(ctx, name, value)  # moved to meta
    assert ctx.prepared.labeled_images.device == meta
    with pytest.raises((RuntimeError, NotImplementedError)):  # the guard bites on a read-back
        float(ctx.prepared.labeled_images.sum())
    ctx._map_generator = torch.Generator()  # maps drawn on the CPU, then moved (meta has no generator)
    ctx.student = cpu.ctx.student.to(meta)
    ctx.head = cpu.ctx.head.to(meta) if cpu.ctx.head is not None else None
    ctx.teacher = copy.deepcopy(ctx.student).eval()
    if fresh:
        assert ctx.bank.draw_corners.device == meta and ctx.bank.maps is None
    offset = 0
    for phase, length, step_fn in loop.training_phases(ctx.cfg):
        if fresh:
            ctx.step = offset + 3  # the phase's fourth iteration: fresh draws 12-15 in self-training
        offset += length
        terms = step_fn(ctx)
        assert terms["loss"].device == meta
        if phase == "selftrain":
            assert {"loss_true", "loss_pseudo", "pl_frac_rv"} <= terms.keys()
            assert all(v.device == meta for v in terms.values())
        terms["loss"].backward()
        update_ema(ctx.teacher, ctx.student, 0.99)


# --- a GPU rule with no CUDA fails in one line; one job per local GPU -------------------------------------


def test_cuda_requested_without_cuda_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        pick_device("cuda")
    message = str(caught.value)
    assert "\n" not in message and "sees no CUDA device" in message and "cu126" in message
    assert pick_device("auto").type == "cpu"


def test_gpu_job_without_cuda_exits_with_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "sraseg.device", "--", sys.executable, "-m", "sraseg", "train", "--prepared",
           str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out"), "--settings", '{"device": "cuda"}']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sees no CUDA device" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_slots_go_to_different_jobs(tmp_path):
    first = claim_gpu(2, tmp_path)
    second = claim_gpu(2, tmp_path)
    try:
        assert first[0] == 0 and second[0] == 1
        os.close(first[1])  # job 0 ends: its card is free again
        third = claim_gpu(2, tmp_path)
        assert third[0] == 0
        os.close(third[1])
    finally:
        os.close(second[1])
    assert claim_gpu(0, tmp_path) is None


# --- the benchmarks run ---------------------------------------------------------------------------------


def test_gpu_check_smoke_on_the_cpu_imports_nothing_beyond_torch(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--size", "32", "--batch",
           "4", "--sa-batch", "2", "--steps", "1", "--pretrain-steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = __import__("json").loads(out.read_text())
    assert summary["device"]["extra_imports"] == [] and summary["filter"]["ok"]
    assert set(summary["methods"]["sraseg"]) >= {"pretrain", "selftrain", "peak_mem_mib"}


def test_host_time_benchmark_prints_every_ratio():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "host_time.py"), "--size", "32", "--batch", "4", "--repeats", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("self-train", "pre-train"))]
    assert len(rows) == 5 and all(float(row[-1]) > 0 for row in rows)
