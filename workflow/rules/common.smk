# Validation first, then the paths and input functions the rules share.
import copy
import hashlib
import json
import os
import re
import shlex
import sys

from snakemake.utils import validate

sys.path.insert(0, os.path.abspath(os.path.join(workflow.basedir, "..", "src")))
from sraseg.datasets import dataset_of_source
from sraseg.method_settings import blend_read_by, settings_read_by
from sraseg.settings import SCHEMA_PATH, config_problems, experiment_section


# Every config mistake as one line (key, value, what is allowed; did-you-mean for unknown keys),
# and a missing dataset.raw_dir, stop the run before any job starts. The schema is the package's
# (src/sraseg/config.schema.yaml), the one the stages check their settings with.
_problems = config_problems(config)
# source fives reads the user's FIVES download: the same raw_dir check as for source acdc (there in
# sraseg.settings, whose code the ACDC stages hash; this check sits here so their hashes stay as they are)
_dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
if not _problems and _dataset.get("source") == "fives":
    _raw = _dataset.get("raw_dir")
    if not _raw:
        _problems.append(
            "'dataset.raw_dir' is not set; source fives needs the FIVES-layout folder (train/ and test/, each Original/ and Ground truth/)"
        )
    elif not os.path.isdir(_raw):
        _problems.append(f"'dataset.raw_dir' is {_raw!r}: no such folder")
if _problems:
    for _line in _problems:
        print(f"config error: {_line}", file=sys.stderr)
    sys.exit(1)

# Experiment overrides are validated against the same keys as `train`/`blend`, but filling them
# with defaults would override the user's section values: keep the overrides as written.
_experiments_as_written = copy.deepcopy(config.get("experiments"))
validate(config, schema=str(SCHEMA_PATH))
if _experiments_as_written is not None:
    config["experiments"] = _experiments_as_written

DS = config["dataset"]["name"]
# The dataset's layout, a name in sraseg.datasets.DATASETS: acdc (NIfTI volumes, 4 classes; sources
# phantom and acdc) or fives (fundus PNGs, 2 classes; sources fives_phantom and fives). The prepare,
# predict, evaluate and report rules pass it as --dataset and hash its module with their stage's code.
DATASET = dataset_of_source(config["dataset"]["source"])
DATASET_MODULE = f"sraseg.datasets.{DATASET}"
RESULTS = f"results/{DS}"
PREPARED = f"{RESULTS}/prepared"
GENERATOR = f"{RESULTS}/generator"
SYNTHETIC = f"{RESULTS}/synthetic"
EMBED = f"{RESULTS}/embed"
# train.unlabeled: real puts the real unlabeled training slices where the synthetic images go (real_pool
# rule), with their own embeddings and index beside the synthetic ones
REAL_POOL = f"{RESULTS}/real_pool"
EMBED_REAL = f"{RESULTS}/embed_real_pool"
CONTENT = f"{RESULTS}/content"
LOGS = f"{RESULTS}/logs"
EXPERIMENTS = config["experiments"]
SEEDS = config["seeds"]
# threads of every job that runs a network: fixed, so a CPU run gives the same numbers on any machine (schema)
CPU_THREADS = config["cpu_threads"]

# Which shared inputs each method consumes (so labeled_only never builds the generator).
METHOD_NEEDS = {
    "labeled_only": set(),
    "bcp_real": set(),
    "bcp_synthetic": {"synthetic"},
    "sraseg": {"synthetic", "embed", "blend"},
}


wildcard_constraints:
    exp="|".join(EXPERIMENTS) if EXPERIMENTS else "none",
    seed=r"\d+",


def raw_dir():
    """The release-layout folder (ACDC or FIVES): generated for a phantom, the user's download otherwise."""
    if config["dataset"]["source"] in ("phantom", "fives_phantom"):
        return f"resources/{DS}/raw"
    return config["dataset"]["raw_dir"]


def as_json(settings):
    """Settings for a rule's params: JSON with sorted keys, so equal settings compare equal."""
    return json.dumps(settings, sort_keys=True)


def method_of(exp):
    return EXPERIMENTS[exp]["method"]


def unlabeled_of(exp):
    """The experiment's `train.unlabeled`: synthetic (the generator's images) or real (the real pool)."""
    return experiment_section(config, "train", exp).get("unlabeled", "synthetic")


