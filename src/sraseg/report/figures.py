"""Report figures (matplotlib, no display needed): training curves, prediction overlays (cardiac
contours; for a binary task such as FIVES, vessel pixels found, missed and added in three colours), real
versus synthetic slices, the generator's FD curve and how the pairing rules spread partners."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sraseg.io import load_array, read_table  # noqa: E402

__all__ = ["curve_data", "training_curves", "overlays", "ERROR_COLOURS", "error_overlay", "error_overlays",
           "real_vs_synthetic", "partner_use", "partner_use_figure"]  # fmt: skip

log = logging.getLogger(__name__)

CLASS_COLOURS = {1: "tab:red", 2: "tab:green", 3: "tab:blue"}  # RV, MYO, LV
# A binary prediction against its truth, RGB 0-255 (blue, vermillion, yellow: told apart with the common
# colour-vision deficiencies, and from a grey image)
ERROR_COLOURS = {"true positive": (40, 120, 255), "false negative (missed)": (230, 60, 0),
                 "false positive (added)": (255, 220, 0)}  # fmt: skip
# the longest side of an error-overlay panel; a larger image is shrunk (area average) to fit
PANEL_PIXELS = 512


def _val_dice_column(table: pd.DataFrame) -> str | None:
    for name in ("val_dice_mean", "val_dice"):
        if name in table.columns:
            return name
    candidates = [c for c in table.columns if c.startswith("val") and "mean" in c]
    return candidates[0] if candidates else None


def curve_data(
    results_dir: Path, experiments: dict, seeds: list[int]
) -> tuple[dict[str, pd.DataFrame], list[tuple[str, int, int]]]:
    """Validation curves on the global step axis (the `step` column of train_log.csv).

    Returns:
        curves: experiment -> rows sorted by step with columns step, phase, mean, low, high, seeds
            (mean, min and max of the validation Dice over the seeds logged at that step);
        phases: (name, first step, last step) of every phase seen, in order of first step.
    """
    curves, spans = {}, {}
    for name in experiments:
        tables = []
        for seed in seeds:
            log_path = results_dir / name / f"seed{seed}" / "train_log.csv"
            if not log_path.is_file():
                continue
            table = pd.read_csv(log_path)
            column = _val_dice_column(table)
            if column is None or not {"step", "phase", "iteration"} <= set(table.columns):
                log.warning("%s: no step, phase, iteration and validation Dice columns; left out of the curves",
                            log_path)
                continue
            # the switch guard's row repeats the teacher at the last pre-training step: not a point of the curve
            table = table[table["phase"] != "switch"].dropna(subset=[column]).drop_duplicates("step", keep="last")
            tables.append(table.assign(dice=table[column], seed=seed))
            for phase, rows in table.groupby("phase"):
                first, last = int((rows["step"] - rows["iteration"]).min()), int(rows["step"].max())
                old = spans.get(phase, (first, last))
                spans[phase] = (min(old[0], first), max(old[1], last))
        if tables:
            rows = pd.concat(tables).groupby(["step", "phase"], sort=False)["dice"]
            curves[name] = (
                rows.agg(mean="mean", low="min", high="max", seeds="count").reset_index().sort_values("step")
            )
    phases = sorted(((name, a, b) for name, (a, b) in spans.items()), key=lambda p: (p[1], p[2]))
    return curves, phases


def training_curves(results_dir: Path, experiments: dict, seeds: list[int], path: Path,
                    classes: tuple[str, ...] = ("RV", "MYO", "LV")) -> None:  # fmt: skip
    """Validation Dice against the global iteration, one line per experiment (mean over seeds, min-max band),
    broken at phase changes; phase boundaries drawn and named. `classes`: the foreground classes the
    validation Dice averages (named on the axis)."""
    curves, phases = curve_data(results_dir, experiments, seeds)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # phase spans: labeled_only's single "supervised" phase covers the whole axis, so name it only alone
    shown = [p for p in phases if p[0] != "supervised"] or phases
    for i, (phase, first, last) in enumerate(shown):
        if i % 2 == 0:
            ax.axvspan(first, last, color="0.93", zorder=0)
        if first > 0:
            ax.axvline(first, color="0.4", linestyle="--", linewidth=0.8, zorder=1)
        ax.text((first + last) / 2, 1.01, phase, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="0.3")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
    for colour, (name, table) in zip(colours, curves.items()):
        for j, (_, part) in enumerate(table.groupby("phase", sort=False)):
            ax.plot(part["step"], part["mean"], color=colour, marker=".", markersize=3, linewidth=1.2,
                    label=name if j == 0 else None)
            if part["seeds"].max() > 1:
                ax.fill_between(part["step"], part["low"], part["high"], color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel("iteration (all phases)")
    ax.set_ylabel(f"validation Dice (mean of {', '.join(classes)})" if len(classes) > 1 else
                  f"validation Dice ({classes[0]})")  # fmt: skip
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _contours(ax, labels: np.ndarray, style: str) -> None:
    for value, colour in CLASS_COLOURS.items():
        mask = (labels == value).astype(float)
        if mask.any():
            ax.contour(mask.T, levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)


def overlays(results_dir: Path, experiments: dict, seed: int, path: Path, n_cases: int = 3) -> None:
    """Mid-ventricular test slices: ground truth dashed, each experiment's prediction solid."""
    volumes = read_table(results_dir / "prepared" / "volumes.parquet", ("case", "split", "image_path", "gt_path"))
    cases = volumes[volumes["split"] == "test"].head(n_cases)
    names = list(experiments)
    fig, axes = plt.subplots(len(cases), len(names), figsize=(2.6 * len(names), 2.6 * len(cases)), squeeze=False)
    for row, (_, case) in enumerate(cases.iterrows()):
        image = np.asanyarray(nib.load(case["image_path"]).dataobj, dtype=np.float32)
        truth = np.asanyarray(nib.load(case["gt_path"]).dataobj).astype(np.uint8)
        z = image.shape[2] // 2
        for col, name in enumerate(names):
            ax = axes[row, col]
            ax.imshow(image[:, :, z].T, cmap="gray")
            _contours(ax, truth[:, :, z], "dashed")
            prediction_path = results_dir / name / f"seed{seed}" / "predictions" / f"{case['case']}.nii.gz"
            if prediction_path.is_file():
                prediction = np.asanyarray(nib.load(prediction_path).dataobj).astype(np.uint8)
                _contours(ax, prediction[:, :, z], "solid")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{case['case']} z={z}", fontsize=8)
    fig.suptitle("test slices: truth dashed, prediction solid (RV red, MYO green, LV blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def error_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray | None) -> np.ndarray:
    """A grey image with a binary prediction's pixels coloured by `ERROR_COLOURS`.

    Args:
        image: float [H,W] in [0,1]; truth, prediction: bool [H,W] (prediction None: the image alone).

    Returns:
        uint8 [H,W,3]: true positives, false negatives and false positives in their colours, the grey
        image elsewhere.
    """
    grey = np.clip(np.asarray(image, dtype=np.float32) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if prediction is not None:
        truth, prediction = np.asarray(truth, bool), np.asarray(prediction, bool)
        for mask, colour in zip((truth & prediction, truth & ~prediction, ~truth & prediction), ERROR_COLOURS.values()):
            rgb[mask] = colour
    return rgb


def _fit_panel(rgb: np.ndarray) -> np.ndarray:
    """`rgb` shrunk (area average) so its longer side is at most PANEL_PIXELS; unchanged when it is."""
    from PIL import Image

    scale = PANEL_PIXELS / max(rgb.shape[:2])
    if scale >= 1:
        return rgb
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def error_overlays(cases: list[tuple], names: list[str], path: Path) -> None:
    """Test images (columns) under each experiment's binary prediction (rows), pixels coloured by
    `error_overlay`, each panel with its Dice; the first row is the image alone.

    Args:
        cases: [(title, image float [H,W] in [0,1], truth bool [H,W], {name: prediction bool [H,W] or None})]
            (a dataset's `overlay_cases`).
        names: the experiments, one row each, in order.
    """
    from matplotlib.patches import Patch

    rows = ["image", *names]
    fig, axes = plt.subplots(len(rows), max(1, len(cases)), figsize=(2.7 * max(1, len(cases)), 2.7 * len(rows) + 0.5),
                             squeeze=False)  # fmt: skip
    for col, (title, image, truth, predictions) in enumerate(cases):
        for row, name in enumerate(rows):
            ax = axes[row, col]
            prediction = None if row == 0 else predictions.get(name)
            ax.imshow(_fit_panel(error_overlay(image, truth, prediction)), interpolation="nearest")
            if row == 0:
                ax.set_title(title, fontsize=8)
            elif prediction is None:
                ax.set_xlabel("no prediction", fontsize=7)
            else:
                overlap = 2 * int((truth & prediction).sum())
                total = int(truth.sum()) + int(prediction.sum())
                ax.set_xlabel(f"Dice {overlap / total:.3f}" if total else "Dice n/a (both empty)", fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(facecolor=np.array(c) / 255, label=label) for label, c in ERROR_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (2.7 * len(rows) + 0.5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def real_vs_synthetic(results_dir: Path, path: Path, n: int = 8, seed: int = 0, transpose: bool = True) -> None:
    """A row of real training slices above a row of synthetic ones, picked at random; `transpose`: show
    each [S,S] array transposed (ACDC's slices are [X,Y]; FIVES images rows x cols are shown as stored)."""
    rng = np.random.default_rng(seed)
    slices = read_table(results_dir / "prepared" / "slices.parquet", ("slice_id", "split"))
    real = load_array(results_dir / "prepared" / "images.npy")
    synthetic = load_array(results_dir / "synthetic" / "images.npy")
    train_ids = slices.loc[slices["split"] == "train", "slice_id"].to_numpy()
    picks = [
        ("real", real, rng.choice(train_ids, size=min(n, len(train_ids)), replace=False)),
        ("synthetic", synthetic, rng.choice(len(synthetic), size=min(n, len(synthetic)), replace=False)),
    ]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for row, (label, images, ids) in enumerate(picks):
        for col in range(n):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(ids):
                picture = np.asarray(images[ids[col]])
                ax.imshow(picture.T if transpose else picture, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generator_fd_curve(fd_log: Path, path: Path) -> None:
    """The generator's FD ratio (fixed small sample vs real, over the real-vs-real floor) against steps."""
    from matplotlib.figure import Figure

    from sraseg.generate.probe import read_fd_log

    rows = read_fd_log(fd_log)
    if not rows:
        return
    fig = Figure(figsize=(5, 3.2), dpi=120)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["fd_ratio"] for r in rows], marker="o", ms=3)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="real vs real (floor)")
    ax.set_xlabel("generator step")
    ax.set_ylabel("FD / real floor")
    ax.set_title("synthetic sample vs real train slices (stand-in encoder)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def partner_use(blend_dirs: dict[str, Path]) -> dict[str, dict]:
    """Per pairing rule (the first experiment using it): how often each labeled slice is a partner.

    Returns rule -> {"experiment", "counts" (int array over all labeled slices, unused ones as 0,
    sorted descending), "cap" (balanced's use limit or None)}.
    """
    from sraseg.io import read_json

    out = {}
    for name, folder in blend_dirs.items():
        info = read_json(folder / "blend.json")
        rule = info["settings"]["pairing"]
        if rule in out:
            continue
        pairs = read_table(folder / "pairs.parquet")
        counts = np.sort(pairs["real_id"].value_counts().to_numpy())[::-1]
        counts = np.concatenate([counts, np.zeros(max(0, info["n_labeled_slices"] - len(counts)), dtype=counts.dtype)])
        out[rule] = {"experiment": name, "counts": counts, "cap": info.get("cap")}
    return out


def partner_use_figure(blend_dirs: dict[str, Path], path: Path) -> None:
    """Blend maps per labeled real slice, slices ranked by use, one line per pairing rule (hubness)."""
    use = partner_use(blend_dirs)
    if not use:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    for rule, entry in use.items():
        counts = entry["counts"]
        share = 100 * counts[0] / max(1, counts.sum())
        label = f"{rule}: {int((counts > 0).sum())}/{len(counts)} slices used, top {share:.0f}%"
        ax.step(np.arange(1, len(counts) + 1), counts, where="mid", label=label)
        if entry["cap"]:
            ax.axhline(entry["cap"], color="grey", lw=0.8, ls=":")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("labeled real slice, ranked by use")
    ax.set_ylabel("blend maps pairing with it")
    ax.set_title("real partners of the synthetic images (dotted: balanced's cap)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
