"""Test Dice against the number of unlabeled images, synthetic and real (issue 33: "how many synthetic
images should I generate, and what is one worth against a real one?").

After a finished workflow run (its prepared data, generator and real pool), this trains SRA-Seg on
unlabeled sets of several sizes, each with the run's own settings, and labeled-only beside them:

- `synthetic_N`: the first N images of one sample of the run's generator (image i has seed i, so the
  sets are nested and the smallest equals a run's own `sample.n_images` set when the sizes agree);
- `real_K`: every unlabeled training slice of the first K unlabeled training patients (sorted ids),
  whole patients as the real pool is cut in practice; `real_all` is the whole pool (`sraseg_real`).

Each set gets its own embed, index and blend, then one SRA-Seg training per seed (`train.unlabeled: real`
for the real sets, as the `sraseg_real` experiment), then test predictions and the evaluation. Two
variants of a set say what else than the count separates synthetic from real images (off the curve):

- `--blur SET:SIGMA`: SET's images under a Gaussian blur of SIGMA px (real slices made as smooth as samples);
- `--realism SET:N`: the N images of SET whose embeddings lie closest to the real training slices (mean
  cosine to their 5 nearest, in SET's own embed folder): curation by the FAISS index;
- `--shuffle SET:SEED`: SET's images in another order (a permutation drawn from SEED). The order decides
  which image each self-training draw takes, so this row measures how far the order alone moves a result.

The
trainings run `--jobs` at a time with `--threads` torch threads each. Writes under --out-dir:
count_curve.csv (one row per set and seed), count_curve.md and count_curve.png. Reruns skip what has
finished. From the repository root with the venv on PATH, after `make demo`:

    python benchmarks/count_curve.py --out-dir runs/count_curve          # the demo's curve, ~14 trainings
    python benchmarks/count_curve.py --out-dir runs/count_curve --table  # the table and figure of what ran
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ("RV", "MYO", "LV")


def sraseg(args: list[str], log: Path, threads: int) -> None:
    """One `python -m sraseg` command with its output in `log`; a failure stops the study with its log named."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "sraseg", *args], stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"count_curve: `sraseg {args[0]}` failed, see {log}")


