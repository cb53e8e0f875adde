"""The `sraseg` command line: one subcommand per stage. It only parses arguments and calls the
stage's `run(...)`; stage modules are imported lazily so `sraseg --help` stays fast.

One naming scheme: an input or output folder is `--<what>-dir`, a single file is `--<what>` (or
`--out-file`), and every stage with settings takes `--config FILE` (a whole workflow config; the
stage reads its own section) and `--settings JSON` (that section only, applied on top). The
spellings of earlier versions (`--prepared`, `--synthetic`, `--generator`, `--out`) still work.
`sraseg <stage> --help` lists the stage's settings, defaults and meanings from the config schema.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from sraseg.errors import ConfigError, Preempted, SrasegError

log = logging.getLogger("sraseg")

# The model config/acdc.yaml embeds with (the real-data run needs these weights fetched).
FETCH_DEFAULT_MODEL = "vit_base_patch14_dinov2.lvd142m"


def _settings(value: str) -> dict:
    """A JSON object given inline or as a path to a .json/.yaml file."""
    text = value
    path = Path(value)
    if not value.lstrip().startswith("{") and path.exists():
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--settings is neither a JSON object nor a readable file: {err}") from err
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--settings must be a JSON object")
    return data


def _config_file(value: str) -> dict:
    """A whole workflow config file (YAML or JSON), checked against the schema later."""
    import yaml

    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{path}: not valid YAML ({' '.join(str(err).split())[:160]})") from err
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{path}: a config file is a mapping of sections")
    return data


def _settings_epilog(section: str) -> str | None:
    """The section's settings from the schema: name, default, one-line meaning (None without a schema)."""
    from sraseg.settings import load_schema

    try:
        spec = load_schema()["properties"][section]
    except (ConfigError, KeyError):
        return None
    rows = []
    for key, sub in spec.get("properties", {}).items():
        meaning = " ".join(str(sub.get("description", "")).split())
        if "enum" in sub:
            meaning += f" [{' | '.join(map(str, sub['enum']))}]"
        rows.append((key, json.dumps(sub.get("default")), meaning))
    width = max(len(k) for k, _, _ in rows) + 2
    dwidth = min(max(len(d) for _, d, _ in rows), 34) + 2
    lines = [f"  {k:<{width}}{d:<{dwidth}}{m}" for k, d, m in rows]
    return (
        f"settings (config section `{section}`; set them with --config FILE or --settings JSON):\n"
        f"  {'name':<{width}}{'default':<{dwidth}}meaning\n" + "\n".join(lines)
    )


def _devices() -> list[str]:
    """The device choices, as the schema gives every stage's `device` (auto, cpu, cuda)."""
    from sraseg.settings import choices

    return list(choices("train", "device"))


def _parser(sub, name: str, help: str, section: str | None = None, description: str | None = None):
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=_settings_epilog(section) if section else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(required_args=[], section=section)
    return p


def _path(p, flag: str, *old: str, required: bool = False, help: str = "", metavar: str | None = None):
    """`flag` (shown) with earlier spellings `old` (accepted, not shown), all into one dest."""
    dest = flag.lstrip("-").replace("-", "_")
    metavar = metavar or ("DIR" if flag.endswith("-dir") else "FILE")
    p.add_argument(flag, dest=dest, type=Path, default=None, metavar=metavar, help=help + (" (required)" if required else ""))
    for alias in old:
        p.add_argument(alias, dest=dest, type=Path, default=None, help=argparse.SUPPRESS)
    if required:
        p.get_default("required_args").append((dest, flag))


def _add_config(p, experiment: bool = False):
    p.add_argument("--config", type=_config_file, default=None, metavar="FILE",
                   help="a whole workflow config (e.g. config/acdc.yaml); this stage reads its section")  # fmt: skip
    p.add_argument("--settings", type=_settings, default={}, metavar="JSON",
                   help="this stage's section only, as JSON or a .json/.yaml file; applied over --config")  # fmt: skip
    if experiment:
        p.add_argument("--experiment", default=None, metavar="NAME",
                       help="with --config: apply this experiment's overrides (and, for train, its method)")  # fmt: skip


