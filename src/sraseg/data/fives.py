"""Reader, checker and prepare step for datasets in the FIVES release layout (the real release and
the phantom of `sraseg.data.fives_phantom`); the protocol's split lists are `sraseg.data.fives_splits`.

Layout (Jin et al., Scientific Data 2022; see `fives_phantom` for what we relied on):
`raw_dir/{train,test}/Original/<n>_<C>.png` colour fundus photographs and
`raw_dir/{train,test}/Ground truth/<n>_<C>.png` their vessel masks, the same file name, with `n` a
number that restarts in each split and `C` the condition (A, D, G, N). Because `1_A.png` exists in
both splits (two different eyes), a case id names its split: `train_1_A`, `test_1_A`; so the
duplicates refused are a number used twice within a split (`1_A.png` and `01_A.png`) and the same
pixels under two names, not a name shared by the two splits. An image is its own case and
patient (FIVES gives one image per eye and no patient ids). Files other than `.png` are ignored.

Reading (what the reference code feeds its network, one grey channel at 256 x 256, 2 classes):
- grey: ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B, computed in float32 (no rounding to 8
  bits). It is the grey that common readers' grey mode gives (PIL "L", OpenCV IMREAD_GRAYSCALE), so
  the network sees the contrast the reference's does; grey PNGs are taken as they are.
- intensity: per-image min-max to [0,1] over the whole image (dark surround included), as ACDC
  volumes are normalised per volume.
- resizing to S x S: images bilinear with antialiasing (`antialias=True`, a triangle filter as
  wide as the reduction); at 2048 -> 256 a plain bilinear reads 4 of every 64 source pixels and
  turns thin vessels into dotted lines. Masks nearest-exact, as ACDC labels: each output pixel
  takes the source pixel at its centre, which keeps the vessel fraction unbiased, where a majority
  vote over the 8 x 8 footprint would delete every vessel under 4 source pixels wide. A non-square
  image is stretched to S x S, as ACDC slices are. At S equal to the image side both are exact
  copies. Array rows are image rows (no transpose).
- masks: 0 background and 255 vessel (the release), or 0 and 1; grey or colour PNGs whose colour
  channels are equal (others read the release's masks as RGB). Anything else is refused.

`check_dataset` and `run` (the prepare step) load every listed pair, collect every problem and raise one
`DatasetError` whose single-line message names each file and what is wrong: a missing folder, a
PNG name outside the `<n>_<C>.png` pattern, a number used twice in a split, an image without its
mask or a mask without its image, an unreadable PNG, an image/mask size mismatch, mask values
other than background/vessel, a constant image, a case listed in two splits or not on disk, and the
same pixels under two names (a duplicate that would leak between training and test).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sraseg.data.acdc import read_split_list
from sraseg.data.fives_phantom import CONDITION_NAMES, CONDITIONS, IMAGE_DIR, MASK_DIR, RELEASE_SPLITS
from sraseg.errors import ConfigError, DatasetError
from sraseg.io import portable_path, staged_outputs, write_json

__all__ = [
    "NAME_PATTERN",
    "CLASSES",
    "RELEASE_COUNTS",
    "FivesRecord",
    "case_id",
    "parse_case",
    "list_release",
    "read_image",
    "read_mask",
    "check_dataset",
    "resize",
    "raise_problems",
    "run",
]

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^(\d+)_([ADGN])\.png$", re.IGNORECASE)
CASE_PATTERN = re.compile(r"^(train|test)_(\d+)_([ADGN])$")
CLASSES = ("background", "vessel")
RELEASE_COUNTS = {"train": 600, "test": 200}  # the published release
SPLITS = ("train", "val", "test")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
_MAX_LISTED = 25  # problems named in one error message; the rest are counted
# What a damaged PNG can raise while decoding (PIL reports truncation as OSError or SyntaxError).
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class FivesRecord:
    """One image of the release and its mask, found on disk (checked when returned by `check_dataset`).

    Attributes:
        case: "train_1_A"; release_split: "train"/"test"; number: 1; condition: "A".
        image_path, gt_path: absolute paths; shape: (rows, cols) of the image (None before loading).
    """

    case: str
    release_split: str
    number: int
    condition: str
    image_path: Path
    gt_path: Path
    shape: tuple[int, int] | None = None


def case_id(release_split: str, number: int, condition: str) -> str:
    """The case id of a release file: ("train", 1, "A") -> "train_1_A"."""
    return f"{release_split}_{int(number)}_{condition.upper()}"


def parse_case(case: str) -> tuple[str, int, str]:
    """Inverse of `case_id`; ConfigError for anything else (split lists hold case ids)."""
    match = CASE_PATTERN.match(case)
    if not match:
        raise ConfigError(f"'{case}' is not a FIVES case id (<train|test>_<number>_<A|D|G|N>, e.g. train_1_A)")
    return match.group(1), int(match.group(2)), match.group(3)


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."))


def list_release(raw_dir: Path | str) -> tuple[dict[str, FivesRecord], list[str]]:
    """Find every image/mask pair on disk by name (nothing is decoded).

    Returns:
        (case id -> record, problems): problems name a missing folder, a PNG name outside the
        pattern, a number used twice in one split, an image without its mask or a mask without its
        image. Records are made only for complete, unambiguous pairs.

    Raises:
        DatasetError: `raw_dir` is not a folder.
    """
    raw_dir = Path(raw_dir).resolve()
    if not raw_dir.is_dir():
        raise DatasetError(f"{raw_dir}: raw dataset folder does not exist")
    records: dict[str, FivesRecord] = {}
    problems: list[str] = []
    for split in RELEASE_SPLITS:
        folders = {kind: raw_dir / split / kind for kind in (IMAGE_DIR, MASK_DIR)}
        missing = [f for f in folders.values() if not f.is_dir()]
        for folder in missing:
            problems.append(f"{folder}: folder missing (the release layout is <split>/{IMAGE_DIR} and <split>/{MASK_DIR})")
        if missing:
            continue
        found: dict[str, dict[str, Path]] = {IMAGE_DIR: {}, MASK_DIR: {}}
        owner: dict[int, Path] = {}
        for kind, folder in folders.items():
            for path in _pngs(folder):
                match = NAME_PATTERN.match(path.name)
                if not match:
                    problems.append(f"{path}: name is not <number>_<A|D|G|N>.png as in the release")
                    continue
                number, cond = int(match.group(1)), match.group(2).upper()
                case = case_id(split, number, cond)
                if kind == IMAGE_DIR:
                    if number in owner:
                        problems.append(f"{path}: number {number} already used by {owner[number].name} in {split}")
                        continue
                    owner[number] = path
                elif case in found[kind]:
                    problems.append(f"{path}: same case as {found[kind][case].name} in {split}")
                    continue
                found[kind][case] = path
        images, masks = found[IMAGE_DIR], found[MASK_DIR]
        for case, path in images.items():
            if case not in masks:
                problems.append(f"{path}: image without its mask ({folders[MASK_DIR] / path.name} missing)")
        for case, path in masks.items():
            if case not in images:
                problems.append(f"{path}: mask without its image ({folders[IMAGE_DIR] / path.name} missing)")
        for case in sorted(set(images) & set(masks), key=lambda c: parse_case(c)[1]):
            _, number, cond = parse_case(case)
            records[case] = FivesRecord(case, split, number, cond, images[case], masks[case])
    if not records and not problems:
        raise DatasetError(f"{raw_dir}: no <number>_<A|D|G|N>.png images found (empty dataset)")
    return records, problems


def _open(path: Path) -> np.ndarray:
    """Decode a whole PNG; DatasetError naming the file when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise DatasetError(f"{path}: not a PNG file ({img.format})")
                img.load()  # decodes every row: a truncated file fails here
                mode = img.mode
                if mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif mode == "1":
                    img = img.convert("L")
                data = np.asarray(img)
    except DatasetError:
        raise
    except (*_READ_ERRORS, Image.DecompressionBombWarning) as err:
        raise DatasetError(f"{path}: unreadable PNG ({type(err).__name__}: {err})") from None
    if data.ndim == 3 and data.shape[2] in (2, 4):
        data = data[..., :-1]  # drop alpha (LA -> L, RGBA -> RGB)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] != 3) or min(data.shape[:2]) < 1:
        raise DatasetError(f"{path}: unsupported PNG layout (mode {mode}, shape {data.shape})")
    return data


