"""GPU check of the train stage (a few minutes at most): speed, memory and sanity of each method's step.

For a CUDA machine with torch (timm optional) but without diffusers, monai, faiss or snakemake: it imports
only the train stage's modules (U-Net, losses, teacher, alignment, blend maps, device, loop), never the
generator, embed or evaluate code, and checks that none of those heavy packages got imported.

  1. prints the GPU name, torch and CUDA versions and the compute capability;
  2. runs --steps self-train iterations (after --warmup untimed ones) of labeled_only, bcp_synthetic (the
     same step function as bcp_real) and sraseg with SA at the ACDC settings -- 256 x 256, batch 12 + 12,
     sa_batch 6, SGD lr 0.01, bf16 autocast, channels_last -- on in-memory cardiac-like phantoms
     (benchmarks/train_step.py builds them and drives the loop's own step functions);
     reports iterations per second, median s/iteration and peak GPU memory (reset between methods);
     checks the loss is finite at every step and lower over the last tenth of steps than the first;
  3. if `import faiss` works and faiss.get_num_gpus() > 0: GPU IndexFlatIP search on 10k x 384 unit
     vectors, top-5 compared with a torch matmul top-k;
  4. writes a JSON summary to --out (default gpu_check.json, or $OUT/gpu_check.json when OUT is set).

Exit codes: 0 all checks passed, 1 a check failed, 2 no CUDA device (use --device cpu for a smoke test).

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --steps 2 --size 64   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from train_step import build_inputs, make_bench, timed_iteration, train_iteration  # benchmarks/ is sys.path[0]

log = logging.getLogger("benchmarks.gpu_check")

HEAVY = ("diffusers", "monai", "faiss", "snakemake")
# label -> train settings (ACDC: batch 12 + 12, SGD 0.01 are TrainSettings' defaults, repeated for clarity)
METHODS = {
    "labeled_only": dict(method="labeled_only"),
    "bcp_synthetic": dict(method="bcp_synthetic"),  # bcp_real runs the same step on real unlabeled slices
    "sraseg": dict(method="sraseg", sa=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed iterations per method (default 200)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--batch", type=int, default=12, help="labeled_batch = unlabeled_batch (default 12)")
    p.add_argument("--sa-batch", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--faiss-n", type=int, default=10000, help="faiss check: database vectors (default 10000)")
    out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    p.add_argument("--out", type=Path, default=out, help=f"JSON summary (default {out})")
    return p.parse_args(argv)


def device_info(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None)  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    else:
        info.update(name=f"cpu ({torch.get_num_threads()} threads)", capability=None)
    return info


def run_method(name: str, settings: dict, inputs, device: torch.device, steps: int, warmup: int) -> dict:
    """Warm up, then time `steps` iterations; loss finiteness and trend; peak memory of this method alone."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bench = make_bench(name, inputs, device, **settings)
    losses, times = [], []
    for _ in range(warmup):
        losses.append(train_iteration(bench)["loss"])
    wall_start = time.perf_counter()
    for _ in range(steps):
        seconds, terms = timed_iteration(bench)
        times.append(seconds)
        losses.append(terms["loss"])
    wall = time.perf_counter() - wall_start
    finite = all(math.isfinite(v) for v in losses)
    tenth = max(len(losses) // 10, 1)
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    decreasing = (last < first) if len(losses) >= 20 else None  # too few steps to tell
    result = dict(
        steps=steps, warmup=warmup, it_per_s=steps / wall, median_s_per_it=statistics.median(times),
        peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        loss_first=losses[0], loss_last=losses[-1], loss_first_tenth=first, loss_last_tenth=last,
        finite=finite, decreasing=decreasing,
        ok=finite and decreasing is not False,
    )  # fmt: skip
    del bench
    return result


def faiss_check(n: int, device: torch.device, dim: int = 384, queries: int = 1000, k: int = 5) -> dict:
    """GPU IndexFlatIP top-k against torch matmul top-k on the same unit vectors (skipped without faiss GPU)."""
    try:
        import faiss
    except ImportError:
        return dict(status="skipped", reason="not installed")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0 or device.type != "cuda":
        return dict(status="skipped", reason="no GPU support")
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    query = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(dim))
    index.add(base.numpy())
    start = time.perf_counter()
    scores, ids = index.search(query.numpy(), k)
    faiss_s = time.perf_counter() - start
    ref_scores, ref_ids = (query.to(device) @ base.to(device).T).topk(k, dim=1)
    ref_ids, ref_scores = ref_ids.cpu().numpy(), ref_scores.cpu().numpy()
    same = float((ids == ref_ids).mean())
    max_diff = float(abs(scores - ref_scores).max())
    return dict(status="ran", n=n, dim=dim, queries=queries, k=k, search_s=faiss_s, same_ids_fraction=same,
                max_score_diff=max_diff, ok=same >= 0.99 and max_diff < 1e-3)  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("gpu_check: no CUDA device (torch %s, built for CUDA %s); run with --device cpu for a smoke test",
                  torch.__version__, torch.version.cuda)  # fmt: skip
        return 2
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    info = device_info(device)
    log.info("device %s, capability %s, torch %s, CUDA %s, cuDNN %s", info["name"], info["capability"],
             info["torch"], info["cuda"], info["cudnn"])  # fmt: skip
    heavy = [m for m in HEAVY if m in sys.modules]
    if heavy:
        log.warning("train-stage imports pulled in %s", ", ".join(heavy))

    names = [m for m in args.methods.split(",") if m]
    if set(names) - set(METHODS):
        log.error("gpu_check: unknown method(s) %s; choose from %s", sorted(set(names) - set(METHODS)), list(METHODS))
        return 2
    common = dict(labeled_batch=args.batch, unlabeled_batch=args.batch, sa_batch=args.sa_batch, lr=args.lr)
    inputs = build_inputs(args.size)
    methods = {}
    for name in names:
        methods[name] = run_method(name, {**common, **METHODS[name]}, inputs, device, args.steps, warmup)
        r = methods[name]
        mem = f"{r['peak_mem_mib']:.0f} MiB" if r["peak_mem_mib"] is not None else "n/a"
        log.info("%-14s %7.2f it/s  %.4f s/it median  peak %s  loss %.3f -> %.3f  finite %s  decreasing %s",
                 name, r["it_per_s"], r["median_s_per_it"], mem, r["loss_first_tenth"], r["loss_last_tenth"],
                 r["finite"], r["decreasing"])  # fmt: skip

    faiss = faiss_check(args.faiss_n, device)
    if faiss["status"] == "skipped":
        log.info("faiss: not installed / no GPU support -- skipped (%s)", faiss["reason"])
    else:
        log.info("faiss GPU IndexFlatIP %d x %d: top-%d ids equal to torch's %.4f, max score diff %.2e, %.4f s",
                 faiss["n"], faiss["dim"], faiss["k"], faiss["same_ids_fraction"], faiss["max_score_diff"],
                 faiss["search_s"])  # fmt: skip

    ok = all(r["ok"] for r in methods.values()) and faiss.get("ok", True) and not heavy
    summary = dict(device=info, settings=dict(vars(args), out=str(args.out), warmup=warmup), heavy_imports=heavy,
                   methods=methods, faiss=faiss, ok=ok)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s; wrote %s", "all checks passed" if ok else "SOME CHECKS FAILED", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