def section_settings(args) -> dict:
    """The stage's settings: --config's section (with --experiment's overrides), then --settings."""
    from sraseg.settings import ConfigProblems, config_problems, experiment_section, section_schema

    merged: dict = {}
    config = getattr(args, "config", None)
    if config is not None:
        problems = config_problems(config, check_paths=False)
        if problems:
            raise ConfigProblems(problems)
        merged = experiment_section(config, args.section, getattr(args, "experiment", None))
    elif getattr(args, "experiment", None) is not None:
        raise ConfigError("--experiment needs --config FILE (the experiments are read from it)")
    own_keys = set((section_schema(args.section) or {}).get("properties") or {})
    if ({"dataset", "experiments", args.section} & set(args.settings)) - own_keys:
        # `--settings config/acdc.yaml` was the old way to pass a whole file: say what to use instead
        raise ConfigError(f"--settings takes the `{args.section}` section only; for a whole config file use --config FILE")
    merged.update(args.settings)
    return merged


def train_settings(args) -> dict:
    """The train stage's settings: `section_settings`, plus --config's blend map keys (kernel, kernel_size,
    sigma, ratio; with --experiment's overrides) under `blend`, unless --settings gives `blend` itself."""
    from sraseg.method_settings import blend_read_by
    from sraseg.settings import experiment_section

    settings = section_settings(args)
    maps = blend_read_by(None, experiment_section(args.config or {}, "blend", args.experiment))
    return {**settings, "blend": maps} if maps and "blend" not in settings else settings


def _add_phantom(sub):
    p = _parser(sub, "phantom", "write the built-in cardiac cine-MRI phantom in ACDC layout")
    _path(p, "--out-dir", "--out", required=True, help="output folder (patientXXX/ sub-folders)")
    p.add_argument("--patients", type=int, default=100, help="number of patients (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--phantom-version", type=int, default=None, help="generator version (default 1; 2 adds scanner-like variety, see config/README.md)")
    p.set_defaults(
        target="sraseg.data.phantom",
        kwargs=lambda a: dict(out_dir=a.out_dir, patients=a.patients, seed=a.seed)
        | ({} if a.phantom_version is None else dict(version=a.phantom_version)),
    )


def _add_fives_phantom(sub):
    p = _parser(sub, "fives-phantom", "write the built-in colour fundus phantom with vessel masks in FIVES layout")
    _path(p, "--out-dir", required=True, help="output folder (train/ and test/, each Original/ and Ground truth/)")
    p.add_argument("--train", type=int, default=48, help="images in the release's train split (default 48)")
    p.add_argument("--test", type=int, default=16, help="images in the release's test split (default 16)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.set_defaults(
        target="sraseg.data.fives_phantom",
        kwargs=lambda a: dict(out_dir=a.out_dir, train=a.train, test=a.test, size=a.size, seed=a.seed),
    )


def _add_fives_splits(sub):
    p = _parser(sub, "fives-splits", "write the FIVES protocol's split lists (pool, val, test, labeled subsets)")
    _path(p, "--out-dir", required=True, help="folder for train.txt, val.txt, test.txt, labeled_<n>.txt")
    _path(p, "--raw-dir", help="FIVES-layout folder to split (default: the published release's 600/200 names)")
    p.add_argument("--pool-per-condition", type=int, default=140, help="training pool per condition (default 140)")
    p.add_argument("--labeled-per-condition", type=int, nargs="+", default=[14, 7],
                   help="labeled cases per condition, one list each (default 14 7: 56 and 28 images)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--release-train", type=int, default=600, help="without --raw-dir: release train images (default 600)")
    p.add_argument("--release-test", type=int, default=200, help="without --raw-dir: release test images (default 200)")
    p.set_defaults(
        target="sraseg.data.fives_splits",
        kwargs=lambda a: dict(out_dir=a.out_dir, raw_dir=a.raw_dir, pool_per_condition=a.pool_per_condition,
                              labeled_per_condition=tuple(a.labeled_per_condition), seed=a.seed,
                              release_train=a.release_train, release_test=a.release_test),  # fmt: skip
    )