def read_image(path: Path | str) -> np.ndarray:
    """A fundus photograph as one grey channel.

    Returns:
        float32 [H,W] in [0,1]: BT.601 luma of an RGB(A) PNG (the grey values of a grey PNG),
        min-max normalised over the image.

    Raises:
        DatasetError: unreadable, not a PNG, an unsupported layout, or constant intensities.
    """
    path = Path(path)
    data = _open(path)
    scale = 255.0 if data.dtype == np.uint8 else 65535.0  # 16-bit grey PNGs
    data = data.astype(np.float32)
    grey = (data @ _LUMA if data.ndim == 3 else data) / scale
    low, high = float(grey.min()), float(grey.max())
    if high <= low:
        raise DatasetError(f"{path}: constant image (every pixel {low * scale:g}); cannot normalise")
    return ((grey - low) / (high - low)).astype(np.float32)


def read_mask(path: Path | str) -> np.ndarray:
    """A vessel mask.

    Returns:
        uint8 [H,W] in {0,1} (1 vessel) from 0/255 or 0/1 values in a grey PNG or a colour PNG whose
        channels are equal.

    Raises:
        DatasetError: unreadable, colour channels that differ, or values other than background/vessel.
    """
    path = Path(path)
    data = _open(path)
    if data.ndim == 3:
        if not (np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0], data[..., 2])):
            raise DatasetError(f"{path}: colour mask whose channels differ; expected a grey vessel mask")
        data = data[..., 0]
    values = {int(v) for v in np.unique(data)}
    if values <= {0, 255}:
        return (data == 255).astype(np.uint8)
    if values <= {0, 1}:
        return data.astype(np.uint8)
    shown = sorted(values)[:10]
    raise DatasetError(f"{path}: mask values {shown} are not background/vessel (0 and 255, or 0 and 1)")


