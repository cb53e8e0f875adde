"""FIVES: the fundus phantom's layout and vessels, the checked reader and prepare, and the split lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_data import copy_dataset, run_cli
from PIL import Image
from scipy import ndimage
from train_fixtures import TINY

from sraseg.cli import build_parser
from sraseg.data import acdc, fives, fives_phantom, fives_splits
from sraseg.datasets import fives as fives_dataset
from sraseg.datasets import prepare
from sraseg.errors import ConfigError, DatasetError
from sraseg.train import log_table, loop
from sraseg.train.unet import load_model
from sraseg.train.validation import validate

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST, SIZE = 8, 4, 128  # 2 and 1 images per condition
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("fives") / "raw"
    fives_phantom.run(out, train=TRAIN, test=TEST, size=SIZE, seed=0)
    return out


@pytest.fixture(scope="module")
def splits():
    """train 4 (one per condition), val 4, test 4, labeled_4 = the pool."""
    return fives_splits.protocol_splits(fives_splits.release_case_ids(TRAIN, TEST), 1, (1,), seed=0)


def _write_splits(root, lists, labeled="labeled_4"):
    folder = root / "splits"
    fives_splits.write_splits(lists, folder, "test split")
    return folder, folder / f"{labeled}.txt"


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


# ---- the phantom -------------------------------------------------------------------------------


def test_phantom_writes_the_release_layout(raw):
    for split, count in (("train", TRAIN), ("test", TEST)):
        images = sorted(p.name for p in (raw / split / "Original").iterdir())
        masks = sorted(p.name for p in (raw / split / "Ground truth").iterdir())
        assert images == masks and len(images) == count
        # numbered from 1 in each split, conditions in blocks A, D, G, N
        expected = [f"{n}_{c}.png" for n, c in fives_phantom.release_names(count)]
        assert images == sorted(expected)
        assert [c for _, c in fives_phantom.release_names(count)] == sorted(fives_phantom.CONDITIONS * (count // 4))
    assert (raw / "train" / "Original" / "1_A.png").is_file() and (raw / "test" / "Original" / "1_A.png").is_file()
    with Image.open(raw / "train" / "Original" / "3_D.png") as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (SIZE, SIZE))
    for name in _files(raw):
        if name.parts[1] != "Ground truth":
            continue
        mask = np.asarray(Image.open(raw / name))
        assert mask.shape == (SIZE, SIZE, 3) and mask.dtype == np.uint8
        assert (mask[..., 0] == mask[..., 1]).all() and (mask[..., 0] == mask[..., 2]).all()
        assert set(np.unique(mask).tolist()) == {0, 255}, name  # binary and not empty
    meta = json.loads((raw / "phantom.json").read_text())
    assert meta["layout"] == "FIVES" and len(meta["images"]) == TRAIN + TEST
    assert meta["counts"]["train"] == {c: 2 for c in "ADGN"}


def _runs_on_circle(mask: np.ndarray, centre, radius: float) -> list[int]:
    """Lengths (in samples of 0.25 px) of the vessel runs a circle crosses."""
    angles = np.linspace(0, 2 * np.pi, int(2 * np.pi * radius * 4), endpoint=False)
    rows = np.floor(centre[0] + radius * np.sin(angles)).astype(int)
    cols = np.floor(centre[1] + radius * np.cos(angles)).astype(int)
    ok = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    on = np.zeros(len(angles), dtype=bool)
    on[ok] = mask[rows[ok], cols[ok]] > 0
    if on.all() or not on.any():
        return [len(on)] if on.all() else []
    on = np.roll(on, -int(np.argmin(on)))  # start outside a vessel
    edges = np.flatnonzero(np.diff(on.astype(int)))
    starts, ends = edges[::2], edges[1::2]
    return list(ends - starts)


def test_phantom_vessels_are_thin_branching_trees_seen_in_the_image():
    size = 256
    for index, cond in enumerate("ADGN"):
        image, mask, geo = fives_phantom.make_image(index, cond, size, seed=3)
        rr, cc = np.mgrid[0:size, 0:size] + 0.5
        fov = np.hypot(rr - geo["fov"][0], cc - geo["fov"][1]) < geo["fov_radius"]
        fraction = mask[fov].mean()
        assert 0.02 < fraction < 0.2, (cond, fraction)
        # thin: a disc of radius 3 px fits almost nowhere inside a vessel (only where two cross)
        disc = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
        core = ndimage.binary_erosion(mask, disc)
        assert core.sum() < 0.03 * mask.sum(), (cond, core.sum(), mask.sum())
        # connected trees: a few components, most pixels in the largest ones
        labels, n = ndimage.label(mask, np.ones((3, 3)))
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        assert n <= 12 and sizes[:3].sum() > 0.8 * mask.sum(), (cond, n)
        # branching with decreasing width: farther from the disc, more and narrower vessels
        near = _runs_on_circle(mask, geo["disc"], 1.6 * geo["disc_radius"])
        far = _runs_on_circle(mask, geo["disc"], 4.0 * geo["disc_radius"])
        assert len(near) >= 4 and len(far) > len(near), (cond, len(near), len(far))
        assert np.median(far) < np.median(near), (cond, np.median(near), np.median(far))
        # the image shows them: vessels darker (green channel) than the fundus beside them
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask.astype(bool) & fov
        green = image[..., 1].astype(float)
        assert green[mask.astype(bool)].mean() < green[ring].mean() - 3, cond


def test_phantom_conditions_differ():
    stats = {}
    for cond in "ADGN":
        geo = [fives_phantom.make_image(i, cond, 128, seed=0)[2] for i in range(3)]
        stats[cond] = [g["cup_to_disc"] for g in geo]
    assert min(stats["G"]) >= 0.6 and max(max(stats[c]) for c in "ADN") <= 0.45
    # lesions: DR images hold dark red blots away from vessels, normal eyes none
    def dark_spots(cond):
        image, mask, geo = fives_phantom.make_image(7, cond, 256, seed=0)
        rgb = image.astype(float)
        red_dark = (rgb[..., 0] < 0.6 * np.median(rgb[..., 0][rgb[..., 0] > 20])) & (rgb[..., 0] > 20)
        far = ~ndimage.binary_dilation(mask, iterations=4)
        return int((red_dark & far).sum())

    assert dark_spots("D") > dark_spots("N") + 20


def test_phantom_same_seed_same_bytes(raw, tmp_path):
    again = tmp_path / "again"
    fives_phantom.run(again, train=TRAIN, test=TEST, size=SIZE, seed=0)
    assert _files(raw) == _files(again)
    for rel in _files(raw):
        assert (raw / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    fives_phantom.run(other, train=1, test=1, size=SIZE, seed=1)
    name = "train/Original/1_A.png"
    assert (raw / name).read_bytes() != (other / name).read_bytes()


@pytest.mark.parametrize("kwargs", [dict(train=0), dict(size=32), dict(seed=-1), dict(test=True)])
def test_phantom_bad_settings(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        fives_phantom.run(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# ---- the reader and prepare ---------------------------------------------------------------------


def test_prepare_round_trips_the_phantom(raw, splits, tmp_path):
    splits_dir, labeled = _write_splits(tmp_path, splits)
    out = tmp_path / "prepared"
    prepare.run(raw, splits_dir, labeled, SIZE, out, dataset="fives")
    table = pd.read_parquet(out / "slices.parquet")
    images, labels = np.load(out / "images.npy"), np.load(out / "labels.npy")
    assert images.dtype == np.float32 and labels.dtype == np.uint8 and images.shape == (12, SIZE, SIZE)
    assert list(table.slice_id) == list(range(12))
    assert list(table.case) == splits["train"] + splits["val"] + splits["test"]
    assert (table.patient == table.case).all()
    assert table.split.tolist() == ["train"] * 4 + ["val"] * 4 + ["test"] * 4
    assert table.labeled.tolist() == [True] * 4 + [False] * 8
    for row in table.itertuples():
        release, number, cond = fives.parse_case(row.case)
        assert (row.condition, row.release_split) == (cond, release)
        rgb = np.asarray(Image.open(raw / release / "Original" / f"{number}_{cond}.png"), dtype=np.float64)
        grey = rgb @ LUMA
        expected = (grey - grey.min()) / (grey.max() - grey.min())
        np.testing.assert_allclose(images[row.slice_id], expected, atol=1e-5)
        mask = np.asarray(Image.open(raw / release / "Ground truth" / f"{number}_{cond}.png"))[..., 0] == 255
        np.testing.assert_array_equal(labels[row.slice_id], mask.astype(np.uint8))
    assert labels.max() == 1 and 0.01 < labels.mean() < 0.2
    volumes = pd.read_parquet(out / "volumes.parquet")
    assert (volumes.nz == 1).all() and (volumes.nx == SIZE).all() and list(volumes.first_slice_id) == list(range(12))
    meta = json.loads((out / "prepare.json").read_text())
    assert meta["dataset"] == "fives" and meta["num_classes"] == 2 and meta["image_size"] == SIZE
    assert meta["counts"]["conditions"]["val"] == {c: 1 for c in "ADGN"}


def test_prepare_resizes_images_smoothly_and_masks_without_bias(raw, splits, tmp_path):
    splits_dir, labeled = _write_splits(tmp_path, splits)
    out = tmp_path / "prepared"
    prepare.run(raw, splits_dir, labeled, 64, out, dataset="fives")
    images, labels = np.load(out / "images.npy"), np.load(out / "labels.npy")
    assert images.shape == labels.shape == (12, 64, 64)
    assert images.min() >= 0 and images.max() <= 1 and set(np.unique(labels)) == {0, 1}
    full = np.stack([fives.read_mask(raw / "train" / "Ground truth" / f"{n}_{c}.png")
                     for _, n, c in map(fives.parse_case, splits["train"])])  # fmt: skip
    assert abs(labels[:4].mean() - full.mean()) < 0.25 * full.mean()  # nearest keeps the vessel fraction
    grey = fives.read_image(raw / "train" / "Original" / "1_A.png")
    box = grey.reshape(64, 2, 64, 2).mean((1, 3))  # antialiased: close to the 2 x 2 box average
    row = pd.read_parquet(out / "slices.parquet").set_index("case").loc["train_1_A", "slice_id"]
    assert np.abs(images[row] - box).mean() < 0.02


def _damage_truncate(root):
    path = root / "train" / "Original" / "3_D.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path, "unreadable PNG"


def _damage_not_png(root):
    path = root / "test" / "Ground truth" / "2_D.png"
    path.write_text("not an image\n")
    return path, "unreadable PNG"


def _damage_size(root):
    path = root / "train" / "Ground truth" / "5_G.png"
    Image.open(path).resize((SIZE, SIZE + 8), Image.NEAREST).save(path)
    return path, "differs from image size"


def _damage_values(root):
    path = root / "train" / "Ground truth" / "7_N.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[mask == 255] = 128
    Image.fromarray(mask).save(path)
    return path, "not background/vessel"


def _damage_channels(root):
    path = root / "train" / "Ground truth" / "1_A.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[:10, :10, 1] = 255 - mask[:10, :10, 1]
    Image.fromarray(mask).save(path)
    return path, "channels differ"


def _damage_no_mask(root):
    (root / "train" / "Ground truth" / "4_D.png").unlink()
    return root / "train" / "Original" / "4_D.png", "image without its mask"


def _damage_no_image(root):
    (root / "test" / "Original" / "4_N.png").unlink()
    return root / "test" / "Ground truth" / "4_N.png", "mask without its image"


def _damage_duplicate_pixels(root):
    # the same eye under two names, one in each release split: a train/test leak
    for folder in ("Original", "Ground truth"):
        shutil.copy(root / "train" / folder / "1_A.png", root / "test" / folder / "1_A.png")
    return root / "test" / "Original" / "1_A.png", "same pixels as"


def _damage_duplicate_number(root):
    for folder in ("Original", "Ground truth"):
        shutil.copy(root / "train" / folder / "3_D.png", root / "train" / folder / "03_D.png")
    return root / "train" / "Original" / "3_D.png", "already used"


def _damage_name(root):
    path = root / "train" / "Original" / "eye.png"
    shutil.copy(root / "train" / "Original" / "1_A.png", path)
    return path, "name is not"


def _damage_constant(root):
    path = root / "train" / "Original" / "6_G.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)).save(path)
    return path, "constant image"


def _damage_missing_folder(root):
    shutil.rmtree(root / "test" / "Ground truth")
    return root / "test" / "Ground truth", "folder missing"


DAMAGES = [
    _damage_truncate, _damage_not_png, _damage_size, _damage_values, _damage_channels, _damage_no_mask,
    _damage_no_image, _damage_duplicate_pixels, _damage_duplicate_number, _damage_name, _damage_constant,
    _damage_missing_folder,
]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[len("_damage_"):])
def test_bad_input_is_one_error_naming_the_file_and_nothing_is_written(raw, splits, tmp_path, damage):
    broken = copy_dataset(raw, tmp_path / "raw")
    path, problem = damage(broken)
    splits_dir, labeled = _write_splits(tmp_path, splits)
    out = tmp_path / "prepared"
    with pytest.raises(DatasetError) as err:
        prepare.run(broken, splits_dir, labeled, SIZE, out, dataset="fives")
    message = str(err.value)
    assert "\n" not in message
    named = [part for part in message.split("; ") if str(path.resolve()) in part]
    assert named and problem in named[0], message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no staging left over


def test_case_in_two_splits_or_not_on_disk(raw, splits, tmp_path):
    twice = dict(splits, val=splits["val"] + [splits["test"][0]])
    splits_dir, labeled = _write_splits(tmp_path / "a", twice)
    with pytest.raises(DatasetError, match=r"test_1_A: case listed in both 'val' and 'test'"):
        fives.check_dataset(raw, {n: acdc.read_split_list(splits_dir / f"{n}.txt") for n in ("train", "val", "test")})
    with pytest.raises(DatasetError, match=r"test/Original/9_N.png: case test_9_N in split 'test' not found"):
        fives.check_dataset(raw, {"train": splits["train"], "test": ["test_9_N"]})
    records = fives.check_dataset(raw, {"train": splits["train"]})
    assert [r.case for r in records] == splits["train"] and records[0].shape == (SIZE, SIZE)


def test_masks_in_other_encodings_are_read(tmp_path):
    mask = np.zeros((6, 5), dtype=np.uint8)
    mask[2, 1:4] = 1
    for name, data, mode in (("grey255.png", mask * 255, "L"), ("grey01.png", mask, "L"), ("bits.png", mask * 255, "1")):
        Image.fromarray(data).convert(mode).save(tmp_path / name)
        np.testing.assert_array_equal(fives.read_mask(tmp_path / name), mask, err_msg=name)


def test_labeled_outside_train(raw, splits, tmp_path):
    bad = dict(splits, labeled_4=[splits["val"][0]])
    splits_dir, labeled = _write_splits(tmp_path, bad)
    with pytest.raises(ConfigError, match="not in"):
        prepare.run(raw, splits_dir, labeled, SIZE, tmp_path / "out", dataset="fives")
    assert not (tmp_path / "out").exists()


# ---- split lists ---------------------------------------------------------------------------------


def _read(folder, name):
    return acdc.read_split_list(folder / f"{name}.txt")


def _conditions(ids):
    return {c: sum(1 for i in ids if fives.parse_case(i)[2] == c) for c in "ADGN"}


def test_shipped_fives_splits_follow_the_protocol():
    folder = REPO / "config" / "splits" / "fives"
    lists = {n: _read(folder, n) for n in ("train", "val", "test", "labeled_56", "labeled_28")}
    assert [len(lists[n]) for n in ("train", "val", "test", "labeled_56", "labeled_28")] == [560, 40, 200, 56, 28]
    everyone = lists["train"] + lists["val"] + lists["test"]
    assert len(set(everyone)) == 800 and set(everyone) == set(fives_splits.release_case_ids())
    assert set(lists["labeled_28"]) <= set(lists["labeled_56"]) <= set(lists["train"])
    assert all(fives.parse_case(c)[0] == "test" for c in lists["test"])  # the release's test stays test
    sizes = {n: _conditions(ids) for n, ids in lists.items()}
    assert sizes == {n: {c: k for c in "ADGN"} for n, k in
                     (("train", 140), ("val", 10), ("test", 50), ("labeled_56", 14), ("labeled_28", 7))}  # fmt: skip
    # the files are what the documented rule writes
    assert lists == fives_splits.protocol_splits(fives_splits.release_case_ids(), 140, (14, 7), seed=0)


def test_shipped_phantom_splits_match_the_phantom_names():
    folder = REPO / "config" / "splits" / "fives_phantom"
    lists = {n: _read(folder, n) for n in ("train", "val", "test", "labeled_8", "labeled_4")}
    assert lists == fives_splits.protocol_splits(fives_splits.release_case_ids(48, 16), 10, (2, 1), seed=0)
    assert [len(lists[n]) for n in ("train", "val", "test", "labeled_8", "labeled_4")] == [40, 8, 16, 8, 4]
    assert not set(lists["train"]) & set(lists["val"]) and set(lists["labeled_4"]) <= set(lists["labeled_8"])


def test_phantom_names_are_the_release_case_ids(raw):
    records, problems = fives.list_release(raw)
    assert not problems and sorted(records) == sorted(fives_splits.release_case_ids(TRAIN, TEST))


def test_protocol_draw_depends_on_the_seed_and_checks_sizes():
    cases = fives_splits.release_case_ids()
    a = fives_splits.protocol_splits(cases, seed=0)
    b = fives_splits.protocol_splits(cases, seed=1)
    assert a["test"] == b["test"] and set(a["train"]) != set(b["train"]) and a["labeled_56"] != b["labeled_56"]
    with pytest.raises(ConfigError, match="pool_per_condition"):
        fives_splits.protocol_splits(cases, pool_per_condition=150)
    with pytest.raises(ConfigError, match="labeled_per_condition"):
        fives_splits.protocol_splits(cases, pool_per_condition=10, labeled_per_condition=(11,))
    with pytest.raises(ConfigError, match="not a FIVES case id"):
        fives_splits.protocol_splits(["patient001"])


# ---- the command line -----------------------------------------------------------------------------


def test_prepare_cli_picks_the_stage_module_by_layout():
    base = ["prepare", "--raw-dir", "r", "--splits-dir", "s", "--labeled", "l", "--out-dir", "o"]
    args = build_parser().parse_args(base)
    assert args.target == "sraseg.datasets.prepare"  # one stage module; the dataset is an argument
    assert args.kwargs(args) == dict(raw_dir=Path("r"), splits_dir=Path("s"), labeled_list=Path("l"), image_size=256,
                                     out_dir=Path("o"), dataset="acdc")  # fmt: skip
    args = build_parser().parse_args([*base, "--dataset", "fives"])
    assert args.target == "sraseg.datasets.prepare" and args.kwargs(args)["dataset"] == "fives"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--dataset", "drive"])


def test_cli_phantom_splits_and_a_bad_mask(tmp_path):
    out = tmp_path / "raw"
    proc = run_cli("fives-phantom", "--out-dir", str(out), "--train", "4", "--test", "4", "--size", "64")
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "test" / "Ground truth").glob("*.png"))) == 4
    proc = run_cli("fives-splits", "--raw-dir", str(out), "--out-dir", str(tmp_path / "splits"),
                   "--pool-per-condition", "0")  # fmt: skip
    assert proc.returncode == 1 and "pool_per_condition 0" in proc.stderr and not (tmp_path / "splits").exists()
    bad = out / "train" / "Ground truth" / "2_D.png"
    Image.fromarray(np.full((64, 64), 7, dtype=np.uint8)).save(bad)
    splits_dir = tmp_path / "s"
    splits_dir.mkdir()
    for name, ids in (("train", ["train_1_A", "train_2_D"]), ("val", ["train_3_G"]), ("test", ["test_1_A"])):
        (splits_dir / f"{name}.txt").write_text("\n".join(ids) + "\n")
    (splits_dir / "labeled.txt").write_text("train_1_A\n")
    prepared = tmp_path / "prepared"
    proc = run_cli("prepare", "--dataset", "fives", "--raw-dir", str(out), "--splits-dir", str(splits_dir),
                   "--labeled", str(splits_dir / "labeled.txt"), "--image-size", "64", "--out-dir", str(prepared))  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith("sraseg prepare: error:"), proc.stderr
    assert str(bad) in errors[0] and "mask values [7]" in errors[0]
    assert not prepared.exists()


# ---- binary training on the prepared phantom -------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_binary(raw, tmp_path_factory):
    """The phantom prepared at 32 px: 6 train images (2 labeled), 2 val, 4 test."""
    root = tmp_path_factory.mktemp("fives_prepared")
    cases = fives_splits.release_case_ids(TRAIN, TEST)
    train_ids = [c for c in cases if c.startswith("train_")]
    lists = dict(train=train_ids[:6], val=train_ids[6:], test=[c for c in cases if c.startswith("test_")],
                 labeled=[train_ids[0], train_ids[2]])  # fmt: skip
    splits_dir, labeled = _write_splits(root, lists, labeled="labeled")
    prepare.run(raw, splits_dir, labeled, 32, root / "prepared", dataset="fives")
    return root / "prepared"


def test_binary_training_logs_the_vessel_class(prepared_binary, tmp_path):
    settings = dict(TINY, method="bcp_real", num_classes=2, channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])
    out = loop.run(out_dir=tmp_path / "run", settings=settings, seed=0, prepared_dir=prepared_binary)
    table = pd.read_csv(out / "train_log.csv")
    assert tuple(table.columns) == log_table.log_columns(("vessel",))
    assert "val_dice_rv" not in table.columns and table.val_dice_vessel.between(0, 1).all()
    selftrain = table[table.phase == "selftrain"]
    assert len(selftrain) and selftrain.pl_frac_vessel.between(0, 1).all()
    model, meta = load_model(out / "model.safetensors")
    assert meta["num_classes"] == 2
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    assert json.loads((out / "train.json").read_text())["labeled_fraction"].keys() == {"vessel"}
    # the class count comes from the dataset: ACDC's 4 on FIVES data is refused before training
    with pytest.raises(ConfigError, match="has 2 classes"):
        loop.run(out_dir=tmp_path / "four", settings=dict(settings, num_classes=4), seed=0, prepared_dir=prepared_binary)
    assert not (tmp_path / "four").exists()


def test_validate_scores_the_vessel_class_per_image():
    class ReadsIntensity(torch.nn.Module):  # vessel where the image is bright
        def forward(self, x):
            return torch.cat([0.5 - x, x - 0.5], 1)

    truth = np.zeros((3, 6, 6), np.uint8)
    truth[0, 1:3, 1:3] = 1  # image a: 4 vessel px, 2 predicted
    pred = np.zeros_like(truth)
    pred[0, 1:3, 1] = 1
    pred[1, 0, :] = 1  # image b: predicted vessel, none true -> 0
    # image c: nothing in either -> 1
    dice = validate(ReadsIntensity(), torch.from_numpy(pred.astype(np.float32)), torch.from_numpy(truth),
                         np.array(["a", "b", "c"]), torch.device("cpu"), batch=2)  # fmt: skip
    np.testing.assert_allclose(dice, [(2 * 2 / (2 + 4) + 0 + 1) / 3])
    assert log_table.class_names(2) == ("vessel",) and log_table.class_names(4) == ("rv", "myo", "lv")
    assert log_table.log_columns() == log_table.LOG_COLUMNS


def test_per_image_2d_metrics_in_pixels_match_a_hand_computed_case():
    """A 3 x 4 vessel patch predicted one row too low: overlap 8 of 12 + 12 px, so Dice 2/3 and
    Jaccard 1/2. Each surface has 10 px (the 2 interior px eroded); 6 of each surface lie one pixel
    from the other surface, 4 on it: HD95 1 px, ASD 6/10 px in both modes."""
    from sraseg.metrics import score_case

    ref = np.zeros((8, 8), np.uint8)
    ref[2:5, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[3:6, 2:6] = 1
    rows = score_case(pred, ref, spacing=(1.0, 1.0), classes={1: "vessel"})
    assert [(r["cls"], r["mode"]) for r in rows] == [("vessel", "peer"), ("vessel", "mm")]
    for row in rows:
        np.testing.assert_allclose([row["dice"], row["jaccard"], row["hd95"], row["asd"]], [2 / 3, 0.5, 1.0, 0.6],
                                   err_msg=row["mode"])  # fmt: skip


# ---- predict (PNG masks) and evaluate (per image, in pixels) ----------------------------------------


def test_image_mode_scores_the_hand_computed_case_and_leaves_empty_distances_missing():
    """The hand-computed patch above through the FIVES evaluate's image mode: Dice 2/3, Jaccard 1/2,
    HD95 1 px, ASD 0.6 px; an empty prediction is a miss (Dice 0) with HD95/ASD missing, not 0."""
    ref = np.zeros((8, 8), bool)
    ref[2:5, 2:6] = True
    pred = np.zeros_like(ref)
    pred[3:6, 2:6] = True
    got = fives_dataset.image_scores(pred, ref)
    np.testing.assert_allclose([got[m] for m in ("dice", "jaccard", "hd95", "asd")], [2 / 3, 0.5, 1.0, 0.6])
    empty = fives_dataset.image_scores(np.zeros_like(ref), ref)
    assert empty["dice"] == 0 and empty["jaccard"] == 0 and np.isnan(empty["hd95"]) and np.isnan(empty["asd"])


@pytest.fixture(scope="module")
def binary_run(prepared_binary, tmp_path_factory):
    settings = dict(TINY, method="labeled_only", num_classes=2, channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])
    return loop.run(out_dir=tmp_path_factory.mktemp("fives_run") / "run", settings=settings, seed=0,
                    prepared_dir=prepared_binary)  # fmt: skip


def test_predict_writes_png_masks_at_the_image_size_and_evaluate_scores_them(raw, prepared_binary, binary_run, tmp_path):
    from sraseg.evaluate import predict
    from sraseg.evaluate import run as evaluate

    # the workflow's mode: the prepared test cases, <case>.png
    preds = tmp_path / "predictions"
    predict.run(binary_run, prepared_binary, "test", preds, device="cpu", dataset="fives")
    test_cases = sorted(pd.read_parquet(prepared_binary / "volumes.parquet").query("split == 'test'").case)
    assert sorted(p.stem for p in preds.glob("*.png")) == test_cases
    for path in preds.glob("*.png"):
        mask = np.asarray(Image.open(path))
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    summary = evaluate.run(preds, raw, tmp_path / "eval", dataset="fives")
    assert summary["image"]["n_cases"] == len(test_cases) and summary["stacked"]["n_cases"] == len(test_cases)
    assert 0 <= summary["image"]["mean"]["dice"] <= 1 and set(summary["image"]["per_class"]) == {"vessel"}
    table = pd.read_csv(tmp_path / "eval" / "metrics_per_case.csv")
    assert list(table.columns) == ["case", "class", "mode", "dice", "jaccard", "hd95", "asd"]
    assert (table["mode"] == "image").sum() == len(test_cases) and (table["mode"] == "stacked").sum() == 1

    # the ground truth itself scores perfectly in both modes
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for case in test_cases:
        _, number, cond = fives.parse_case(case)
        shutil.copy(raw / "test" / "Ground truth" / f"{number}_{cond}.png", perfect / f"{case}.png")
    summary = evaluate.run(perfect, raw, tmp_path / "eval_perfect", dataset="fives")
    for mode in ("image", "stacked"):
        assert summary[mode]["mean"] == dict(dice=1.0, jaccard=1.0, hd95=0.0, asd=0.0), mode


def test_predict_cli_on_a_folder_of_pngs_writes_masks_with_the_same_names(raw, binary_run, tmp_path):
    images = raw / "test" / "Original"
    args = build_parser().parse_args(["predict", "-i", str(images), "-o", str(tmp_path / "o"), "-m", str(binary_run)])
    assert args.kwargs(args)["dataset"] == "fives"  # PNG input picks the 2-D path by itself
    proc = run_cli("predict", "-i", str(images), "-o", str(tmp_path / "masks"), "-m", str(binary_run), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(p.name for p in images.glob("*.png"))
    # an unreadable image is named in one line and skipped; the others are written; exit 1
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "1_A.png").write_bytes(b"not a png")
    proc = run_cli("predict", "-i", str(broken), "-o", str(tmp_path / "m2"), "-m", str(binary_run), "--device", "cpu")
    assert proc.returncode == 1 and "1_A.png" in proc.stderr
    assert len(list((tmp_path / "m2").glob("*.png"))) == len(list(images.glob("*.png"))) - 1


def test_evaluate_names_a_missing_mask_and_a_size_mismatch(raw, tmp_path):
    from sraseg.evaluate import run as evaluate

    preds = tmp_path / "p"
    preds.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(preds / "test_99_A.png")
    with pytest.raises(DatasetError, match="no ground truth for case test_99_A"):
        evaluate.run(preds, raw, tmp_path / "e", dataset="fives")
    (preds / "test_99_A.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(preds / "test_1_A.png")
    with pytest.raises(DatasetError, match="prediction size"):
        evaluate.run(preds, raw, tmp_path / "e", dataset="fives")
    assert not (tmp_path / "e").exists()
    proc = run_cli("evaluate", "--dataset", "fives", "--pred-dir", str(preds), "--gt-dir", str(raw), "--out-dir",
                   str(tmp_path / "e"))  # fmt: skip
    assert proc.returncode == 1 and "test_1_A.png" in proc.stderr


def test_fives_report_averages_seeds_per_mode_and_names_a_missing_summary(tmp_path):
    from sraseg.report import run as report

    def summary(dice, stacked=True):
        entry = lambda d: dict(n_cases=4, mean=dict(dice=d, jaccard=d / 2, hd95=3.0, asd=None))  # noqa: E731
        return dict(image=entry(dice), **({"stacked": entry(dice + 0.1)} if stacked else {}))

    for seed, dice in ((1, 0.5), (2, 0.7)):
        path = tmp_path / "sraseg" / f"seed{seed}" / "eval" / "summary.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(summary(dice, stacked=seed == 1)))
    frame = report.collect_results(tmp_path, {"sraseg": {"method": "sraseg"}}, [1, 2], "fives")
    image = frame[frame["mode"] == "image"].iloc[0]
    np.testing.assert_allclose([image.dice_mean, image.dice_std, image.jaccard_mean, image.hd95_mean],
                               [60.0, np.std([50, 70], ddof=1), 30.0, 3.0])  # fmt: skip
    assert np.isnan(image.asd_mean) and image.n_seeds == 2
    assert list(frame["mode"]) == ["image"]  # a seed without the stacked mode leaves that table out
    report.write_markdown(frame, tmp_path / "results.md", "t", [], [1, 2], dataset="fives")
    assert "| sraseg | sraseg | 60.00 ± 14.14 | 30.00 ± 7.07 | 3.00 ± 0.00 | n/a |" in (tmp_path / "results.md").read_text()
    with pytest.raises(DatasetError, match="seed 3"):
        report.collect_results(tmp_path, {"sraseg": {"method": "sraseg"}}, [3], "fives")


# ---- the report's figures ---------------------------------------------------------------------------


def _colour_pixels(path: Path) -> dict[str, int]:
    """How many pixels of the PNG at `path` have each of the report's error colours exactly."""
    from sraseg.report.figures import ERROR_COLOURS

    rgb = np.asarray(Image.open(path).convert("RGB"))
    return {name: int((rgb == colour).all(axis=2).sum()) for name, colour in ERROR_COLOURS.items()}


