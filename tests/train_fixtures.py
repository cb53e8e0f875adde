"""Tiny train-stage inputs written directly in the CONTRACTS.md formats (prepared, synthetic, embed,
blend), plus tiny TrainSettings for runs of a few iterations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sraseg.blend.maps import make_blend_maps

SIZE = 32
EMBED_DIM = 8

TINY = dict(
    pretrain_iterations=2,
    selftrain_iterations=2,
    labeled_batch=4,
    unlabeled_batch=4,
    sa_batch=2,
    val_every=2,
    checkpoint_every=1,
    device="cpu",
)


def disc_slice(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A cardiac-like slice: LV disc, MYO ring around it, RV disc up and to the left (no mirror or
    transpose symmetry, so a label moved differently from its image shows); image intensities follow the
    label (one level per class plus a little noise), in [0,1]."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-3, 3, size=2)
    r_lv = rng.uniform(3, 5)
    dist = np.hypot(yy - cy, xx - cx)
    rv_dist = np.hypot(yy - (cy - 3), xx - (cx - r_lv - 5))
    label = np.zeros((size, size), np.uint8)
    label[rv_dist < 4] = 1
    label[(dist >= r_lv) & (dist < r_lv + 2.5)] = 2
    label[dist < r_lv] = 3
    levels = np.array([0.1, 0.8, 0.4, 0.9], np.float32)
    image = levels[label] + rng.normal(0, 0.05, (size, size)).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), label


def make_prepared(root: Path, seed: int = 0, size: int = SIZE) -> Path:
    """patient001-002 labeled train, 003 unlabeled train, 004 val, 005 test; 2 frames x 3 slices each."""
    rng = np.random.default_rng(seed)
    splits = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    rows, images, labels = [], [], []
    for patient, split in splits.items():
        for frame, phase in ((1, "ED"), (8, "ES")):
            for z in range(3):
                image, label = disc_slice(rng, size)
                images.append(image)
                labels.append(label)
                rows.append(dict(slice_id=len(rows), case=f"patient{patient:03d}_frame{frame:02d}",
                                 patient=f"patient{patient:03d}", frame=frame, phase=phase, slice=z, split=split,
                                 labeled=split == "train" and patient <= 2))
    out = root / "prepared"
    out.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(out / "slices.parquet")
    np.save(out / "images.npy", np.stack(images))
    np.save(out / "labels.npy", np.stack(labels))
    return out


def make_synthetic(root: Path, count: int = 8, seed: int = 1, size: int = SIZE) -> Path:
    rng = np.random.default_rng(seed)
    out = root / "synthetic"
    out.mkdir(parents=True)
    np.save(out / "images.npy", np.stack([disc_slice(rng, size)[0] for _ in range(count)]))
    pd.DataFrame(dict(synthetic_id=np.arange(count), seed=np.arange(count) + 100)).to_parquet(
        out / "synthetic.parquet"
    )
    return out


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, EMBED_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_embed(root: Path, prepared: Path, synthetic: Path, seed: int = 2) -> Path:
    """Random unit embeddings (D=8) for every train slice and synthetic image; neighbours by cosine."""
    rng = np.random.default_rng(seed)
    table = pd.read_parquet(prepared / "slices.parquet")
    train = table[table["split"] == "train"]
    count = len(np.load(synthetic / "images.npy", mmap_mode="r"))
    real, syn = _unit(rng, len(train)), _unit(rng, count)
    out = root / "embed"
    out.mkdir(parents=True)
    np.save(out / "real.npy", real)
    np.save(out / "synthetic.npy", syn)
    pd.DataFrame(dict(row=np.arange(len(train)), slice_id=train["slice_id"].to_numpy(),
                      labeled=train["labeled"].to_numpy())).to_parquet(out / "real.parquet")
    pd.DataFrame(dict(row=np.arange(count), synthetic_id=np.arange(count))).to_parquet(out / "synthetic.parquet")
    cosine = syn @ real.T
    order = np.argsort(-cosine, axis=1)[:, :2]
    pd.DataFrame(
        [dict(synthetic_id=s, rank=k, real_id=int(train["slice_id"].iloc[j]), cosine=float(cosine[s, j]))
         for s in range(count) for k, j in enumerate(order[s])]
    ).to_parquet(out / "neighbours.parquet")
    return out


def make_blend(root: Path, prepared: Path, synthetic: Path, kind: str = "gaussian", seed: int = 3,
               embed: Path | None = None) -> Path:  # fmt: skip
    """Two maps per synthetic image, each paired with a random labeled train slice; with `embed`, each entry's
    SA target is its image's rank-0 neighbour there (sa_real_id, as the blend stage writes it)."""
    rng = np.random.default_rng(seed)
    table = pd.read_parquet(prepared / "slices.parquet")
    labeled = table.loc[table["labeled"], "slice_id"].to_numpy()
    count, size = np.load(synthetic / "images.npy", mmap_mode="r").shape[:2]
    maps = make_blend_maps(2 * count, size, size, rng, kind)[:, 0].numpy().astype(np.float16)
    out = root / f"blend_{kind}"
    out.mkdir(parents=True)
    np.save(out / "maps.npy", maps)
    pd.DataFrame(dict(blend_id=np.arange(2 * count), synthetic_id=np.repeat(np.arange(count), 2),
                      real_id=rng.choice(labeled, 2 * count), map_index=np.tile([0, 1], count),
                      rank=np.zeros(2 * count, int), cosine=np.full(2 * count, np.nan))).to_parquet(out / "pairs.parquet")
    if embed is not None:
        pairs = pd.read_parquet(out / "pairs.parquet")
        neighbours = pd.read_parquet(embed / "neighbours.parquet")
        nearest = neighbours[neighbours["rank"] == 0].set_index("synthetic_id")["real_id"]
        pairs["sa_real_id"] = nearest.loc[pairs["synthetic_id"]].to_numpy(dtype=np.int64)
        pairs.to_parquet(out / "pairs.parquet")
    return out