def _load_pair(rec: FivesRecord) -> tuple[list[str], tuple[np.ndarray, np.ndarray, str] | None]:
    """(problems, (grey image, mask, pixel digest) or None) for one record."""
    problems: list[str] = []
    image = mask = None
    try:
        image = read_image(rec.image_path)
    except DatasetError as err:
        problems.append(str(err))
    try:
        mask = read_mask(rec.gt_path)
    except DatasetError as err:
        problems.append(str(err))
    if image is None or mask is None:
        return problems, None
    if image.shape != mask.shape:
        problems.append(f"{rec.gt_path}: mask size {mask.shape[1]} x {mask.shape[0]} differs from image size "
                        f"{image.shape[1]} x {image.shape[0]} ({rec.image_path.name})")  # fmt: skip
        return problems, None
    digest = hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()
    return problems, (image, mask, digest)


def raise_problems(problems: list[str]) -> None:
    """Raise one DatasetError listing the problems (the first 25 named, the rest counted)."""
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    tail = f"; ... and {more} more problem(s)" if more else ""
    raise DatasetError(f"{len(problems)} dataset problem(s): " + "; ".join(shown) + tail)


def _listed(raw_dir: Path, splits: dict[str, list[str]]) -> tuple[list[tuple[str, FivesRecord]], list[str]]:
    """(split, record) of every listed case in split order, and the problems of the layout and lists."""
    records, problems = list_release(raw_dir)
    owner: dict[str, str] = {}
    listed: list[tuple[str, FivesRecord]] = []
    for split, ids in splits.items():
        for case in ids:
            if case in owner:
                problems.append(f"{raw_dir / case}: case listed in both '{owner[case]}' and '{split}' splits")
                continue
            owner[case] = split
            if case in records:
                listed.append((split, records[case]))
                continue
            match = CASE_PATTERN.match(case)
            where = raw_dir / match.group(1) / IMAGE_DIR / f"{match.group(2)}_{match.group(3)}.png" if match else raw_dir / case
            problems.append(f"{where}: case {case} in split '{split}' not found on disk")
    return listed, problems