def test_error_overlay_colours_each_kind_of_pixel():
    from sraseg.report.figures import ERROR_COLOURS, error_overlay

    image = np.full((4, 4), 0.5, np.float32)
    truth = np.zeros((4, 4), bool)
    truth[0, :2] = True  # (0,0) found, (0,1) missed
    pred = np.zeros((4, 4), bool)
    pred[0, 0] = pred[3, 3] = True  # (3,3) added
    rgb = error_overlay(image, truth, pred)
    assert [tuple(rgb[p]) for p in ((0, 0), (0, 1), (3, 3))] == list(ERROR_COLOURS.values())
    assert tuple(rgb[2, 2]) == (127, 127, 127)  # the image elsewhere
    assert (error_overlay(image, truth, None) == 127).all()


@pytest.fixture(scope="module")
def fives_results(raw, prepared_binary, binary_run, tmp_path_factory):
    """A FIVES results folder as the workflow leaves it, small: the prepared phantom; `shifted` predicts
    each test image's truth moved 2 px right (found, missed and added vessel pixels), `perfect` the truth
    itself; both evaluated; synthetic images; the labeled-only model's content stage; a blend preview."""
    from sraseg.evaluate import content
    from sraseg.evaluate import run as evaluate

    results = tmp_path_factory.mktemp("fives_report") / "results" / "fives_phantom"
    shutil.copytree(prepared_binary, results / "prepared")
    volumes = pd.read_parquet(prepared_binary / "volumes.parquet").query("split == 'test'")
    for name, shift in (("shifted", 2), ("perfect", 0)):
        preds = results / name / "seed0" / "predictions"
        preds.mkdir(parents=True)
        for row in volumes.itertuples():
            fives_dataset.write_mask(preds / f"{row.case}.png", np.roll(fives.read_mask(row.gt_path), shift, axis=1))
        evaluate.run(preds, raw, results / name / "seed0" / "eval", dataset="fives")
    # synthetic images: the prepared train images mirrored, so the model finds vessels in them
    real = np.load(prepared_binary / "images.npy")
    (results / "synthetic").mkdir()
    np.save(results / "synthetic" / "images.npy", np.ascontiguousarray(real[:6, :, ::-1]))
    content.run(binary_run / "model.safetensors", results / "synthetic", results / "prepared", results / "content",
                {"device": "cpu"})  # fmt: skip
    (results / "blend" / "perfect").mkdir(parents=True)
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None], (32, 1))).save(results / "blend" / "perfect" / "preview.png")
    return results


