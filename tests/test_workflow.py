"""The Snakemake workflow on the tiny config: lint, plan, and real runs in a scratch folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_run import REPO, SNAKEMAKE, copy_run, run_snakemake, scratch


def snakemake(workdir: Path, *args: str, config: str = "tiny.yaml", check: bool = True,
              snakefile: Path | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the repository's workflow (or the one at `snakefile`) with `workdir` as its working directory."""
    return run_snakemake(workdir, config, *args, check=check, snakefile=snakefile)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return scratch(tmp_path)


def test_lint_is_clean():
    result = subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(REPO / "workflow" / "Snakefile"), "--lint"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.mark.parametrize("config", ["config.yaml", "acdc.yaml", "tiny.yaml"])
def test_configs_validate_and_plan(workdir: Path, config: str):
    if config == "acdc.yaml":
        # Point the ACDC config at a folder that exists, so the plan can be made.
        (workdir / "acdc").mkdir()
        extra = ["--config", f"dataset={{'name': 'acdc', 'source': 'acdc', 'raw_dir': '{workdir / 'acdc'}'}}"]
    else:
        extra = []
    result = snakemake(workdir, "-n", *extra, config=config)
    assert "train" in result.stdout


def test_labeled_only_plan_never_builds_the_generator(workdir: Path):
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["experiments"] = {"base": {"method": "labeled_only"}, "bcp": {"method": "bcp_real"}}
    (workdir / "config" / "supervised.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n", config="supervised.yaml")
    assert "prepare" in result.stdout
    for rule in ("train_generator", "sample", "embed", "index", "blend", "content"):
        assert f"rule {rule}:" not in result.stdout