def needs(exp, what):
    """Whether the experiment reads `what`; with train.unlabeled real, its method's synthetic and embed
    needs become real_pool and embed_real (so such an experiment never builds the generator)."""
    wanted = METHOD_NEEDS[method_of(exp)]
    if unlabeled_of(exp) == "real":
        wanted = {{"synthetic": "real_pool", "embed": "embed_real"}.get(need, need) for need in wanted}
    return what in wanted


def unlabeled_dirs(exp):
    """(images folder, embed folder) of the experiment's unlabeled set."""
    return (REAL_POOL, EMBED_REAL) if unlabeled_of(exp) == "real" else (SYNTHETIC, EMBED)


def gpu_device(settings):
    """A GPU stage's device: its own `device` unless auto, else the config's top-level `device` (cuda)."""
    own = settings.get("device", "auto")
    return own if own != "auto" else config["device"]


def gpu_settings(section):
    """A GPU stage's settings with its device resolved (see gpu_device)."""
    return as_json({**config[section], "device": gpu_device(config[section])})


def train_settings(wildcards):
    """The experiment's training settings: config `train`, its overrides, and its method, with the blend
    section's map keys under `blend`; only the keys its method reads (the schema's x-methods marks), so a
    setting of another method does not rerun it."""
    method = method_of(wildcards.exp)
    settings = settings_read_by(method, experiment_section(config, "train", wildcards.exp))
    maps = blend_read_by(method, experiment_section(config, "blend", wildcards.exp))
    return as_json({**settings, "device": gpu_device(settings), **({"blend": maps} if maps else {})})


def blend_settings(wildcards):
    return as_json(experiment_section(config, "blend", wildcards.exp))


def blend_maps(exp):
    """The experiment's `blend.maps`: bank (maps.npy, rule blend) or fresh (draws.parquet, rule blend_fresh)."""
    return experiment_section(config, "blend", exp).get("maps", "bank")


def blend_experiments(mode):
    """A wildcard constraint matching the experiments whose blend folder `mode` writes (none: matches nothing)."""
    names = [exp for exp in EXPERIMENTS if needs(exp, "blend") and blend_maps(exp) == mode]
    return "|".join(re.escape(exp) for exp in names) if names else "(?!)"


def blend_draws(wildcards):
    """`--draws N` for maps fresh: the experiment's selftrain_iterations x unlabeled_batch, the draws its
    training takes (so only a fresh blend folder depends on, and reruns with, these train settings).
    A list of arguments, for `{params.draws:q}` (none: an empty list, nothing in the command)."""
    if blend_maps(wildcards.exp) != "fresh":
        return []
    train = experiment_section(config, "train", wildcards.exp)
    return ["--draws", str(int(train["selftrain_iterations"]) * int(train["unlabeled_batch"]))]


def train_inputs(wildcards):
    """Only what the experiment's method reads."""
    inputs = {"prepared": f"{PREPARED}/slices.parquet"}
    images, embed = unlabeled_dirs(wildcards.exp)
    if needs(wildcards.exp, "synthetic") or needs(wildcards.exp, "real_pool"):
        inputs["synthetic"] = f"{images}/images.npy"
    if needs(wildcards.exp, "embed") or needs(wildcards.exp, "embed_real"):
        inputs["neighbours"] = f"{embed}/neighbours.parquet"
    if needs(wildcards.exp, "blend"):
        inputs["blend"] = f"{RESULTS}/blend/{wildcards.exp}/pairs.parquet"
        # the maps mode's own file: a changed blend.maps switches the rule that writes the folder, and
        # Snakemake reruns that rule for a missing requested file (not for the other rule's params)
        maps_file = "draws.parquet" if blend_maps(wildcards.exp) == "fresh" else "maps.npy"
        inputs["blend_maps"] = f"{RESULTS}/blend/{wildcards.exp}/{maps_file}"
    return inputs