def _iter_checked(
    raw_dir: Path, splits: dict[str, list[str]], problems: list[str]
) -> Iterator[tuple[str, FivesRecord, np.ndarray, np.ndarray]]:
    """Yield (split, record with shape, image, mask) for every listed case that loads cleanly;
    append every problem (including duplicate pixels across names) to `problems`."""
    listed, list_problems = _listed(raw_dir, splits)
    problems.extend(list_problems)
    seen: dict[str, Path] = {}
    for split, rec in tqdm(listed, desc="check fives", unit="image", leave=False):
        pair_problems, loaded = _load_pair(rec)
        problems.extend(pair_problems)
        if loaded is None:
            continue
        image, mask, digest = loaded
        if digest in seen:
            problems.append(f"{rec.image_path}: same pixels as {seen[digest]} (a duplicate image)")
            continue
        seen[digest] = rec.image_path
        yield split, FivesRecord(**{**rec.__dict__, "shape": tuple(int(n) for n in image.shape)}), image, mask


def check_dataset(raw_dir: Path | str, splits: dict[str, list[str]]) -> list[FivesRecord]:
    """Check the FIVES-layout dataset for the given splits (every listed pair is decoded).

    Args:
        raw_dir: release-layout folder; splits: split name -> case ids.

    Returns:
        FivesRecord per listed case (with its shape), in split order then list order.

    Raises:
        DatasetError: one line listing every problem found (see the module docstring).
    """
    problems: list[str] = []
    records = [rec for _, rec, _, _ in _iter_checked(Path(raw_dir).resolve(), splits, problems)]
    if problems:
        raise_problems(problems)
    return records


def resize(array: np.ndarray, size: int, kind: str) -> np.ndarray:
    """Resize one [H,W] image or mask to [size,size].

    Args:
        array: float32 image in [0,1] or uint8 mask; kind: "image" (bilinear, antialiased) or
        "label" (nearest-exact).

    Returns:
        float32 [size,size] in [0,1] for images, uint8 for labels; an exact copy when already that size.
    """
    if array.shape == (size, size):
        return array.astype(np.float32 if kind == "image" else np.uint8, copy=True)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if kind == "image":
        out = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return out[0, 0].clamp_(0.0, 1.0).numpy()
    out = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return out[0, 0].round().numpy().astype(np.uint8)


def _read_splits(splits_dir: Path, labeled_list: Path) -> tuple[dict[str, list[str]], list[str]]:
    splits = {name: read_split_list(splits_dir / f"{name}.txt") for name in SPLITS}
    labeled = read_split_list(labeled_list)
    outside = [case for case in labeled if case not in set(splits["train"])]
    if outside:
        raise ConfigError(f"{labeled_list.resolve()}: labeled cases {outside[:10]} are not in {splits_dir / 'train.txt'}")
    return splits, labeled


