"""Reader and checker for datasets in the official ACDC layout (the real release and the phantom).

Layout: `raw_dir/patientXXX/Info.cfg` plus, for the ED and ES frame numbers given there,
`patientXXX_frameYY.nii.gz` (image) and `patientXXX_frameYY_gt.nii.gz` (labels 0 background, 1 RV,
2 myocardium, 3 LV). Other files (the 4-D `_4d.nii.gz` cine, notes) are ignored. Arrays keep
nibabel's [X,Y,Z] order; a 2-D slice is `volume[:, :, z]`.

`check_dataset` loads every needed volume, collects every problem and raises one `DatasetError`
whose single-line message names each file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError
from tqdm import tqdm

from sraseg.data.problems import check_split_owners, raise_problems
from sraseg.errors import ConfigError, DatasetError

__all__ = [
    "PATIENT_PATTERN",
    "CaseRecord",
    "read_info_cfg",
    "list_patients",
    "frame_paths",
    "load_volume",
    "load_case",
    "read_split_list",
    "check_dataset",
]

log = logging.getLogger(__name__)

PATIENT_PATTERN = re.compile(r"^patient\d+$")
# What a damaged NIfTI can raise while reading the header or decompressing the data.
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    TypeError,
    MemoryError,
)


@dataclass(frozen=True)
class CaseRecord:
    """One labeled frame of one patient, checked.

    Attributes:
        case: "patient001_frame01"; patient: "patient001"; frame: frame number; phase: "ED"/"ES".
        image_path, gt_path: absolute paths of the NIfTI files.
        shape: (nx, ny, nz) of the image; spacing: (sx, sy, sz) in mm.
    """

    case: str
    patient: str
    frame: int
    phase: str
    image_path: Path
    gt_path: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def read_info_cfg(path: Path | str) -> dict:
    """Parse an ACDC `Info.cfg` ("Key: value" lines).

    Returns:
        dict with every key found; ED, ES, NbFrame as int, Height, Weight as float when parseable,
        other values as str.

    Raises:
        DatasetError: the file is missing or unreadable, or ED / ES is missing or not a positive integer.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise DatasetError(f"{path}: cannot read Info.cfg ({err.strerror or err})") from err
    info: dict = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key:
            info[key] = value
    for key in ("ED", "ES"):
        if key not in info:
            raise DatasetError(f"{path}: missing '{key}:' entry")
        try:
            number = float(info[key])
        except ValueError:
            raise DatasetError(f"{path}: '{key}: {info[key]}' is not a frame number") from None
        if not number.is_integer() or number < 1:
            raise DatasetError(f"{path}: '{key}: {info[key]}' is not a positive integer frame number")
        info[key] = int(number)
    for key, kind in (("NbFrame", int), ("Height", float), ("Weight", float)):
        if key in info:
            try:
                info[key] = kind(float(info[key])) if kind is int else kind(info[key])
            except ValueError:
                pass  # informative only; ED/ES are what the pipeline needs
    return info


