"""The workflow on FIVES: the phantom config plans every method with the FIVES rules, the real-release
config plans, a tiny FIVES run goes through evaluate, and the ACDC plans do not depend on FIVES code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_workflow import blend_of, changed, checkout_copy, job_stats, planned_jobs, runs
from workflow_run import copy_run, run_snakemake, scratch, snakemake_command, snakemake_env

METHODS = ("labeled_only", "bcp_real", "bcp_synthetic", "sraseg")


def snakemake(workdir: Path, *args: str, config: str, check: bool = True) -> subprocess.CompletedProcess:
    """The repository's workflow in `workdir` on one core (the FIVES runs are small)."""
    return run_snakemake(workdir, config, *args, cores=1, check=check)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return scratch(tmp_path)


def test_fives_phantom_config_plans_every_method_with_the_fives_rules(workdir: Path):
    out = snakemake(workdir, "-n", "-p", config="fives_phantom.yaml").stdout
    stats = job_stats(out)
    fives_rules = ("fives_phantom", "prepare", "train", "predict", "evaluate", "report")
    assert {rule: stats.get(rule) for rule in fives_rules} == {
        "fives_phantom": 1, "prepare": 1, "train": 4, "predict": 4, "evaluate": 4, "report": 1}  # fmt: skip
    assert {"train_generator", "sample", "embed", "index", "blend_fresh"} <= set(stats)
    # the content check of the vessel class, with the labeled-only model; the ACDC phantom is not planned
    assert stats.get("content") == 1 and "phantom" not in stats
    assert ("python -m sraseg content --model results/fives_phantom/labeled_only/seed0/model.safetensors "
            "--synthetic-dir results/fives_phantom/synthetic --prepared-dir results/fives_phantom/prepared") in out
    assert "python -m sraseg fives-phantom --out-dir resources/fives_phantom/raw --train 48 --test 16 --size 256" in out
    assert re.search(r"python -m sraseg prepare --dataset fives --raw-dir resources/fives_phantom/raw "
                     r"--splits-dir config/splits/fives_phantom --labeled \S+/labeled_4.txt --image-size 64", out)  # fmt: skip
    for method in METHODS:
        run = f"results/fives_phantom/{method}/seed0"
        train = re.search(rf"python -m sraseg train .*--out-dir {run} .*", out).group(0)
        settings = json.loads(re.search(r"--settings '(.*)'", train).group(1))
        assert (settings["method"], settings["num_classes"]) == (method, 2)
        # the soft pre-training maps' edge is sraseg's alone (x-methods): the other methods' params leave it out
        assert settings.get("blend", {}).get("kernel") == ("box" if method == "sraseg" else None)
        assert f"sraseg predict --dataset fives -m {run}/model.safetensors --prepared-dir results/fives_phantom/prepared" in out
        assert (f"sraseg evaluate --dataset fives --pred-dir {run}/predictions --gt-dir resources/fives_phantom/raw "
                f"--out-dir {run}/eval") in out  # fmt: skip
    assert "python -m sraseg report --dataset fives --results-dir results/fives_phantom" in out
    blend = re.search(r"python -m sraseg blend .*", out).group(0)
    assert '"kernel": "box"' in blend and '"kernel_size": 7' in blend


def test_fives_release_config_plans_and_needs_its_folder(workdir: Path):
    release = workdir / "FIVES"
    release.mkdir()
    dataset = dict(yaml.safe_load((workdir / "config" / "fives.yaml").read_text())["dataset"], raw_dir=str(release))
    result = snakemake(workdir, "-n", "-p", "--config", f"dataset={dataset}", config="fives.yaml")
    stats = job_stats(result.stdout)
    assert stats["prepare"] == 1 and stats["evaluate"] == 4 and "fives_phantom" not in stats
    assert f"prepare --dataset fives --raw-dir {release} --splits-dir config/splits/fives" in result.stdout
    assert '"num_classes": 2' in result.stdout and '"pretrain_iterations": 10000' in result.stdout
    refused = snakemake(workdir, "-n", config="fives.yaml", check=False)  # raw_dir /path/to/FIVES
    assert refused.returncode != 0 and "'dataset.raw_dir' is '/path/to/FIVES': no such folder" in refused.stderr