def test_blend_maps_fresh_plans_its_own_rule_with_the_draw_count(workdir: Path):
    """blend.maps fresh: rule blend_fresh writes the experiment's folder (draws.parquet, no maps.npy) with
    --draws = its selftrain_iterations x unlabeled_batch, and its training reads draws.parquet; a bank
    experiment beside it keeps rule blend and maps.npy, without --draws."""
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["blend"]["maps"] = "bank"
    config["experiments"]["fresh"] = {"method": "sraseg", "blend": {"maps": "fresh"}, "train": {"selftrain_iterations": 5}}
    (workdir / "config" / "fresh.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(workdir, "-n", "-p", config="fresh.yaml").stdout
    jobs = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*", out)}
    assert "draws.parquet" in jobs["blend_fresh"] and "blend/fresh/" in jobs["blend_fresh"]
    assert "maps.npy" in jobs["blend"] and "blend/sraseg/" in jobs["blend"]
    calls = re.findall(r"python -m sraseg blend .*?--out-dir (\S+)(.*?)--settings", out)
    assert sorted((d.split("/")[-1], rest.strip()) for d, rest in calls) == [("fresh", "--draws 10"), ("sraseg", "")]
    trains = [m.group(0) for m in re.finditer(r"rule train:\n(?:    .*\n)*", out)]
    train_input = {exp: next(j for j in trains if f"tiny/{exp}/seed1" in j).split("input: ")[1].split("\n")[0]
                   for exp in ("fresh", "sraseg")}
    assert "blend/fresh/draws.parquet" in train_input["fresh"] and "maps.npy" not in train_input["fresh"]
    assert "blend/sraseg/maps.npy" in train_input["sraseg"] and "draws.parquet" not in train_input["sraseg"]


def test_unlabeled_real_plans_the_real_pool_and_never_the_generator(workdir: Path):
    """train.unlabeled real: real_pool, its own embed and index, and the experiment's blend and training
    read the pool's folders; no generator, sample or synthetic embed is planned."""
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["experiments"] = {"base": {"method": "labeled_only"},
                             "sraseg_real": {"method": "sraseg", "train": {"unlabeled": "real"}}}
    (workdir / "config" / "real.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(workdir, "-n", "-p", config="real.yaml").stdout
    stats = job_stats(out)
    assert {"real_pool", "embed_real_pool", "index_real_pool", "blend_fresh"} <= set(stats)
    assert not {"train_generator", "sample", "embed", "index", "content"} & set(stats)
    train = re.search(r"python -m sraseg train .*sraseg_real/seed\d+ .*", out).group(0)
    assert "--synthetic-dir results/tiny/real_pool " in train and "--embed-dir results/tiny/embed_real_pool " in train
    assert '"unlabeled": "real"' in train


def test_reference_preset_overlays_the_released_codes_choices(workdir: Path):
    """config/reference.yaml after a config: every sraseg training and blend gets the reference's choices,
    the config's other keys stay."""
    config = workdir / "config"
    out = snakemake(workdir, "-n", "-p", "--configfile", str(config / "tiny.yaml"), str(config / "reference.yaml")).stdout
    train = re.search(r"python -m sraseg train .*tiny/sraseg/seed\d+ .*", out).group(0)
    for pair in ('"teacher_mode": "train"', '"pseudo_weight": 1.0', '"selftrain_reduction": "sum"',
                 '"pretrain_iterations": 2'):
        assert pair in train, pair
    blend = re.search(r"python -m sraseg blend .*", out).group(0)
    assert '"maps": "fresh"' in blend and '"pairing": "random"' in blend and "--draws" in blend


def test_bad_config_value_is_refused_before_any_job(workdir: Path):
    result = snakemake(workdir, "-n", "--config", "prepare={'image_size': 4}", check=False)
    assert result.returncode != 0
    assert "image_size" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def checkout_copy(workdir: Path) -> Path:
    """workflow/, src/ and envs/ copied into `workdir` (beside its config/): stage code can be edited
    there without touching this checkout. Returns the copy's Snakefile."""
    for name in ("workflow", "src", "envs"):
        shutil.copytree(REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__", ".snakemake"))
    return workdir / "workflow" / "Snakefile"


def job_stats(text: str) -> dict[str, int]:
    """The first 'Job stats' table Snakemake prints: {rule: count} (without 'total')."""
    match = re.search(r"Job stats:\njob\s+count\n[-\s]+\n((?:\S+\s+\d+\n)+)", text)
    assert match, text[-3000:]
    rows = (line.split() for line in match.group(1).strip().splitlines())
    return {rule: int(count) for rule, count in rows if rule != "total"}


def planned_jobs(text: str) -> set[tuple[str, str]]:
    """Every job a dry run plans, as (rule, wildcards): from the job blocks Snakemake prints ("rule train:"
    and indented lines, one of them "wildcards: exp=sraseg, seed=1"; "" for a job without wildcards),
    checked against its Job stats table. Nothing to be done: the empty set."""
    if "Nothing to be done" in text:
        return set()
    jobs = []
    for match in re.finditer(r"^(?:local)?rule (\w+):\n((?:    .*\n)*)", text, re.M):
        wildcards = re.search(r"^    wildcards: (.*)$", match.group(2), re.M)
        jobs.append((match.group(1), wildcards.group(1) if wildcards else ""))
    assert Counter(rule for rule, _ in jobs) == Counter(job_stats(text)), text[-3000:]
    assert len(set(jobs)) == len(jobs), jobs
    return set(jobs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One complete run of the tiny config from a checkout copy (workflow/, src/, envs/ beside config/),
    shared by the tests that need one: each works on its own copy (copy_run)."""
    workdir = scratch(tmp_path_factory.mktemp("tiny_run"))
    snakemake(workdir, snakefile=checkout_copy(workdir))
    return workdir


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tiny_run: Path, tmp_path: Path):
    """phantom -> prepare -> generator -> embed -> index -> blend -> train -> predict -> evaluate, then
    reruns after a changed setting, input and stage code (one complete run serves both)."""
    workdir = copy_run(tiny_run, tmp_path / "run")
    snakefile = workdir / "workflow" / "Snakefile"
    results = workdir / "results" / "tiny"
    slices = pd.read_parquet(results / "prepared" / "slices.parquet")
    assert set(slices["split"]) == {"train", "val", "test"}
    for exp in ("labeled_only", "sraseg"):
        summary = json.loads((results / exp / "seed1" / "eval" / "summary.json").read_text())
        assert summary["peer"]["n_cases"] == 4  # 2 test patients x (ED, ES)
        per_case = pd.read_csv(results / exp / "seed1" / "eval" / "metrics_per_case.csv")
        assert set(per_case["class"]) == {"RV", "MYO", "LV"}
        assert set(per_case["mode"]) == {"peer", "mm"}
        predictions = sorted((results / exp / "seed1" / "predictions").glob("*.nii.gz"))
        assert len(predictions) == 4
    report = pd.read_csv(results / "report" / "results.csv")
    assert sorted(report["experiment"].unique()) == ["labeled_only", "sraseg"]
    assert report["dice_mean_mean"].between(0, 100).all()
    markdown = (results / "report" / "results.md").read_text()
    # the tiny config embeds with the offline stand-in, and the report says so, with the FD ratio
    assert "stand-in for DINOv2" in markdown and "UNTRAINED" not in markdown
    encoder = json.loads((results / "embed" / "encoder.json").read_text())
    assert encoder["weights_sha256"].startswith("b0353104")
    fd = json.loads((results / "embed" / "fd_dinov2.json").read_text())
    assert fd["fd_ratio"] == pytest.approx(fd["fd_dinov2"] / fd["fd_floor"])
    for figure in ("training_curves", "overlays", "real_vs_synthetic", "embedding_projection", "blend_sraseg",
                   "synthetic_content"):  # fmt: skip
        assert (results / "report" / "figures" / f"{figure}.png").stat().st_size > 1000
    # what the synthetic images contain: the labeled-only model against held-out real slices, in the report
    content = json.loads((results / "content" / "content.json").read_text())
    assert set(content["per_class"]) == {"RV", "MYO", "LV"} and content["n_synthetic"] == 8
    assert content["model"].endswith("labeled_only/seed1/model.safetensors")
    assert "## What the synthetic images contain" in markdown
    # Nothing is left to do after a complete run.
    dry = snakemake(workdir, "-n", snakefile=snakefile)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # One command gives the browsable HTML report.
    snakemake(workdir, "--report", str(workdir / "report.html"), snakefile=snakefile)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "results.csv" in html and "overlays.png" in html
    # Job logs are lines, not progress-bar frames; no resume checkpoint outlives its job.
    for name in ("train_labeled_only_seed1", "train_sraseg_seed1", "train_generator"):
        text = (results / "logs" / f"{name}.log").read_text()
        assert "\r" not in text and len(text.splitlines()) < 50, text
    assert not list(results.glob("**/last.ckpt"))
    _reruns(workdir, snakefile, results)


def _reruns(workdir: Path, snakefile: Path, results: Path) -> None:
    upstream = ("phantom", "prepare", "train_generator", "sample", "embed", "index", "blend")
    model = results / "labeled_only" / "seed1" / "model.safetensors"

    # 1. Stage code: a comment appended to a module of src/sraseg/train/ (in the copy) plans train and
    # what follows, not the generator; with the file restored there is nothing to do again.
    losses = workdir / "src" / "sraseg" / "train" / "losses.py"
    original = losses.read_text()
    losses.write_text(original + "# an edit\n")
    planned = job_stats((lambda r: r.stdout + r.stderr)(snakemake(workdir, "-n", snakefile=snakefile)))
    assert planned.get("train") == 2 and planned.get("predict") == 2, planned
    assert not set(planned) & set(upstream), planned
    losses.write_text(original)
    dry = snakemake(workdir, "-n", snakefile=snakefile)
    assert "Nothing to be done" in dry.stdout + dry.stderr

    # 2. A train setting only sraseg reads (x-methods in the schema), changed for every experiment in
    # `train`: only sraseg's training and what follows it rerun; labeled_only's params hold no such key.
    config = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    config["train"]["sa_weight"] = 0.2
    (workdir / "config" / "changed.yaml").write_text(yaml.safe_dump(config))
    sraseg_model = results / "sraseg" / "seed1" / "model.safetensors"
    before, sraseg_before = model.stat().st_mtime_ns, sraseg_model.read_bytes()
    ran = snakemake(workdir, config="changed.yaml", snakefile=snakefile)
    assert job_stats(ran.stdout + ran.stderr) == {"train": 1, "predict": 1, "evaluate": 1, "report": 1, "all": 1}
    assert model.stat().st_mtime_ns == before and sraseg_model.read_bytes() != sraseg_before
    assert json.loads((results / "sraseg" / "seed1" / "train.json").read_text())["settings"]["sa_weight"] == 0.2

    # 3. A changed train setting (one experiment's labeled_batch 2 -> 3): exit 0, only that train and
    # its dependents ran, new weights; nothing upstream was touched.
    config["experiments"]["labeled_only"]["train"] = {"labeled_batch": 3}
    (workdir / "config" / "changed.yaml").write_text(yaml.safe_dump(config))
    before = model.read_bytes()
    upstream_mtimes = {p: p.stat().st_mtime_ns for p in (results / "generator" / "train_log.csv",
                       results / "prepared" / "slices.parquet", results / "sraseg" / "seed1" / "model.safetensors")}
    ran = snakemake(workdir, config="changed.yaml", snakefile=snakefile)
    # the content stage segments with the labeled-only model, so it reruns with it
    assert job_stats(ran.stdout + ran.stderr) == {"train": 1, "predict": 1, "evaluate": 1, "content": 1, "report": 1,
                                                  "all": 1}  # fmt: skip
    assert model.read_bytes() != before
    assert {p: p.stat().st_mtime_ns for p in upstream_mtimes} == upstream_mtimes
    assert json.loads((results / "labeled_only" / "seed1" / "train.json").read_text())["settings"]["labeled_batch"] == 3

    # 4. Other labeled patients under the same file name: prepare and train rerun, new weights.
    (workdir / "config" / "splits" / "tiny" / "labeled.txt").write_text("patient003\npatient004\n")
    before = model.read_bytes()
    ran = snakemake(workdir, str(model.relative_to(workdir)), config="changed.yaml", snakefile=snakefile)
    assert job_stats(ran.stdout + ran.stderr) == {"prepare": 1, "train": 1}
    assert model.read_bytes() != before
    assert not list(results.glob("**/last.ckpt"))


def runs(exp: str, seed: int = 1, rules=("train", "predict", "evaluate")) -> set[tuple[str, str]]:
    """The jobs of one experiment and seed: train, predict, evaluate."""
    return {(rule, f"exp={exp}, seed={seed}") for rule in rules}


def blend_of(exp: str, rule: str = "blend_fresh") -> set[tuple[str, str]]:
    return {(rule, f"exp={exp}")}


REPORT = {("report", ""), ("all", "")}
REAL_POOL = {("real_pool", ""), ("embed_real_pool", ""), ("index_real_pool", "")}
NOSA = {"method": "sraseg", "train": {"sa": False}}
NOSA_JOBS = blend_of("sraseg_nosa") | runs("sraseg_nosa") | REPORT


def changed(config: dict, path: str, value) -> dict:
    """A copy of `config` with the dotted key `path` set to `value` (None: deleted)."""
    config = yaml.safe_load(yaml.safe_dump(config))
    *parents, key = path.split(".")
    section = config
    for name in parents:
        section = section.setdefault(name, {})
    if value is None:
        del section[key]
    else:
        section[key] = value
    return config


# Changes to config/tiny.yaml (experiments labeled_only and sraseg, seed 1) after its complete run, each
# with exactly the jobs it must plan: (what changes, config key, new value or None to delete it, jobs).
TINY_CHANGES = [
    ("add labeled_only", "experiments.lo_batch3", {"method": "labeled_only", "train": {"labeled_batch": 3}},
     runs("lo_batch3") | REPORT),
    ("add bcp_real", "experiments.bcp_real", {"method": "bcp_real"}, runs("bcp_real") | REPORT),
    ("add bcp_synthetic", "experiments.bcp_syn", {"method": "bcp_synthetic"}, runs("bcp_syn") | REPORT),
    ("add sraseg", "experiments.sraseg_b", {"method": "sraseg"}, blend_of("sraseg_b") | runs("sraseg_b") | REPORT),
    ("add an sraseg ablation", "experiments.sraseg_nosa", NOSA, NOSA_JOBS),
    ("add sraseg on real data", "experiments.sraseg_real", {"method": "sraseg", "train": {"unlabeled": "real"}},
     REAL_POOL | blend_of("sraseg_real") | runs("sraseg_real") | REPORT),
    ("remove labeled_only", "experiments.labeled_only", None, REPORT),  # and with it the content check
    ("add a seed", "seeds", [1, 2], runs("labeled_only", 2) | runs("sraseg", 2) | REPORT),
    # the content check segments with labeled_only's model, so it follows that training
    ("change a setting one experiment reads", "experiments.labeled_only.train", {"labeled_batch": 3},
     runs("labeled_only") | {("content", "")} | REPORT),
    ("change a blend setting", "blend.pairing", "nearest", blend_of("sraseg") | runs("sraseg") | REPORT),
    ("change the blend maps", "blend.maps", "bank", blend_of("sraseg", "blend") | runs("sraseg") | REPORT),
]


@pytest.mark.slow
def test_a_changed_config_plans_exactly_its_jobs_and_an_added_sraseg_reports(tiny_run: Path, tmp_path: Path):
    """After a complete tiny run, each change of TINY_CHANGES plans exactly its jobs (issue 32: an added
    SRA-Seg experiment planned nothing, its report figure had no metadata); the added ablation, run for
    real, gains its row in the report without touching the other runs, and then nothing is left to do."""
    workdir = copy_run(tiny_run, tmp_path / "run")
    snakefile = workdir / "workflow" / "Snakefile"
    base = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text())
    dry = snakemake(workdir, "-n", snakefile=snakefile)
    assert "Nothing to be done" in dry.stdout + dry.stderr  # the copy is as complete as the run
    wrong = {}
    for name, key, value, expected in TINY_CHANGES:
        (workdir / "config" / "case.yaml").write_text(yaml.safe_dump(changed(base, key, value)))
        dry = snakemake(workdir, "-n", config="case.yaml", snakefile=snakefile)
        planned = planned_jobs(dry.stdout + dry.stderr)
        if planned != expected:
            wrong[name] = {"missing": sorted(expected - planned), "unexpected": sorted(planned - expected)}
    assert not wrong, f"wrong plan for {sorted(wrong)}: {wrong}"

    results = workdir / "results" / "tiny"
    kept = {p: p.stat().st_mtime_ns for p in results.glob("*/seed1/*") if p.is_file()}
    (workdir / "config" / "nosa.yaml").write_text(yaml.safe_dump(changed(base, "experiments.sraseg_nosa", NOSA)))
    ran = snakemake(workdir, config="nosa.yaml", snakefile=snakefile)
    assert planned_jobs(ran.stdout + ran.stderr) == NOSA_JOBS
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # labeled_only's and sraseg's runs untouched
    table = pd.read_csv(results / "report" / "results.csv")
    assert sorted(table["experiment"].unique()) == ["labeled_only", "sraseg", "sraseg_nosa"]
    assert "| sraseg_nosa | sraseg |" in (results / "report" / "results.md").read_text()
    assert (results / "report" / "figures" / "blend_sraseg_nosa.png").is_file()
    dry = snakemake(workdir, "-n", config="nosa.yaml", snakefile=snakefile)
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_network_jobs_take_cpu_threads_whatever_the_core_count(workdir: Path):
    """Every job that runs a network gets `cpu_threads` threads (Snakemake sets its OMP_NUM_THREADS), not
    what the machine's core count would give: on a CPU the numbers depend on the thread count."""
    networks = {"train_generator", "sample", "embed", "train", "predict", "content"}
    for cores, threads in ((16, 2), (16, 3), (2, 2)):
        out = snakemake(workdir, "-n", "--cores", str(cores), "--config", f"cpu_threads={threads}").stdout
        jobs = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*", out)}
        assert networks <= set(jobs)
        for rule in networks:
            assert f"threads: {min(threads, cores)}\n" in jobs[rule], (cores, threads, rule)
