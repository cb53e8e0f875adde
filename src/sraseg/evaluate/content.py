"""The content stage: what the synthetic images contain, as a segmenter sees them.

The Fréchet distance says how far the synthetic set is from the real one in an encoder's feature
space, not whether the images hold a heart (or vessels). Here the workflow's `labeled_only` U-Net (it
never saw a synthetic image nor an unlabeled real one) segments (a) the synthetic images and (b) a
held-out real set of the same size: unlabeled train slices, drawn without replacement with a fixed
seed. Per foreground class (1 RV, 2 MYO, 3 LV for the cardiac models; 1 vessel for FIVES, named by
prepare.json's `classes`):

- presence rate: the fraction of images whose predicted class covers at least `MIN_AREA` of the image;
- the area fraction of each image, its mean, and the 1-D Wasserstein distance (W1) between the
  synthetic and the real area distributions;
- `presence_gap` = presence_synthetic - presence_real, and `area_w1`;
- a floor: the same two numbers between two patient-disjoint halves of the held-out real set (what
  "as close as real data is to itself" looks like; the floor's presence gap is a magnitude, since
  the order of two real halves means nothing).

Plus a quick intensity check: the mean intensity and the mean per-slice minimum of both sets (real
slices are mostly black background, minimum about 0.01; a broken generator gives mid-grey samples).

A stage of its own rather than part of the index stage's index.json: there it would make the index,
the blend bank and every SRA-Seg training wait for, and rerun with, the labeled-only training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sraseg.errors import DatasetError
from sraseg.io import load_array, portable_path, read_json, read_table, staged_outputs, write_json
from sraseg.metrics import CLASS_NAMES
from sraseg.settings import parse_settings, settings_dict

__all__ = [
    "ContentSettings",
    "MIN_AREA",
    "class_names",
    "prepared_class_names",
    "area_fractions",
    "compare_areas",
    "content_stats",
    "floor_stats",
    "intensity_stats",
    "segment_images",
    "plot_content",
    "run",
]

log = logging.getLogger(__name__)

# A class counts as present in an image when its predicted pixels cover at least this fraction of the
# image (0.1 %: 66 px of a 256 x 256 slice, 4 px at 64 px, 2 px at 32 px). It keeps a few stray
# pixels from counting as an organ; ACDC's smallest apical structures are well above it.
MIN_AREA = 0.001
# The synthetic set's mean per-slice minimum this far above the real one is flagged as grey background.
GREY_MARGIN = 0.1

_SAMPLE_HINT = "run the sample stage first"
_PREPARE_HINT = "run the prepare stage first"


@dataclass
class ContentSettings:
    """Settings of the content stage (config section `content`).

    Args:
        n_images (`int | None`, None): synthetic images segmented (the first n); None = all of them. The
            held-out real set has as many images, or every unlabeled train slice when there are fewer.
        seed (`int`, 0): seed of the held-out real draw and of the floor's patient-disjoint halves.
        batch_size (`int`, 32): images per forward pass.
        device (`str`, "auto"): "auto" (CUDA when present), "cpu" or "cuda"; the model runs in fp32.
    """

    n_images: int | None = None
    seed: int = 0
    batch_size: int = 32
    device: str = "auto"


def class_names(num_classes: int) -> list[str]:
    """Names of the foreground classes 1..num_classes-1: RV, MYO, LV for the cardiac labels, else class<k>."""
    return [CLASS_NAMES.get(c, f"class{c}") if num_classes == 4 else f"class{c}" for c in range(1, num_classes)]


def prepared_class_names(prepared_dir: Path, num_classes: int) -> list[str]:
    """The foreground class names prepare.json lists (`classes`, background first: FIVES's vessel) when
    they fit the model's class count, else `class_names(num_classes)` (ACDC's prepare.json lists none)."""
    path = Path(prepared_dir) / "prepare.json"
    listed = read_json(path).get("classes") if path.is_file() else None
    if isinstance(listed, list) and len(listed) == num_classes:
        return [str(name) for name in listed[1:]]
    return class_names(num_classes)


def area_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The fraction of each image covered by each foreground class.

    Args:
        labels: integer label maps [N,H,W] (0 background).
        num_classes: classes including background.

    Returns:
        float64 [N, num_classes-1]; column k-1 is class k.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected label maps [N,H,W]; got shape {labels.shape}")
    pixels = labels.shape[1] * labels.shape[2]
    flat = labels.reshape(len(labels), -1)
    return np.stack([(flat == c).sum(axis=1) / pixels for c in range(1, num_classes)], axis=1).astype(np.float64)


def compare_areas(real: np.ndarray, synthetic: np.ndarray, names: list[str], min_area: float = MIN_AREA) -> dict:
    """Per-class presence rates and area distributions of two sets of images.

    Args:
        real: area fractions [Nr,K] of the real images (one column per foreground class).
        synthetic: area fractions [Ns,K] of the synthetic images.
        names: the K class names.
        min_area: a class is present in an image when its area fraction is >= min_area.

    Returns:
        class name -> {presence_real, presence_synthetic, presence_gap (synthetic - real),
        area_mean_real, area_mean_synthetic, area_w1 (1-D Wasserstein distance of the area fractions)}.

    Raises:
        ValueError: an empty set, or column counts that differ from `names`.
    """
    from scipy.stats import wasserstein_distance

    real, synthetic = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    for what, table in (("real", real), ("synthetic", synthetic)):
        if table.ndim != 2 or table.shape[1] != len(names) or not len(table):
            raise ValueError(f"{what} areas: expected a non-empty [N,{len(names)}] table; got shape {table.shape}")
    out = {}
    for k, name in enumerate(names):
        p_real = float((real[:, k] >= min_area).mean())
        p_syn = float((synthetic[:, k] >= min_area).mean())
        out[name] = {
            "presence_real": p_real,
            "presence_synthetic": p_syn,
            "presence_gap": p_syn - p_real,
            "area_mean_real": float(real[:, k].mean()),
            "area_mean_synthetic": float(synthetic[:, k].mean()),
            "area_w1": float(wasserstein_distance(real[:, k], synthetic[:, k])),
        }
    return out


def content_stats(real_labels: np.ndarray, synthetic_labels: np.ndarray, num_classes: int,
                  min_area: float = MIN_AREA) -> dict:  # fmt: skip
    """`compare_areas` of two label stacks [N,H,W], classes named by `class_names(num_classes)`."""
    names = class_names(num_classes)
    return compare_areas(area_fractions(real_labels, num_classes), area_fractions(synthetic_labels, num_classes),
                         names, min_area)  # fmt: skip


def floor_stats(real: np.ndarray, patients: np.ndarray, names: list[str], seed: int = 0,
                min_area: float = MIN_AREA) -> dict | None:  # fmt: skip
    """The presence gap and area W1 between two patient-disjoint halves of a real set: the floor.

    Args:
        real: area fractions [N,K] of the real images.
        patients: [N] patient of each image.
        names: the K class names.
        seed: seed of the split into halves (`sraseg.embed.frechet.patient_halves`).

    Returns:
        {"sizes": [n_a, n_b], "patients": [patients in A, in B], "per_class": name -> {presence_gap
        (|presence_A - presence_B|), area_w1}}, or None when the set holds fewer than two patients.
    """
    from sraseg.embed.frechet import patient_halves

    patients = np.asarray(patients).astype(str)
    try:
        half_a = patient_halves(patients, seed)
    except ValueError:
        return None
    stats = compare_areas(real[half_a], real[~half_a], names, min_area)
    return {
        "sizes": [int(half_a.sum()), int((~half_a).sum())],
        "patients": [int(len(set(patients[half_a]))), int(len(set(patients[~half_a])))],
        "per_class": {name: {"presence_gap": abs(s["presence_gap"]), "area_w1": s["area_w1"]}
                      for name, s in stats.items()},  # fmt: skip
    }


def intensity_stats(images: np.ndarray) -> dict:
    """Mean intensity and mean per-slice minimum of images [N,H,W] (real slices: minimum about 0.01)."""
    images = np.asarray(images, dtype=np.float64)
    return {"mean": float(images.mean()), "mean_min": float(images.min(axis=(1, 2)).mean())}


def segment_images(model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu",
                   batch_size: int = 32) -> np.ndarray:  # fmt: skip
    """Segment 2-D slices at the size the model was trained on, in fp32.

    Args:
        model: maps float32 [B,1,S,S] to logits [B,C,S,S]; on `device`, in eval mode.
        images: float32 [N,S,S] in [0,1] (prepared slices or synthetic images).
        device: where the model runs.
        batch_size: images per forward pass.

    Returns:
        uint8 [N,S,S], the argmax of the logits.
    """
    device = torch.device(device)
    out = np.empty(images.shape, dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = np.array(images[start : start + batch_size], dtype=np.float32)  # a writable copy for torch
            logits = model(torch.from_numpy(chunk)[:, None].to(device)).float()
            out[start : start + len(chunk)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return out


def _synthetic_images(synthetic_dir: Path, n_images: int | None) -> np.ndarray:
    """The first `n_images` synthetic images (all when None) as float32 [N,S,S], checked finite.

    Raises:
        DatasetError: missing file, not [N,S,S], or NaN/inf pixels (names the file).
    """
    path = synthetic_dir / "images.npy"
    images = load_array(path, _SAMPLE_HINT)
    if images.ndim != 3 or not len(images) or images.shape[1] != images.shape[2]:
        raise DatasetError(f"{path}: expected synthetic images [N,S,S]; got shape {images.shape}")
    images = np.asarray(images[: n_images or len(images)], dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(images).all(axis=(1, 2)))
    if bad.size:
        raise DatasetError(f"{path}: {bad.size} image(s) hold NaN/inf pixels (first image {bad[0]}); resample them")
    return images


def _held_out_real(prepared_dir: Path, n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, str]:
    """`n` (at most) real slices the labeled-only model never trained on, drawn without replacement.

    Unlabeled train slices; when there are none (every train patient labeled), val slices.

    Returns:
        (float32 images [n,S,S], their rows of slices.parquet sorted by slice_id, "unlabeled_train" or "val").

    Raises:
        DatasetError: missing or inconsistent prepared files, no slice to draw from.
    """
    table_path = prepared_dir / "slices.parquet"
    slices = read_table(table_path, ("slice_id", "split", "labeled", "patient"), _PREPARE_HINT)
    images = load_array(prepared_dir / "images.npy", _PREPARE_HINT)
    if images.ndim != 3 or len(images) != len(slices):
        raise DatasetError(f"{prepared_dir / 'images.npy'}: shape {images.shape} does not match the "
                           f"{len(slices)} rows of slices.parquet (rerun prepare)")  # fmt: skip
    pool, source = slices[(slices["split"] == "train") & ~slices["labeled"].astype(bool)], "unlabeled_train"
    if pool.empty:
        pool, source = slices[slices["split"] == "val"], "val"
        log.warning("%s: every train slice is labeled; the held-out real set is drawn from the val slices", table_path)
    if pool.empty:
        raise DatasetError(f"{table_path}: no unlabeled train or val slices to hold out")
    rng = np.random.default_rng(seed)
    picked = pool.iloc[np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
    ids = picked["slice_id"].to_numpy(dtype=np.int64)
    if ids.max() >= len(images):
        raise DatasetError(f"{table_path}: slice_id {ids.max()} beyond the {len(images)} rows of images.npy")
    real = np.asarray(images[ids], dtype=np.float32)
    if not np.isfinite(real).all():
        raise DatasetError(f"{prepared_dir / 'images.npy'}: NaN/inf pixels in the held-out slices (rerun prepare)")
    return real, picked.reset_index(drop=True), source


def plot_content(stats: dict, real: np.ndarray, synthetic: np.ndarray, names: list[str], path: Path,
                 title: str) -> None:  # fmt: skip
    """Presence rate per class (real vs synthetic bars) and one area-fraction histogram per class, titled
    with its area W1 and, when `stats` holds it (`area_w1_floor`), the real-vs-real floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3.2), squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [stats[n]["presence_real"] for n in names], 0.4, label=f"real ({len(real)})", color="tab:blue")
    ax.bar(x + 0.2, [stats[n]["presence_synthetic"] for n in names], 0.4, label=f"synthetic ({len(synthetic)})",
           color="tab:orange")  # fmt: skip
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.25)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_ylabel(f"presence rate (area >= {100 * MIN_AREA:g}%)")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    for k, name in enumerate(names, start=1):
        ax = axes[0, k]
        real_pct, syn_pct = 100 * real[:, k - 1], 100 * synthetic[:, k - 1]
        bins = np.linspace(0, max(float(max(real_pct.max(), syn_pct.max())), 0.1), 21)
        ax.hist(real_pct, bins=bins, alpha=0.55, color="tab:blue", label="real")
        ax.hist(syn_pct, bins=bins, alpha=0.55, color="tab:orange", label="synthetic")
        ax.locator_params(axis="x", nbins=5)
        ax.set_xlabel(f"{name} area (% of the image)")
        ax.set_ylabel("images" if k == 1 else "")
        floor = stats[name].get("area_w1_floor")  # real half against real half, when there is a floor
        ax.set_title(f"{name}: area W1 {stats[name]['area_w1']:.4f}"
                     + ("" if floor is None else f" (floor {floor:.4f})"), fontsize=8)  # fmt: skip
        if k == 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_sizes(size: int, weights: Path, *sets: tuple[Path, np.ndarray]) -> None:
    """DatasetError when a (path, images) set is not at the model's training size."""
    for path, images in sets:
        if images.shape[1:] != (size, size):
            raise DatasetError(f"{path}: images of {images.shape[1]} x {images.shape[2]} px, but the model "
                               f"{weights} was trained at {size} px")  # fmt: skip


