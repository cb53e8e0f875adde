"""Prepare, predict and evaluate on FIVES-sized files: wall time and peak memory of each stage.

The real FIVES release holds 800 RGB fundus photographs of 2048 x 2048 pixels with binary vessel masks.
This script writes the fundus phantom at that size (or reads a FIVES-layout folder given with
--raw-dir, the real release included), then runs each stage as the workflow does, in its own process,
so that the peak resident memory (ru_maxrss of that process, from os.wait4) is the stage's alone:

  prepare   `sraseg prepare --dataset fives` at --image-size (256, config/fives.yaml's) on every image;
  predict   `sraseg predict --dataset fives -i <test/Original>` with a small labeled-only model trained
            here for a few iterations (the model's accuracy does not matter, only the image size); every
            written mask is checked to be a grey PNG of the input's size holding only 0 and 255;
  evaluate  `sraseg evaluate --dataset fives` of those masks against test/Ground truth (per image and
            the stacked mode, which scores every test image as one volume). A model of a few iterations
            may find no vessel, and an empty prediction skips the distance transforms, so
  evaluate_vessels scores the ground truth moved by 3 pixels instead: what evaluate costs on a trained
            model's predictions (its peak sets the workflow's memory request).

Each stage runs twice, on all its images and on half of them, so that the time and memory an image adds
are measured (slope = difference / difference in images; a slope below zero, noise, is taken as 0), and
the stage is extrapolated to the full release (prepare 800 images, predict and evaluate 200 test
images): value(N) = value(measured) + slope x (N - measured images). The table is printed and written
to OUT/fives_real_size.json and OUT/fives_real_size.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fives_real_size.py --out-dir /tmp/fives_real_size
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fives_real_size.py --out-dir /tmp/q --size 128 --train 8 --test 4
    .venv/bin/python benchmarks/fives_real_size.py --out-dir /tmp/r --raw-dir FIVES   # the real release
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if importlib.util.find_spec("sraseg") is None:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL_RELEASE = {"prepare": 800, "predict": 200, "evaluate": 200, "evaluate_vessels": 200}  # images each stage reads in the release
TRAIN_SETTINGS = dict(method="labeled_only", pretrain_iterations=4, selftrain_iterations=0, labeled_batch=2,
                      val_every=4, checkpoint_every=4, val_batch=4, num_classes=2, device="cpu")  # fmt: skip


def sraseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "sraseg", *args]


def measured(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd` as its own process; its wall time (s) and peak resident memory (MB, ru_maxrss).

    Raises:
        SystemExit: the command failed (its log is named).
    """
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed (exit {process.returncode}); see {log_path}")
    return dict(wall_s=wall, peak_mb=usage.ru_maxrss / 1024)  # ru_maxrss is in KiB on Linux