def run(raw_dir: Path, splits_dir: Path, labeled_list: Path, image_size: int, out_dir: Path) -> None:
    """The prepare stage for FIVES (`sraseg prepare --dataset fives`): check a FIVES-layout dataset and
    write the prepared tables and arrays; all or nothing.

    Writes what the ACDC prepare writes, one row per image (an image is its own case, patient and
    one-slice volume): slices.parquet (slice_id, case, patient, frame 0, phase "", slice 0, split,
    labeled, condition, release_split), images.npy float32 [N,S,S] in [0,1], labels.npy uint8
    [N,S,S] in {0,1}, volumes.parquet (nx, ny = image rows, cols; nz 1; spacing 1 pixel) and
    prepare.json (settings, classes, counts).

    Args:
        raw_dir: release-layout folder; splits_dir: train.txt, val.txt, test.txt of case ids;
        labeled_list: labeled training cases (a subset of train); image_size: S (> 0); out_dir.

    Raises:
        ConfigError: bad split lists, labeled cases outside train, image_size < 1.
        DatasetError: any problem of the dataset (one line naming each file).
    """
    raw_dir, splits_dir, labeled_list, out_dir = Path(raw_dir), Path(splits_dir), Path(labeled_list), Path(out_dir)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"prepare image_size must be a positive integer; got {image_size!r}")
    splits, labeled = _read_splits(splits_dir, labeled_list)
    labeled_set = set(labeled)
    n_images = sum(len(ids) for ids in splits.values())
    size = image_size
    problems: list[str] = []
    slice_rows: list[dict] = []
    volume_rows: list[dict] = []
    with staged_outputs(out_dir) as st:
        images = np.lib.format.open_memmap(st.path("images.npy"), mode="w+", dtype=np.float32, shape=(n_images, size, size))
        labels = np.lib.format.open_memmap(st.path("labels.npy"), mode="w+", dtype=np.uint8, shape=(n_images, size, size))
        row = 0
        for split, rec, image, mask in _iter_checked(raw_dir.resolve(), splits, problems):
            if problems:
                continue  # keep checking, but nothing is written once a problem is found
            images[row] = resize(image, size, "image")
            labels[row] = resize(mask, size, "label")
            common = dict(case=rec.case, patient=rec.case, frame=0, phase="", split=split)
            extra = dict(condition=rec.condition, release_split=rec.release_split)
            slice_rows.append(dict(slice_id=row, **common, slice=0,
                                   labeled=split == "train" and rec.case in labeled_set, **extra))  # fmt: skip
            # the files through raw_dir as written (the reader resolved it)
            volume_rows.append(dict(**common, image_path=portable_path(rec.image_path, raw_dir),
                                    gt_path=portable_path(rec.gt_path, raw_dir),
                                    nx=rec.shape[0], ny=rec.shape[1], nz=1, sx=1.0, sy=1.0, sz=1.0,
                                    first_slice_id=row, n_slices=1, **extra))  # fmt: skip
            row += 1
        if problems:
            raise_problems(problems)  # staged outputs are discarded
        images.flush()
        labels.flush()
        del images, labels
        slices = pd.DataFrame(slice_rows).astype(dict(slice_id="int64", frame="int64", slice="int64", labeled="bool",
                                                      case=str, patient=str, phase=str, split=str))  # fmt: skip
        volumes = pd.DataFrame(volume_rows).astype(
            dict(frame="int64", nx="int64", ny="int64", nz="int64", first_slice_id="int64", n_slices="int64",
                 sx="float64", sy="float64", sz="float64")  # fmt: skip
        )
        slices.to_parquet(st.path("slices.parquet"), index=False)
        volumes.to_parquet(st.path("volumes.parquet"), index=False)
        counts = dict(
            cases={name: len(ids) for name, ids in splits.items()},
            labeled_cases=len(labeled),
            conditions={name: {c: int(((slices.split == name) & (slices.condition == c)).sum()) for c in CONDITIONS}
                        for name in SPLITS},  # fmt: skip
            labeled_slices=int(slices.labeled.sum()),
            total_slices=int(len(slices)),
        )
        write_json(
            st.path("prepare.json"),
            dict(
                dataset="fives",
                raw_dir=portable_path(raw_dir),
                splits_dir=portable_path(splits_dir),
                labeled_list=portable_path(labeled_list),
                image_size=size,
                num_classes=len(CLASSES),
                classes=list(CLASSES),
                conditions=CONDITION_NAMES,
                grey="ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B), float32",
                normalisation="per-image min-max to [0,1]",
                image_interpolation="bilinear, align_corners=False, antialias=True",
                label_interpolation="nearest-exact",
                slice_axis="image rows, cols (no transpose)",
                labeled=labeled,
                counts=counts,
            ),
        )
    log.info("prepared %s: FIVES images train/val/test %s, %d labeled", out_dir,
             "/".join(str(counts["cases"][n]) for n in SPLITS), counts["labeled_slices"])  # fmt: skip