def write_set(out: Path, images: np.ndarray, table: pd.DataFrame) -> None:
    """An unlabeled set in the sample stage's layout (images.npy, synthetic.parquet with synthetic_id = row)."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", np.ascontiguousarray(images, dtype=np.float32))
    table.assign(synthetic_id=np.arange(len(table), dtype=np.int64)).to_parquet(out / "synthetic.parquet", index=False)


def real_sets(prepared: Path, patient_counts: list[str], out: Path) -> dict[str, Path]:
    """real_K: the unlabeled train slices of the first K unlabeled train patients; real_all: all of them."""
    slices = pd.read_parquet(prepared / "slices.parquet")
    pool = slices[(slices["split"] == "train") & ~slices["labeled"].astype(bool)]
    patients = sorted(pool["patient"].unique())
    images = np.load(prepared / "images.npy", mmap_mode="r")
    sets = {}
    for count in patient_counts:
        k = len(patients) if count == "all" else int(count)
        rows = pool[pool["patient"].isin(patients[:k])]
        name = f"real_{count}"
        if not (out / name / "synthetic.parquet").is_file():
            write_set(out / name, images[rows["slice_id"].to_numpy()], rows[["slice_id"]].reset_index(drop=True))
        sets[name] = out / name
    return sets


def synthetic_sets(source: Path, counts: list[int], out: Path) -> dict[str, Path]:
    """synthetic_N: the first N images of the sample folder `source`."""
    images = np.load(source / "images.npy", mmap_mode="r")
    table = pd.read_parquet(source / "synthetic.parquet")
    if len(images) < max(counts):
        raise SystemExit(f"count_curve: {source} holds {len(images)} images; the curve needs {max(counts)}")
    sets = {}
    for n in counts:
        name = f"synthetic_{n}"
        if not (out / name / "synthetic.parquet").is_file():
            write_set(out / name, images[:n], table.iloc[:n].drop(columns="synthetic_id").reset_index(drop=True))
        sets[name] = out / name
    return sets


def blurred_set(source: Path, sigma: float, out: Path) -> Path:
    """SET_blurSIGMA: every image of `source` under a Gaussian blur of `sigma` px."""
    from scipy import ndimage

    name = out / f"{source.name}_blur{sigma:g}"
    if not (name / "synthetic.parquet").is_file():
        images = np.load(source / "images.npy")
        blurred = np.stack([ndimage.gaussian_filter(image, sigma) for image in images])
        write_set(name, blurred, pd.read_parquet(source / "synthetic.parquet").drop(columns="synthetic_id"))
    return name


def shuffled_set(source: Path, seed: int, out: Path) -> Path:
    """SET_shuffleSEED: the images of `source` in the order of a permutation drawn from `seed`."""
    name = out / f"{source.name}_shuffle{seed}"
    if not (name / "synthetic.parquet").is_file():
        order = np.random.default_rng(seed).permutation(len(pd.read_parquet(source / "synthetic.parquet")))
        table = pd.read_parquet(source / "synthetic.parquet").iloc[order].rename(columns={"synthetic_id": "source_id"})
        write_set(name, np.load(source / "images.npy")[order], table.reset_index(drop=True))
    return name


def realism_scores(embed_dir: Path, k: int = 5) -> np.ndarray:
    """Per image of the set, the mean cosine of its embedding to its k nearest real training slices."""
    from sraseg.embed.embeddings import load_embeddings
    from sraseg.embed.index import cosine_knn

    real, _, synthetic, _ = load_embeddings(embed_dir)
    return cosine_knn(real, synthetic, k)[2].mean(axis=1)


def realism_set(source: Path, n: int, out: Path) -> Path:
    """SET_realismN: the n images of `source` that score highest in `realism_scores` (needs its embed)."""
    name = out / f"{source.name}_realism{n}"
    if not (name / "synthetic.parquet").is_file():
        keep = np.sort(np.argsort(-realism_scores(source / "embed"), kind="stable")[:n])
        table = pd.read_parquet(source / "synthetic.parquet").iloc[keep].rename(columns={"synthetic_id": "source_id"})
        write_set(name, np.load(source / "images.npy")[keep], table.reset_index(drop=True))
    return name


def prepare_set(folder: Path, a) -> None:
    """embed, index and blend of one unlabeled set, with the run's settings (the sraseg experiment's blend)."""
    if (folder / "blend" / "blend.json").is_file():
        return
    common = ["--config", str(a.config)]
    sraseg(["embed", "--prepared-dir", str(a.prepared), "--synthetic-dir", str(folder), "--out-dir",
            str(folder / "embed"), *common], folder / "embed.log", a.threads * a.jobs)  # fmt: skip
    sraseg(["index", "--embed-dir", str(folder / "embed"), "--prepared-dir", str(a.prepared), "--out-dir",
            str(folder / "embed"), *common], folder / "index.log", a.threads * a.jobs)  # fmt: skip
    sraseg(["blend", "--synthetic-dir", str(folder), "--prepared-dir", str(a.prepared), "--neighbours",
            str(folder / "embed" / "neighbours.parquet"), "--embed-dir", str(folder / "embed"), "--out-dir",
            str(folder / "blend"), *common, "--experiment", "sraseg"], folder / "blend.log", a.threads * a.jobs)  # fmt: skip


def train_and_score(name: str, folder: Path | None, seed: int, a) -> None:
    """One training (SRA-Seg on the set, or labeled-only when `folder` is None), its test predictions and scores."""
    run = a.out_dir / "runs" / name / f"seed{seed}"
    if (run / "eval" / "summary.json").is_file():
        return
    run.mkdir(parents=True, exist_ok=True)
    experiment = "labeled_only" if folder is None else "sraseg"
    args = ["train", "--config", str(a.config), "--experiment", experiment, "--seed", str(seed),
            "--prepared-dir", str(a.prepared), "--out-dir", str(run)]  # fmt: skip
    if folder is not None:
        args += ["--synthetic-dir", str(folder), "--embed-dir", str(folder / "embed"), "--blend-dir", str(folder / "blend")]
        if name.startswith("real"):
            args += ["--settings", json.dumps({"unlabeled": "real"})]
    sraseg(args, run.parent / f"seed{seed}.train.log", a.threads)
    sraseg(["predict", "--dataset", a.dataset, "-m", str(run / "model.safetensors"), "--prepared-dir", str(a.prepared),
            "--split", "test", "--device", "auto", "-o", str(run / "predictions")], run.parent / f"seed{seed}.predict.log",
           a.threads)  # fmt: skip
    sraseg(["evaluate", "--dataset", a.dataset, "--pred-dir", str(run / "predictions"), "--gt-dir", str(a.gt_dir),
            "--out-dir", str(run / "eval")], run.parent / f"seed{seed}.evaluate.log", a.threads)  # fmt: skip
    print(f"count_curve: {name} seed {seed} done", flush=True)


def collect(out_dir: Path) -> pd.DataFrame:
    """One row per finished run: set, kind, n_images, seed, test Dice (%, peer mode) mean and per class."""
    rows = []
    for summary in sorted((out_dir / "runs").glob("*/seed*/eval/summary.json")):
        name, seed = summary.parents[2].name, int(summary.parents[1].name.removeprefix("seed"))
        peer = json.loads(summary.read_text())["peer"]
        n = 0 if name == "labeled_only" else len(pd.read_parquet(out_dir / "sets" / name / "synthetic.parquet"))
        kind = "variant" if any(v in name for v in ("_blur", "_realism", "_shuffle")) else name.split("_")[0]
        rows.append(dict(set=name, kind=kind, n_images=n, seed=seed, dice=100 * peer["mean"]["dice"],
                         **{c: 100 * peer["per_class"][c]["dice"] for c in CLASSES}))  # fmt: skip
    return pd.DataFrame(rows)


def write_table_and_figure(frame: pd.DataFrame, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame.to_csv(out_dir / "count_curve.csv", index=False)
    seeds = sorted(frame["seed"].unique())
    wide = frame.pivot_table(index=["kind", "n_images", "set"], columns="seed", values="dice").reset_index()
    wide["mean"] = wide[seeds].mean(axis=1)
    lines = ["| unlabeled set | images | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
    for _, row in wide.sort_values(["kind", "n_images"]).iterrows():
        cells = " | ".join("" if np.isnan(row[s]) else f"{row[s]:.2f}" for s in seeds)
        lines.append(f"| {row['set']} | {row['n_images']} | {cells} | {row['mean']:.2f} |")
    (out_dir / "count_curve.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, colour in (("synthetic", "tab:orange"), ("real", "tab:blue")):
        part = wide[wide["kind"] == kind].sort_values("n_images")
        if part.empty:
            continue
        ax.plot(part["n_images"], part["mean"], "o-", color=colour, label=f"SRA-Seg, {kind} unlabeled images")
        for s in seeds:
            ax.scatter(part["n_images"], part[s], color=colour, alpha=0.35, s=14)
    baseline = wide[wide["kind"] == "labeled"]
    if not baseline.empty:
        ax.axhline(float(baseline["mean"].iloc[0]), color="grey", ls="--", label="labeled-only (mean)")
    ax.set_xscale("log")
    ax.set_xlabel("unlabeled images (log scale)")
    ax.set_ylabel("test Dice (%), mean over seeds; dots: seeds")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "count_curve.png", dpi=120)
    print((out_dir / "count_curve.md").read_text())


def parse_variants(option: str, specs: list[str], known: list[str], kind: type) -> list[tuple[str, float | int]]:
    """`SET:VALUE` strings as (set, value); a malformed one, or one naming no set of the curve, stops the
    study with one line before anything runs."""
    parsed = []
    for spec in specs:
        name, _, value = spec.partition(":")
        try:
            parsed.append((name, kind(value)))
        except ValueError:
            raise SystemExit(f"count_curve: {option} {spec!r}: expected SET:{kind.__name__.upper()}") from None
        if name not in known:
            raise SystemExit(f"count_curve: {option} {spec!r}: no set {name!r}; the curve's sets: {', '.join(known)}")
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--results-dir", type=Path, default=Path("results/phantom"), help="the finished run")
    parser.add_argument("--gt-dir", type=Path, default=Path("resources/phantom/raw"), help="the run's raw data")
    parser.add_argument("--dataset", default="acdc", help="predict/evaluate --dataset")
    parser.add_argument("--synthetic", type=int, nargs="+", default=[200, 1000, 1352], help="synthetic set sizes")
    parser.add_argument("--real-patients", nargs="+", default=["5", "10", "all"], help="real sets, in patients")
    parser.add_argument("--synthetic-dir", type=Path, help="a sample folder with enough images (default: sample anew)")
    parser.add_argument("--blur", nargs="*", default=[], metavar="SET:SIGMA", help="a blurred copy of a set")
    parser.add_argument("--realism", nargs="*", default=[], metavar="SET:N", help="a set's n most real-like images")
    parser.add_argument("--shuffle", nargs="*", default=[], metavar="SET:SEED", help="a set in another order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1339])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="only write the table and figure of what has run")
    a = parser.parse_args()
    a.prepared = a.results_dir / "prepared"
    if not a.table:
        for needed in (a.prepared / "slices.parquet", a.config, a.gt_dir):
            if not needed.exists():
                raise SystemExit(f"count_curve: {needed} is missing (run the workflow first)")
        known = [f"synthetic_{n}" for n in a.synthetic] + [f"real_{k}" for k in a.real_patients]
        variants = [(blurred_set, spec) for spec in parse_variants("--blur", a.blur, known, float)]
        variants += [(realism_set, spec) for spec in parse_variants("--realism", a.realism, known, int)]
        variants += [(shuffled_set, spec) for spec in parse_variants("--shuffle", a.shuffle, known, int)]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if not a.table:
        source = a.synthetic_dir or a.out_dir / "sample"
        if a.synthetic_dir is None and not (source / "synthetic.parquet").is_file():
            sraseg(["sample", "--generator-dir", str(a.results_dir / "generator"), "--prepared-dir", str(a.prepared),
                    "--out-dir", str(source), "--config", str(a.config), "--settings",
                    json.dumps({"n_images": max(a.synthetic), "seed": 0})], a.out_dir / "sample.log",
                   a.threads * a.jobs)  # fmt: skip
        sets = synthetic_sets(source, a.synthetic, a.out_dir / "sets")
        sets.update(real_sets(a.prepared, a.real_patients, a.out_dir / "sets"))
        for folder in sets.values():
            prepare_set(folder, a)
        for make, (name, value) in variants:
            folder = make(sets[name], value, a.out_dir / "sets")
            prepare_set(folder, a)
            sets[folder.name] = folder
        work = [("labeled_only", None, s) for s in a.seeds] + [(n, f, s) for n, f in sets.items() for s in a.seeds]
        with ThreadPoolExecutor(a.jobs) as pool:
            list(pool.map(lambda job: train_and_score(*job, a), work))
    write_table_and_figure(collect(a.out_dir), a.out_dir)


if __name__ == "__main__":
    main()