def _add_floor(stats: dict, floor: dict | None, names: list[str]) -> None:
    """Put the floor's presence gap and area W1 beside each class's (None without a floor) and log them."""
    for name in names:
        s = stats[name]
        s["presence_gap_floor"] = floor["per_class"][name]["presence_gap"] if floor else None
        s["area_w1_floor"] = floor["per_class"][name]["area_w1"] if floor else None
        log.info("%-5s present in %5.1f%% of real, %5.1f%% of synthetic images (gap %+.1f points, floor %s); "
                 "area W1 %.4f (floor %s)", name, 100 * s["presence_real"], 100 * s["presence_synthetic"],
                 100 * s["presence_gap"], "n/a" if floor is None else f"{100 * s['presence_gap_floor']:.1f}",
                 s["area_w1"], "n/a" if floor is None else f"{s['area_w1_floor']:.4f}")  # fmt: skip


def _intensity_check(synthetic: np.ndarray, real: np.ndarray) -> dict:
    """Both sets' intensity statistics and whether the synthetic background is grey (warned about)."""
    intensity = {"synthetic": intensity_stats(synthetic), "real": intensity_stats(real)}
    intensity["grey_background"] = intensity["synthetic"]["mean_min"] - intensity["real"]["mean_min"] > GREY_MARGIN
    if intensity["grey_background"]:
        log.warning("synthetic images have a mean per-slice minimum of %.3f against %.3f for real slices: "
                    "grey background, the generator does not make the black background of MRI",
                    intensity["synthetic"]["mean_min"], intensity["real"]["mean_min"])  # fmt: skip
    return intensity