def _add_dataset(p, help: str, default: str | None = "acdc"):
    """`--dataset`: a name in the dataset table (`sraseg.datasets.DATASETS`)."""
    from sraseg.datasets import DATASETS

    p.add_argument("--dataset", choices=list(DATASETS), default=default, help=help)


def _add_prepare(sub):
    p = _parser(sub, "prepare", "check an ACDC-layout (or FIVES-layout) dataset and cut it into normalised 2-D slices")
    _path(p, "--raw-dir", required=True, help="ACDC-layout folder (patientXXX/...), or FIVES layout with --dataset fives")
    _path(p, "--splits-dir", required=True, help="folder with train.txt, val.txt, test.txt")
    _path(p, "--labeled", required=True, help="file listing the labeled training patients")
    p.add_argument("--image-size", type=int, default=256, help="slice size after resizing (default 256)")
    _path(p, "--out-dir", required=True, help="prepared folder")
    _add_dataset(p, "the raw folder's layout: acdc (NIfTI volumes, default) or fives (fundus PNGs)")
    p.set_defaults(
        target="sraseg.datasets.prepare",
        kwargs=lambda a: dict(raw_dir=a.raw_dir, splits_dir=a.splits_dir, labeled_list=a.labeled,
                              image_size=a.image_size, out_dir=a.out_dir, dataset=a.dataset),  # fmt: skip
    )


def _add_real_pool(sub):
    p = _parser(sub, "real-pool", "write the real unlabeled training slices as an unlabeled image set (train.unlabeled: real)")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare stage output folder")
    _path(p, "--out-dir", required=True, help="pool folder (images.npy, synthetic.parquet, as the sample stage writes)")
    p.set_defaults(target="sraseg.data.real_pool", kwargs=lambda a: dict(prepared_dir=a.prepared_dir, out_dir=a.out_dir))


def _add_train_generator(sub):
    p = _parser(sub, "train-generator", "train the unconditional diffusion model on real training slices", "generator")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare stage output folder")
    _path(p, "--out-dir", required=True, help="generator folder (a diffusers pipeline)")
    _add_config(p)
    p.set_defaults(
        target="sraseg.generate.train",
        kwargs=lambda a: dict(prepared_dir=a.prepared_dir, out_dir=a.out_dir, settings=section_settings(a)),
    )


def _add_sample(sub):
    p = _parser(sub, "sample", "sample synthetic slices from a trained generator", "sample")
    _path(p, "--generator-dir", "--generator", required=True, help="train-generator output folder")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output (image size, real slices for the preview)")
    _path(p, "--out-dir", required=True, help="synthetic folder")
    _add_config(p)
    p.set_defaults(
        target="sraseg.generate.sample",
        kwargs=lambda a: dict(
            generator_dir=a.generator_dir, prepared_dir=a.prepared_dir, out_dir=a.out_dir, settings=section_settings(a)
        ),
    )


def _add_embed(sub):
    p = _parser(sub, "embed", "embed real and synthetic slices with a frozen DINOv2 encoder", "embed")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output folder")
    _path(p, "--synthetic-dir", "--synthetic", required=True, help="sample stage output folder")
    _path(p, "--out-dir", required=True, help="embed folder")
    _add_config(p)
    p.set_defaults(
        target="sraseg.embed.run",
        kwargs=lambda a: dict(
            prepared_dir=a.prepared_dir, synthetic_dir=a.synthetic_dir, out_dir=a.out_dir, settings=section_settings(a)
        ),
    )