def blend_inputs(wildcards):
    """The blend stage's inputs: the experiment's unlabeled set, its neighbours and embeddings."""
    images, embed = unlabeled_dirs(wildcards.exp)
    return {
        "synthetic": f"{images}/images.npy",
        "neighbours": f"{embed}/neighbours.parquet",
        "prepared": f"{PREPARED}/slices.parquet",
        # the embed folder (--embed-dir): balanced pairing reads the embeddings
        "real_embeddings": f"{embed}/real.npy",
        "synthetic_embeddings": f"{embed}/synthetic.npy",
    }


def input_dir(key):
    """A params function: the folder holding input `key` (keeps paths tied to declared files)."""
    return lambda wildcards, input: os.path.dirname(input[key])


def output_dir(key):
    """A params function: the folder holding output `key`."""
    return lambda wildcards, output: os.path.dirname(output[key])


def optional_dir(flag, path_key):
    """`--flag DIR` when the train input `path_key` is present (its parent folder): a list of arguments, for
    `{params.<name>:q}`, which quotes each (absent: an empty list, nothing in the command)."""

    def render(wildcards, input):
        return [flag, os.path.dirname(input[path_key])] if path_key in input.keys() else []

    return render


def get_final_output():
    return expand(
        f"{RESULTS}/{{exp}}/seed{{seed}}/eval/summary.json",
        exp=list(EXPERIMENTS),
        seed=SEEDS,
    )


def uses(what):
    return any(needs(exp, what) for exp in EXPERIMENTS)


def content_experiment():
    """The first experiment with method labeled_only (its first seed's model segments for `content`), or None."""
    return next((exp for exp in EXPERIMENTS if method_of(exp) == "labeled_only"), None)


def content_enabled():
    """The content rule exists when there is a labeled-only model and some experiment uses synthetic data
    (any dataset: the content stage names the classes from prepare.json, FIVES's vessel)."""
    return content_experiment() is not None and uses("synthetic")


def content_model():
    """The weights and description of the labeled-only model the content rule segments with."""
    run = f"{RESULTS}/{content_experiment()}/seed{SEEDS[0]}"
    return {"model": f"{run}/model.safetensors", "meta": f"{run}/model.json"}


def full_report():
    """Whether the report adds provenance, content, the HTML page and the synthetic-data figures: the
    dataset's `full_report` (sraseg.datasets.acdc and fives set it), read without importing the dataset
    module here, which would load its readers into every workflow run."""
    return DATASET in ("acdc", "fives")


def report_optional_inputs():
    """Synthetic-data provenance shown in the report, when some experiment built it."""
    if not full_report():
        return []
    inputs = []
    if uses("synthetic"):
        inputs.append(f"{SYNTHETIC}/images.npy")
    if content_enabled():
        inputs += [f"{CONTENT}/content.json", f"{CONTENT}/content.png"]
    if uses("embed"):
        inputs += [f"{EMBED}/encoder.json", f"{EMBED}/fd_dinov2.json", f"{EMBED}/projection.png", f"{EMBED}/index.json"]
    for exp in EXPERIMENTS:
        if needs(exp, "blend"):
            inputs += [f"{RESULTS}/blend/{exp}/{name}" for name in ("preview.png", "pairs.parquet", "blend.json")]
    return inputs


def caption_file(name):
    """A report figure's caption: workflow/report/<name>_<dataset>.rst where the dataset has its own
    (FIVES: vessels, not cardiac classes), else workflow/report/<name>.rst; relative to this file."""
    own = f"{name}_{DATASET}.rst"
    return f"../report/{own}" if os.path.isfile(os.path.join(workflow.basedir, "report", own)) else f"../report/{name}.rst"