def make_fresh_blend(root: Path, inputs: dict[str, Path], draws: int, **settings) -> Path:
    """The blend stage's own `maps: fresh` folder for `make_all`'s inputs: two random partners per synthetic
    image and `draws` self-training draws (pairs.parquet, draws.parquet, blend.json, preview.png)."""
    from sraseg.blend import run as blend

    out = root / "blend_fresh"
    blend.run(inputs["synthetic_dir"], inputs["prepared_dir"], inputs["embed_dir"] / "neighbours.parquet", out,
              dict(dict(maps="fresh", pairing="random", maps_per_image=2), **settings), draws=draws,
              embed_dir=inputs["embed_dir"])
    return out


def make_all(root: Path, size: int = SIZE) -> dict[str, Path]:
    """Every input of every method, keyed by `run` keyword."""
    prepared = make_prepared(root, size=size)
    synthetic = make_synthetic(root, size=size)
    embed = make_embed(root, prepared, synthetic)
    return dict(prepared_dir=prepared, synthetic_dir=synthetic, embed_dir=embed,
                blend_dir=make_blend(root, prepared, synthetic, embed=embed))


def student_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """The published student weights of a finished run (last.ckpt is gone once they are published)."""
    from safetensors.torch import load_file

    return load_file(str(out_dir / "model.safetensors"))


class Interrupted(Exception):
    """Stands for a kill of the train process right after it wrote a checkpoint."""


def interrupt_after(monkeypatch, step: int, run) -> None:
    """Call `run()` with the train loop stopping right after it writes the checkpoint of global `step`."""
    from sraseg.train import loop

    real_save = loop.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        if state["step"] == step:
            raise Interrupted

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    try:
        with pytest.raises(Interrupted):
            run()
    finally:
        monkeypatch.setattr(loop, "save_checkpoint", real_save)


def patch_train(monkeypatch, name: str, value, home: bool = False) -> None:
    """Replace function `name` in every train-stage module that imports it (the loop, the context, the
    method modules, ...), so a spy sees every call the training makes; with `home`, also in the module that
    defines it (for its callers there, e.g. `validation.validate_models` calling `validate`)."""
    import sys

    import sraseg.train.loop  # noqa: F401  (imports every train module a run uses)

    for key in sorted(sys.modules):
        module = sys.modules[key]
        if not key.startswith("sraseg.train.") or not callable(getattr(module, name, None)):
            continue
        if home or getattr(getattr(module, name), "__module__", key) != key:
            monkeypatch.setattr(module, name, value)