def _add_index(sub):
    p = _parser(sub, "index", "FAISS index of real embeddings, nearest real neighbours, FD-DINOv2", "index")
    _path(p, "--embed-dir", required=True, help="embed stage output folder")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output folder")
    _path(p, "--out-dir", required=True, help="usually the embed folder itself")
    _add_config(p)
    p.set_defaults(
        target="sraseg.embed.index",
        kwargs=lambda a: dict(
            embed_dir=a.embed_dir, prepared_dir=a.prepared_dir, out_dir=a.out_dir, settings=section_settings(a)
        ),
    )


def _add_fetch_weights(sub):
    p = _parser(sub, "fetch-weights", "download DINOv2 weights to a file (on a machine with internet)")
    p.add_argument("--model", default=None, help=f"timm model tag (default: --config's embed.model, else {FETCH_DEFAULT_MODEL}, "
                   "the model config/acdc.yaml uses)")  # fmt: skip
    _path(p, "--out-file", "--out", required=True, help="weights file to write (.safetensors or .pth)")
    p.add_argument("--config", type=_config_file, default=None, metavar="FILE", help="take the model from its embed.model")

    def kwargs(a):
        model = a.model
        if model is None and a.config is not None:
            from sraseg.settings import load_schema

            # the model that config's embed stage will load: its own, else the schema default
            schema_default = load_schema()["properties"]["embed"]["properties"]["model"]["default"]
            model = (a.config.get("embed") or {}).get("model", schema_default)
        return dict(model=model or FETCH_DEFAULT_MODEL, out=a.out_file)

    p.set_defaults(target="sraseg.embed.fetch", kwargs=kwargs)


def selftrain_draws(args) -> int:
    """Self-training draws the train stage will take from `maps: fresh`: --draws, else
    selftrain_iterations x unlabeled_batch of --config's train section (with --experiment's overrides),
    the schema defaults filling what it leaves out."""
    from sraseg.settings import experiment_section, section_schema

    if args.draws is not None:
        return args.draws
    train = {k: v.get("default") for k, v in ((section_schema("train") or {}).get("properties") or {}).items()}
    train.update(experiment_section(args.config or {}, "train", args.experiment))
    return int(train["selftrain_iterations"]) * int(train["unlabeled_batch"])


def _add_blend(sub):
    p = _parser(sub, "blend", "materialise the soft-edge blend bank (blend maps + real pairings)", "blend")
    _path(p, "--synthetic-dir", "--synthetic", required=True, help="sample stage output folder")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output folder")
    _path(p, "--neighbours", required=True, help="neighbours.parquet from the index stage")
    _path(p, "--embed-dir", help="embed stage folder (real/synthetic embeddings; needed by pairing: balanced)")
    _path(p, "--out-dir", required=True, help="blend bank folder")
    p.add_argument("--draws", type=int, default=None, metavar="N",
                   help="self-training draws for `maps: fresh` (train.selftrain_iterations x train.unlabeled_batch; "
                        "default: from --config/--experiment, else the train defaults); unused by `maps: bank`")  # fmt: skip
    _add_config(p, experiment=True)
    p.set_defaults(
        target="sraseg.blend.run",
        kwargs=lambda a: dict(
            synthetic_dir=a.synthetic_dir,
            prepared_dir=a.prepared_dir,
            neighbours=a.neighbours,
            out_dir=a.out_dir,
            settings=section_settings(a),
            draws=selftrain_draws(a),
            embed_dir=a.embed_dir,
        ),
    )


