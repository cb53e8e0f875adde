"""What a teacher puts in its pseudo-labels, per class, on real unlabeled slices and on synthetic images
(issues 31 and 33: where does a synthetic image teach less than a real one?).

The teacher labels images the way self-training does (`train.teacher_mode`, batches of
`train.unlabeled_batch`... here 8, argmax, then each class's largest blob per slice). Real unlabeled
training slices carry a ground truth the training never reads, so their pseudo-labels can be scored:

- `gt_presence`, `pl_presence`: share of slices whose ground truth / pseudo-label holds the class;
- `pl_on_absent`: share of the slices WITHOUT the class whose pseudo-label still has it (a hallucinated
  class: what self-training then teaches the student to draw where there is nothing);
- `pl_missed`: share of the slices with the class whose pseudo-label lacks it;
- `pixel_dice`: Dice of the pseudo-labels against the ground truth over all probed slices;
- `conf`: mean teacher top probability on the pixels it gives the class;
- `syn_presence`, `syn_area_%`, `syn_conf`: the same teacher on synthetic images (no ground truth).

Run from the repository root with the venv on PATH, e.g. on the demo's teacher at the switch and its
final student:

    python benchmarks/pseudo_label_probe.py results/phantom/labeled_only/seed1337 \
        --prepared-dir results/phantom/prepared --synthetic-dir results/phantom/synthetic
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from sraseg.errors import SrasegError
from sraseg.evaluate.predict import model_weights
from sraseg.train.teacher import largest_components, teacher_logits
from sraseg.train.unet import load_model

BATCH = 8  # the demo's and the benchmark's unlabeled batch: train-mode BatchNorm sees this many images


def label_images(model: torch.nn.Module, images: np.ndarray, num_classes: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels (argmax, largest blob per class) and the top probability per pixel, in batches."""
    labels, confidence = [], []
    for start in range(0, len(images), BATCH):
        x = torch.from_numpy(np.array(images[start : start + BATCH], np.float32))[:, None]
        torch.manual_seed(start)  # train mode draws dropout: one fixed draw per batch
        logits = teacher_logits(model, x, mode).float()
        labels.append(largest_components(logits.argmax(1), num_classes).numpy())
        confidence.append(logits.softmax(1).amax(1).numpy())
    return np.concatenate(labels), np.concatenate(confidence)


def pseudo_label_table(pl: np.ndarray, conf: np.ndarray, gt: np.ndarray, names: list[str],
                       syn_pl: np.ndarray | None = None, syn_conf: np.ndarray | None = None) -> pd.DataFrame:
    """Per class (1..len(names)): how the pseudo-labels `pl` [N,H,W] of real slices compare with their ground
    truth `gt`, the teacher's confidence `conf` on them, and, given synthetic pseudo-labels, their
    presence, area and confidence; a last row for the slices with no foreground at all."""
    rows = {}
    for c, name in enumerate(names, start=1):
        has_gt, has_pl = (gt == c).any((1, 2)), (pl == c).any((1, 2))
        row = dict(
            gt_presence=has_gt.mean(), pl_presence=has_pl.mean(),
            pl_on_absent=(has_pl & ~has_gt).sum() / max((~has_gt).sum(), 1),
            pl_missed=(~has_pl & has_gt).sum() / max(has_gt.sum(), 1),
            pixel_dice=2 * ((pl == c) & (gt == c)).sum() / max((pl == c).sum() + (gt == c).sum(), 1),
            conf=conf[pl == c].mean() if (pl == c).any() else np.nan,
        )  # fmt: skip
        if syn_pl is not None:
            row.update(syn_presence=(syn_pl == c).any((1, 2)).mean(), **{"syn_area_%": (syn_pl == c).mean() * 100},
                       syn_conf=syn_conf[syn_pl == c].mean() if (syn_pl == c).any() else np.nan)
        rows[name] = row
    empty = ~(gt > 0).any((1, 2))  # slices outside the heart
    rows["no foreground"] = dict(gt_presence=empty.mean(), pl_on_absent=(pl[empty] > 0).any((1, 2)).mean())
    return pd.DataFrame(rows).T


def probe(model_dir: str, prepared_dir: str, synthetic_dir: str | None, mode: str, n: int, seed: int = 0) -> pd.DataFrame:
    model, meta = load_model(model_weights(model_dir))
    num_classes = int(meta.get("num_classes", 4))
    names = meta.get("class_names") or ["RV", "MYO", "LV"][: num_classes - 1]
    slices = pd.read_parquet(f"{prepared_dir}/slices.parquet")
    pool = slices[(slices.split == "train") & ~slices.labeled].slice_id.to_numpy()
    pool = np.sort(np.random.default_rng(seed).permutation(pool)[:n])
    images = np.load(f"{prepared_dir}/images.npy", mmap_mode="r")
    gt = np.asarray(np.load(f"{prepared_dir}/labels.npy", mmap_mode="r")[pool])
    pl, conf = label_images(model, images[pool], num_classes, mode)
    syn_pl = syn_conf = None
    if synthetic_dir:
        syn_pl, syn_conf = label_images(model, np.load(f"{synthetic_dir}/images.npy")[:n], num_classes, mode)
    return pseudo_label_table(pl, conf, gt, names, syn_pl, syn_conf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="train-stage run folders (or their model.safetensors)")
    parser.add_argument("--prepared-dir", required=True)
    parser.add_argument("--synthetic-dir", help="a sample-stage folder (images.npy)")
    parser.add_argument("--mode", choices=("train", "eval"), default="train", help="teacher mode (train.teacher_mode)")
    parser.add_argument("-n", type=int, default=400, help="real unlabeled slices and synthetic images probed")
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    for model in args.models:
        print(f"\n{model} (teacher mode {args.mode}, {args.n} real unlabeled slices and synthetic images)")
        try:
            table = probe(model, args.prepared_dir, args.synthetic_dir, args.mode, args.n)
        except (SrasegError, OSError) as err:  # a missing model or prepared file: one line, exit 1
            raise SystemExit(f"pseudo_label_probe: {err}") from None
        print(table.round(3).to_string())


if __name__ == "__main__":
    main()
