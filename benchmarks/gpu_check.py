"""GPU check of the train stage (a few minutes): correctness of the device-side pieces, and host time,
device time and peak memory of every method's pre-training and self-training steps at the ACDC settings.

Needs torch and this project's source only: it imports torch and the train stage's modules, which import
nothing beyond torch (and what torch itself loads); it checks that on start. No pandas, scipy, tqdm,
safetensors, diffusers, monai, faiss or snakemake.

  1. prints the GPU, torch/CUDA versions, compute capability and the autocast dtype the loop uses;
  2. component filter: the CUDA-graph route, the eager torch route on the GPU and the torch route on the
     CPU (which the tests prove equal to scipy's) agree exactly on random and phantom-like labels;
  3. per method (labeled_only, bcp_real, sraseg with SA) at 256 x 256, batch 12 + 12, sa_batch 6, SGD 0.01:
     --pretrain-steps pre-training iterations (bcp_real: hard maps, sraseg: gaussian maps built on the
     device), timed after --warmup; then the pre-trained student becomes the EMA teacher (a trained-looking
     teacher: its pseudo-labels are blobs, not noise) and --steps self-training iterations are timed.
     An iteration is what the loop does minus its bookkeeping: the step function under autocast, backward
     (through a GradScaler where fp16), SGD step, EMA update; no value is read back per step.
     host ms: time the Python side takes to queue one iteration; device ms: CUDA-event time of the
     iteration on the GPU; wall ms: elapsed time over all timed iterations / count (one sync at the end).
     wall ~ device means the GPU is kept busy; wall ~ host means the host is the bottleneck.
  4. losses finite (one read at the end), peak GPU memory per method; JSON to --out.

Exit codes: 0 all checks passed, 1 a check failed, 2 no CUDA device (use --device cpu for a smoke test).

    python benchmarks/gpu_check.py                                          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --size 32 --batch 4 --steps 2 --pretrain-steps 2   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

_BEFORE = set(sys.modules)  # what torch itself loads is allowed; the project's train modules add nothing else
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code, installed or not

from sraseg.device import amp_dtype, autocast, grad_scaler  # noqa: E402
from sraseg.settings import parse_settings  # noqa: E402
from sraseg.train.alignment import ProjectionHead  # noqa: E402
from sraseg.train.context import TrainContext  # noqa: E402
from sraseg.train.data import BlendBank, EmbedTargets, Prepared  # noqa: E402
from sraseg.train.loop import make_optimizer, train_iteration, training_phases  # noqa: E402
from sraseg.train.settings import TrainSettings  # noqa: E402
from sraseg.train.teacher import _graphed_filter, largest_components_torch  # noqa: E402
from sraseg.train.unet import UNet  # noqa: E402

EXTRA_IMPORTS = sorted({m.split(".")[0] for m in set(sys.modules) - _BEFORE} - {"sraseg"})
METHODS = ("labeled_only", "bcp_real", "sraseg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed self-training iterations per method")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="timed pre-training iterations per method (they also train the teacher)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=12, help="labeled_batch = unlabeled_batch (default 12)")
    p.add_argument("--sa-batch", type=int, default=6)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--methods", default=",".join(METHODS))
    out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    p.add_argument("--out", type=Path, default=out)
    return p.parse_args(argv)


def phantom(count: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cardiac-like slices in torch: LV disc, myocardium ring, RV disc, bias field, noise.
    Returns float32 [N,S,S] in [0,1] and uint8 [N,S,S] labels."""
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    images, labels = [], []
    for _ in range(count):
        cy, cx, r_lv, wall = (torch.rand(4, generator=gen) * torch.tensor([0.1, 0.1, 0.04, 0.015])
                              + torch.tensor([0.45, 0.45, 0.05, 0.025])).tolist()  # fmt: skip
        dist = torch.hypot(yy - cy, xx - cx)
        label = torch.zeros(size, size, dtype=torch.uint8)
        label[torch.hypot(yy - cy, xx - (cx - r_lv - wall - 0.06)) < 0.07] = 1
        label[(dist >= r_lv) & (dist < r_lv + wall)] = 2
        label[dist < r_lv] = 3
        level = torch.tensor([0.15, 0.8, 0.4, 0.85])[label.long()]
        image = level * (0.8 + 0.3 * xx) + 0.04 * torch.randn(size, size, generator=gen)
        images.append(image.clamp(0, 1))
        labels.append(label)
    return torch.stack(images).float(), torch.stack(labels)


