"""Reader and checker for datasets in the FIVES release layout (the real release and the phantom of
`sraseg.data.fives_phantom`); the protocol's split lists are `sraseg.data.fives_splits`, the dataset
interface (prepare, predict, evaluate, report) is `sraseg.datasets.fives`.

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
- resizing to S x S (`sraseg.datasets.fives.resize`): images bilinear with antialiasing
  (`antialias=True`, a triangle filter as wide as the reduction); at 2048 -> 256 a plain bilinear
  reads 4 of every 64 source pixels and turns thin vessels into dotted lines. Masks nearest-exact,
  as ACDC labels: each output pixel takes the source pixel at its centre, which keeps the vessel
  fraction unbiased, where a majority vote over the 8 x 8 footprint would delete every vessel under
  4 source pixels wide. A non-square image is stretched to S x S, as ACDC slices are. At S equal to
  the image side both are exact copies. Array rows are image rows (no transpose).
- masks: 0 background and 255 vessel (the release), or 0 and 1; grey or colour PNGs whose colour
  channels are equal (others read the release's masks as RGB). Anything else is refused.

`check_dataset` and `iter_checked` (what the prepare stage reads) load every listed pair, collect
every problem and raise one `DatasetError` whose single-line message names each file and what is
wrong: a missing folder, a PNG name outside the `<n>_<C>.png` pattern, a number used twice in a
split, an image without its mask or a mask without its image, an unreadable PNG, an image/mask size
mismatch, mask values other than background/vessel, a constant image, a case listed in two splits or
not on disk, and the same pixels under two names (a duplicate that would leak between training and
test).
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
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sraseg.data.fives_phantom import IMAGE_DIR, MASK_DIR, RELEASE_SPLITS
from sraseg.data.problems import check_split_owners, raise_problems
from sraseg.errors import ConfigError, DatasetError

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
    "iter_checked",
    "check_dataset",
]

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^(\d+)_([ADGN])\.png$", re.IGNORECASE)
CASE_PATTERN = re.compile(r"^(train|test)_(\d+)_([ADGN])$")
CLASSES = ("background", "vessel")
RELEASE_COUNTS = {"train": 600, "test": 200}  # the published release
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
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


def _listed(raw_dir: Path, splits: dict[str, list[str]]) -> tuple[list[tuple[str, FivesRecord]], list[str]]:
    """(split, record) of every listed case in split order, and the problems of the layout and lists."""
    records, problems = list_release(raw_dir)
    listed: list[tuple[str, FivesRecord]] = []
    for split, case in check_split_owners(splits, lambda case: raw_dir / case, "case", problems):
        if case in records:
            listed.append((split, records[case]))
            continue
        match = CASE_PATTERN.match(case)
        where = raw_dir / match.group(1) / IMAGE_DIR / f"{match.group(2)}_{match.group(3)}.png" if match else raw_dir / case
        problems.append(f"{where}: case {case} in split '{split}' not found on disk")
    return listed, problems


def iter_checked(
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
    records = [rec for _, rec, _, _ in iter_checked(Path(raw_dir).resolve(), splits, problems)]
    if problems:
        raise_problems(problems)
    return records
