"""The generator study: one change at a time on the generator, each judged on the FD curve, the
full synthetic set's FD ratio and what a labeled-only segmenter finds in the samples.

Each variant is the config's `generator` section plus a few overrides (VARIANTS below). A run trains
it with the train-generator stage (the FD probe logs the curve), samples the config's `sample`
section, embeds and indexes the set (the workflow's own `fd_ratio`: FD to every real train slice
over the patient-disjoint real floor) and, given a labeled-only model, measures presence rates and
intensities with the content stage. Everything goes through the stages' own `run` functions, so the
numbers are the ones the workflow would report.

    # one variant per core (each process uses one thread)
    python benchmarks/generator_study.py --config config/benchmark.yaml \\
        --prepared-dir results/phantom_benchmark/prepared \\
        --segmenter results/phantom_benchmark/labeled_only/seed1337/model.safetensors \\
        --out-dir results/generator_study --steps 1000 --variant old_schedule
    # the table of every finished variant
    python benchmarks/generator_study.py --out-dir results/generator_study --table
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from sraseg.embed import index as index_stage
from sraseg.embed import run as embed_stage
from sraseg.generate import sample as sample_stage
from sraseg.generate import train as generator_stage
from sraseg.io import read_json, write_json

log = logging.getLogger("benchmarks.generator_study")

# The schedule before issue 21: epsilon prediction, linear betas ending at a non-zero SNR,
# leading spacing (skips the pure-noise level at sampling), x0 clipped.
OLD_SCHEDULE = {
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "zero_terminal_snr": False,
    "timestep_spacing": "leading",
    "clip_sample": True,
}
NEW_SCHEDULE = {
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "zero_terminal_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
}
# name -> (what changed, overrides on the config's generator section). Each later variant changes
# one thing against the one named in its description.
VARIANTS = {
    "old_schedule": ("48 px, linear betas, epsilon, leading (the benchmark's generator before)", OLD_SCHEDULE),
    "zero_snr": ("zero terminal SNR + v-prediction + trailing spacing", NEW_SCHEDULE),
    "zero_snr_64px": ("zero_snr at native 64 px", {**NEW_SCHEDULE, "resolution": 64}),
    "zero_snr_cosine": ("zero_snr with the cosine beta schedule", {**NEW_SCHEDULE, "beta_schedule": "squaredcos_cap_v2"}),
    "zero_snr_minsnr": ("zero_snr with min-SNR-5 loss weighting", {**NEW_SCHEDULE, "snr_gamma": 5.0}),
    "zero_snr_attention": ("zero_snr with attention at the coarsest level", {**NEW_SCHEDULE, "attention": True}),
    "zero_snr_wide": ("zero_snr with a wider first level (64-64-128)", {**NEW_SCHEDULE, "block_out_channels": [64, 64, 128]}),
    "zero_snr_lr1e-3": ("zero_snr with learning rate 1e-3", {**NEW_SCHEDULE, "lr": 0.001}),
    "minsnr_64px": ("zero_snr_minsnr at native 64 px", {**NEW_SCHEDULE, "snr_gamma": 5.0, "resolution": 64}),
    "minsnr_64px_cosine": ("minsnr_64px with the cosine beta schedule",
                           {**NEW_SCHEDULE, "snr_gamma": 5.0, "resolution": 64, "beta_schedule": "squaredcos_cap_v2"}),
    # The benchmark's generator (config/benchmark.yaml as it is) and one change each, for the
    # architecture and optimiser levers; screened at equal steps, so compare the CPU minutes too.
    "bench64": ("the benchmark's generator (64 px, cosine, min-SNR-5, 32-64-64, lr 5e-4)", {}),
    "bench64_attention": ("bench64 with attention at the coarsest level", {"attention": True}),
    "bench64_wide": ("bench64 with a wider first level (64-64-128)", {"block_out_channels": [64, 64, 128]}),
    "bench64_lr1e-3": ("bench64 with learning rate 1e-3", {"lr": 0.001}),
    "bench64_constant_lr": ("bench64 with a constant learning rate after warm-up (no cosine decay)",
                            {"lr_schedule": "constant_with_warmup"}),
}


# Sampling variants: an already trained generator (--generator-dir, e.g. the benchmark's) sampled
# with other `sample` settings; sampling costs no training, so these are the cheapest levers.
SAMPLERS = {
    "sample_ddim25": ("the benchmark's generator as the benchmark samples it (DDIM, 25 steps)", {"sampler": "ddim", "inference_steps": 25}),
    "sample_ddim50": ("the benchmark's generator, DDIM with 50 steps (25 in the benchmark)", {"sampler": "ddim", "inference_steps": 50}),
    "sample_ddim100": ("the benchmark's generator, DDIM with 100 steps", {"sampler": "ddim", "inference_steps": 100}),
    "sample_ddpm100": ("the benchmark's generator, ancestral DDPM with 100 steps", {"sampler": "ddpm", "inference_steps": 100}),
}


# Real test slices passed through a generator's resolution and back to the prepared size: what a
# perfect generator at that resolution would score (64 = the prepared size: the measure's own floor).
REFERENCES = {
    "real_test_64px": ("real test slices at the prepared 64 px (a perfect 64 px generator)", 64),
    "real_test_via_48px": ("real test slices through 48 px and back (a perfect 48 px generator)", 48),
}


def run_reference(name: str, config: dict, prepared_dir: Path, segmenter: Path | None, out_dir: Path,
                  n_images: int = 300) -> dict:  # fmt: skip
    """Score real test slices, resized through a resolution, as if they were a synthetic set."""
    import numpy as np
    import pandas as pd

    from sraseg.generate.common import resize_stack
    from sraseg.io import read_table

    what, resolution = REFERENCES[name]
    root = out_dir / name
    slices = read_table(prepared_dir / "slices.parquet", ("slice_id", "split"))
    test = slices.loc[slices["split"] == "test", "slice_id"].to_numpy()
    pick = np.sort(np.random.default_rng(0).choice(test, min(n_images, len(test)), replace=False))
    images = torch.from_numpy(np.asarray(np.load(prepared_dir / "images.npy", mmap_mode="r")[pick], np.float32))
    size = images.shape[-1]
    through = resize_stack(resize_stack(images[:, None], resolution), size)[:, 0].clamp(0.0, 1.0).numpy()
    synthetic = root / "synthetic"
    synthetic.mkdir(parents=True, exist_ok=True)
    np.save(synthetic / "images.npy", through)
    pd.DataFrame({"synthetic_id": np.arange(len(pick)), "seed": np.zeros(len(pick), np.int64)}).to_parquet(
        synthetic / "synthetic.parquet", index=False
    )
    _score(root, config, prepared_dir, segmenter)
    row = {"variant": name, "change": what, "overrides": {}, "steps": None, "train_minutes": None,
           "train_cpu_minutes": None}  # fmt: skip
    write_json(root / "row.json", row)
    return row


def _score(root: Path, config: dict, prepared_dir: Path, segmenter: Path | None) -> None:
    """Embed and index the set in root/synthetic (the workflow's fd_ratio), then segment it (content)."""
    embed_stage.run(prepared_dir, root / "synthetic", root / "embed", {**config["embed"], "device": "cpu"})
    index_stage.run(root / "embed", prepared_dir, root / "embed", config["index"])
    if segmenter is not None:
        from sraseg.evaluate import content as content_stage

        content_stage.run(segmenter, root / "synthetic", prepared_dir, root / "content", {"device": "cpu"})


def run_variant(name: str, config: dict, prepared_dir: Path, segmenter: Path | None, out_dir: Path, steps: int | None,
                sampling: str | None = None) -> dict:  # fmt: skip
    """Train, sample (the config's sampler, or SAMPLERS[sampling]'s), embed, index and (with a
    segmenter) measure one variant; returns its row."""
    what, overrides = VARIANTS[name]
    root = out_dir / name
    settings = {**config["generator"], **overrides, "device": "cpu"}
    if steps:
        settings["steps"] = steps
    started, cpu_started = time.perf_counter(), time.process_time()
    generator_stage.run(prepared_dir, root / "generator", settings)
    # wall time depends on what else runs; CPU time of this one-thread process is its cost on one core
    train_minutes = (time.perf_counter() - started) / 60
    train_cpu_minutes = (time.process_time() - cpu_started) / 60
    sample_settings = {**config["sample"], **(SAMPLERS[sampling][1] if sampling else {}), "device": "cpu"}
    sample_stage.run(root / "generator", prepared_dir, root / "synthetic", sample_settings)
    _score(root, config, prepared_dir, segmenter)
    row = {"variant": name, "change": what, "overrides": overrides, "steps": settings["steps"],
           "sampling": {k: sample_settings[k] for k in ("sampler", "inference_steps") if k in sample_settings},
           "train_minutes": train_minutes, "train_cpu_minutes": train_cpu_minutes}  # fmt: skip
    write_json(root / "row.json", row)
    return row


def run_sampler(name: str, config: dict, generator_dir: Path, prepared_dir: Path, segmenter: Path | None,
                out_dir: Path) -> dict:  # fmt: skip
    """Sample a trained generator with other sampling settings, then score the set as a variant."""
    what, overrides = SAMPLERS[name]
    root = out_dir / name
    cpu_started = time.process_time()
    sample_stage.run(generator_dir, prepared_dir, root / "synthetic", {**config["sample"], **overrides, "device": "cpu"})
    sample_cpu_minutes = (time.process_time() - cpu_started) / 60
    _score(root, config, prepared_dir, segmenter)
    row = {"variant": name, "change": what, "overrides": overrides, "generator_dir": str(generator_dir),
           "steps": None, "train_minutes": None, "train_cpu_minutes": None,
           "sample_cpu_minutes": sample_cpu_minutes}  # fmt: skip
    write_json(root / "row.json", row)
    return row


def collect(out_dir: Path) -> list[dict]:
    """Every finished variant's row with its FD curve, full-set FD ratio and content numbers."""
    rows = []
    for name in [*VARIANTS, *SAMPLERS, *REFERENCES]:
        root = out_dir / name
        if not (root / "row.json").is_file():
            continue
        row = read_json(root / "row.json")
        row["fd_ratio"] = read_json(root / "embed" / "fd_dinov2.json")["fd_ratio"]
        fd_log = root / "generator" / "fd_log.csv"
        row["fd_curve"] = generator_stage_fd_curve(fd_log) if fd_log.is_file() else []
        content_path = root / "content" / "content.json"
        row["content"] = read_json(content_path) if content_path.is_file() else None
        rows.append(row)
    return rows


def generator_stage_fd_curve(path: Path) -> list[tuple[int, float]]:
    from sraseg.generate.probe import read_fd_log

    return [(r["step"], round(r["fd_ratio"], 2)) for r in read_fd_log(path)]


def markdown_table(rows: list[dict]) -> str:
    """One line per variant: change, minutes on one core, FD curve, full-set FD ratio, presence rates."""
    head = ("| variant | change | steps | train min, CPU (wall) | FD probe curve | full-set FD ratio | "
            "mean / min intensity (real) | presence RV / MYO / LV synthetic (real) |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        curve = ", ".join(f"{v:.2f}" for _, v in r["fd_curve"]) or "-"
        content, presence, intensity = r["content"], "-", "-"
        if content:
            classes = content["per_class"].values()
            presence = " / ".join(f"{c['presence_synthetic']:.2f} ({c['presence_real']:.2f})" for c in classes)
            i = content["intensity"]
            intensity = (f"{i['synthetic']['mean']:.2f} / {i['synthetic']['mean_min']:.2f} "
                         f"({i['real']['mean']:.2f} / {i['real']['mean_min']:.2f})")  # fmt: skip
        cpu, wall = r.get("train_cpu_minutes"), r.get("train_minutes")
        minutes = "-" if wall is None else f"{cpu:.1f} ({wall:.1f})" if cpu is not None else f"n/m ({wall:.1f})"
        lines.append(f"| {r['variant']} | {r['change']} | {r['steps'] or '-'} | {minutes} | {curve} | "
                     f"{r['fd_ratio']:.2f} | {intensity} | {presence} |")  # fmt: skip
    return "\n".join(lines)


def compare_figure(out_dir: Path, names: list[str], path: Path, n: int = 8) -> None:
    """The first n images of each named set, one row per set: sets sampled from one generator share
    their per-image seeds (image i starts from the same noise), so a column is one image each way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(names), n, figsize=(1.6 * n, 1.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        images = np.load(out_dir / name / "synthetic" / "images.npy", mmap_mode="r")
        for col in range(n):
            axes[row, col].imshow(np.asarray(images[col]).T, cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
        axes[row, 0].set_title(name, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="workflow config whose generator/sample/embed/index sections are the base")
    p.add_argument("--prepared-dir", type=Path)
    p.add_argument("--segmenter", type=Path, help="a labeled-only model.safetensors (presence rates); optional")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--variant", nargs="*", default=[], choices=sorted(VARIANTS))
    p.add_argument("--reference", nargs="*", default=[], choices=sorted(REFERENCES),
                   help="score real test slices through a resolution, as a perfect generator's set")
    p.add_argument("--sampler", nargs="*", default=[], choices=sorted(SAMPLERS),
                   help="sample --generator-dir's generator with other sampling settings")
    p.add_argument("--generator-dir", type=Path, help="a trained generator (for --sampler)")
    p.add_argument("--steps", type=int, help="override generator.steps (a shorter screening run)")
    p.add_argument("--sampling", choices=sorted(SAMPLERS),
                   help="sample the --variant runs with this sampler's settings instead of the config's")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: one variant per core)")
    p.add_argument("--compare", nargs="+", metavar="SET", help="a figure of these sets' first images, one row each")
    p.add_argument("--figure", type=Path, help="where --compare writes its figure")
    p.add_argument("--table", action="store_true", help="print the table of finished variants (and write study.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.variant:
        config = yaml.safe_load(args.config.read_text())
        for name in args.variant:
            run_variant(name, config, args.prepared_dir, args.segmenter, args.out_dir, args.steps, args.sampling)
    if args.sampler:
        if args.generator_dir is None:
            p.error("--sampler needs --generator-dir")
        config = yaml.safe_load(args.config.read_text())
        for name in args.sampler:
            run_sampler(name, config, args.generator_dir, args.prepared_dir, args.segmenter, args.out_dir)
    if args.reference:
        config = yaml.safe_load(args.config.read_text())
        for name in args.reference:
            run_reference(name, config, args.prepared_dir, args.segmenter, args.out_dir)
    if args.compare:
        compare_figure(args.out_dir, args.compare, args.figure or args.out_dir / "compare.png")
    if args.table:
        rows = collect(args.out_dir)
        (args.out_dir / "study.json").write_text(json.dumps(rows, indent=1))
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