def build_inputs(size: int, batch: int, embed_dim: int = 384):
    gen = torch.Generator().manual_seed(0)
    n = 2 * batch
    lab_images, lab_labels = phantom(n, size, gen)
    unl_images, _ = phantom(n, size, gen)
    val_images, val_labels = phantom(4, size, gen)
    syn_images, _ = phantom(n, size, gen)
    prepared = Prepared(image_size=size, labeled_images=lab_images, labeled_labels=lab_labels,
                        labeled_ids=torch.arange(n).numpy(), unlabeled_images=unl_images, val_images=val_images,
                        val_labels=val_labels, val_cases=None)  # fmt: skip
    real = torch.nn.functional.normalize(torch.randn(2 * n, embed_dim, generator=gen), dim=1)
    embed = EmbedTargets(real, None, torch.randint(0, 2 * n, (n,), generator=gen).numpy())
    hard = torch.ones(2 * n, size, size)
    for i in range(2 * n):  # soft-edged boxes stand in for the bank's maps (their cost is the same)
        top, left = torch.randint(0, size // 3, (2,), generator=gen).tolist()
        hard[i, top : top + 2 * size // 3, left : left + 2 * size // 3] = 0
    bank = BlendBank(hard.half(), torch.arange(n).repeat_interleave(2).numpy(),
                     torch.randint(0, n, (2 * n,), generator=gen).numpy())
    return prepared, unl_images, syn_images, bank, embed


def make_context(method: str, inputs, device: torch.device, settings: dict) -> TrainContext:
    prepared, unlabeled, synthetic, bank, embed = inputs
    cfg = parse_settings(TrainSettings, {**settings, "method": method, "device": device.type}, "train")
    torch.manual_seed(0)
    ctx = TrainContext(cfg=cfg, seed=0, device=device, generator=torch.Generator().manual_seed(0),
                       prepared=prepared, student=None)  # fmt: skip
    if method == "bcp_real":
        ctx.unlabeled = unlabeled
    if method == "sraseg":
        ctx.synthetic = ctx.unlabeled = synthetic
        ctx.bank, ctx.bank_real_pos = bank, bank.real_ids
        ctx.embed, ctx.bank_real_embed_rows = embed, bank.real_ids
    student = UNet(1, cfg.num_classes, cfg.channels, cfg.dropout).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    ctx.student = student
    ctx.head = ProjectionHead(student.feature_dim, embed.dim).to(device) if ctx.embed is not None else None
    return ctx


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(ctx: TrainContext, step_fn, optimizer, scaler, steps: int, warmup: int) -> dict:
    """Run warmup + steps iterations; host, device and wall ms per timed iteration; losses kept on the device."""
    device = ctx.device
    losses, host, events = [], [], []
    for i in range(warmup + steps):
        timed = i >= warmup
        if timed and i == warmup:
            _sync(device)
            wall_start = time.perf_counter()
        if timed and device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        terms = train_iteration(ctx, step_fn, optimizer, scaler)
        ctx.step += 1
        losses.append(terms["loss"].detach())
        if timed:
            host.append(time.perf_counter() - start)
            if device.type == "cuda":
                end.record()
                events.append((begin, end))
    _sync(device)
    wall = (time.perf_counter() - wall_start) / max(steps, 1)
    device_ms = [b.elapsed_time(e) for b, e in events]
    values = torch.stack(losses).float().cpu()  # the one read-back
    tenth = max(len(values) // 10, 1)
    return dict(steps=steps, host_ms=statistics.median(host) * 1e3 if host else None,
                device_ms=statistics.median(device_ms) if device_ms else None, wall_ms=wall * 1e3,
                finite=bool(torch.isfinite(values).all()), loss_first_tenth=float(values[:tenth].mean()),
                loss_last_tenth=float(values[-tenth:].mean()))  # fmt: skip


def run_method(method: str, inputs, device: torch.device, args, warmup: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    settings = dict(labeled_batch=args.batch, unlabeled_batch=args.batch, sa_batch=args.sa_batch,
                    pretrain_iterations=max(args.pretrain_steps, 1), selftrain_iterations=max(args.steps, 1))
    ctx = make_context(method, inputs, device, settings)
    phases = training_phases(ctx.cfg)
    scaler = grad_scaler(device)
    result = {}
    first_name, _, first_fn = phases[0]
    result[first_name] = time_phase(ctx, first_fn, make_optimizer(ctx.cfg, ctx.student, ctx.head), scaler,
                                    args.pretrain_steps, warmup)  # fmt: skip
    if len(phases) > 1:
        ctx.teacher = copy.deepcopy(ctx.student).eval()  # the pre-trained student: a trained-looking teacher
        with torch.no_grad(), autocast(device):
            labels = ctx.teacher(ctx.to_device(ctx.unlabeled[: args.batch][:, None])).argmax(1)
        kept = largest_components_torch(labels, 4)
        result["teacher_pixels_removed_by_filter"] = float((kept != labels).float().mean())
        name, _, fn = phases[1]
        result[name] = time_phase(ctx, fn, make_optimizer(ctx.cfg, ctx.student, ctx.head), scaler, args.steps,
                                  warmup)  # fmt: skip
    result["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result["ok"] = all(r["finite"] for r in result.values() if isinstance(r, dict))
    return result


def filter_check(device: torch.device, size: int, batch: int) -> dict:
    """Graphed (CUDA) and eager torch filter on the device equal the torch filter on the CPU."""
    gen = torch.Generator().manual_seed(1)
    cases = {"random": torch.randint(0, 4, (batch, size, size), generator=gen)}
    _, labels = phantom(batch, size, gen)
    speckled = labels.long()
    specks = torch.rand(speckled.shape, generator=gen) < 0.005
    speckled[specks] = torch.randint(0, 4, (int(specks.sum()),), generator=gen)
    cases["phantom + specks"] = speckled
    out = {}
    for name, labels in cases.items():
        small = labels[:2, :64, :64] if name == "random" else labels  # the CPU reference of noise is slow
        reference = largest_components_torch(small, 4)
        eager = largest_components_torch(small.to(device), 4).cpu()
        graphed = (_graphed_filter(small.to(device), 4) if device.type == "cuda" else eager.to(device)).cpu()
        graphed_again = (_graphed_filter(small.to(device), 4) if device.type == "cuda" else eager).cpu()
        out[name] = dict(eager_equal=bool(torch.equal(eager, reference)), graph_equal=bool(torch.equal(graphed, reference)),
                         graph_replay_equal=bool(torch.equal(graphed_again, reference)),
                         removed=float((reference != small).float().mean()))  # fmt: skip
    out["ok"] = all(v["eager_equal"] and v["graph_equal"] and v["graph_replay_equal"] for v in out.values())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
              "--device cpu for a smoke test", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as pick_device("cuda") sets it
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                amp=str(amp_dtype(device)), extra_imports=EXTRA_IMPORTS)  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))  # fmt: skip
    print(json.dumps(info))
    if EXTRA_IMPORTS:
        print(f"train-stage imports pulled in {', '.join(EXTRA_IMPORTS)}", file=sys.stderr)

    filt = filter_check(device, args.size, args.batch)
    print(f"component filter on {device}: " + ", ".join(
        f"{k}: eager {v['eager_equal']}, graph {v['graph_equal']}/{v['graph_replay_equal']}"
        for k, v in filt.items() if isinstance(v, dict)))  # fmt: skip

    inputs = build_inputs(args.size, args.batch)
    methods = {}
    print(f"{'method':<13} {'phase':<10} {'host ms':>8} {'device ms':>10} {'wall ms':>8} {'loss':>15} {'peak MiB':>9}")
    for name in [m for m in args.methods.split(",") if m]:
        r = methods[name] = run_method(name, inputs, device, args, warmup)
        for phase, v in r.items():
            if not isinstance(v, dict):
                continue
            dev = f"{v['device_ms']:.2f}" if v["device_ms"] is not None else "n/a"
            mem = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "n/a"
            print(f"{name:<13} {phase:<10} {v['host_ms']:>8.2f} {dev:>10} {v['wall_ms']:>8.2f} "
                  f"{v['loss_first_tenth']:>7.3f}->{v['loss_last_tenth']:<7.3f} {mem:>9}", flush=True)
    ok = filt["ok"] and all(r["ok"] for r in methods.values()) and not EXTRA_IMPORTS
    summary = dict(device=info, settings=dict(vars(args), out=str(args.out), warmup=warmup), filter=filt,
                   methods=methods, ok=ok)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