def test_fives_report_draws_the_four_figures(fives_results, tmp_path):
    from sraseg.report import run as report

    out = tmp_path / "report"
    report.run(fives_results, out, {"experiments": {"shifted": {"method": "labeled_only"},
                                                    "perfect": {"method": "sraseg"}}, "seeds": [0]}, "fives")  # fmt: skip
    figures = out / "figures"
    # 1. predictions over the fundus images: every kind of pixel of `shifted` in its colour, beyond the legend's
    legend_only = tmp_path / "legend_only.png"
    from sraseg.report.figures import error_overlays

    cases = fives_dataset.DATASET.overlay_cases(fives_results, ["shifted", "perfect"], 0)
    assert [c[0].split()[0] for c in cases] == ["test_1_A", "test_2_D", "test_3_G", "test_4_N"]  # one per condition
    error_overlays([(t, image, truth, {}) for t, image, truth, _ in cases], ["shifted", "perfect"], legend_only)
    legend, drawn = _colour_pixels(legend_only), _colour_pixels(figures / "overlays.png")
    assert all(drawn[kind] > legend[kind] + 200 for kind in drawn), (drawn, legend)
    perfect_only = tmp_path / "perfect.png"
    error_overlays([(t, image, truth, {"perfect": p["perfect"]}) for t, image, truth, p in cases], ["perfect"], perfect_only)
    found, missed, added = _colour_pixels(perfect_only).values()
    assert found > legend["true positive"] + 200 and (missed, added) == tuple(list(legend.values())[1:])
    # 2. synthetic beside real, not blank; 3. the blend preview as the blend stage wrote it
    samples = np.asarray(Image.open(figures / "real_vs_synthetic.png").convert("L"), dtype=np.float32)
    assert samples.std() > 20
    assert (figures / "blend_perfect.png").read_bytes() == (fives_results / "blend" / "perfect" / "preview.png").read_bytes()
    # 4. the content check names the vessel class, in its figure and the report's lines
    record = json.loads((fives_results / "content" / "content.json").read_text())
    assert record["classes"] == ["vessel"] and record["per_class"]["vessel"]["area_w1_floor"] is not None
    assert (figures / "synthetic_content.png").read_bytes() == (fives_results / "content" / "content.png").read_bytes()
    text = (out / "results.md").read_text()
    assert "## What the synthetic images contain" in text and "- vessel: present in" in text
    assert (out / "results.html").is_file() and (figures / "training_curves.png").is_file()
