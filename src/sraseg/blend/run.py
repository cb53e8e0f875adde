"""The blend stage: materialise the soft-edge blend bank, the blend maps and their real pairings.

Pairings (both modes). For every synthetic image, K = `maps_per_image` entries, each with a real LABELED
train slice to pair it with (pairs.parquet, blend_id = s * K + k):
- "nearest": the synthetic image's rows of neighbours.parquet, kept only where real_id is a labeled
  train slice, in rank order; entry k takes neighbour k mod (number of such neighbours), so with K
  entries and n >= K neighbours the K nearest are each used once;
- "random": uniform over all labeled train slices (seeded), cosine NaN and rank -1;
- "balanced": the embed folder's embeddings (--embed-dir), each domain centred on its own mean and
  renormalised, then the assignment of the M*K entries to labeled slices that maximises the total
  centred cosine with no slice used more than ceil(M*K / labeled slices) times (no hub can form).
  `cosine` is the plain (uncentred) cosine and `rank` its rank among the image's neighbours (-1: not
  among them).
The rules themselves live in sraseg.embed.pairing (the index stage reports their hubness). Every entry
also names its SA target, `sa_real_id`, the real slice the SA loss pulls the synthetic image toward:
the partner for "balanced", the image's rank-0 neighbour (any bank slice) for "nearest" and "random".
At training time x = a * synthetic + (1 - a) * real and y = a * Y(synthetic) + (1 - a) * Y(real):
`a` = 1 keeps the synthetic image, the hole shows the real one.

Blend maps `a` (a BCP box hole of ratio*H x ratio*W softened by the kernel with reflection padding,
exactly 1 away from the hole), by `maps`:
- "bank": one fixed map per entry, maps.npy float16 [M*K,S,S]; self-training draws entries
  with the training seed, so each map serves many draws (ACDC: 2,352 maps for 600,000 draws).
- "fresh" (the default): every self-training draw gets its own map, as in the reference, which draws a new mask every
  iteration. Materialising 600,000 maps of 256 x 256 would take 79 GB; a map is fixed by its hole
  corner and the kernel settings, so the stage writes draws.parquet instead, one row per self-training
  draw (blend_id, synthetic_id, real_id, top, left: int32/int16 columns, about 3 MB for ACDC's 600,000
  draws), and blend.json holds the kernel settings and the hole size once. Self-training iteration j
  takes rows j*B .. j*B+B-1 (B = train.unlabeled_batch) and renders their maps on the training device
  with `render_blend_maps`, the function the preview uses too. The draws' synthetic images run through
  the whole synthetic set once per epoch in a seeded shuffle (as the reference's data loader), each
  with one of its K entries chosen uniformly.
  The two stages agree on the count through the workflow: the rule passes `--draws` =
  selftrain_iterations x unlabeled_batch of the experiment's train settings (the CLI computes it from
  --config/--experiment, else the train defaults), and the train stage refuses a table with fewer rows.
  Chosen over a seeded rule rendered from (seed, step) inside training because what training uses is
  then a file: every draw's synthetic image, partner and hole can be read back, the preview shows real
  draws, and reproducibility needs no coupling to the training seed or step counter (a resume at step t
  reads the same rows). The cost: the order of the synthetic draws is fixed by `blend.seed`, not by the
  training seed.

Maps (hole corners) and pairings come from independent streams of `seed` (the draws' synthetic images
and entries from a third), so the maps are identical whichever pairing is chosen (a clean ablation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sraseg.blend.maps import hole_size, make_blend_maps, mix, render_blend_maps
from sraseg.embed.embeddings import load_embeddings
from sraseg.embed.pairing import (
    PAIRING_RULES,
    balanced_partners,
    nearest_partners,
    partner_stats,
    random_partners,
)
from sraseg.errors import ConfigError, DatasetError
from sraseg.io import load_array, read_table, staged_outputs, write_json
from sraseg.settings import parse_settings, settings_dict

__all__ = [
    "BlendSettings",
    "LABEL_COLOURS",
    "blend_labels",
    "draw_table",
    "pair_balanced",
    "pair_nearest",
    "pair_random",
    "pair_entries",
    "nearest_sa_targets",
    "run",
]

log = logging.getLogger(__name__)

# draws.parquet (maps: fresh): one row per self-training draw, row d = draw d; narrow types keep it small
DRAW_COLUMNS = {"blend_id": np.int32, "synthetic_id": np.int32, "real_id": np.int32, "top": np.int16,
                "left": np.int16}
# Background black, RV red, MYO green, LV blue (preview only).
LABEL_COLOURS = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 0.9, 0.2], [0.3, 0.5, 1.0]], dtype=np.float32)
_CHUNK = 256  # maps generated per call: bounds memory at S=256 (part of the seeded sequence)
_PREVIEW_ROWS = 4


@dataclass
class BlendSettings:
    """Settings of the blend stage.

    Args:
        maps (`str`, "fresh"): "bank" (a fixed map per entry, maps.npy) or "fresh" (a map per self-training
            draw, rendered in training from draws.parquet).
        maps_per_image (`int`, 2): entries (real pairings; with "bank" each with its map) per synthetic image, K.
        kernel (`str`, "gaussian"): edge softening: "gaussian", "box" or "hard" (a plain BCP mask).
        kernel_size (`int`, 5): odd side of the smoothing kernel.
        sigma (`float`, 1.0): std of the Gaussian kernel in pixels.
        ratio (`float`, 2/3): side of the hole relative to the image, in (0, 1).
        pairing (`str`, "random"): "nearest" (DINOv2 neighbours), "random" labeled slices, or "balanced"
            (per-domain centred cosine, capacity-capped assignment).
        seed (`int`, 0): seed of the maps, of random pairing and of the fresh draws.
    """

    maps: str = "fresh"
    maps_per_image: int = 2
    kernel: str = "gaussian"
    kernel_size: int = 5
    sigma: float = 1.0
    ratio: float = 2 / 3
    pairing: str = "random"
    seed: int = 0

    def cross_checks(self) -> None:
        """What the schema cannot say (parse_settings runs it): the kernel needs a centre pixel."""
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"'blend.kernel_size' is {self.kernel_size!r}; must be odd")


def blend_labels(blend: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Continuous label of a blend: a * first + (1 - a) * second.

    Args:
        blend: float [B,1,H,W] in [0,1]; first, second: one-hot (or soft) labels [B,C,H,W].

    Returns:
        float [B,C,H,W]; sums to 1 over C wherever both inputs do.
    """
    return mix(blend, first, second)


