"""How far the demo's table moves between seeds and between CPUs (issue 31).

After `make demo` (results/phantom, seed 1337), this reruns the demo's trainings, predictions and
evaluations in copies of its results folder, one copy per variant, and prints one table of test Dice (peer
mode) per experiment and variant:

- `seed1338`, `seed1339`: other training seeds, same data, generator and samples (the order must hold on each);
- `avx2`: seed 1337 with oneDNN and ATen held to AVX2 kernels (`ONEDNN_MAX_CPU_ISA=AVX2`,
  `ATEN_CPU_CAPABILITY=avx2`): what a CPU without AVX-512 computes; on an AVX-512 machine it stands in for another machine;
- `threads1`: seed 1337 with one torch thread per job (`cpu_threads: 1`): what a 1-core machine, or an older
  version of this workflow on another core count, computes.

The copies share everything up to the samples and the blend bank (copied with their Snakemake metadata
so nothing before training reruns). Run from the repository root with the venv on PATH:

    python benchmarks/demo_spread.py                    # every variant, ~4 demo trainings on 2 cores
    python benchmarks/demo_spread.py --variant avx2      # one
    python benchmarks/demo_spread.py --table            # the table of what has run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

CONFIG = Path("config/config.yaml")
BASE = "phantom"  # the demo's dataset.name
CLASSES = ("RV", "MYO", "LV")
VARIANTS = {
    "seed1337": dict(seed=1337, env={}, config={}),
    "seed1338": dict(seed=1338, env={}, config={}),
    "seed1339": dict(seed=1339, env={}, config={}),
    "avx2": dict(seed=1337, env={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, config={}),
    "threads1": dict(seed=1337, env={}, config={"cpu_threads": 1}),
}


def results_dir(variant: str) -> Path:
    return Path("results") / (BASE if variant.startswith("seed") else f"{BASE}_{variant}")


def run_variant(variant: str, cores: int) -> None:
    """The variant's trainings and what follows them, in its own results folder for the kernel variants."""
    spec = VARIANTS[variant]
    overlay = dict(spec["config"], seeds=[spec["seed"]])
    forced = []
    if not variant.startswith("seed"):  # a copy of the demo's folder, trainings forced
        target = results_dir(variant)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(results_dir("seed1337"), target, symlinks=True)
        for done in target.glob("*/seed*"):  # the copied trainings are what this variant redoes
            shutil.rmtree(done)
        shutil.rmtree(target / "report", ignore_errors=True)
        overlay["dataset"] = {"name": target.name}
        raw = Path("resources") / BASE
        if raw.is_dir() and not (Path("resources") / target.name).exists():
            shutil.copytree(raw, Path("resources") / target.name)
        forced = ["--forcerun", "train"]
    overlay_path = Path("results") / f".demo_spread_{variant}.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))
    env = dict(os.environ, **spec["env"])
    cmd = ["snakemake", "--snakefile", "workflow/Snakefile", "--configfile", str(CONFIG), str(overlay_path),
           "--cores", str(cores), *forced]
    print("+", " ".join(f"{k}={v}" for k, v in spec["env"].items()), " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def test_dice(variant: str) -> dict[str, dict[str, float]]:
    """experiment -> {RV, MYO, LV, mean} test Dice (%, peer mode) of the variant's seed; missing runs left out."""
    seed = VARIANTS[variant]["seed"]
    experiments = yaml.safe_load(CONFIG.read_text())["experiments"]
    out = {}
    for name in experiments:
        path = results_dir(variant) / name / f"seed{seed}" / "eval" / "summary.json"
        if path.is_file():
            peer = json.loads(path.read_text())["peer"]
            out[name] = {c: 100 * peer["per_class"][c]["dice"] for c in CLASSES} | {"mean": 100 * peer["mean"]["dice"]}
    return out


def teacher_at_switch(variant: str, name: str) -> str:
    seed = VARIANTS[variant]["seed"]
    path = results_dir(variant) / name / f"seed{seed}" / "train.json"
    record = json.loads(path.read_text()).get("switch") if path.is_file() else None
    if not record:
        return "-"
    return " / ".join(f"{v:.2f}" for v in record["teacher_val_dice"].values())


def print_table(variants: list[str]) -> None:
    print("| variant | experiment | Dice | RV | MYO | LV | teacher at the switch (val RV / MYO / LV) |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        for name, dice in test_dice(variant).items():
            cells = " | ".join(f"{dice[c]:.2f}" for c in ("mean", *CLASSES))
            print(f"| {variant} | {name} | {cells} | {teacher_at_switch(variant, name)} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", choices=[v for v in VARIANTS if v != "seed1337"],
                   default=[v for v in VARIANTS if v != "seed1337"])
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--table", action="store_true", help="only print the table of what has run")
    args = p.parse_args(argv)
    if not args.table:
        for variant in args.variant:
            run_variant(variant, args.cores)
    print_table(["seed1337", *args.variant])


if __name__ == "__main__":
    main()
