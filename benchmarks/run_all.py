"""All benchmarks in one run, each a side-by-side ratio measured in this run, then a summary table.

  embed     embed path (FrozenEncoder.embed_array) over the bare ViT forward, images/s ratio (goal >= 0.9);
            benchmarks/embed_throughput.py's functions, random weights.
  train     sraseg self-train step time over bcp_synthetic at the same batch (goal <= 1.3); also sraseg
            without SA; benchmarks/train_step.py's functions.
  sampling  DDIM over DDPM sampling time per image, with the generator UNet at random init (speed does not
            depend on the weights). DDPM runs a reduced chain (--ddpm-steps, strided timesteps), so two
            ratios are given: per denoising step (DDIM s/step over DDPM s/step; about 1 expected) and the
            projected full chain, DDIM-<ddim-steps> over DDPM-<num_train_timesteps> (DDPM's measured s/step
            times its full length; goal <= 0.1).
  noop      seconds of `snakemake -n` after a complete run of config/tiny.yaml in a scratch folder
            (the complete run happens first, a few minutes on 2 cores; --workdir reuses a finished one).
  rerun     a change of one experiment's training setting, rerun for real: a copy of the tiny config with
            experiments.<exp>.train.lr doubled; `snakemake -n` on it (job list parsed), then the run itself
            (seconds, the jobs it ran, whether the weights changed), then the original config again (back to
            the first weights). Fails if a phantom/prepare/generator/sample/embed/index/blend job or another
            experiment's job is planned or run, a run fails, or the weights did not change / did not return.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/run_all.py                 # everything, ~5-8 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_all.py --skip noop,rerun --train-size 64
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import train_step  # benchmarks/ is sys.path[0]; train_step also makes `sraseg` importable from src/
import yaml

from sraseg.device import pick_device

log = logging.getLogger("benchmarks.run_all")

REPO = Path(__file__).resolve().parents[1]
PARTS = ("embed", "train", "sampling", "noop", "rerun")
# rules whose jobs a training-setting change must never rerun
UPSTREAM_RULES = ("phantom", "prepare", "train_generator", "sample", "embed", "index", "blend")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# (a) embed throughput
# ---------------------------------------------------------------------------------------------------


def part_embed(args, device: torch.device) -> dict:
    """images/s of the embed path and of the bare ViT forward on the same images, interleaved, best of repeats."""
    import embed_throughput as bench
    import numpy as np

    from sraseg.embed.encoder import build_encoder

    logging.getLogger("sraseg.embed.encoder").setLevel(logging.ERROR)  # the UNTRAINED banner is expected here
    encoder = build_encoder(args.embed_model, args.embed_img_size, "cls", weights="random").to(device)
    images = np.random.default_rng(0).random((args.embed_n, args.embed_input_size, args.embed_input_size),
                                             dtype=np.float32)  # fmt: skip
    batch = args.embed_batch
    with torch.inference_mode():
        ready = [encoder.preprocess(torch.from_numpy(images[i : i + batch]).to(device))
                 for i in range(0, len(images), batch)]  # fmt: skip
    encoder.embed_array(images[:batch], batch)  # warm-up
    bench.bare_forward(encoder.vit, ready[:1], device)
    t_embed, t_bare = [], []
    for _ in range(args.repeats):
        t_embed.append(bench.best_time(lambda: encoder.embed_array(images, batch), 1, device))
        t_bare.append(bench.best_time(lambda: bench.bare_forward(encoder.vit, ready, device), 1, device))
    embed_ips, bare_ips = args.embed_n / min(t_embed), args.embed_n / min(t_bare)
    log.info("embed: %s, %d images %dpx -> %dpx, batch %d: embed path %.1f images/s, bare forward %.1f images/s",
             args.embed_model, args.embed_n, args.embed_input_size, args.embed_img_size, batch, embed_ips,
             bare_ips)  # fmt: skip
    ratio = embed_ips / bare_ips
    return dict(rows=[("embed", "embed / bare forward (images/s)", f"{ratio:.3f}", ">= 0.9", ratio >= 0.9)])


# ---------------------------------------------------------------------------------------------------
# (b) train step
# ---------------------------------------------------------------------------------------------------


def part_train(args, device: torch.device) -> dict:
    result = train_step.measure(args.train_size, args.train_batch, args.train_sa_batch, args.repeats,
                                args.train_steps, args.train_warmup, device.type)  # fmt: skip
    train_step.report(result)
    sec = result["seconds"]
    return dict(rows=[
        ("train", "sraseg / bcp_synthetic (s/step)", f"{result['ratio']:.3f}", "<= 1.3", result["ratio"] <= 1.3),
        ("train", "sraseg no SA / bcp_synthetic", f"{sec['sraseg_no_sa'] / sec['bcp_synthetic']:.3f}", "-", None),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# (c) sampling
# ---------------------------------------------------------------------------------------------------


def part_sampling(args, device: torch.device) -> dict:
    """DDIM and DDPM (reduced chain) on the same seeds, interleaved, best of repeats, seconds per image."""
    import sampling as bench

    from sraseg.generate.common import build_unet, check_resolution
    from sraseg.generate.sample import image_seed, make_sampler, sample_images
    from sraseg.generate.train import GeneratorSettings, make_scheduler

    s = bench.parse_args(["--resolution", str(args.sample_resolution), "--channels",
                          *map(str, args.sample_channels), "--images", str(args.sample_images),
                          "--ddim-steps", str(args.ddim_steps), "--ddpm-steps", str(args.ddpm_steps)])  # fmt: skip
    check_resolution(s.resolution, s.channels, "--sample-resolution")
    torch.manual_seed(0)
    unet = build_unet(s.resolution, s.channels, s.layers_per_block, s.attention, not s.no_mid_attention)
    unet = unet.to(device).eval()
    scheduler = make_scheduler(GeneratorSettings(resolution=s.resolution, block_out_channels=s.channels))
    full = scheduler.config.num_train_timesteps
    seeds = [image_seed(0, i) for i in range(s.images)]
    samplers = {name: make_sampler(scheduler, name, steps) for name, steps in (("ddim", s.ddim_steps),
                                                                               ("ddpm", s.ddpm_steps))}  # fmt: skip
    sample_images(unet, make_sampler(scheduler, "ddim", 2)[0], seeds, device, batch_size=s.images)  # warm-up
    per_image: dict[str, list[float]] = {"ddim": [], "ddpm": []}
    for _ in range(args.repeats):
        for name, (sampler, _) in samplers.items():
            _sync(device)
            start = time.perf_counter()
            sample_images(unet, sampler, seeds, device, batch_size=s.images)
            _sync(device)
            per_image[name].append((time.perf_counter() - start) / s.images)
    t = {name: min(v) for name, v in per_image.items()}
    steps = {name: n for name, (_, n) in samplers.items()}
    per_step = {name: t[name] / steps[name] for name in t}
    step_ratio = per_step["ddim"] / per_step["ddpm"]
    chain_ratio = t["ddim"] / (per_step["ddpm"] * full)
    log.info("sampling: UNet %s at %dpx, %d images: DDIM-%d %.3f s/image (%.4f s/step), DDPM-%d %.3f s/image "
             "(%.4f s/step; DDPM-%d projected %.2f s/image)", s.channels, s.resolution, s.images, steps["ddim"],
             t["ddim"], per_step["ddim"], steps["ddpm"], t["ddpm"], per_step["ddpm"], full,
             per_step["ddpm"] * full)  # fmt: skip
    return dict(rows=[
        ("sampling", "DDIM / DDPM per denoising step", f"{step_ratio:.3f}", "-", None),
        ("sampling", f"DDIM-{steps['ddim']} / DDPM-{full} per image (projected)", f"{chain_ratio:.4f}", "<= 0.1",
         chain_ratio <= 0.1),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# (d) and (e) the workflow
# ---------------------------------------------------------------------------------------------------


def snakemake(workdir: Path, configfile: Path, cores: int, *extra: str, timeout: float = 1800):
    """Run the repository's workflow in `workdir` (as tests/test_workflow.py does). Returns (seconds, result)."""
    exe = Path(sys.executable).with_name("snakemake")
    exe = str(exe) if exe.exists() else shutil.which("snakemake") or "snakemake"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [exe, "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", str(cores), *extra]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return time.perf_counter() - start, result