def report_outputs():
    """The report's files; each figure carries its caption for `snakemake --report`."""
    out = f"{RESULTS}/report"
    if not full_report():
        return {
            "table": f"{out}/results.csv",
            "markdown": f"{out}/results.md",
            "curves": f"{out}/figures/training_curves.png",
        }
    outputs = {
        "table": report(f"{out}/results.csv", caption=caption_file("results"), category="Results"),
        "markdown": f"{out}/results.md",
        # the table itself in the HTML report (a .csv there is only a download)
        "html": report(f"{out}/results.html", caption=caption_file("results"), category="Results"),
        "curves": report(
            f"{out}/figures/training_curves.png", caption=caption_file("curves"), category="Training"
        ),
        "overlays": report(
            f"{out}/figures/overlays.png", caption=caption_file("overlays"), category="Predictions"
        ),
    }
    if uses("synthetic"):
        outputs["samples"] = report(
            f"{out}/figures/real_vs_synthetic.png", caption=caption_file("samples"), category="Synthetic data"
        )
    if content_enabled():
        outputs["content"] = report(
            f"{out}/figures/synthetic_content.png", caption=caption_file("content"), category="Synthetic data"
        )
    if uses("embed"):
        outputs["projection"] = report(
            f"{out}/figures/embedding_projection.png",
            caption=caption_file("projection"),
            category="Synthetic data",
        )
    if any(needs(exp, "blend") for exp in EXPERIMENTS):
        outputs["partner_use"] = report(
            f"{out}/figures/partner_use.png", caption=caption_file("partner_use"), category="Blend bank"
        )
    for exp in EXPERIMENTS:
        if needs(exp, "blend"):
            outputs[f"blend_{exp}"] = report(
                f"{out}/figures/blend_{exp}.png", caption=caption_file("blend"), category="Blend bank"
            )
    return outputs


# Rules run `python -m sraseg` from this checkout, inside the venv or a per-rule conda env alike. The
# checkout's path is quoted (a clone under a folder named "my data" or "it's" stays one word) and its braces
# doubled (Snakemake formats the prefix). A prefix of one's own replaces Snakemake's strict mode
# (`set -euo pipefail` under bash), so `set -eu` (POSIX; no command here pipes) is set again: a failing step
# stops the job.
# Every value in the shell commands is quoted as well: `{...:q}` (shlex.quote), lists element by
# element (optional arguments are lists, empty when absent), so no path or setting splits or runs.
SRC_DIR = os.path.abspath(os.path.join(workflow.basedir, "..", "src"))
_QUOTED_SRC_DIR = shlex.quote(SRC_DIR).replace("{", "{{").replace("}", "}}")
shell.prefix(f"set -eu; export PYTHONPATH={_QUOTED_SRC_DIR}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")


# Stage code as a rerun trigger. Snakemake tracks the code of `run` and `script` steps, not the
# package a shell command calls, so every step gets the param `code=stage_code(<its module>)`, a
# hash of the module's file and every sraseg module it imports, followed transitively with `ast`
# (imports inside functions included; the CLI, which only parses arguments, is left out). A changed
# hash is a changed param: that step reruns, and with it everything downstream.
def _module_files(module):
    """The files `import module` executes inside sraseg: parent packages' __init__.py and the module."""
    parts, files = module.split("."), []
    for i in range(1, len(parts) + 1):
        base = os.path.join(SRC_DIR, *parts[:i])
        if os.path.isdir(base):
            if os.path.isfile(os.path.join(base, "__init__.py")):
                files.append(os.path.join(base, "__init__.py"))
        elif os.path.isfile(base + ".py"):
            files.append(base + ".py")
        else:
            break  # a name defined in a module (`from sraseg.io import write_json`), not a module
    return files


def _sraseg_imports(path):
    """Modules named by the import statements of one source file (relative imports resolved)."""
    import ast

    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    package = os.path.relpath(path, SRC_DIR).split(os.sep)[:-1]  # for a module and an __init__.py alike
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "sraseg" or n.startswith("sraseg.")]


def _stage_sources(modules):
    """Absolute paths of the `modules`' files and of every sraseg module they import, transitively."""
    seen, todo = set(), list(modules)
    while todo:
        for path in _module_files(todo.pop()):
            if path not in seen:
                seen.add(path)
                todo += _sraseg_imports(path)
    return sorted(seen)


_STAGE_CODE = {}  # computed once per workflow run


def stage_code(*modules):
    """sha256 (16 hex digits) over the relative paths and contents of `_stage_sources(modules)`. A stage
    written against the dataset interface names the dataset's module too (DATASET_MODULE): the stage
    module picks it by name, which no import statement shows."""
    if modules not in _STAGE_CODE:
        digest = hashlib.sha256()
        for path in _stage_sources(modules):
            digest.update(os.path.relpath(path, SRC_DIR).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(handle.read() + b"\0")
        _STAGE_CODE[modules] = digest.hexdigest()[:16]
    return _STAGE_CODE[modules]