def list_patients(raw_dir: Path | str) -> list[str]:
    """Sorted patient folder names (`patient\\d+`) under `raw_dir`.

    Raises:
        DatasetError: `raw_dir` is missing or not a folder, or holds no patient folders.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DatasetError(f"{raw_dir.resolve()}: raw dataset folder does not exist")
    patients = sorted(p.name for p in raw_dir.iterdir() if p.is_dir() and PATIENT_PATTERN.match(p.name))
    if not patients:
        raise DatasetError(f"{raw_dir.resolve()}: no patientXXX folders found (empty dataset)")
    return patients


def frame_paths(raw_dir: Path | str, patient: str, frame: int) -> tuple[Path, Path]:
    """(image, gt) paths of one frame; `.nii.gz` preferred, plain `.nii` accepted when present."""
    folder = Path(raw_dir).resolve() / patient
    stem = f"{patient}_frame{frame:02d}"
    image, gt = folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"
    if not image.exists() and (folder / f"{stem}.nii").exists():
        image = folder / f"{stem}.nii"
    if not gt.exists() and (folder / f"{stem}_gt.nii").exists():
        gt = folder / f"{stem}_gt.nii"
    return image, gt


def _read_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Read a whole NIfTI file into memory. A `.gz` file is decompressed in full first, so its CRC and
    length are verified (nibabel alone reads only the bytes it needs and misses a damaged tail)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")} if len(raw) >= 4 else set()
    if 348 in sizeof_hdr:
        return nib.Nifti1Image.from_bytes(raw)
    if 540 in sizeof_hdr:
        return nib.Nifti2Image.from_bytes(raw)
    raise ImageFileError("not a NIfTI-1/2 file (bad header size)")


def read_nifti(path: Path | str) -> tuple[np.ndarray, nib.Nifti1Image | nib.Nifti2Image]:
    """Read a whole 3-D NIfTI file (header and data), checked.

    Returns:
        (data [X,Y,Z] in the file's dtype, the nibabel image for its affine and header).

    Raises:
        DatasetError: the file is missing, unreadable, truncated or not 3-D.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    try:
        img = _read_nifti(path)
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise DatasetError(f"{path}: unreadable or truncated NIfTI ({type(err).__name__}: {err})") from err
    # Trailing singleton axes (X,Y,Z,1) are harmless; anything else than 3-D is not a frame.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume, got shape {tuple(data.shape)}")
    return data, img


def load_volume(path: Path | str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Load a 3-D NIfTI volume (see `read_nifti`).

    Returns:
        (data [X,Y,Z] in the file's dtype, affine float64 [4,4], spacing (sx, sy, sz) mm).
    """
    data, img = read_nifti(path)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return data, np.asarray(img.affine, dtype=np.float64), spacing


def label_problem(label: np.ndarray) -> str | None:
    """What is wrong with a label volume (non-integer, NaN, values outside {0,1,2,3}), or None."""
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            return "label volume has NaN or infinite values"
        if not np.array_equal(label, np.round(label)):
            return "label volume has non-integer values"
    bad = sorted({int(v) for v in np.unique(label)} - {0, 1, 2, 3})
    if bad:
        return f"label values {bad[:10]} outside {{0,1,2,3}}"
    return None


def _load_pair(image_path: Path, gt_path: Path) -> tuple[list[str], tuple | None]:
    """Load and check one image/label pair.

    Returns:
        (problems, loaded) with loaded = (image float32, label, affine, spacing), or None when a
        file could not be read.
    """
    problems: list[str] = []
    image = label = None
    try:
        image, affine, spacing = load_volume(image_path)
    except DatasetError as err:
        problems.append(str(err))
    try:
        label, gt_affine, _ = load_volume(gt_path)
    except DatasetError as err:
        problems.append(str(err))
    if image is None or label is None:
        return problems, None
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        problems.append(f"{image_path}: NaN or infinite intensities")
    elif float(image.max()) == float(image.min()):
        problems.append(f"{image_path}: constant intensities (cannot min-max normalise)")
    problem = label_problem(label)
    if problem:
        problems.append(f"{gt_path}: {problem}")
    if image.shape != label.shape:
        problems.append(f"{gt_path}: shape {label.shape} differs from image shape {image.shape}")
    elif not np.allclose(affine, gt_affine, rtol=1e-5, atol=1e-4):
        problems.append(f"{gt_path}: affine differs from the image's affine ({image_path.name})")
    return problems, (image, label, affine, spacing)


def load_case(image_path: Path | str, gt_path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Load one frame and its labels, checked.

    Returns:
        (image float32 [X,Y,Z] raw intensities, label uint8 [X,Y,Z] in {0,1,2,3},
        affine float64 [4,4] of the image, spacing (sx, sy, sz) mm).

    Raises:
        DatasetError: unreadable files, shape/affine mismatch, bad labels, non-finite or constant
        intensities (all problems of the pair in one line).
    """
    problems, loaded = _load_pair(Path(image_path), Path(gt_path))
    if problems:
        raise DatasetError("; ".join(problems))
    image, label, affine, spacing = loaded
    return image, np.rint(label).astype(np.uint8), affine, spacing


def read_split_list(path: Path | str) -> list[str]:
    """Patient ids from a split list: one per line; blank lines and `#` comments are ignored.

    Raises:
        ConfigError: the file is missing, empty (no ids), has a malformed line or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.resolve()}: split list not found")
    ids: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) != 1:
            raise ConfigError(f"{path.resolve()}: line {number} holds more than one id: {entry!r}")
        if entry in ids:
            raise ConfigError(f"{path.resolve()}: patient {entry} listed twice")
        ids.append(entry)
    if not ids:
        raise ConfigError(f"{path.resolve()}: split list is empty")
    return ids


def check_dataset(
    raw_dir: Path | str, splits: dict[str, list[str]], patients_needed: list[str] | None = None
) -> list[CaseRecord]:
    """Check the dataset for the given splits and describe every labeled frame.

    Args:
        raw_dir: ACDC-layout folder.
        splits: split name -> patient ids (e.g. {"train": [...], "val": [...], "test": [...]}).
        patients_needed: patients whose files are checked (default: every patient in `splits`).

    Returns:
        CaseRecord per (patient, ED then ES), patients in split order then list order.

    Raises:
        DatasetError: one line listing every problem found (file and problem each): missing folder,
        no patients, a patient in two splits or not on disk, a missing or bad Info.cfg, missing frame
        files, unreadable/truncated NIfTI, shape or affine mismatch, bad labels, NaN/inf intensities.
    """
    raw_dir = Path(raw_dir).resolve()
    on_disk = set(list_patients(raw_dir))
    problems: list[str] = []
    listed = []
    for split, pid in check_split_owners(splits, lambda pid: raw_dir / pid, "patient", problems):
        listed.append(pid)
        if pid not in on_disk:
            problems.append(f"{raw_dir / pid}: patient in split '{split}' not found on disk")
    needed = listed if patients_needed is None else [p for p in patients_needed if p in on_disk]
    needed = [p for p in needed if p in on_disk]
    records: list[CaseRecord] = []
    for pid in tqdm(needed, desc="check dataset", unit="patient", leave=False):
        try:
            info = read_info_cfg(raw_dir / pid / "Info.cfg")
        except DatasetError as err:
            problems.append(str(err))
            continue
        frames = [("ED", info["ED"])] + ([("ES", info["ES"])] if info["ES"] != info["ED"] else [])
        for phase, frame in frames:
            image_path, gt_path = frame_paths(raw_dir, pid, frame)
            missing = [p for p in (image_path, gt_path) if not p.exists()]
            for path in missing:
                problems.append(f"{path}: {phase} frame file named in Info.cfg is missing")
            if missing:
                continue
            pair_problems, loaded = _load_pair(image_path, gt_path)
            problems.extend(pair_problems)
            if pair_problems:
                continue
            shape, spacing = tuple(int(n) for n in loaded[0].shape), loaded[3]
            records.append(
                CaseRecord(f"{pid}_frame{frame:02d}", pid, frame, phase, image_path, gt_path, shape, spacing)
            )
    if problems:
        raise_problems(problems)
    log.info("dataset %s: %d patients checked, %d labeled frames", raw_dir, len(needed), len(records))
    return records