def _add_train(sub):
    p = _parser(sub, "train", "train a segmentation U-Net with one of the methods", "train")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output folder")
    _path(p, "--out-dir", required=True, help="results/{ds}/{exp}/seed{seed}")
    p.add_argument("--seed", type=int, default=1337, help="training seed (default 1337)")
    _path(p, "--synthetic-dir", "--synthetic", help="sample output (bcp_synthetic, sraseg)")
    _path(p, "--embed-dir", help="embed+index output (sraseg)")
    _path(p, "--blend-dir", help="blend bank (sraseg)")
    _add_config(p, experiment=True)
    p.set_defaults(
        target="sraseg.train.loop",
        kwargs=lambda a: dict(
            prepared_dir=a.prepared_dir,
            out_dir=a.out_dir,
            settings=train_settings(a),
            seed=a.seed,
            synthetic_dir=a.synthetic_dir,
            embed_dir=a.embed_dir,
            blend_dir=a.blend_dir,
        ),
    )


def _add_predict(sub):
    p = _parser(
        sub,
        "predict",
        "segment NIfTI volumes slice by slice (or FIVES PNG images) with a trained model (-i IN -o OUT -m RUN_DIR)",
        description="Segment every *.nii.gz volume in IN with the model in RUN_DIR and write OUT/<same name> "
        "(labels 0-3, the input's shape and affine); for a folder of *.png fundus images (FIVES, a 2-class "
        "model), PNG masks with 0 background and 255 vessel at the input's size. A failing input is named "
        "in one line and skipped; the exit code is 1 when any failed. 4-D series are skipped.",
    )
    p.add_argument("-i", "--input", type=Path, default=None,
                   help="folder of .nii.gz volumes or .png images (or one such file)")  # fmt: skip
    p.add_argument("-o", "--output", "--out-dir", dest="output", type=Path, required=True, help="predictions folder")
    p.add_argument("-m", "--model", type=Path, required=True,
                   help="train output: results/{ds}/{exp}/seed{N} or its model.safetensors")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    p.add_argument("--device", default="auto", choices=_devices(),
                   help="auto (default): CUDA when torch sees one; cuda: fail in one line when it does not")
    # the workflow's mode: a split of the prepared volumes.parquet instead of a folder
    _path(p, "--prepared-dir", "--prepared", help="instead of -i: prepare output whose volumes.parquet lists the cases")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="with --prepared-dir (default test)")
    _add_dataset(p, "acdc: NIfTI volumes; fives: fundus PNGs, written as PNG masks (0/255). Default: fives when "
                    "-i is a .png file or a folder of .png images without .nii.gz volumes, else acdc", default=None)  # fmt: skip
    p.set_defaults(
        target="sraseg.evaluate.predict",
        kwargs=lambda a: dict(
            model_path=a.model,
            input_path=a.input,
            prepared_dir=a.prepared_dir,
            split=a.split,
            out_dir=a.output,
            batch_size=a.batch_size,
            device=a.device,
            dataset=_predict_dataset(a),
        ),
    )


def _predict_dataset(a) -> str:
    """predict's --dataset, or what -i holds: PNG images (fives) or NIfTI volumes (acdc)."""
    if a.dataset is not None:
        return a.dataset
    path = a.input
    if path is None:
        return "acdc"
    if path.is_file():
        return "fives" if path.suffix.lower() == ".png" else "acdc"
    if path.is_dir() and not any(path.glob("*.nii.gz")) and any(q.suffix.lower() == ".png" for q in path.iterdir()):
        return "fives"
    return "acdc"


def _add_evaluate(sub):
    p = _parser(sub, "evaluate", "Dice, Jaccard, HD95, ASD per case and class, in peer and mm modes")
    _path(p, "--pred-dir", required=True, help="folder of <case>.nii.gz predictions (<case>.png with --dataset fives)")
    _path(p, "--gt-dir", required=True, help="folder of <case>_gt.nii.gz or <case>.nii.gz (fives: the release folder)")
    _path(p, "--out-dir", required=True, help="eval folder")
    _add_dataset(p, "acdc (NIfTI volumes, default) or fives: <case>.png masks against a FIVES-layout folder, "
                    "per image in pixels and stacked (the reference's mode)")  # fmt: skip
    p.set_defaults(
        target="sraseg.evaluate.run",
        kwargs=lambda a: dict(pred_dir=a.pred_dir, gt_dir=a.gt_dir, out_dir=a.out_dir, dataset=a.dataset),
    )


