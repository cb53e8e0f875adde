"""Self-train step time: `sraseg` over `bcp_synthetic` at the same batch, measured side by side.

What is timed: one full training iteration exactly as `sraseg.train.loop.run` does it, minus validation,
checkpointing and TensorBoard writes -- the method's own self-train step function (from the loop's phase
table) under autocast, backward, SGD step, EMA teacher update, and reading the loss terms back as floats
(the loop does that every iteration, so on a GPU it synchronises there too). Data are in memory: small
cardiac-like phantoms built here in the stage formats' dataclasses (Prepared, BlendBank, EmbedTargets),
so no workflow run is needed and no file IO is timed. The batch is labeled_batch = unlabeled_batch; the
teacher is a copy of the freshly initialised student (self-training normally starts from pre-trained
weights; the step cost does not depend on the weights).

Variants: bcp_synthetic, sraseg (SA on), sraseg_no_sa. After a warm-up, the variants are interleaved over
repeats (their order rotates each repeat) so background load hits all alike; the median seconds per step
of each variant and the ratio sraseg / bcp_synthetic (goal <= 1.3) are printed.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step.py --size 128 --batch 12 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if importlib.util.find_spec("sraseg") is None:  # a bare checkout (e.g. a GPU box): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from sraseg.blend.maps import make_blend_maps  # noqa: E402
from sraseg.device import autocast, pick_device, seed_everything  # noqa: E402
from sraseg.settings import parse_settings  # noqa: E402
from sraseg.train.alignment import ProjectionHead  # noqa: E402
from sraseg.train.context import TrainContext  # noqa: E402
from sraseg.train.data import BlendBank, EmbedTargets, Prepared  # noqa: E402
from sraseg.train.loop import make_optimizer, training_phases  # noqa: E402
from sraseg.train.settings import TrainSettings  # noqa: E402
from sraseg.train.teacher import update_ema  # noqa: E402
from sraseg.train.unet import UNet  # noqa: E402

__all__ = ["Inputs", "Bench", "build_inputs", "make_bench", "train_iteration", "measure", "VARIANTS"]

log = logging.getLogger("benchmarks.train_step")

# label -> train settings that differ between the variants
VARIANTS = {
    "bcp_synthetic": dict(method="bcp_synthetic"),
    "sraseg": dict(method="sraseg", sa=True),
    "sraseg_no_sa": dict(method="sraseg", sa=False),
}


def phantom_slice(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A cardiac-like slice scaled to `size`: LV disc, myocardium ring, RV disc beside it, a bias field.

    Returns:
        (image float32 [S,S] in [0,1], label uint8 [S,S] in {0..3}).
    """
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, size=2)
    r_lv, wall = rng.uniform(0.05, 0.09), rng.uniform(0.025, 0.04)
    dist = np.hypot(yy - cy, xx - cx)
    rv_dist = np.hypot(yy - cy, xx - (cx - r_lv - wall - 0.06))
    label = np.zeros((size, size), np.uint8)
    label[rv_dist < 0.07] = 1
    label[(dist >= r_lv) & (dist < r_lv + wall)] = 2
    label[dist < r_lv] = 3
    levels = np.array([0.15, 0.8, 0.4, 0.85], np.float32)
    image = levels[label] * (0.8 + 0.3 * xx) + rng.normal(0, 0.04, (size, size))
    return np.clip(image, 0, 1).astype(np.float32), label


@dataclass
class Inputs:
    """In-memory training inputs of every method (the loader dataclasses of sraseg.train.data)."""

    prepared: Prepared
    synthetic: torch.Tensor  # float32 [M,S,S]
    bank: BlendBank
    embed: EmbedTargets
    bank_real_pos: np.ndarray  # row in the labeled arrays of each bank entry's real slice
    bank_real_embed_rows: np.ndarray  # row in embed.real of each bank entry's real slice


