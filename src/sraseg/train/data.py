"""Training inputs: prepared slices, synthetic images, DINOv2 targets and the blend bank; augmentation
and seeded batch sampling.

The loaders give CPU tensors; training moves them to its device once (ACDC at 256 px is about 1.1 GB),
so a batch is indexed where it will be used. All augmentation draws come from the loop's own CPU
`torch.Generator` (a fixed number per sample, so runs are reproducible on any device).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sraseg.blend.maps import render_blend_maps
from sraseg.device import full_precision
from sraseg.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    import pandas as pd

    from sraseg.train.settings import TrainSettings

__all__ = [
    "AUGMENTATIONS",
    "Prepared",
    "EmbedTargets",
    "BlendBank",
    "load_prepared",
    "load_synthetic",
    "load_embed",
    "load_blend",
    "dataset_classes",
    "needed_inputs",
    "check_inputs",
    "TrainInputs",
    "load_inputs",
    "sa_target_rows",
    "sample_indices",
    "augment",
    "PAIR_AUGMENTS",
    "augment_pair",
]

log = logging.getLogger(__name__)

AUGMENTATIONS = ("rot_flip_or_rotate", "none")
PAIR_AUGMENTS = ("shared", "separate")
MAX_ANGLE = 20.0  # degrees, rotation augmentation range [-20, 20]


@dataclass
class Prepared:
    """The prepared slices a training run reads.

    Attributes:
        image_size: S.
        labeled_images: float32 [L,S,S] in [0,1], train slices with labeled == True.
        labeled_labels: uint8 [L,S,S] in {0..3}.
        labeled_ids: int64 [L] slice ids of those rows.
        unlabeled_images: float32 [U,S,S], train slices with labeled == False (bcp_real's pool).
        val_images: float32 [V,S,S]; val_labels uint8 [V,S,S]; val_cases: str [V] (case of each slice).
    """

    image_size: int
    labeled_images: torch.Tensor
    labeled_labels: torch.Tensor
    labeled_ids: np.ndarray
    unlabeled_images: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    val_cases: np.ndarray

    def labeled_position(self, slice_ids: np.ndarray, source: Path) -> np.ndarray:
        """Row in `labeled_images` of each slice id; DatasetError naming `source` for an unlabeled id."""
        import pandas as pd  # the loaders' tools are imported when loading: the steps need only torch

        lookup = pd.Series(np.arange(len(self.labeled_ids)), index=self.labeled_ids)
        found = lookup.reindex(np.asarray(slice_ids))
        if found.isna().any():
            bad = sorted(set(np.asarray(slice_ids)[found.isna().to_numpy()].tolist()))[:5]
            raise DatasetError(f"{source}: slice id(s) {bad} are not labeled train slices of the prepared data")
        return found.to_numpy(dtype=np.int64)


def load_prepared(prepared_dir: Path | str, num_classes: int = 4) -> Prepared:
    """Read slices.parquet, images.npy and labels.npy; labels are read only for labeled and val rows.

    Raises:
        DatasetError: missing files or columns, row counts that disagree, no labeled or no val slices,
            label values outside [0, num_classes).
    """
    from sraseg.io import load_array, read_table

    prepared_dir = Path(prepared_dir)
    table_path = prepared_dir / "slices.parquet"
    table = read_table(table_path, ("slice_id", "case", "split", "labeled"))
    images = load_array(prepared_dir / "images.npy")
    labels = load_array(prepared_dir / "labels.npy")
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise DatasetError(f"{prepared_dir / 'images.npy'}: expected [N,S,S], got shape {images.shape}")
    if len(table) != len(images) or labels.shape != images.shape:
        raise DatasetError(
            f"{prepared_dir}: slices.parquet has {len(table)} rows, images.npy {images.shape}, labels.npy {labels.shape}"
        )
    split = table["split"].to_numpy()
    labeled = table["labeled"].to_numpy(dtype=bool)
    labeled_rows = np.flatnonzero((split == "train") & labeled)
    unlabeled_rows = np.flatnonzero((split == "train") & ~labeled)
    val_rows = np.flatnonzero(split == "val")
    if len(labeled_rows) == 0:
        raise DatasetError(f"{table_path}: no labeled train slices (split == 'train' and labeled == True)")
    if len(val_rows) == 0:
        raise DatasetError(f"{table_path}: no val slices; validation picks the model to keep")
    labeled_labels = np.asarray(labels[labeled_rows])
    val_labels = np.asarray(labels[val_rows])
    for name, values in (("labeled", labeled_labels), ("val", val_labels)):
        if values.size and int(values.max()) >= num_classes:
            raise DatasetError(f"{prepared_dir / 'labels.npy'}: {name} label values up to {int(values.max())} "
                               f"outside [0, {num_classes})")
    as_tensor = lambda rows: torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32))  # noqa: E731
    return Prepared(
        image_size=int(images.shape[1]),
        labeled_images=as_tensor(labeled_rows),
        labeled_labels=torch.from_numpy(labeled_labels.astype(np.uint8)),
        labeled_ids=table["slice_id"].to_numpy(dtype=np.int64)[labeled_rows],
        unlabeled_images=as_tensor(unlabeled_rows),
        val_images=as_tensor(val_rows),
        val_labels=torch.from_numpy(val_labels.astype(np.uint8)),
        val_cases=table["case"].to_numpy()[val_rows].astype(str),
    )


def load_synthetic(synthetic_dir: Path | str, image_size: int) -> torch.Tensor:
    """synthetic images.npy -> float32 [M,S,S]; DatasetError for a wrong size or an empty set."""
    from sraseg.io import load_array

    path = Path(synthetic_dir) / "images.npy"
    images = load_array(path)
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size) or len(images) == 0:
        raise DatasetError(f"{path}: expected [M,{image_size},{image_size}] with M > 0, got shape {images.shape}")
    return torch.from_numpy(np.array(images, dtype=np.float32))


@dataclass
class EmbedTargets:
    """DINOv2 targets of the SA loss.

    Attributes:
        real: float32 [R,D] L2-normalised embeddings of the real train slices.
        real_row: pandas Series slice_id -> row of `real`.
        neighbour_row: int64 [M] row of `real` holding each synthetic image's rank-0 neighbour (-1: none).
    """

    real: torch.Tensor
    real_row: pd.Series
    neighbour_row: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.real.shape[1])

    def rows_of(self, slice_ids: np.ndarray, source: Path) -> np.ndarray:
        found = self.real_row.reindex(np.asarray(slice_ids))
        if found.isna().any():
            bad = sorted(set(np.asarray(slice_ids)[found.isna().to_numpy()].tolist()))[:5]
            raise DatasetError(f"{source}: slice id(s) {bad} have no embedding in real.parquet")
        return found.to_numpy(dtype=np.int64)


def load_embed(embed_dir: Path | str, synthetic_count: int) -> EmbedTargets:
    """Read real.npy/real.parquet and neighbours.parquet (rank 0 = nearest real slice)."""
    import pandas as pd

    from sraseg.embed.embeddings import read_embeddings
    from sraseg.io import read_table

    embed_dir = Path(embed_dir)
    real, table = read_embeddings(embed_dir, "real")
    real_row = pd.Series(table["row"].to_numpy(dtype=np.int64), index=table["slice_id"].to_numpy(dtype=np.int64))
    neighbours_path = embed_dir / "neighbours.parquet"
    neighbours = read_table(neighbours_path, ("synthetic_id", "rank", "real_id"))
    nearest = neighbours[neighbours["rank"] == 0]
    neighbour_row = np.full(synthetic_count, -1, dtype=np.int64)
    ids = nearest["synthetic_id"].to_numpy(dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= synthetic_count):
        raise DatasetError(f"{neighbours_path}: synthetic ids outside [0, {synthetic_count})")
    targets = EmbedTargets(torch.from_numpy(real.astype(np.float32)), real_row, neighbour_row)
    neighbour_row[ids] = targets.rows_of(nearest["real_id"].to_numpy(dtype=np.int64), neighbours_path)
    return targets


@dataclass
class BlendBank:
    """The materialised blend bank (the blend stage's output), in one of its two `maps` modes.

    Attributes:
        maps: bank: float16 [B,S,S] in [0,1], the fixed map of each entry (1 keeps the synthetic image in the
            a-half mix); fresh: None.
        synthetic_ids: int64 [B]; real_ids: int64 [B] (labeled slice ids): each entry's images.
        draw_entries: fresh: int64 [D], the entry of each self-training draw (draws.parquet row d = draw d);
            bank: None (the training seed draws entries).
        draw_corners: fresh: int64 [D,2], (top, left) of each draw's hole; a tensor, so it moves to the
            training device with the bank and the maps are rendered there.
        hole: fresh: (rows, columns) of the hole; kernel, kernel_size, sigma: fresh: the edge softening;
        maps_size: fresh: the image side S the maps are rendered at.
        sa_real_ids: int64 [B], each entry's SA target (pairs.parquet sa_real_id, which the blend stage
            always writes); None when the table has no such column (written by hand or an older blend stage).
    """

    maps: torch.Tensor | None
    synthetic_ids: np.ndarray
    real_ids: np.ndarray
    draw_entries: np.ndarray | None = None
    draw_corners: torch.Tensor | None = None
    hole: tuple[int, int] | None = None
    kernel: str = "gaussian"
    kernel_size: int = 5
    sigma: float = 1.0
    maps_size: int = 0
    sa_real_ids: np.ndarray | None = None

    @property
    def fresh(self) -> bool:
        return self.draw_entries is not None

    def render(self, start: int, count: int) -> torch.Tensor:
        """The blend maps of draws start .. start+count-1, float32 [count,1,S,S], rendered on the device
        that holds `draw_corners` (the slice bounds are host integers: nothing is read back)."""
        if start < 0 or start + count > len(self.draw_entries):
            raise IndexError(f"draws {start}..{start + count - 1} are outside the {len(self.draw_entries)} "
                             "self-training draws of draws.parquet")
        return render_blend_maps(self.draw_corners[start : start + count], self.maps_size, self.hole, self.kernel,
                                 self.kernel_size, self.sigma)


def sa_target_rows(bank: BlendBank, embed: EmbedTargets, pairs_path: Path) -> np.ndarray:
    """Row of `embed.real` holding each bank entry's SA target: pairs.parquet's sa_real_id, as the blend stage
    wrote it (the partner for balanced pairing, the rank-0 neighbour otherwise).

    Raises:
        DatasetError: no sa_real_id column or an entry without a target (a blend folder from before the stage
            wrote them: rerun it), or a target without an embedding.
    """
    if bank.sa_real_ids is None or (bank.sa_real_ids < 0).any():
        raise DatasetError(f"{pairs_path}: entries without an SA target (sa_real_id); rerun the blend stage")
    return embed.rows_of(bank.sa_real_ids, pairs_path)


def load_blend(blend_dir: Path | str, image_size: int, synthetic_count: int) -> BlendBank:
    """Read the blend stage's folder, checking shapes and id ranges: pairs.parquet, and maps.npy (`maps:
    bank`, also when blend.json is absent) or draws.parquet with blend.json's kernel and hole (`fresh`)."""
    from sraseg.io import load_array, read_json, read_table

    blend_dir = Path(blend_dir)
    maps_path, pairs_path, info_path = blend_dir / "maps.npy", blend_dir / "pairs.parquet", blend_dir / "blend.json"
    info = read_json(info_path) if info_path.is_file() else {}
    settings = info.get("settings") or {}
    pairs = read_table(pairs_path, ("blend_id", "synthetic_id", "real_id")).sort_values("blend_id")
    if settings.get("maps", "bank") == "bank":
        maps = load_array(maps_path, mmap=False)
        if maps.ndim != 3 or maps.shape[1:] != (image_size, image_size) or len(maps) == 0:
            raise DatasetError(f"{maps_path}: expected [B,{image_size},{image_size}] with B > 0, got shape {maps.shape}")
        entries = len(maps)
    else:
        maps, entries = None, len(pairs)
    if not len(pairs) or not np.array_equal(pairs["blend_id"].to_numpy(), np.arange(entries)):
        what = "one row per map of maps.npy" if maps is not None else "one row per entry"
        raise DatasetError(f"{pairs_path}: blend_id must be 0..{entries - 1}, {what}")
    synthetic_ids = pairs["synthetic_id"].to_numpy(dtype=np.int64)
    real_ids = pairs["real_id"].to_numpy(dtype=np.int64)
    sa_real_ids = pairs["sa_real_id"].to_numpy(dtype=np.int64) if "sa_real_id" in pairs else None
    if synthetic_ids.min() < 0 or synthetic_ids.max() >= synthetic_count:
        raise DatasetError(f"{pairs_path}: synthetic ids outside [0, {synthetic_count}) of the synthetic set")
    if maps is not None:
        return BlendBank(torch.from_numpy(maps.astype(np.float16)), synthetic_ids, real_ids, sa_real_ids=sa_real_ids)

    draws_path = blend_dir / "draws.parquet"
    draws = read_table(draws_path, ("blend_id", "synthetic_id", "real_id", "top", "left"), "run the blend stage")
    entry = draws["blend_id"].to_numpy(dtype=np.int64)
    if len(entry) and (entry.min() < 0 or entry.max() >= entries):
        raise DatasetError(f"{draws_path}: blend_id outside [0, {entries}) of {pairs_path.name}")
    if not (np.array_equal(draws["synthetic_id"].to_numpy(dtype=np.int64), synthetic_ids[entry])
            and np.array_equal(draws["real_id"].to_numpy(dtype=np.int64), real_ids[entry])):
        raise DatasetError(f"{draws_path}: synthetic_id/real_id disagree with {pairs_path.name} (files of two runs?)")
    if int(info.get("image_size", -1)) != image_size or len(info.get("hole") or ()) != 2:
        raise DatasetError(f"{info_path}: written for {info.get('image_size')} px with hole {info.get('hole')}; the "
                           f"prepared slices are {image_size} px (rerun the blend stage)")
    hole = (int(info["hole"][0]), int(info["hole"][1]))
    corners = draws[["top", "left"]].to_numpy(dtype=np.int64)
    if len(corners) and (corners.min() < 0 or (corners + np.array(hole) > image_size).any()):
        raise DatasetError(f"{draws_path}: a hole of {hole[0]}x{hole[1]} at top/left outside the {image_size} px image")
    return BlendBank(None, synthetic_ids, real_ids, draw_entries=entry, draw_corners=torch.tensor(corners),
                     hole=hole, kernel=str(settings.get("kernel", "gaussian")),
                     kernel_size=int(settings.get("kernel_size", 5)), sigma=float(settings.get("sigma", 1.0)),
                     maps_size=image_size, sa_real_ids=sa_real_ids)


def dataset_classes(prepared_dir: Path | str) -> int:
    """The prepared dataset's class count: prepare.json's num_classes (FIVES: 2), else 4 (ACDC's
    prepare.json predates the key and ACDC has 4)."""
    from sraseg.io import read_json

    meta_path = Path(prepared_dir) / "prepare.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    return int(meta.get("num_classes", 4))


_INPUT_FLAGS = {"synthetic_dir": "--synthetic", "embed_dir": "--embed-dir", "blend_dir": "--blend-dir"}


def needed_inputs(cfg: TrainSettings) -> dict[str, bool]:
    """Which of the optional input folders the method reads."""
    return {"synthetic_dir": cfg.method in ("bcp_synthetic", "sraseg"), "blend_dir": cfg.method == "sraseg",
            "embed_dir": cfg.method == "sraseg" and cfg.sa}


def check_inputs(cfg: TrainSettings, **given: Path | str | None) -> None:
    """ConfigError when the method needs an input folder (synthetic_dir, embed_dir, blend_dir) not given."""
    missing = [name for name, needed in needed_inputs(cfg).items() if needed and given[name] is None]
    if missing:
        raise ConfigError(f"method {cfg.method} needs input(s) {', '.join(missing)} (command line "
                          f"{', '.join(_INPUT_FLAGS[m] for m in missing)})")


@dataclass
class TrainInputs:
    """Everything a training run reads, on the CPU; None where the method reads no such input.

    Attributes:
        prepared: the prepared slices.
        unlabeled: the self-training pool of BCP (bcp_real: the unlabeled train slices; else the synthetic set).
        synthetic: float32 [M,S,S] (bcp_synthetic, sraseg).
        bank: the blend bank (sraseg); bank_real_pos: row in the labeled arrays of each entry's real slice.
        embed: the embedding targets (sraseg with sa); bank_sa_rows: row in real.npy of each entry's SA
            target; bank_real_embed_rows: row in real.npy of each entry's real slice.
    """

    prepared: Prepared
    unlabeled: torch.Tensor | None = None
    synthetic: torch.Tensor | None = None
    bank: BlendBank | None = None
    bank_real_pos: np.ndarray | None = None
    embed: EmbedTargets | None = None
    bank_sa_rows: np.ndarray | None = None
    bank_real_embed_rows: np.ndarray | None = None


def load_inputs(cfg: TrainSettings, prepared_dir: Path | str, synthetic_dir: Path | str | None = None,
                embed_dir: Path | str | None = None, blend_dir: Path | str | None = None) -> TrainInputs:
    """Load what `cfg.method` trains on (`check_inputs` has checked the folders it needs are given).

    Raises:
        ConfigError: the prepared dataset's class count is not train.num_classes.
        DatasetError: missing or inconsistent input files, no labeled slices, too few blend draws.
    """
    if dataset_classes(prepared_dir) != cfg.num_classes:
        raise ConfigError(f"'train.num_classes' is {cfg.num_classes} but the prepared dataset in {prepared_dir} has "
                          f"{dataset_classes(prepared_dir)} classes (prepare.json num_classes; 4 when absent)")
    prepared = load_prepared(prepared_dir, cfg.num_classes)
    inputs = TrainInputs(prepared)
    if cfg.method == "bcp_real":
        if len(prepared.unlabeled_images) == 0:
            raise DatasetError(f"{Path(prepared_dir) / 'slices.parquet'}: no unlabeled train slices for bcp_real")
        inputs.unlabeled = prepared.unlabeled_images
    if needed_inputs(cfg)["synthetic_dir"]:
        inputs.synthetic = inputs.unlabeled = load_synthetic(synthetic_dir, prepared.image_size)
    if cfg.method == "sraseg":
        _load_bank(inputs, cfg, blend_dir)
        if cfg.sa:
            _load_sa_targets(inputs, embed_dir, blend_dir)
    return inputs


def _load_bank(inputs: TrainInputs, cfg: TrainSettings, blend_dir: Path | str) -> None:
    """sraseg's blend bank and the labeled row of each entry's real slice."""
    inputs.bank = load_blend(blend_dir, inputs.prepared.image_size, len(inputs.synthetic))
    needed = cfg.selftrain_iterations * cfg.unlabeled_batch
    if inputs.bank.fresh and len(inputs.bank.draw_entries) < needed:
        raise DatasetError(
            f"{Path(blend_dir) / 'draws.parquet'}: {len(inputs.bank.draw_entries)} self-training draws, training needs "
            f"{needed} (selftrain_iterations x unlabeled_batch); rerun the blend stage with --draws set to that")
    inputs.bank_real_pos = inputs.prepared.labeled_position(inputs.bank.real_ids, Path(blend_dir) / "pairs.parquet")


def _load_sa_targets(inputs: TrainInputs, embed_dir: Path | str, blend_dir: Path | str) -> None:
    """The embeddings and, per bank entry, the real.npy rows of its SA target and of its real slice."""
    inputs.embed = load_embed(embed_dir, len(inputs.synthetic))
    inputs.bank_sa_rows = sa_target_rows(inputs.bank, inputs.embed, Path(blend_dir) / "pairs.parquet")
    inputs.bank_real_embed_rows = inputs.embed.rows_of(inputs.bank.real_ids, Path(embed_dir) / "real.parquet")


def sample_indices(population: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into range(population): without replacement when the pool is large enough.

    Returns:
        int64 [count] on the CPU.
    """
    if count <= population:
        return torch.randperm(population, generator=generator)[:count]
    return torch.randint(population, (count,), generator=generator)


def augment(
    images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample geometric augmentation (as BCP's generator): with probability 1/2 a random rot90 then
    a flip along a random axis; else with probability 1/2 a rotation by an angle in [-20, 20] degrees;
    else nothing. All channels of a sample get the same transform.

    Args:
        images: float [B,K,H,W] with H == W, resampled bilinearly (zeros outside). Always computed in
            fp32, also inside an autocast region: a bf16 sampling grid is off by up to 0.7 px at 256 px.
        labels: float [B,L,H,W] class-index maps, resampled nearest (background outside), or None.
        generator: CPU generator all random draws come from (a fixed number per sample).
        mode: "rot_flip_or_rotate" or "none".
    Returns:
        (images, labels) transformed, same shapes.
    """
    if mode == "none":
        return images, labels
    with full_precision(images.device):
        return _augment(images.float(), None if labels is None else labels.float(), generator)


def augment_pair(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator, mode: str,
    pairing: str = "shared",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment two image batches whose rows belong together (SRA-Seg's synthetic image and its real
    partner) and the second batch's labels.

    shared: sample i of both batches gets one transform (they were paired to match, and a rot90 applied
    to one only would undo that); the draws are those of one `augment` call on the stacked channels.
    separate: each batch its own transforms, drawn first for `first`, then for `second` and its labels.

    Args:
        first, second: float [B,K,H,W]; labels: float [B,L,H,W] of `second`, or None.
        generator, mode: as `augment`.
        pairing: "shared" or "separate".
    Returns:
        (first, second, labels) transformed, same shapes.
    Raises:
        ValueError: an unknown pairing.
    """
    if pairing == "shared":
        pair, labels = augment(torch.cat([first, second], 1), labels, generator, mode)
        return pair[:, : first.shape[1]], pair[:, first.shape[1] :], labels
    if pairing != "separate":
        raise ValueError(f"pair augmentation must be one of {', '.join(PAIR_AUGMENTS)}; got {pairing!r}")
    first, _ = augment(first, None, generator, mode)
    second, labels = augment(second, labels, generator, mode)
    return first, second, labels


def _augment(
    images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    count = images.shape[0]
    choice = torch.rand(count, generator=generator)
    turns = torch.randint(0, 4, (count,), generator=generator)
    axis = torch.randint(2, 4, (count,), generator=generator)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(MAX_ANGLE)
    images, labels = images.clone(), None if labels is None else labels.clone()
    for i in torch.nonzero(choice < 0.5).flatten().tolist():
        k, dim = int(turns[i]), int(axis[i])
        images[i] = torch.rot90(images[i], k, dims=(1, 2)).flip(dim - 1)
        if labels is not None:
            labels[i] = torch.rot90(labels[i], k, dims=(1, 2)).flip(dim - 1)
    rotate = torch.nonzero((choice >= 0.5) & (choice < 0.75)).flatten()
    if len(rotate):
        cos, sin = torch.cos(angle[rotate]), torch.sin(angle[rotate])
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                             torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
        # the draws are on the host: stage them without waiting for the device (a blocking copy would sync)
        theta = theta.to(images.device, images.dtype, non_blocking=True)
        index = rotate.to(images.device, non_blocking=True)
        grid = F.affine_grid(theta, [len(rotate), images.shape[1], *images.shape[2:]], align_corners=False)
        images[index] = F.grid_sample(images[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if labels is not None:
            labels[index] = F.grid_sample(labels[index], grid.to(labels.dtype), mode="nearest", padding_mode="zeros",
                                          align_corners=False)
    return images, labels