# A dry run that prints every planned job's rule, wildcards and params (the code hashes among them).
_PLAN_PARAMS = """
import json, sys
import snakemake.jobs as J
_orig = J.Job.log_info
def log_info(self, *a, **k):
    print("PARAMS", self.rule.name, json.dumps(dict(self.wildcards_dict), sort_keys=True),
          json.dumps({n: str(v) for n, v in self.params.items()}, sort_keys=True), flush=True)
    return _orig(self, *a, **k)
J.Job.log_info = log_info
from snakemake.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _planned_jobs(workdir: Path, snakefile: Path, config: str) -> list[str]:
    cmd = snakemake_command(workdir, config, "--cores", "1", "-n", "-p")
    cmd[cmd.index("--snakefile") + 1] = str(snakefile)
    proc = subprocess.run([sys.executable, "-c", _PLAN_PARAMS, *cmd[1:]], capture_output=True, text=True,
                          env=snakemake_env(), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    return sorted(line for line in lines if line.startswith("PARAMS") or "python -m sraseg" in line)


def test_acdc_plans_do_not_depend_on_the_fives_code(workdir: Path):
    """The tiny ACDC plan (every job's params, code hashes included, and its commands) is the same with
    the FIVES modules removed from a checkout copy: FIVES code never enters an ACDC job."""
    planned = _planned_jobs(workdir, checkout_copy(workdir), "tiny.yaml")
    rules = {line.split()[1] for line in planned if line.startswith("PARAMS")}
    assert {"phantom", "prepare", "predict", "evaluate"} <= rules and not {r for r in rules if "fives" in r}
    for module in ("data/fives.py", "data/fives_phantom.py", "data/fives_splits.py", "datasets/fives.py"):
        (workdir / "src" / "sraseg" / module).unlink()
    assert _planned_jobs(workdir, workdir / "workflow" / "Snakefile", "tiny.yaml") == planned


@pytest.fixture(scope="module")
def fives_tiny_run(tmp_path_factory) -> Path:
    """The FIVES phantom (64 px images, prepared at 32 px) with labeled_only for a few iterations, run once
    to its report and shared by the tests below (each works on a copy)."""
    workdir = scratch(tmp_path_factory.mktemp("fives_tiny_run"))
    config = yaml.safe_load((workdir / "config" / "fives_phantom.yaml").read_text())
    config["dataset"]["name"] = "fives_tiny"
    config["fives_phantom"]["size"] = 64
    config["prepare"]["image_size"] = 32
    # switch_min_dice 0: the guard off, as in tiny.yaml (4 pre-training iterations teach no vessel, by design)
    config["train"].update(pretrain_iterations=4, selftrain_iterations=0, val_every=2, checkpoint_every=2,
                           channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2], device="cpu", switch_min_dice=0)  # fmt: skip
    config["experiments"] = {"labeled_only": {"method": "labeled_only"}}
    (workdir / "config" / "fives_tiny.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir, config="fives_tiny.yaml")
    return workdir


@pytest.mark.slow
def test_tiny_fives_run_goes_to_a_report_and_a_rerun_does_nothing(fives_tiny_run: Path, tmp_path: Path):
    """phantom -> prepare -> train -> PNG predictions -> per-image evaluation -> report; then nothing to do."""
    workdir = copy_run(fives_tiny_run, tmp_path / "run")
    run = workdir / "results" / "fives_tiny" / "labeled_only" / "seed0"
    masks = sorted((run / "predictions").glob("*.png"))
    assert len(masks) == 16 and masks[0].stem.startswith("test_")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["image"]["n_cases"] == 16 and 0 <= summary["image"]["mean"]["dice"] <= 1
    assert summary["stacked"]["n_cases"] == 16
    report = (workdir / "results" / "fives_tiny" / "report" / "results.md").read_text()
    assert "| labeled_only | labeled_only |" in report and "Stacked, the reference's mode (16 test images" in report
    figures = workdir / "results" / "fives_tiny" / "report" / "figures"
    assert {p.name for p in figures.iterdir()} == {"training_curves.png", "overlays.png"}  # no synthetic data here
    again = snakemake(workdir, config="fives_tiny.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
    shutil.rmtree(workdir / "resources")


FIVES_RUNS = ("train", "predict", "evaluate")
FIVES_REPORT = {("report", ""), ("all", "")}
# sraseg trains 2 self-training iterations (the base config has none, and a fresh blend draws for them)
FIVES_SRASEG = {"method": "sraseg", "train": {"selftrain_iterations": 2}}
FIVES_SRASEG_REAL = {"method": "sraseg", "train": {"selftrain_iterations": 2, "unlabeled": "real"}}
SYNTHETIC = {("train_generator", ""), ("sample", ""), ("embed", ""), ("index", "")}
REAL_POOL = {("real_pool", ""), ("embed_real_pool", ""), ("index_real_pool", "")}
SRASEG_REAL_JOBS = REAL_POOL | blend_of("sraseg_real") | runs("sraseg_real", 0, FIVES_RUNS) | FIVES_REPORT

# Changes to the FIVES tiny config (labeled_only, seed 0) after its complete run, each with exactly its jobs.
FIVES_CHANGES = [
    ("add bcp_real", "experiments.bcp_real", {"method": "bcp_real"}, runs("bcp_real", 0, FIVES_RUNS) | FIVES_REPORT),
    # with synthetic images and a labeled-only model, the content check runs too
    ("add sraseg", "experiments.sraseg", FIVES_SRASEG,
     SYNTHETIC | {("content", "")} | blend_of("sraseg") | runs("sraseg", 0, FIVES_RUNS) | FIVES_REPORT),
    ("add sraseg on real data", "experiments.sraseg_real", FIVES_SRASEG_REAL, SRASEG_REAL_JOBS),
    ("add a seed", "seeds", [0, 1], runs("labeled_only", 1, FIVES_RUNS) | FIVES_REPORT),
    ("change a setting one experiment reads", "experiments.labeled_only.train", {"labeled_batch": 3},
     runs("labeled_only", 0, FIVES_RUNS) | FIVES_REPORT),
]


@pytest.mark.slow
def test_an_added_fives_experiment_plans_exactly_its_jobs_and_reports(fives_tiny_run: Path, tmp_path: Path):
    """Issue 32 on the FIVES path: after the tiny FIVES run each change of FIVES_CHANGES plans exactly its
    jobs; the added sraseg_real (the benchmark's protocol: SRA-Seg added to a finished run without one; no
    generator, so it stays short), run for real, gains its row in the report and leaves labeled_only's run
    alone."""
    workdir = copy_run(fives_tiny_run, tmp_path / "run")
    base = yaml.safe_load((workdir / "config" / "fives_tiny.yaml").read_text())
    wrong = {}
    for name, key, value, expected in FIVES_CHANGES:
        (workdir / "config" / "case.yaml").write_text(yaml.safe_dump(changed(base, key, value)))
        dry = snakemake(workdir, "-n", config="case.yaml")
        planned = planned_jobs(dry.stdout + dry.stderr)
        if planned != expected:
            wrong[name] = {"missing": sorted(expected - planned), "unexpected": sorted(planned - expected)}
    assert not wrong, f"wrong plan for {sorted(wrong)}: {wrong}"

    results = workdir / "results" / "fives_tiny"
    kept = {p: p.stat().st_mtime_ns for p in (results / "labeled_only" / "seed0").glob("**/*") if p.is_file()}
    added = changed(base, "experiments.sraseg_real", FIVES_SRASEG_REAL)
    (workdir / "config" / "added.yaml").write_text(yaml.safe_dump(added))
    ran = snakemake(workdir, config="added.yaml")
    assert planned_jobs(ran.stdout + ran.stderr) == SRASEG_REAL_JOBS
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    report = (results / "report" / "results.md").read_text()
    assert "| labeled_only | labeled_only |" in report and "| sraseg_real | sraseg |" in report
    again = snakemake(workdir, "-n", config="added.yaml")
    assert "Nothing to be done" in again.stdout + again.stderr