def _read_synthetic(synthetic_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images_path, table_path = synthetic_dir / "images.npy", synthetic_dir / "synthetic.parquet"
    hint = "run the sample stage first"
    images = load_array(images_path, hint)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(f"{images_path}: expected float32 [M,S,S], got shape {images.shape}")
    ids = read_table(table_path, ("synthetic_id",), hint)["synthetic_id"].to_numpy(dtype=np.int64)
    if len(ids) != len(images) or not np.array_equal(ids, np.arange(len(images))):
        raise DatasetError(
            f"{table_path}: synthetic_id must equal the row index of {images_path.name} ({len(images)} rows)"
        )
    return images, ids


def _read_prepared(prepared_dir: Path, size: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    hint = "run the prepare stage first"
    slices = read_table(prepared_dir / "slices.parquet", ("slice_id", "split", "labeled"), hint)
    images = load_array(prepared_dir / "images.npy", hint)
    labels = load_array(prepared_dir / "labels.npy", hint)
    if images.shape[1:] != (size, size):
        raise DatasetError(
            f"{prepared_dir / 'images.npy'}: slices are {images.shape[1:]}, synthetic images {size}x{size}"
        )
    return slices, images, labels


def _read_neighbours(path: Path, synthetic_ids: np.ndarray, slices: pd.DataFrame) -> pd.DataFrame:
    """neighbours.parquet checked against the synthetic set and the prepared table (all its rows)."""
    table = read_table(path, ("synthetic_id", "rank", "real_id", "cosine"), "run the index stage first")
    unknown = np.setdiff1d(table["synthetic_id"].to_numpy(), synthetic_ids)
    if len(unknown):
        raise DatasetError(
            f"{path}: synthetic id(s) {unknown[:5].tolist()} not in the synthetic set of {len(synthetic_ids)}"
        )
    split = slices.set_index("slice_id")["split"]
    train_ids = split.index[split.to_numpy() == "train"].to_numpy()
    not_train = np.setdiff1d(table["real_id"].to_numpy(), train_ids)
    if len(not_train):
        raise DatasetError(f"{path}: real id(s) {not_train[:5].tolist()} are not train slices of the prepared data")
    return table


def _labeled_neighbours(table: pd.DataFrame, path: Path, synthetic_ids: np.ndarray, slices: pd.DataFrame,
                        every_image: bool) -> pd.DataFrame:  # fmt: skip
    """The neighbours restricted to labeled real ids, sorted by (synthetic_id, rank); with `every_image`
    (nearest pairing: its partners), every synthetic image must keep one."""
    labeled = slices["slice_id"].to_numpy()[slices["labeled"].to_numpy(dtype=bool)]
    kept = table[table["real_id"].isin(labeled)].sort_values(["synthetic_id", "rank"], kind="stable")
    without = np.setdiff1d(synthetic_ids, kept["synthetic_id"].to_numpy())
    if every_image and len(without):
        raise DatasetError(
            f"{path}: synthetic id(s) {without[:5].tolist()} have no labeled train slice among their neighbours "
            "(index with bank 'labeled' or more neighbours)"
        )
    return kept


def pair_nearest(neighbours: pd.DataFrame, synthetic_ids: np.ndarray, maps_per_image: int) -> pd.DataFrame:
    """Map k of synthetic image s takes its labeled neighbour k mod n (n = its number of labeled neighbours).

    Args:
        neighbours: rows (synthetic_id, rank, real_id, cosine) restricted to labeled real ids.

    Returns:
        pairs (blend_id, synthetic_id, real_id, map_index, rank, cosine, sa_real_id -1), blend_id = s * K + k.
    """
    picks = nearest_partners(neighbours, synthetic_ids, maps_per_image)
    entries = [(int(sid), k) for sid in synthetic_ids for k in range(maps_per_image)]
    rows = [(sid, int(real_id), k, int(rank), float(cosine)) for (sid, k), real_id, rank, cosine
            in zip(entries, picks["real_id"], picks["rank"], picks["cosine"])]  # fmt: skip
    return _pairs_table(rows)


def pair_random(
    labeled_ids: np.ndarray, synthetic_ids: np.ndarray, maps_per_image: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Uniform labeled partners; rank -1 and cosine NaN mark them as unranked."""
    picks = labeled_ids[random_partners(len(labeled_ids), len(synthetic_ids), maps_per_image, rng)]
    rows = [
        (int(sid), int(picks[i, k]), k, -1, float("nan"))
        for i, sid in enumerate(synthetic_ids)
        for k in range(maps_per_image)
    ]
    return _pairs_table(rows)


def pair_balanced(
    embed_dir: Path, neighbours: pd.DataFrame, labeled_ids: np.ndarray, synthetic_ids: np.ndarray, maps_per_image: int
) -> tuple[pd.DataFrame, int]:
    """Capacity-capped partners on per-domain centred embeddings (see `balanced_partners`).

    Args:
        embed_dir: the embed stage's folder (real/synthetic .npy + .parquet).
        neighbours: the checked neighbours table (for each pair's rank among the image's neighbours).
        labeled_ids: the labeled train slice ids (the bank).

    Returns:
        (pairs with sa_real_id == real_id, cap).

    Raises:
        DatasetError: embeddings missing, or a labeled slice / synthetic image without an embedding.
    """
    real, real_table, syn, syn_table = load_embeddings(embed_dir)
    real_row = pd.Series(np.arange(len(real_table)), index=real_table["slice_id"].to_numpy(dtype=np.int64))
    syn_row = pd.Series(np.arange(len(syn_table)), index=syn_table["synthetic_id"].to_numpy(dtype=np.int64))
    for ids, rows, name in ((labeled_ids, real_row, "real"), (synthetic_ids, syn_row, "synthetic")):
        missing = np.setdiff1d(ids, rows.index.to_numpy())
        if len(missing):
            raise DatasetError(
                f"{embed_dir / (name + '.parquet')}: id(s) {missing[:5].tolist()} have no embedding (stale embed? rerun it)"
            )
    bank = real[real_row.loc[labeled_ids].to_numpy()]
    queries = syn[syn_row.loc[synthetic_ids].to_numpy()]
    partners, cap = balanced_partners(bank, queries, maps_per_image)
    rank_of = {(int(a), int(b)): int(r) for a, b, r in neighbours[["synthetic_id", "real_id", "rank"]].itertuples(index=False)}
    rows = []
    for i, sid in enumerate(synthetic_ids):
        for k in range(maps_per_image):
            col = int(partners[i, k])
            rid = int(labeled_ids[col])
            cosine = float(queries[i].astype(np.float64) @ bank[col].astype(np.float64))
            rows.append((int(sid), rid, k, rank_of.get((int(sid), rid), -1), cosine))
    table = _pairs_table(rows)
    table["sa_real_id"] = table["real_id"]
    return table, cap


def nearest_sa_targets(pairs: pd.DataFrame, neighbours: pd.DataFrame, path: Path) -> pd.DataFrame:
    """pairs with sa_real_id set to each synthetic image's rank-0 neighbour (the paper's SA target; used by
    nearest and random pairing, whatever the bank: an unlabeled slice is a valid target).

    Raises:
        DatasetError: an image of `pairs` without a rank-0 row in `neighbours`.
    """
    nearest = neighbours[neighbours["rank"] == 0]
    first = dict(zip(nearest["synthetic_id"].to_numpy(dtype=np.int64), nearest["real_id"].to_numpy(dtype=np.int64)))
    synthetic_ids = pairs["synthetic_id"].to_numpy(dtype=np.int64)
    missing = np.unique([s for s in synthetic_ids if s not in first])
    if len(missing):
        raise DatasetError(f"{path}: no rank-0 neighbour (the SA target) for synthetic id(s) {missing[:5].tolist()}")
    return pairs.assign(sa_real_id=np.array([first[s] for s in synthetic_ids], dtype=np.int64))


def _pairs_table(rows: list[tuple]) -> pd.DataFrame:
    """pairs with sa_real_id -1 (set by the caller: the partner for balanced, else the rank-0 neighbour)."""
    table = pd.DataFrame(rows, columns=["synthetic_id", "real_id", "map_index", "rank", "cosine"])
    table.insert(0, "blend_id", np.arange(len(table), dtype=np.int64))
    table["sa_real_id"] = -1
    return table.astype(dict(blend_id="int64", synthetic_id="int64", real_id="int64", map_index="int64", rank="int64",
                             sa_real_id="int64"))  # fmt: skip


def draw_table(pairs: pd.DataFrame, maps_per_image: int, count: int, size: int, ratio: float,
               map_rng: np.random.Generator, draw_rng: np.random.Generator) -> pd.DataFrame:
    """`count` self-training draws for `maps: fresh`; row d is draw d.

    Args:
        pairs: the pairing table, blend_id = s * K + k for synthetic images s = 0..M-1.
        map_rng: the maps' stream (hole corners only, so the maps do not depend on the pairing).
        draw_rng: the draws' stream: the synthetic images in a fresh shuffle per epoch (each image once per
            epoch, as a shuffling data loader), each draw with one of the image's K entries, uniform.
    Returns:
        DRAW_COLUMNS: blend_id, synthetic_id, real_id (the entry's partner), top, left (the hole's corner,
        uniform over the positions inside the image).
    """
    n_synthetic = len(pairs) // maps_per_image
    # epoch by epoch (its shuffle, then its entries), and corners draw by draw: more draws extend the same
    # sequence, so a longer self-training starts with the same draws and maps
    epochs = [draw_rng.permutation(n_synthetic) * maps_per_image + draw_rng.integers(0, maps_per_image, n_synthetic)
              for _ in range(-(-count // n_synthetic))]
    entry = np.concatenate(epochs)[:count] if epochs else np.zeros(0, dtype=np.int64)
    hole_h, hole_w = hole_size(size, size, ratio)
    corners = map_rng.integers(0, [size - hole_h + 1, size - hole_w + 1], size=(count, 2))  # (top, left) per draw
    table = pd.DataFrame(dict(blend_id=entry, synthetic_id=pairs["synthetic_id"].to_numpy()[entry],
                              real_id=pairs["real_id"].to_numpy()[entry], top=corners[:, 0], left=corners[:, 1]))
    return table.astype(DRAW_COLUMNS)


def _write_preview(
    path: Path, maps: np.ndarray, rows: pd.DataFrame, names: list[str], synthetic: np.ndarray, real: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Rows of: synthetic | paired real | blend map | blended image | (1 - a) * one-hot(real label) in colour.

    Args:
        maps: float [n,S,S], the map of each of the n `rows` (synthetic_id, real_id); names: row captions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["synthetic", "paired real", "blend map a", "a*syn + (1-a)*real", "(1-a) * real label"]
    fig, axes = plt.subplots(max(1, len(rows)), 5, figsize=(10, 2.1 * max(1, len(rows))), squeeze=False)
    for row in range(len(rows)):
        sid, rid = int(rows["synthetic_id"].iloc[row]), int(rows["real_id"].iloc[row])
        a = maps[row].astype(np.float32)
        syn, rl = np.asarray(synthetic[sid]), np.asarray(real[rid])
        onehot = np.eye(len(LABEL_COLOURS), dtype=np.float32)[np.asarray(labels[rid])]  # [S,S,C]
        colour = ((1.0 - a)[..., None] * onehot) @ LABEL_COLOURS
        panels = [syn, rl, a, a * syn + (1 - a) * rl, np.clip(colour, 0, 1)]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
        axes[row, 0].set_ylabel(names[row], fontsize=7)
    if not len(rows):
        axes[0, 0].set_ylabel("no self-training draws", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _preview_rows(count: int) -> np.ndarray:
    """Up to _PREVIEW_ROWS row numbers spread over `count` rows, first and last included."""
    if not count:
        return np.zeros(0, dtype=int)
    return np.unique(np.linspace(0, count - 1, num=min(_PREVIEW_ROWS, count)).round().astype(int))


def run(
    synthetic_dir: Path | str,
    prepared_dir: Path | str,
    neighbours: Path | str,
    out_dir: Path | str,
    settings: dict | None = None,
    draws: int | None = None,
    embed_dir: Path | str | None = None,
) -> None:
    """Write the blend bank: pairs.parquet, preview.png, blend.json and, by `maps`, maps.npy float16
    [M*K,S,S] in [0,1] (bank) or draws.parquet (fresh, one row per self-training draw).

    Args:
        neighbours: the index stage's neighbours.parquet (nearest partners, and every rule's SA target).
        draws: self-training draws (train.selftrain_iterations x train.unlabeled_batch); needed by
            `maps: fresh`, unused by `bank`.
        embed_dir: the embed stage's folder (real/synthetic embeddings); needed by `pairing: balanced`.
    Raises:
        ConfigError: bad settings (names the key and the allowed values); `fresh` without `draws`; `balanced`
            without `embed_dir`.
        DatasetError: missing inputs; synthetic ids or shapes that disagree; neighbours.parquet with
            synthetic ids outside the synthetic set, real ids that are not train slices, a synthetic image
            without any labeled neighbour or without a rank-0 neighbour; no labeled train slices.
    """
    cfg = parse_settings(BlendSettings, settings, "blend")
    if cfg.maps == "fresh" and (draws is None or int(draws) < 0):
        raise ConfigError("blend.maps 'fresh' needs the number of self-training draws (--draws N, N = "
                          f"train.selftrain_iterations x train.unlabeled_batch); got {draws!r}")
    if cfg.pairing == "balanced" and embed_dir is None:
        raise ConfigError("blend.pairing 'balanced' reads the embeddings: give the embed folder (--embed-dir)")
    neighbours, out_dir = Path(neighbours), Path(out_dir)
    inputs = _read_inputs(Path(synthetic_dir), Path(prepared_dir))
    # three streams of one seed: maps, pairings, fresh draws (spawn(3)'s first two are spawn(2)'s)
    map_seq, pair_seq, draw_seq = np.random.SeedSequence(cfg.seed).spawn(3)
    pairs, cap = pair_entries(cfg, inputs, neighbours, embed_dir, np.random.default_rng(pair_seq))
    rng = np.random.default_rng(map_seq)
    with staged_outputs(out_dir) as st:
        if cfg.maps == "bank":
            maps = _write_bank_maps(st.path("maps.npy"), pairs, inputs.size, cfg, rng)
        else:
            maps = _write_draws(st.path("draws.parquet"), pairs, inputs, cfg, int(draws), rng,
                                np.random.default_rng(draw_seq))
        pairs.to_parquet(st.path("pairs.parquet"), index=False)
        _write_preview(st.path("preview.png"), maps.preview, maps.shown, maps.names, inputs.synthetic, inputs.real,
                       inputs.labels)
        write_json(st.path("blend.json"), _blend_record(cfg, inputs, pairs, maps, cap, neighbours))
    # the other mode's file, left by an earlier run into this folder, is not what training uses
    (out_dir / ("draws.parquet" if cfg.maps == "bank" else "maps.npy")).unlink(missing_ok=True)
    stats = partner_stats(pairs["real_id"].to_numpy())
    log.info("blend %s: %d maps for %d synthetic images (%d entries), %s pairing: %d distinct partners, largest "
             "share %.1f%%", cfg.maps, maps.count, len(inputs.synthetic_ids), len(pairs), cfg.pairing,
             stats["distinct"], 100 * stats["top_share"])  # fmt: skip


@dataclass
class _Inputs:
    """What the blend stage reads besides the neighbours: the synthetic set and the prepared slices."""

    synthetic: np.ndarray  # float32 [M,S,S]
    synthetic_ids: np.ndarray  # int64 [M], == row
    slices: pd.DataFrame
    real: np.ndarray  # prepared images [N,S,S]
    labels: np.ndarray  # prepared labels [N,S,S]
    labeled_ids: np.ndarray  # the labeled train slice ids: the partners

    @property
    def size(self) -> int:
        return int(self.synthetic.shape[1])


def _read_inputs(synthetic_dir: Path, prepared_dir: Path) -> _Inputs:
    synthetic, synthetic_ids = _read_synthetic(synthetic_dir)
    if not len(synthetic_ids):
        raise DatasetError(f"{synthetic_dir / 'images.npy'}: no synthetic images to blend")
    slices, real, labels = _read_prepared(prepared_dir, synthetic.shape[1])
    labeled_ids = slices["slice_id"].to_numpy()[
        slices["labeled"].to_numpy(dtype=bool) & (slices["split"] == "train").to_numpy()
    ]
    if not len(labeled_ids):
        raise DatasetError(f"{prepared_dir / 'slices.parquet'}: no labeled train slices to pair with")
    return _Inputs(synthetic, synthetic_ids, slices, real, labels, labeled_ids)


def pair_entries(cfg: BlendSettings, inputs: _Inputs, neighbours: Path, embed_dir: Path | str | None,
                 rng: np.random.Generator) -> tuple[pd.DataFrame, int | None]:  # fmt: skip
    """The pairs table of `cfg.pairing` with every entry's SA target, and the balanced rule's cap (else None).

    Args:
        rng: the pairings' stream (random pairing only).
    """
    table = _read_neighbours(neighbours, inputs.synthetic_ids, inputs.slices)
    labeled = _labeled_neighbours(table, neighbours, inputs.synthetic_ids, inputs.slices, cfg.pairing == "nearest")
    if cfg.pairing == "balanced":
        return pair_balanced(Path(embed_dir), labeled, inputs.labeled_ids, inputs.synthetic_ids, cfg.maps_per_image)
    if cfg.pairing == "nearest":
        pairs = pair_nearest(labeled, inputs.synthetic_ids, cfg.maps_per_image)
    else:
        pairs = pair_random(inputs.labeled_ids, inputs.synthetic_ids, cfg.maps_per_image, rng)
    return nearest_sa_targets(pairs, table, neighbours), None


@dataclass
class _Maps:
    """What a maps mode wrote, for the preview and blend.json."""

    count: int  # maps (bank) or draws (fresh)
    rule: str  # blend.json's map_rule
    shown: pd.DataFrame  # the previewed rows (synthetic_id, real_id)
    preview: np.ndarray  # float [n,S,S], their maps
    names: list[str]  # their captions
    extra: dict  # fresh: draw statistics for blend.json


def _write_bank_maps(path: Path, pairs: pd.DataFrame, size: int, cfg: BlendSettings, rng: np.random.Generator
                     ) -> _Maps:  # fmt: skip
    """maps.npy float16 [entries,S,S]: one fixed map per entry of `pairs`, in chunks of _CHUNK from `rng`."""
    entries = len(pairs)
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(entries, size, size))
    for start in tqdm(range(0, entries, _CHUNK), desc="blend maps", unit="chunk"):
        n = min(_CHUNK, entries - start)
        chunk = make_blend_maps(n, size, size, rng, cfg.kernel, cfg.kernel_size, cfg.sigma, cfg.ratio)
        maps[start : start + n] = chunk[:, 0].numpy().astype(np.float16)
    maps.flush()
    chosen = _preview_rows(entries)
    shown, preview = pairs.iloc[chosen], np.asarray(maps[chosen])
    del maps
    names = [f"syn {s} / real {r}" for s, r in zip(shown["synthetic_id"], shown["real_id"])]
    return _Maps(entries, "one fixed map per entry (maps.npy); self-training draws entries", shown, preview, names, {})


def _write_draws(path: Path, pairs: pd.DataFrame, inputs: _Inputs, cfg: BlendSettings, draws: int,
                 map_rng: np.random.Generator, draw_rng: np.random.Generator) -> _Maps:  # fmt: skip
    """draws.parquet: one row per self-training draw (`draw_table`); the preview renders a few of its maps."""
    size = inputs.size
    table = draw_table(pairs, cfg.maps_per_image, draws, size, cfg.ratio, map_rng, draw_rng)
    table.to_parquet(path, index=False)
    chosen = _preview_rows(len(table))
    shown = table.iloc[chosen]
    corners = torch.tensor(shown[["top", "left"]].to_numpy(dtype=np.int64))
    hole = hole_size(size, size, cfg.ratio)
    preview = render_blend_maps(corners, size, hole, cfg.kernel, cfg.kernel_size, cfg.sigma)[:, 0].numpy()
    names = [f"draw {d}: syn {s} / real {r}" for d, s, r in zip(chosen, shown["synthetic_id"], shown["real_id"])]
    uses = np.bincount(table["synthetic_id"].to_numpy(), minlength=len(inputs.synthetic_ids))
    rule = ("one map per self-training draw (draws.parquet row d = draw d; iteration j uses rows j*B..j*B+B-1, "
            "B = train.unlabeled_batch), rendered in training")
    extra = dict(n_draws=len(table), draws_per_synthetic=dict(min=int(uses.min()), max=int(uses.max())),
                 draw_partner_stats=partner_stats(table["real_id"].to_numpy()))
    return _Maps(len(table), rule, shown, preview, names, extra)


def _blend_record(cfg: BlendSettings, inputs: _Inputs, pairs: pd.DataFrame, maps: _Maps, cap: int | None,
                  neighbours: Path | str) -> dict:  # fmt: skip
    """blend.json: the settings, the sizes, the rules and how concentrated the pairing is."""
    size = inputs.size
    return dict(
        settings=settings_dict(cfg),
        n_synthetic=int(len(inputs.synthetic_ids)),
        n_maps=int(maps.count),
        n_entries=int(len(pairs)),
        image_size=int(size),
        hole=list(hole_size(size, size, cfg.ratio)),
        map_rule=maps.rule,
        n_labeled_slices=int(len(inputs.labeled_ids)),
        n_distinct_real=int(pairs["real_id"].nunique()),
        mean_cosine=float(pairs["cosine"].mean()) if cfg.pairing != "random" else None,
        partner_stats=partner_stats(pairs["real_id"].to_numpy(), pairs["cosine"].to_numpy()),
        cap=cap,
        neighbours=str(neighbours) if cfg.pairing != "random" else None,
        pairing_rule=PAIRING_RULES[cfg.pairing],
        **maps.extra,
    )
