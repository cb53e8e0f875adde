"""The built-in phantom: ACDC layout, determinism, label sanity and anatomy."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from helpers_data import make_phantom
from scipy import ndimage

from sraseg.data import acdc, phantom
from sraseg.errors import ConfigError

N_PATIENTS = 5


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("phantom"), patients=N_PATIENTS, seed=0)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_and_info_cfg(raw):
    assert acdc.list_patients(raw) == [f"patient{i:03d}" for i in range(1, N_PATIENTS + 1)]
    groups = []
    for pid in acdc.list_patients(raw):
        info = acdc.read_info_cfg(raw / pid / "Info.cfg")
        assert info["ED"] == 1 and 8 <= info["ES"] <= 14
        assert set(info) >= {"ED", "ES", "Group", "Height", "Weight", "NbFrame"}
        assert info["NbFrame"] > info["ES"]
        groups.append(info["Group"])
        for frame in (info["ED"], info["ES"]):
            for suffix in ("", "_gt"):
                assert (raw / pid / f"{pid}_frame{frame:02d}{suffix}.nii.gz").is_file()
    assert sorted(groups) == sorted(phantom.GROUPS)  # 5 patients: one per group


def test_same_seed_same_bytes_other_seed_differs(raw, tmp_path):
    again = make_phantom(tmp_path / "again", patients=N_PATIENTS, seed=0)
    assert _files(raw) == _files(again)
    for rel in _files(raw):
        assert (raw / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_phantom(tmp_path / "other", patients=2, seed=1)
    name = "patient001/patient001_frame01.nii.gz"
    assert (raw / name).read_bytes() != (other / name).read_bytes()


def test_groups_balanced_for_100():
    groups = [phantom._group_of(i, 100) for i in range(100)]
    assert {g: groups.count(g) for g in phantom.GROUPS} == dict.fromkeys(phantom.GROUPS, 20)


def test_nifti_header_and_intensities(raw):
    img = nib.load(raw / "patient001" / "patient001_frame01.nii.gz")
    gt = nib.load(raw / "patient001" / "patient001_frame01_gt.nii.gz")
    data = np.asanyarray(img.dataobj)
    assert data.ndim == 3 and 8 <= data.shape[2] <= 12 and 128 <= data.shape[0] <= 176
    assert data.dtype == np.int16 and data.min() >= 0 and 300 < data.max() < 32767
    zooms = img.header.get_zooms()
    assert 1.4 <= zooms[0] <= 1.8 and zooms[0] == pytest.approx(zooms[1]) and 5 <= zooms[2] <= 10
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.affine, gt.affine)
    assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), zooms)


def test_labels_classes_and_anatomy(raw):
    for pid in acdc.list_patients(raw):
        info = acdc.read_info_cfg(raw / pid / "Info.cfg")
        volumes = {}
        for phase in ("ED", "ES"):
            image_path, gt_path = acdc.frame_paths(raw, pid, info[phase])
            image, label, _, spacing = acdc.load_case(image_path, gt_path)
            assert set(np.unique(label)) == {0, 1, 2, 3}, (pid, phase)
            volumes[phase] = np.prod(spacing) * np.array([(label == c).sum() for c in (1, 2, 3)])
            # Blood is bright and myocardium darker, on average (contrast is not trivial but right).
            assert image[label == 3].mean() > 1.5 * image[label == 2].mean()
            nz = label.shape[2]
            for z in range(nz // 4, nz // 2 + 1):
                lab = label[:, :, z]
                lv, rv, myo = lab == 3, lab == 1, lab == 2
                if lv.any():
                    # The LV cavity is enclosed by myocardium.
                    grown = ndimage.binary_dilation(lv)
                    assert np.all(lab[grown] >= 2), (pid, phase, z)
                if rv.any():
                    assert not (ndimage.binary_dilation(rv) & lv).any()  # RV never touches the LV cavity
                    assert (ndimage.binary_dilation(rv) & myo).any()  # it lies against the septum
        # Systole: the LV cavity is smaller.
        assert volumes["ES"][2] < 0.95 * volumes["ED"][2], pid


def test_rv_vanishes_toward_apex(raw):
    label = np.asanyarray(nib.load(raw / "patient004" / "patient004_frame01_gt.nii.gz").dataobj)
    rv_area = (label == 1).sum(axis=(0, 1))
    nz = len(rv_area)
    assert rv_area[: nz // 2].max() > 0 and rv_area[-1] == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="patients"):
        phantom.run(tmp_path / "x", patients=0)
    assert not (tmp_path / "x").exists()
