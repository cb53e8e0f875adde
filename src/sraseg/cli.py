"""The `sraseg` command line: one subcommand per stage. It only parses arguments and calls the
stage's `run(...)`; stage modules are imported lazily so `sraseg --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from sraseg.errors import SrasegError

log = logging.getLogger("sraseg")


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


def _add_phantom(sub):
    p = sub.add_parser("phantom", help="write the built-in cardiac cine-MRI phantom in ACDC layout")
    p.add_argument("--out", type=Path, required=True, help="output folder (patientXXX/ sub-folders)")
    p.add_argument("--patients", type=int, default=100, help="number of patients (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--phantom-version", type=int, default=None, help="generator version (default: the latest)")
    p.set_defaults(
        target="sraseg.data.phantom",
        kwargs=lambda a: dict(out_dir=a.out, patients=a.patients, seed=a.seed)
        | ({} if a.phantom_version is None else dict(version=a.phantom_version)),
    )


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="check an ACDC-layout dataset and cut it into normalised 2-D slices")
    p.add_argument("--raw-dir", type=Path, required=True, help="ACDC-layout folder (patientXXX/...)")
    p.add_argument("--splits-dir", type=Path, required=True, help="folder with train.txt, val.txt, test.txt")
    p.add_argument("--labeled", type=Path, required=True, help="file listing the labeled training patients")
    p.add_argument("--image-size", type=int, default=256, help="slice size after resizing (default 256)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(
        target="sraseg.data.prepare",
        kwargs=lambda a: dict(
            raw_dir=a.raw_dir, splits_dir=a.splits_dir, labeled_list=a.labeled, image_size=a.image_size, out_dir=a.out_dir
        ),
    )


def _add_train_generator(sub):
    p = sub.add_parser("train-generator", help="train the unconditional diffusion model on real training slices")
    p.add_argument("--prepared", type=Path, required=True, help="prepare stage output folder")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the generator settings")
    p.set_defaults(
        target="sraseg.generate.train",
        kwargs=lambda a: dict(prepared_dir=a.prepared, out_dir=a.out_dir, settings=a.settings),
    )


def _add_sample(sub):
    p = sub.add_parser("sample", help="sample synthetic slices from a trained generator")
    p.add_argument("--generator", type=Path, required=True, help="train-generator output folder")
    p.add_argument("--prepared", type=Path, required=True, help="prepare output (real slices for the preview)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the sampling settings")
    p.set_defaults(
        target="sraseg.generate.sample",
        kwargs=lambda a: dict(generator_dir=a.generator, prepared_dir=a.prepared, out_dir=a.out_dir, settings=a.settings),
    )


def _add_embed(sub):
    p = sub.add_parser("embed", help="embed real and synthetic slices with a frozen DINOv2 encoder")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--synthetic", type=Path, required=True, help="sample stage output folder")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the embed settings")
    p.set_defaults(
        target="sraseg.embed.run",
        kwargs=lambda a: dict(prepared_dir=a.prepared, synthetic_dir=a.synthetic, out_dir=a.out_dir, settings=a.settings),
    )


def _add_index(sub):
    p = sub.add_parser("index", help="FAISS index of real embeddings, nearest real neighbours, FD-DINOv2")
    p.add_argument("--embed-dir", type=Path, required=True, help="embed stage output folder")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="usually the embed folder itself")
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the index settings")
    p.set_defaults(
        target="sraseg.embed.index",
        kwargs=lambda a: dict(embed_dir=a.embed_dir, prepared_dir=a.prepared, out_dir=a.out_dir, settings=a.settings),
    )


def _add_fetch_weights(sub):
    p = sub.add_parser("fetch-weights", help="download DINOv2 weights to a file (on a machine with internet)")
    p.add_argument("--model", default="vit_small_patch14_dinov2.lvd142m", help="timm model tag")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors or .pth)")
    p.set_defaults(target="sraseg.embed.fetch", kwargs=lambda a: dict(model=a.model, out=a.out))


def _add_blend(sub):
    p = sub.add_parser("blend", help="materialise the soft-edge blend bank (blend maps + real pairings)")
    p.add_argument("--synthetic", type=Path, required=True)
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--neighbours", type=Path, required=True, help="neighbours.parquet from the index stage")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the blend settings")
    p.set_defaults(
        target="sraseg.blend.run",
        kwargs=lambda a: dict(
            synthetic_dir=a.synthetic, prepared_dir=a.prepared, neighbours=a.neighbours, out_dir=a.out_dir, settings=a.settings
        ),
    )


def _add_train(sub):
    p = sub.add_parser("train", help="train a segmentation U-Net with one of the methods")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True, help="results/{ds}/{exp}/seed{seed}")
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: the training settings")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--synthetic", type=Path, default=None, help="sample output (bcp_synthetic, sraseg)")
    p.add_argument("--embed-dir", type=Path, default=None, help="embed+index output (sraseg)")
    p.add_argument("--blend-dir", type=Path, default=None, help="blend bank (sraseg)")
    p.set_defaults(
        target="sraseg.train.loop",
        kwargs=lambda a: dict(
            prepared_dir=a.prepared,
            out_dir=a.out_dir,
            settings=a.settings,
            seed=a.seed,
            synthetic_dir=a.synthetic,
            embed_dir=a.embed_dir,
            blend_dir=a.blend_dir,
        ),
    )


def _add_predict(sub):
    p = sub.add_parser("predict", help="segment whole volumes slice by slice and write NIfTI predictions")
    p.add_argument("--model", type=Path, required=True, help="model.safetensors from the train stage")
    p.add_argument("--prepared", type=Path, required=True, help="prepare output (volumes.parquet)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out-dir", type=Path, required=True, help="predictions folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(
        target="sraseg.evaluate.predict",
        kwargs=lambda a: dict(
            model_path=a.model, prepared_dir=a.prepared, split=a.split, out_dir=a.out_dir, batch_size=a.batch_size
        ),
    )


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD per case and class, in peer and mm modes")
    p.add_argument("--pred-dir", type=Path, required=True, help="folder of <case>.nii.gz predictions")
    p.add_argument("--gt-dir", type=Path, required=True, help="folder of <case>_gt.nii.gz or <case>.nii.gz")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(
        target="sraseg.evaluate.run", kwargs=lambda a: dict(pred_dir=a.pred_dir, gt_dir=a.gt_dir, out_dir=a.out_dir)
    )


def _add_report(sub):
    p = sub.add_parser("report", help="gather every experiment's summary into tables and figures")
    p.add_argument("--results-dir", type=Path, required=True, help="results/{ds}")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="JSON object or file: experiments and seeds")
    p.set_defaults(
        target="sraseg.report.run", kwargs=lambda a: dict(results_dir=a.results_dir, out_dir=a.out_dir, settings=a.settings)
    )


def build_parser() -> argparse.ArgumentParser:
    from sraseg import __version__

    parser = argparse.ArgumentParser(
        prog="sraseg",
        description="SRA-Seg stages. Each subcommand reads files and writes files; Snakemake chains them.",
    )
    parser.add_argument("--version", action="version", version=f"sraseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for add in (
        _add_phantom,
        _add_prepare,
        _add_train_generator,
        _add_sample,
        _add_embed,
        _add_index,
        _add_fetch_weights,
        _add_blend,
        _add_train,
        _add_predict,
        _add_evaluate,
        _add_report,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sraseg.io import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        module = importlib.import_module(args.target)
        module.run(**args.kwargs(args))
    except SrasegError as err:
        # One line a person can act on; no traceback for problems in their input.
        message = " ".join(str(err).split("\n"))
        print(f"sraseg {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
