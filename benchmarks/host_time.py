"""Host time per training step spent on the work issue 16 moved to the device, before and after, measured
side by side on the CPU (no GPU needed).

On a GPU the host only queues kernels unless it computes something itself. The networks' forward and
backward queue the same kernels in both versions, so this measures only what changed:

before (host work of the code up to issue 16, at the given size, for real):
  - the batch gathered from host memory, the labels cast to float there;
  - the teacher's pseudo-labels: the scipy component filter of int64 [B,S,S] labels (an imperfect
    teacher's: the phantom labels with 0.5 % of pixels set to a random class). The old code also copied
    the labels to the host and back and waited for the GPU there; that is not counted (a lower bound);
  - pre-training only: B/2 soft blend maps from a numpy generator (box loop + 5x5 conv on the CPU).
after (what the host pays to queue the device route): the same steps with tensors of 16 x 16 pixels on
  the CPU, where computing costs next to nothing, so the time is the per-operation host cost (Python,
  dispatcher, allocator) that a CUDA launch also pays; the component filter runs the number of rounds of
  the full size. Two variants: the filter queued op by op (eager), and replayed as one CUDA graph (what
  `pseudo_labels` does on CUDA: one copy in, one replay, one copy out; the replay call itself is not
  measurable here). Each CUDA launch adds about 5 us of driver time per operation on top (not included).

Variants are interleaved over repeats; medians. Operation counts are counted with a dispatch mode.
Last, the operations one whole training iteration queues per method and phase (step under autocast,
backward, SGD, EMA; the filter counted as its graph's 3), which bounds the host time of an iteration on a
GPU from below at about that many kernel launches.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_time.py                 # ACDC: 256 px, batch 12
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/host_time.py --size 64 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

if importlib.util.find_spec("sraseg") is None:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from train_step import phantom_slice  # noqa: E402  (benchmarks/ is sys.path[0])

from sraseg.blend.maps import make_blend_maps  # noqa: E402
from sraseg.train.data import sample_indices  # noqa: E402
from sraseg.train.teacher import largest_components, largest_components_torch, update_ema  # noqa: E402

TINY = 16  # side of the "after" tensors: the host cost of an operation does not depend on its size


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def teacher_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 labels with 0.5 % of pixels set to a random class: specks the filter removes."""
    out = labels.astype(np.int64)
    specks = rng.random(out.shape) < 0.005
    out[specks] = rng.integers(0, 4, int(specks.sum()))
    return out


def build(size: int, batch: int, pool: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    slices = [phantom_slice(rng, size) for _ in range(pool)]
    images = torch.from_numpy(np.stack([s[0] for s in slices]))
    labels = torch.from_numpy(np.stack([s[1] for s in slices]))
    return images, labels, teacher_like(labels[:batch].numpy(), rng)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side (default 256, ACDC)")
    p.add_argument("--batch", type=int, default=12, help="images per pseudo-labelled batch (default 12)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, size = args.batch, args.size
    images, labels, speckled = build(size, b, 2 * b)
    tiny_images, tiny_labels, tiny_speckled = build(TINY, b, 2 * b, seed=1)
    tiny_speckled = torch.from_numpy(tiny_speckled)
    rounds = math.ceil(math.log(size * size) / math.log(1.5)) + 2  # what the filter runs at `size`
    map_gen = torch.Generator()

    def gather(imgs, labs, step):
        idx = sample_indices(len(imgs), b, torch.Generator().manual_seed(step))
        return imgs[idx][:, None].contiguous(), labs[idx][:, None].float()

    def before_self(step):
        gather(images, labels, step)
        largest_components(speckled, 4, route="scipy")

    def after_self_eager(step):
        gather(tiny_images, tiny_labels, step)
        largest_components_torch(tiny_speckled, 4, rounds=rounds)

    graph_in, graph_out = tiny_speckled.clone(), tiny_speckled.clone()

    def after_self_graph(step):
        gather(tiny_images, tiny_labels, step)
        graph_in.copy_(tiny_speckled)
        graph_out.clone()

    def before_pre(step):
        gather(images, labels, step)
        make_blend_maps(b // 2, size, size, np.random.default_rng([0, step]), "gaussian")

    def after_pre(step):
        gather(tiny_images, tiny_labels, step)
        map_gen.manual_seed(step)
        make_blend_maps(b // 2, TINY, TINY, map_gen, "gaussian")

    variants = {
        ("self-train", "before"): before_self,
        ("self-train", "after, eager"): after_self_eager,
        ("self-train", "after, graph"): after_self_graph,
        ("pre-train", "before"): before_pre,
        ("pre-train", "after"): after_pre,
    }
    ops = {}
    for key, fn in variants.items():
        fn(0)  # warm-up
        counter = CountOps()
        with counter:
            fn(0)
        ops[key] = counter.count
    times = {key: [] for key in variants}
    keys = list(variants)
    for repeat in range(args.repeats):
        for key in keys[repeat % len(keys) :] + keys[: repeat % len(keys)]:
            start = time.perf_counter()
            variants[key](repeat + 1)
            times[key].append(time.perf_counter() - start)
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}

    print(f"host time per step of the work moved to the device ({size} px, batch {b}, {args.threads} thread(s), "
          f"median of {args.repeats}; filter rounds {rounds})")
    print(f"{'step':<11} {'route':<14} {'host ms':>9} {'ops':>6} {'before/this':>12}")
    for (phase, route), value in ms.items():
        ratio = ms[phase, "before"] / value
        print(f"{phase:<11} {route:<14} {value:>9.2f} {ops[phase, route]:>6} {ratio:>12.3g}")
    print("\ntensor operations one training iteration queues (step, backward, SGD, EMA; CPU count, filter as graph)")
    for (method, phase), count in iteration_ops(b).items():
        print(f"{method:<13} {phase:<11} {count:>6}")
    return 0


def iteration_ops(batch: int) -> dict:
    """(method, phase) -> tensor operations of one iteration at `batch` (their count does not depend on the
    image size); the component filter is replaced by the 3 operations of its graph replay."""
    import copy

    from gpu_check import build_inputs as gpu_inputs
    from gpu_check import make_context

    from sraseg.train import teacher
    from sraseg.train.loop import make_optimizer, training_phases

    inputs = gpu_inputs(32, batch)
    counts = {}
    original = teacher.largest_components
    teacher.largest_components = lambda labels, n, route="auto": labels.clone().copy_(labels)  # 2 ops (+1 replay)
    try:
        for method in ("labeled_only", "bcp_real", "sraseg"):
            ctx = make_context(method, inputs, torch.device("cpu"), dict(labeled_batch=batch, unlabeled_batch=batch))
            for phase, _, step_fn in training_phases(ctx.cfg):
                if phase == "selftrain":
                    ctx.teacher = copy.deepcopy(ctx.student).eval()
                optimizer = make_optimizer(ctx.cfg, ctx.student, ctx.head)
                for _ in range(2):  # the second iteration counts: the first also creates SGD's momentum buffers
                    counter = CountOps()
                    with counter:
                        terms = step_fn(ctx)
                        optimizer.zero_grad(set_to_none=True)
                        terms["loss"].backward()
                        optimizer.step()
                        if ctx.teacher is not None:
                            update_ema(ctx.teacher, ctx.student, ctx.cfg.ema_decay)
                counts[method, phase] = counter.count + (1 if phase == "selftrain" else 0)
    finally:
        teacher.largest_components = original
    return counts


if __name__ == "__main__":
    sys.exit(main())