def build_inputs(size: int, labeled: int = 24, unlabeled: int = 24, synthetic: int = 24, maps_per_image: int = 2,
                 embed_dim: int = 384, seed: int = 0) -> Inputs:
    """Phantom slices (labeled, unlabeled, 4 val), synthetic phantoms, random unit DINOv2-like targets
    with a random rank-0 neighbour per synthetic image, and a gaussian blend bank paired at random."""
    rng = np.random.default_rng(seed)

    def stack(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [phantom_slice(rng, size) for _ in range(count)]
        return torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs]))

    lab_images, lab_labels = stack(labeled)
    unl_images, _ = stack(unlabeled)
    val_images, val_labels = stack(4)
    prepared = Prepared(
        image_size=size, labeled_images=lab_images, labeled_labels=lab_labels,
        labeled_ids=np.arange(labeled, dtype=np.int64), unlabeled_images=unl_images,
        val_images=val_images, val_labels=val_labels, val_cases=np.array(["patient000_frame01"] * 4),
    )  # fmt: skip
    syn_images, _ = stack(synthetic)
    n_real = labeled + unlabeled  # slice ids 0..n_real-1 are the train slices, all embedded
    real = rng.normal(size=(n_real, embed_dim)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    embed = EmbedTargets(
        torch.from_numpy(real), pd.Series(np.arange(n_real), index=np.arange(n_real)),
        rng.integers(0, n_real, synthetic).astype(np.int64),
    )  # fmt: skip
    count = synthetic * maps_per_image
    maps = make_blend_maps(count, size, size, rng, "gaussian")[:, 0].to(torch.float16)
    bank = BlendBank(maps, np.repeat(np.arange(synthetic), maps_per_image), rng.integers(0, labeled, count))
    source = Path("<benchmark>")
    return Inputs(prepared, syn_images, bank, embed, prepared.labeled_position(bank.real_ids, source),
                  embed.rows_of(bank.real_ids, source))


@dataclass
class Bench:
    """One method ready to step: the loop's context, the self-train step function and the optimizer."""

    name: str
    ctx: TrainContext
    step_fn: object
    optimizer: torch.optim.Optimizer


def make_bench(name: str, inputs: Inputs, device: torch.device, seed: int = 0, **settings) -> Bench:
    """A `TrainContext` as `run` builds it, in self-training (fresh EMA teacher = copy of the student).

    Args:
        name: label of the variant.
        settings: TrainSettings fields (method, labeled_batch, unlabeled_batch, sa, sa_batch, lr, ...).
    Returns:
        Bench with the last phase's step function (self-train; labeled_only's single supervised phase).
    """
    cfg = parse_settings(TrainSettings, {**settings, "device": device.type}, "train")
    torch.manual_seed(seed)  # same initial weights for every variant
    ctx = TrainContext(cfg=cfg, seed=seed, device=device, generator=torch.Generator().manual_seed(seed),
                   prepared=inputs.prepared, student=None)
    if cfg.method == "bcp_real":
        ctx.unlabeled = inputs.prepared.unlabeled_images
    if cfg.method in ("bcp_synthetic", "sraseg"):
        ctx.synthetic = ctx.unlabeled = inputs.synthetic
    if cfg.method == "sraseg":
        ctx.bank, ctx.bank_real_pos = inputs.bank, inputs.bank_real_pos
        if cfg.sa:
            ctx.embed, ctx.bank_real_embed_rows = inputs.embed, inputs.bank_real_embed_rows
    student = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    ctx.student = student
    ctx.head = ProjectionHead(student.feature_dim, ctx.embed.dim).to(device) if ctx.embed is not None else None
    if cfg.method != "labeled_only":
        ctx.teacher = copy.deepcopy(student).eval()
    _, _, step_fn = training_phases(cfg)[-1]
    return Bench(name, ctx, step_fn, make_optimizer(cfg, student, ctx.head))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_iteration(bench: Bench) -> dict[str, float]:
    """One iteration as the loop runs it (no validation, checkpoint or TensorBoard). Returns the loss terms."""
    ctx = bench.ctx
    ctx.student.train()
    with autocast(ctx.device):
        terms = bench.step_fn(ctx)
    bench.optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    bench.optimizer.step()
    if ctx.teacher is not None:
        update_ema(ctx.teacher, ctx.student, ctx.cfg.ema_decay)
    ctx.step += 1
    return {k: float(v.detach()) for k, v in terms.items()}


def timed_iteration(bench: Bench) -> tuple[float, dict[str, float]]:
    """(wall seconds, loss terms) of one iteration, synchronised on CUDA."""
    _sync(bench.ctx.device)
    start = time.perf_counter()
    terms = train_iteration(bench)
    _sync(bench.ctx.device)
    return time.perf_counter() - start, terms


def measure(size: int = 128, batch: int = 12, sa_batch: int = 6, repeats: int = 5, steps: int = 4, warmup: int = 2,
            device: str = "cpu", variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Median seconds per self-train iteration of each variant, interleaved over repeats.

    Returns:
        dict: seconds {variant: median s/step}, samples {variant: [s, ...]}, ratio (sraseg / bcp_synthetic,
        None if either was not run), and the settings used.
    """
    dev = pick_device(device)
    seed_everything(0)
    inputs = build_inputs(size)
    benches = [
        make_bench(name, inputs, dev, labeled_batch=batch, unlabeled_batch=batch, sa_batch=sa_batch,
                   **VARIANTS[name])
        for name in variants
    ]  # fmt: skip
    for bench in benches:  # allocator, oneDNN / cuDNN kernel choice
        for _ in range(warmup):
            train_iteration(bench)
    samples: dict[str, list[float]] = {b.name: [] for b in benches}
    for r in range(repeats):
        for bench in benches[r % len(benches) :] + benches[: r % len(benches)]:
            for _ in range(steps):
                samples[bench.name].append(timed_iteration(bench)[0])
    seconds = {name: statistics.median(ts) for name, ts in samples.items()}
    ratio = seconds["sraseg"] / seconds["bcp_synthetic"] if {"sraseg", "bcp_synthetic"} <= set(seconds) else None
    return dict(seconds=seconds, samples=samples, ratio=ratio, size=size, batch=batch, sa_batch=sa_batch,
                repeats=repeats, steps=steps, warmup=warmup, device=str(dev), threads=torch.get_num_threads())


def report(result: dict) -> None:
    """Log the table of `measure`'s result."""
    log.info("self-train step, %dpx, labeled_batch = unlabeled_batch = %d, sa_batch %d, %s, %d threads, "
             "%d timed steps per variant", result["size"], result["batch"], result["sa_batch"], result["device"],
             result["threads"], result["repeats"] * result["steps"])  # fmt: skip
    log.info("%-14s %12s %12s", "variant", "median s/it", "min s/it")
    for name, sec in result["seconds"].items():
        log.info("%-14s %12.4f %12.4f", name, sec, min(result["samples"][name]))
    if result["ratio"] is not None:
        log.info("ratio sraseg / bcp_synthetic: %.3f (goal <= 1.3)", result["ratio"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image side (default 128)")
    p.add_argument("--batch", type=int, default=12, help="labeled_batch = unlabeled_batch (default 12)")
    p.add_argument("--sa-batch", type=int, default=6, help="sa_batch (default 6)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=4, help="timed iterations per variant per round (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant first (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    report(measure(args.size, args.batch, args.sa_batch, args.repeats, args.steps, args.warmup, args.device, variants))


if __name__ == "__main__":
    main()