def _add_content(sub):
    p = _parser(sub, "content", "what the synthetic images contain: the labeled-only model segments them and "
                "as many held-out real slices", "content")  # fmt: skip
    _path(p, "--model", required=True, help="labeled-only train output: results/{ds}/{exp}/seed{N} or its model.safetensors")
    _path(p, "--synthetic-dir", "--synthetic", required=True, help="sample stage output folder")
    _path(p, "--prepared-dir", "--prepared", required=True, help="prepare output folder")
    _path(p, "--out-dir", required=True, help="content folder (content.json, content.parquet, content.png)")
    p.add_argument("--device", default=None, choices=_devices(),
                   help="overrides the settings' device (auto: CUDA when torch sees one)")  # fmt: skip
    _add_config(p)
    p.set_defaults(
        target="sraseg.evaluate.content",
        kwargs=lambda a: dict(
            model=a.model,
            synthetic_dir=a.synthetic_dir,
            prepared_dir=a.prepared_dir,
            out_dir=a.out_dir,
            settings=section_settings(a) | ({} if a.device is None else {"device": a.device}),
        ),
    )


def _report_settings(a) -> dict:
    merged = {}
    if a.config is not None:
        merged = {key: a.config[key] for key in ("experiments", "seeds") if key in a.config}
    return {**merged, **a.settings}


def _add_report(sub):
    p = _parser(sub, "report", "gather every experiment's summary into tables and figures")
    _path(p, "--results-dir", required=True, help="results/{ds}")
    _path(p, "--out-dir", required=True, help="report folder")
    p.add_argument("--config", type=_config_file, default=None, metavar="FILE", help="take experiments and seeds from it")
    p.add_argument("--settings", type=_settings, default={}, metavar="JSON", help="experiments and seeds as JSON")
    _add_dataset(p, "acdc (default) or fives: the image and stacked modes of `evaluate --dataset fives`")
    p.set_defaults(
        target="sraseg.report.run",
        kwargs=lambda a: dict(results_dir=a.results_dir, out_dir=a.out_dir, settings=_report_settings(a), dataset=a.dataset),
    )


def build_parser() -> argparse.ArgumentParser:
    from sraseg import __version__

    parser = argparse.ArgumentParser(
        prog="sraseg",
        description="SRA-Seg stages. Each subcommand reads files and writes files; Snakemake chains them. "
        "`sraseg STAGE --help` lists a stage's options and settings.",
    )
    parser.add_argument("--version", action="version", version=f"sraseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for add in (
        _add_phantom,
        _add_fives_phantom,
        _add_fives_splits,
        _add_prepare,
        _add_real_pool,
        _add_train_generator,
        _add_sample,
        _add_embed,
        _add_index,
        _add_fetch_weights,
        _add_blend,
        _add_train,
        _add_predict,
        _add_evaluate,
        _add_content,
        _add_report,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sraseg.io import setup_logging
    from sraseg.settings import ConfigProblems

    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [flag for dest, flag in args.required_args if getattr(args, dest) is None]
    if missing:
        print(f"sraseg {args.command}: error: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
    setup_logging(args.verbose)
    try:
        module = importlib.import_module(args.target)
        module.run(**args.kwargs(args))
    except ConfigProblems as err:
        for line in err.problems:  # one line per mistake in the config file
            print(f"sraseg {args.command}: config error: {line}", file=sys.stderr)
        return 1
    except Preempted as err:
        # 128 + signal number, the shell's code for a job ended by that signal; last.ckpt is on disk
        print(f"sraseg {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except SrasegError as err:
        # One line a person can act on; no traceback for problems in their input.
        message = " ".join(str(err).split("\n"))
        print(f"sraseg {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