def complete_run(workdir: Path, cores: int) -> tuple[float | None, str | None]:
    """Run the tiny workflow to the end in `workdir` unless it is already complete. Returns (seconds, error)."""
    if not (workdir / "config").exists():
        shutil.copytree(REPO / "config", workdir / "config")
    config = workdir / "config" / "tiny.yaml"
    _, dry = snakemake(workdir, config, cores, "-n")
    if dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr:
        log.info("workflow: %s is already complete; not rerun", workdir)
        return None, None
    log.info("workflow: complete run of config/tiny.yaml in %s (a few minutes) ...", workdir)
    seconds, result = snakemake(workdir, config, cores)
    if result.returncode != 0:
        return seconds, f"snakemake failed ({result.returncode}): {result.stderr[-2000:]}"
    log.info("workflow: complete run took %.1f s", seconds)
    return seconds, None


def part_noop(args, workdir: Path) -> dict:
    config = workdir / "config" / "tiny.yaml"
    times = []
    for _ in range(args.noop_repeats):
        seconds, result = snakemake(workdir, config, args.cores, "-n")
        if result.returncode != 0 or "Nothing to be done" not in result.stdout + result.stderr:
            tail = (result.stdout + result.stderr)[-1500:]
            log.error("noop: `snakemake -n` after a complete run did not report 'Nothing to be done':\n%s", tail)
            return dict(rows=[("noop", "snakemake -n after a complete run", "work left", "nothing to do", False)])
        times.append(seconds)
    log.info("noop: `snakemake -n` on a complete run: %s s", ", ".join(f"{t:.2f}" for t in times))
    return dict(rows=[("noop", "snakemake -n after a complete run (s, median)", f"{statistics.median(times):.2f}",
                       "-", None)])  # fmt: skip