def _write_lists(folder: Path, lists: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in lists.items():
        (folder / f"{name}.txt").write_text("".join(f"{case}\n" for case in ids))


def split_lists(raw: Path, work: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split lists of every image (train: all but one per condition, one of them labeled per condition;
    val: the rest of release-train; test: release-test) and of half as many, written to work/splits and
    work/splits_half. Returns (lists, half lists)."""
    from sraseg.data.fives import list_release, parse_case
    from sraseg.data.fives_splits import protocol_splits

    records, problems = list_release(raw)
    if problems:
        raise SystemExit(f"{raw}: {problems[0]}")
    per_condition = {}
    for case in records:
        split, _, condition = parse_case(case)
        if split == "train":
            per_condition[condition] = per_condition.get(condition, 0) + 1
    if len(per_condition) < 4 or min(per_condition.values()) < 2:
        raise SystemExit(f"{raw}: needs at least 2 release-train images of each condition A, D, G, N")
    lists = protocol_splits(list(records), min(per_condition.values()) - 1, (1,), seed=0)
    lists["labeled"] = lists.pop(next(name for name in lists if name.startswith("labeled_")))
    half = {name: lists[name][: max(1, len(lists[name]) // 2)] for name in ("val", "test")}
    unlabeled = [case for case in lists["train"] if case not in lists["labeled"]]
    half["train"] = lists["labeled"] + unlabeled[: max(0, len(lists["train"]) // 2 - len(lists["labeled"]))]
    half["labeled"] = lists["labeled"]
    _write_lists(work / "splits", lists)
    _write_lists(work / "splits_half", half)
    return lists, half


def _linked(files: list[Path], folder: Path) -> Path:
    """A folder of links to `files` (a subset of a folder, without copying 2048 px images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
    return folder


def check_masks(inputs: list[Path], pred_dir: Path) -> dict:
    """Every input has a written mask of its own size, grey, holding only 0 and 255.

    Raises:
        SystemExit: naming the first mask that is missing or wrong.
    """
    sizes = set()
    vessel = 0.0
    for src in inputs:
        pred = pred_dir / src.name
        if not pred.is_file():
            raise SystemExit(f"{pred}: no mask written for {src}")
        with Image.open(src) as image, Image.open(pred) as mask:
            values = set(np.unique(np.asarray(mask)).tolist())
            if mask.size != image.size or mask.mode != "L" or not values <= {0, 255}:
                raise SystemExit(f"{pred}: mask {mask.size} mode {mask.mode} values {sorted(values)[:5]}; "
                                 f"expected {image.size}, L, 0 and 255")  # fmt: skip
            sizes.add(mask.size)
            vessel += float(np.mean(np.asarray(mask) == 255))
    return dict(masks=len(inputs), mask_sizes=sorted(f"{w} x {h}" for w, h in sizes), binary=True,
                mean_vessel_fraction=vessel / len(inputs))  # fmt: skip


def extrapolated(stage: str, runs: dict) -> dict:
    """Time and peak at the full release's image count from the two runs (see the module docstring)."""
    full, half = runs["all"], runs["half"]
    extra = full["images"] - half["images"]
    out = dict(images=FULL_RELEASE[stage])
    for key in ("wall_s", "peak_mb"):
        slope = max(0.0, (full[key] - half[key]) / extra) if extra else 0.0
        out[f"{key}_per_image"] = slope
        out[key] = full[key] + slope * (FULL_RELEASE[stage] - full["images"])
    return out


def prepare_runs(raw: Path, work: Path, image_size: int, lists: dict, half: dict) -> dict:
    runs = {}
    for name, chosen in (("all", lists), ("half", half)):
        folder = "splits" if name == "all" else "splits_half"
        cmd = sraseg("prepare", "--dataset", "fives", "--raw-dir", str(raw), "--splits-dir", str(work / folder),
                     "--labeled", str(work / folder / "labeled.txt"), "--image-size", str(image_size),
                     "--out-dir", str(work / f"prepared_{name}"))  # fmt: skip
        runs[name] = dict(images=sum(len(chosen[s]) for s in ("train", "val", "test")),
                          **measured(cmd, work / f"prepare_{name}.log"))  # fmt: skip
    return runs


def shifted_truth(gt_paths: list[Path], folder: Path, shift: int = 3) -> Path:
    """The ground-truth masks moved `shift` pixels down and right: predictions with vessels everywhere a
    trained model's would be, so evaluate computes every distance (an empty prediction skips them)."""
    from sraseg.data.fives import read_mask
    from sraseg.datasets.fives import write_mask

    folder.mkdir(parents=True, exist_ok=True)
    for path in gt_paths:
        write_mask(folder / path.name, np.roll(read_mask(path), (shift, shift), axis=(0, 1)))
    return folder


def run_stages(raw: Path, work: Path, image_size: int) -> dict:
    lists, half = split_lists(raw, work)
    stages = {"prepare": prepare_runs(raw, work, image_size, lists, half)}
    train = measured(sraseg("train", "--prepared-dir", str(work / "prepared_all"), "--out-dir", str(work / "model"),
                            "--seed", "1", "--settings", json.dumps(TRAIN_SETTINGS)), work / "train.log")  # fmt: skip
    test_images = sorted((raw / "test" / "Original").glob("*.png"))
    half_images = test_images[: max(1, len(test_images) // 2)]
    inputs = {"all": raw / "test" / "Original", "half": _linked(half_images, work / "test_half")}
    gt_dir = raw / "test" / "Ground truth"
    stages.update(predict={}, evaluate={}, evaluate_vessels={})
    for name, images in (("all", test_images), ("half", half_images)):
        pred_dir = work / f"predictions_{name}"
        cmd = sraseg("predict", "--dataset", "fives", "-i", str(inputs[name]), "-o", str(pred_dir),
                     "-m", str(work / "model"), "--device", "cpu")  # fmt: skip
        stages["predict"][name] = dict(images=len(images), **measured(cmd, work / f"predict_{name}.log"),
                                       **check_masks(images, pred_dir))  # fmt: skip
        vessels = shifted_truth([gt_dir / p.name for p in images], work / f"vessels_{name}")
        for stage, masks in (("evaluate", pred_dir), ("evaluate_vessels", vessels)):
            cmd = sraseg("evaluate", "--dataset", "fives", "--pred-dir", str(masks), "--gt-dir", str(gt_dir),
                         "--out-dir", str(work / f"{stage}_{name}"))  # fmt: skip
            stages[stage][name] = dict(images=len(images), **measured(cmd, work / f"{stage}_{name}.log"))
    for stage in FULL_RELEASE:
        stages[stage]["full_release"] = extrapolated(stage, stages[stage])
    return dict(train=train, stages=stages)


def table(result: dict) -> str:
    lines = ["| stage | images | wall (s) | peak RSS (MB) | per image: s, MB | full release: images, wall (s), peak (MB) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in FULL_RELEASE:
        runs = result["stages"][stage]
        full = runs["full_release"]
        for name in ("all", "half"):
            run = runs[name]
            per = f"{full['wall_s_per_image']:.2f}, {full['peak_mb_per_image']:.1f}" if name == "all" else ""
            ext = f"{full['images']}, {full['wall_s']:.0f}, {full['peak_mb']:.0f}" if name == "all" else ""
            lines.append(f"| {stage} | {run['images']} | {run['wall_s']:.1f} | {run['peak_mb']:.0f} | {per} | {ext} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="work folder; the table goes here")
    p.add_argument("--raw-dir", type=Path, help="an existing FIVES-layout folder (default: write the phantom)")
    p.add_argument("--size", type=int, default=2048, help="phantom image side (default 2048, the release's)")
    p.add_argument("--train", type=int, default=24, help="phantom release-train images (default 24)")
    p.add_argument("--test", type=int, default=8, help="phantom release-test images (default 8)")
    p.add_argument("--image-size", type=int, default=256, help="prepare's side (default 256, config/fives.yaml)")
    args = p.parse_args(argv)
    work = args.out_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    phantom = None
    raw = args.raw_dir.resolve() if args.raw_dir else work / "raw"
    if args.raw_dir is None:
        cmd = sraseg("fives-phantom", "--out-dir", str(raw), "--train", str(args.train), "--test", str(args.test),
                     "--size", str(args.size))  # fmt: skip
        phantom = dict(images=args.train + args.test, **measured(cmd, work / "phantom.log"))
    result = dict(
        command=" ".join(["benchmarks/fives_real_size.py", *(argv if argv is not None else sys.argv[1:])]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        raw_dir=str(raw), image_size=args.image_size, phantom=phantom, full_release_counts=FULL_RELEASE,
        **run_stages(raw, work, args.image_size),
    )  # fmt: skip
    text = table(result)
    (work / "fives_real_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (work / "fives_real_size.md").write_text(f"{result['command']}\n{result['date']}, {result['machine']}\n\n{text}\n")
    print(text)
    print(f"wrote {work / 'fives_real_size.json'} and {work / 'fives_real_size.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
