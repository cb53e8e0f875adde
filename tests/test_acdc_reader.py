"""The ACDC reader refuses every kind of bad input with one DatasetError naming the file."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers_data import copy_dataset, make_phantom

from sraseg.data import acdc
from sraseg.data.phantom import write_nifti
from sraseg.errors import ConfigError, DatasetError

PATIENTS = [f"patient{i:03d}" for i in range(1, 5)]
SPLITS = {"train": PATIENTS[:2], "val": PATIENTS[2:3], "test": PATIENTS[3:]}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("acdc"), patients=4, seed=3)


@pytest.fixture
def raw(clean, tmp_path):
    return copy_dataset(clean, tmp_path / "raw")


def _gt(raw, pid="patient002", frame=1):
    return raw / pid / f"{pid}_frame{frame:02d}_gt.nii.gz"


def _image(raw, pid="patient002", frame=1):
    return raw / pid / f"{pid}_frame{frame:02d}.nii.gz"


def _expect(raw, *names, splits=SPLITS):
    with pytest.raises(DatasetError) as err:
        acdc.check_dataset(raw, splits)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message
    return message


def test_clean_dataset_records(clean):
    records = acdc.check_dataset(clean, SPLITS)
    assert [r.patient for r in records] == [p for p in PATIENTS for _ in range(2)]
    assert [r.phase for r in records] == ["ED", "ES"] * 4
    for rec in records:
        assert rec.case == f"{rec.patient}_frame{rec.frame:02d}" and rec.image_path.is_absolute()
        assert len(rec.shape) == 3 and all(1.0 < s < 11.0 for s in rec.spacing)
    image, label, affine, spacing = acdc.load_case(records[0].image_path, records[0].gt_path)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.shape == (4, 4)
    assert image.shape == label.shape == records[0].shape


def test_ignores_4d_and_accepts_float_labels(raw):
    gt = _gt(raw)
    img = nib.load(gt)
    write_nifti(gt, np.asanyarray(img.dataobj).astype(np.float32), img.affine)
    four_d = raw / "patient002" / "patient002_4d.nii.gz"
    four_d.write_bytes(b"not even a nifti")  # the cine file is not read
    (raw / "patient002" / "notes.txt").write_text("x")
    records = acdc.check_dataset(raw, SPLITS)
    assert len(records) == 8
    _, label, _, _ = acdc.load_case(_image(raw), gt)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2, 3}


def test_truncated_gzip(raw):
    path = _image(raw)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(raw, path, "truncated")


def test_corrupt_gzip_stream(raw):
    path = _gt(raw, "patient003")
    data = bytearray(path.read_bytes())
    data[400:420] = b"\x00" * 20  # damages the deflate stream (zlib error or CRC failure)
    path.write_bytes(bytes(data))
    _expect(raw, path)


def test_not_a_nifti(raw):
    path = _image(raw)
    with gzip.open(path, "wb") as f:
        f.write(b"hello" * 100)
    _expect(raw, path)


def test_wrong_shape_gt(raw):
    path = _gt(raw)
    img = nib.load(path)
    write_nifti(path, np.asanyarray(img.dataobj)[:-2], img.affine)
    _expect(raw, path, "shape")


def test_affine_mismatch(raw):
    path = _gt(raw)
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 5.0
    write_nifti(path, np.asanyarray(img.dataobj), affine)
    _expect(raw, path, "affine")


def test_label_outside_range(raw):
    path = _gt(raw)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 5
    write_nifti(path, data, img.affine)
    _expect(raw, path, "[5]")


def test_non_integer_labels(raw):
    path = _gt(raw)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[1, 1, 1] = 0.5
    write_nifti(path, data, img.affine)
    _expect(raw, path, "non-integer")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_image(raw, value):
    path = _image(raw)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 3, 1] = value
    write_nifti(path, data, img.affine)
    _expect(raw, path, "NaN or infinite")


def test_missing_info_cfg(raw):
    path = raw / "patient001" / "Info.cfg"
    path.unlink()
    _expect(raw, path)


@pytest.mark.parametrize("text", ["ES: 9\nGroup: NOR\n", "ED: first\nES: 9\n", "ED: 0\nES: 9\n"])
def test_bad_ed_entry(raw, text):
    path = raw / "patient001" / "Info.cfg"
    path.write_text(text)
    _expect(raw, path, "ED")


def test_missing_frame_file(raw):
    info = acdc.read_info_cfg(raw / "patient003" / "Info.cfg")
    path = _image(raw, "patient003", info["ES"])
    path.unlink()
    _expect(raw, path, "ES frame")


def test_patient_in_two_splits(raw):
    splits = dict(SPLITS, val=["patient001"])
    _expect(raw, raw / "patient001", "'train'", "'val'", splits=splits)


def test_split_patient_not_on_disk(raw):
    splits = dict(SPLITS, test=["patient004", "patient777"])
    _expect(raw, raw / "patient777", "not found", splits=splits)


def test_all_problems_in_one_message(raw):
    (raw / "patient001" / "Info.cfg").unlink()
    _image(raw, "patient004").write_bytes(b"\x1f\x8b broken")
    _expect(raw, raw / "patient001" / "Info.cfg", _image(raw, "patient004"), "2 dataset problem(s)")


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        acdc.check_dataset(tmp_path / "empty", SPLITS)
    with pytest.raises(DatasetError, match="does not exist"):
        acdc.check_dataset(tmp_path / "nowhere", SPLITS)


def test_only_split_patients_are_checked(raw):
    _image(raw, "patient004").write_bytes(b"broken")
    records = acdc.check_dataset(raw, {"train": ["patient001"], "val": ["patient002"], "test": ["patient003"]})
    assert {r.patient for r in records} == {"patient001", "patient002", "patient003"}


def test_read_split_list(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("# header\npatient002\n\n  patient001  # inline\n")
    assert acdc.read_split_list(path) == ["patient002", "patient001"]
    path.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="empty") as err:
        acdc.read_split_list(path)
    assert str(path) in str(err.value)
    path.write_text("patient001\npatient001\n")
    with pytest.raises(ConfigError, match="twice"):
        acdc.read_split_list(path)
    with pytest.raises(ConfigError, match="not found"):
        acdc.read_split_list(tmp_path / "missing.txt")


def test_read_info_cfg_types(raw):
    info = acdc.read_info_cfg(raw / "patient001" / "Info.cfg")
    assert isinstance(info["ED"], int) and isinstance(info["Height"], float) and isinstance(info["NbFrame"], int)