def dry_run_jobs(text: str) -> list[dict]:
    """Jobs of a `snakemake -n` printout: [{rule, wildcards {name: value}, reason}] in printed order."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \S+:\n)", text):
        head = re.match(r"(?:local)?rule (\S+):\n", block)
        if not head:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        pairs = [kv.split("=", 1) for kv in wildcards.group(1).split(", ")] if wildcards else []
        jobs.append(dict(rule=head.group(1), wildcards={k: v for k, v in pairs},
                         reason=reason.group(1) if reason else ""))  # fmt: skip
    return jobs


def job_stats(text: str) -> dict[str, int]:
    """The first 'Job stats' table of a dry run: {rule: count} (without 'total')."""
    match = re.search(r"Job stats:\njob\s+count\n[-\s]+\n((?:\S+\s+\d+\n)+)", text)
    if not match:
        return {}
    rows = (line.split() for line in match.group(1).strip().splitlines())
    return {rule: int(count) for rule, count in rows if rule != "total"}


def part_rerun(args, workdir: Path) -> dict:
    """Change experiments.<exp>.train.lr in a copy of the tiny config: check the jobs a dry run plans, then run it
    and the original config again for real."""
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    exp = args.rerun_exp
    if exp not in config["experiments"]:
        raise SystemExit(f"run_all: --rerun-exp {exp} is not an experiment of config/tiny.yaml "
                         f"({', '.join(config['experiments'])})")  # fmt: skip
    overrides = config["experiments"][exp].setdefault("train", {})
    base_lr = overrides.get("lr", config.get("train", {}).get("lr", 0.01))
    overrides["lr"] = base_lr * 2
    changed = workdir / "config" / "changed_lr.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    _, result = snakemake(workdir, changed, args.cores, "-n")
    text = result.stdout + result.stderr
    if result.returncode != 0:
        log.error("rerun: `snakemake -n` with %s failed:\n%s", changed, text[-1500:])
        return dict(rows=[("rerun", f"jobs rerun after experiments.{exp}.train.lr change", "error", "-", False)])
    jobs = dry_run_jobs(text)
    stats = job_stats(text)
    log.info("rerun: experiments.%s.train.lr %g -> %g; `snakemake -n` plans %d job(s):", exp, base_lr,
             overrides["lr"], len(jobs))  # fmt: skip
    for job in jobs:
        wc = ", ".join(f"{k}={v}" for k, v in job["wildcards"].items())
        log.info("  %-16s %-28s %s", job["rule"], wc, job["reason"][:90])
    log.info("rerun: job stats %s", stats)
    upstream = [j["rule"] for j in jobs if j["rule"] in UPSTREAM_RULES]
    others = [f"{j['rule']}[{j['wildcards']['exp']}]" for j in jobs if j["wildcards"].get("exp", exp) != exp]
    trains = [j for j in jobs if j["rule"] == "train" and j["wildcards"].get("exp") == exp]
    ok = bool(trains) and not upstream and not others and sum(stats.values()) == len(jobs)
    if not ok:
        log.error("rerun: train[%s] planned %s; upstream jobs %s; other experiments' jobs %s; stats total %d vs %d "
                  "parsed", exp, bool(trains), upstream or "none", others or "none", sum(stats.values()),
                  len(jobs))  # fmt: skip
    listing = ", ".join(f"{rule} x{n}" for rule, n in stats.items())
    rows = [("rerun", f"jobs planned after experiments.{exp}.train.lr change", listing or "none",
             "no upstream / other-exp jobs", ok)]  # fmt: skip

    # ... and run: the changed config, then the original one again.
    model = workdir / "results" / "tiny" / exp / f"seed{config['seeds'][0]}" / "model.safetensors"
    first = model.read_bytes()
    for label, configfile in (("changed", changed), ("original", workdir / "config" / "tiny.yaml")):
        seconds, result = snakemake(workdir, configfile, args.cores)
        text = result.stdout + result.stderr
        ran = job_stats(text)
        clean = result.returncode == 0 and not set(ran) & set(UPSTREAM_RULES) and ran.get("train") == 1
        weights = model.read_bytes() if model.exists() else b""
        same = weights == first
        good = clean and (same if label == "original" else not same)
        if not good:
            log.error("rerun (%s config): rc %d, jobs %s, weights equal to the first run's: %s\n%s", label,
                      result.returncode, ran, same, text[-1500:])  # fmt: skip
        log.info("rerun: %s config ran %s in %.1f s; weights %s the first run's", label, ran, seconds,
                 "equal" if same else "differ from")  # fmt: skip
        goal = "train+dependents, new weights" if label == "changed" else "train+dependents, first weights"
        rows.append(("rerun", f"run with the {label} lr (s)", f"{seconds:.0f}", goal, good))
    return dict(rows=rows)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto for the in-process parts (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the timed parts (default 3)")
    g = p.add_argument_group("embed")
    g.add_argument("--embed-n", type=int, default=32)
    g.add_argument("--embed-input-size", type=int, default=128)
    g.add_argument("--embed-img-size", type=int, default=224)
    g.add_argument("--embed-batch", type=int, default=16)
    g.add_argument("--embed-model", default="vit_small_patch14_dinov2.lvd142m")
    g = p.add_argument_group("train")
    g.add_argument("--train-size", type=int, default=128)
    g.add_argument("--train-batch", type=int, default=12)
    g.add_argument("--train-sa-batch", type=int, default=6)
    g.add_argument("--train-steps", type=int, default=3, help="timed iterations per variant per round")
    g.add_argument("--train-warmup", type=int, default=1)
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-resolution", type=int, default=32)
    g.add_argument("--sample-channels", type=int, nargs="+", default=[32, 64, 64])
    g.add_argument("--sample-images", type=int, default=2)
    g.add_argument("--ddim-steps", type=int, default=50)
    g.add_argument("--ddpm-steps", type=int, default=100, help="reduced DDPM chain actually run (default 100)")
    g = p.add_argument_group("workflow (noop, rerun)")
    g.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temp folder); "
                   "a folder holding a complete tiny run is reused")  # fmt: skip
    g.add_argument("--keep", action="store_true", help="keep the temp folder")
    g.add_argument("--cores", type=int, default=2)
    g.add_argument("--noop-repeats", type=int, default=3)
    g.add_argument("--rerun-exp", default="labeled_only", help="experiment whose train.lr is changed")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {sorted(args.skip - set(PARTS))}; parts are {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    log.info("run_all: %s, %d torch threads, parts %s", device, torch.get_num_threads(),
             ", ".join(p for p in PARTS if p not in args.skip))  # fmt: skip
    rows = []
    for name, fn in (("embed", part_embed), ("train", part_train), ("sampling", part_sampling)):
        if name not in args.skip:
            start = time.perf_counter()
            rows += fn(args, device)["rows"]
            log.info("[%s done in %.0f s]", name, time.perf_counter() - start)
    if {"noop", "rerun"} - args.skip:
        temp = args.workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="sraseg_bench_")) if temp else args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            seconds, error = complete_run(workdir, args.cores)
            if seconds is not None:
                rows.append(("workflow", "complete tiny run (s)", f"{seconds:.0f}", "-", error is None))
            if error:
                log.error("workflow: %s", error)
            else:
                for name, fn in (("noop", part_noop), ("rerun", part_rerun)):
                    if name not in args.skip:
                        rows += fn(args, workdir)["rows"]
        finally:
            if temp and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            elif temp:
                log.info("workflow: kept %s", workdir)

    width = max(len(r[1]) for r in rows) if rows else 10
    value_w = max(len(r[2]) for r in rows) if rows else 5
    log.info("")
    log.info("%-9s %-*s %-*s %-28s %s", "part", width, "measure", value_w, "value", "goal", "status")
    for part, measure, value, goal, ok in rows:
        status = "-" if ok is None else ("ok" if ok else "FAIL")
        log.info("%-9s %-*s %-*s %-28s %s", part, width, measure, value_w, value, goal, status)
    return 1 if any(r[4] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