def _image_table(synthetic: np.ndarray, real: np.ndarray, picked: pd.DataFrame, syn_areas: np.ndarray,
                 real_areas: np.ndarray, names: list[str]) -> pd.DataFrame:
    """content.parquet: one row per image, the synthetic ones first."""
    syn_rows = pd.DataFrame({"source": "synthetic", "image_id": np.arange(len(synthetic), dtype=np.int64),
                             "patient": None})  # fmt: skip
    real_rows = pd.DataFrame({"source": "real", "image_id": picked["slice_id"].to_numpy(dtype=np.int64),
                              "patient": picked["patient"].astype(str).to_numpy()})  # fmt: skip
    table = pd.concat([syn_rows, real_rows], ignore_index=True)
    areas = np.concatenate([syn_areas, real_areas])
    for k, name in enumerate(names):
        table[f"area_{name}"] = areas[:, k]
    both = np.concatenate([synthetic, real])
    table["mean_intensity"] = both.mean(axis=(1, 2)).astype(np.float64)
    table["min_intensity"] = both.min(axis=(1, 2)).astype(np.float64)
    return table


def run(model: Path | str, synthetic_dir: Path | str, prepared_dir: Path | str, out_dir: Path | str,
        settings: dict | None = None) -> dict:  # fmt: skip
    """Segment the synthetic images and as many held-out real slices with `model`; compare what they contain.

    Writes to out_dir: content.json (per class presence rates, gap, mean areas, area W1 and the floor's
    gap and W1; the floor's set; the intensity check; image counts; model path; presence threshold;
    settings), content.parquet (one row per image: source synthetic/real, image_id (synthetic_id or
    slice_id), patient (real only), area_<class> per foreground class, mean and min intensity) and
    content.png.

    Args:
        model: the labeled-only model: a train-stage run folder or its model.safetensors.
        synthetic_dir: the sample stage's folder (images.npy float32 [N,S,S] in [0,1]).
        prepared_dir: the prepare stage's folder (slices.parquet, images.npy).
        out_dir: where the three files go (all or nothing).
        settings: the `content` section (see ContentSettings).

    Returns:
        the content.json record.

    Raises:
        WeightsError: no model file, or weights that do not fit their model.json.
        DatasetError: missing or inconsistent inputs, NaN/inf synthetic pixels, sizes that differ from the model's.
        ConfigError: bad settings, or cuda requested without a CUDA device.
    """
    from sraseg.device import pick_device
    from sraseg.evaluate.predict import model_weights
    from sraseg.train.unet import load_model

    # inputs: the images of both sets and the model
    cfg = parse_settings(ContentSettings, settings, "content")
    weights = model_weights(model)
    synthetic_dir, prepared_dir = Path(synthetic_dir), Path(prepared_dir)
    synthetic = _synthetic_images(synthetic_dir, cfg.n_images)
    real, picked, real_source = _held_out_real(prepared_dir, len(synthetic), cfg.seed)
    device = pick_device(cfg.device)
    net, meta = load_model(weights, device=device)
    size = int(meta.get("image_size", real.shape[1]))
    _check_sizes(size, weights, (synthetic_dir / "images.npy", synthetic), (prepared_dir / "images.npy", real))
    num_classes = int(meta["num_classes"])
    names = prepared_class_names(prepared_dir, num_classes)
    log.info("segmenting %d synthetic and %d held-out real (%s) images at %d px with %s on %s",
             len(synthetic), len(real), real_source, size, weights, device)  # fmt: skip

    # segment both sets, compare their areas, and the real set's two halves (the floor)
    syn_areas = area_fractions(segment_images(net, synthetic, device, cfg.batch_size), num_classes)
    real_areas = area_fractions(segment_images(net, real, device, cfg.batch_size), num_classes)
    stats = compare_areas(real_areas, syn_areas, names)
    floor = floor_stats(real_areas, picked["patient"].to_numpy(), names, cfg.seed)
    if floor is None:
        log.warning("the held-out real set holds fewer than two patients: no floor")
    _add_floor(stats, floor, names)

    # publish content.json, content.parquet and content.png
    record = {
        "model": portable_path(weights),
        "model_method": meta.get("method"),
        "image_size": size,
        "num_classes": num_classes,
        "classes": names,
        "min_area": MIN_AREA,
        "presence_rule": f"a class is present in an image when its predicted area is >= {100 * MIN_AREA:g}% of it",
        "n_synthetic": int(len(synthetic)),
        "n_real": int(len(real)),
        "real_set": real_source,
        "real_patients": int(picked["patient"].nunique()),
        "per_class": stats,
        "floor": None if floor is None else {
            "set": "two patient-disjoint halves of the held-out real set",
            "sizes": floor["sizes"],
            "patients": floor["patients"],
            "note": "presence_gap_floor is |presence(A) - presence(B)|, a magnitude: compare it with |presence_gap|",
        },
        "intensity": _intensity_check(synthetic, real),
        "grey_margin": GREY_MARGIN,
        "settings": settings_dict(cfg),
        "synthetic_dir": portable_path(synthetic_dir),
        "prepared_dir": portable_path(prepared_dir),
    }
    table = _image_table(synthetic, real, picked, syn_areas, real_areas, names)
    title = (f"segmented by {meta.get('method', 'the')} model: {len(synthetic)} synthetic vs {len(real)} held-out "
             f"real slices")  # fmt: skip
    with staged_outputs(out_dir) as st:
        write_json(st.path("content.json"), record)
        table.to_parquet(st.path("content.parquet"), index=False)
        plot_content(stats, real_areas, syn_areas, names, st.path("content.png"), title)
    log.info("wrote content.json, content.parquet and content.png to %s", out_dir)
    return record
