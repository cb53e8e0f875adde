"""The built-in phantom: ACDC layout, determinism, label sanity, anatomy, versions and v2's variety."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from helpers_data import make_phantom, run_cli
from scipy import ndimage

from sraseg.data import acdc, phantom
from sraseg.errors import ConfigError

N_PATIENTS = 5
# Digest of a 5-patient seed-0 phantom written by the code before versions existed (commit 921cc7c):
# every volume's dtype, shape, voxels and affine, and every Info.cfg. Version 1 must keep it forever.
V1_DIGEST = "be597cdc7990a217873db2da6a051577e39af980a2dd36ddaa98f5b7be2ee420"


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("phantom"), patients=N_PATIENTS, seed=0, version=2)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _digest(root):
    """sha256 over the decoded volumes (not the gzip bytes, which depend on the zlib build) and Info.cfg."""
    h = hashlib.sha256()
    for rel in _files(root):
        if rel.name == "phantom.json":
            continue
        h.update(str(rel).encode())
        if rel.suffix == ".gz":
            data, img = acdc.read_nifti(root / rel)
            h.update(str((data.dtype.str, data.shape)).encode())
            h.update(np.ascontiguousarray(data).tobytes())
            h.update(np.round(np.asarray(img.affine, dtype=np.float64), 6).tobytes())
        else:
            h.update((root / rel).read_bytes())
    return h.hexdigest()


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
    # The reader accepts the whole dataset (every frame, labels, affines).
    records = acdc.check_dataset(raw, {"train": acdc.list_patients(raw)})
    assert len(records) == 2 * N_PATIENTS


def test_same_seed_same_bytes_other_seed_differs(raw, tmp_path):
    again = make_phantom(tmp_path / "again", patients=N_PATIENTS, seed=0, version=2)
    assert _files(raw) == _files(again)
    for rel in _files(raw):
        assert (raw / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_phantom(tmp_path / "other", patients=1, seed=1, version=2)
    name = "patient001/patient001_frame01.nii.gz"
    assert (raw / name).read_bytes() != (other / name).read_bytes()


def test_version_1_is_the_original_phantom(raw, tmp_path):
    # Through the command line, as the workflow calls it.
    out = tmp_path / "v1"
    proc = run_cli("phantom", "--out", str(out), "--patients", str(N_PATIENTS), "--seed", "0", "--phantom-version", "1")
    assert proc.returncode == 0, proc.stderr
    assert _digest(out) == V1_DIGEST
    assert _digest(raw) != V1_DIGEST  # the default is the newer version
    assert json.loads((out / "phantom.json").read_text())["version"] == 1
    img = nib.load(out / "patient001" / "patient001_frame01.nii.gz")
    assert img.header["descrip"].item() == b""  # v1 headers are untouched
    assert img.shape[0] in range(128, 177, 8)


def test_version_recorded(raw):
    summary = json.loads((raw / "phantom.json").read_text())
    assert summary["version"] == phantom.LATEST == 2 and summary["seed"] == 0
    assert set(summary["profiles"]) == set(acdc.list_patients(raw))
    assert {p["scanner"] for p in summary["profiles"].values()} <= {"1.5T", "3T"}
    for rel in _files(raw):
        if rel.suffix == ".gz":
            assert nib.load(raw / rel).header["descrip"].item() == b"sraseg phantom v2 seed 0", rel


def test_groups_balanced_for_100():
    groups = [phantom._group_of(i, 100) for i in range(100)]
    assert {g: groups.count(g) for g in phantom.GROUPS} == dict.fromkeys(phantom.GROUPS, 20)


def test_nifti_header_and_intensities(raw):
    for pid in acdc.list_patients(raw):
        img = nib.load(raw / pid / f"{pid}_frame01.nii.gz")
        gt = nib.load(raw / pid / f"{pid}_frame01_gt.nii.gz")
        data = np.asanyarray(img.dataobj)
        assert data.ndim == 3 and 6 <= data.shape[2] <= 18 and all(152 <= n <= 432 for n in data.shape[:2])
        assert data.dtype == np.int16 and data.min() >= 0 and 150 < data.max() < 32767
        zooms = img.header.get_zooms()
        assert 0.7 <= zooms[0] <= 1.9 and zooms[0] == pytest.approx(zooms[1]) and 5 <= zooms[2] <= 10
        assert 270 <= data.shape[0] * zooms[0] <= 440 or 270 <= data.shape[1] * zooms[0] <= 440  # field of view
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
    for pid in acdc.list_patients(raw):
        label = np.asanyarray(nib.load(raw / pid / f"{pid}_frame01_gt.nii.gz").dataobj)
        rv_area = (label == 1).sum(axis=(0, 1))
        nz = len(rv_area)
        assert rv_area[: nz // 2].max() > 0 and rv_area[-1] == 0, pid


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="patients"):
        phantom.run(tmp_path / "x", patients=0)
    with pytest.raises(ConfigError, match="version must be one of"):
        phantom.run(tmp_path / "x", patients=1, version=3)
    assert not (tmp_path / "x").exists()
    proc = run_cli("phantom", "--out", str(tmp_path / "y"), "--patients", "1", "--phantom-version", "0")
    assert proc.returncode != 0 and "version" in proc.stderr and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------------
# Version 2: variety between patients, measured on the images and labels, against version 1.
# ---------------------------------------------------------------------------------------------------

# Two patients of each group (patients=100 sets the groups), the same ones for both versions.
_VARIETY_INDICES = (3, 12, 27, 33, 44, 51, 66, 78, 86, 97)


def _measure(info, image: np.ndarray, label: np.ndarray) -> dict:
    """What a scanner and a pose change, measured on one frame (at the slice with the largest LV)."""
    nx, ny, _ = label.shape
    sxy = info.spacing[0]
    z = int(np.argmax((label == 3).sum(axis=(0, 1))))
    im, lab = image[:, :, z].astype(np.float64), label[:, :, z]
    pool = ndimage.binary_erosion(lab == 3, iterations=2)
    myo = ndimage.binary_erosion(lab == 2)  # the wall's core, away from partial volume with blood
    blood = np.median(im[pool])
    # Noise: the fine-scale residual in the blood pool (texture and flow are smooth over several pixels).
    residual = im - ndimage.gaussian_filter(im, 1.0)
    lv_centre = np.array(ndimage.center_of_mass(lab == 3))
    rv_centre = np.array(ndimage.center_of_mass(lab == 1))
    return dict(
        contrast=np.median(im[myo if myo.any() else lab == 2]) / blood,  # myocardium against blood
        snr=blood / residual[pool].std(),
        raw_scale=np.percentile(image, 99.5),
        spacing=sxy,
        fov=max(nx, ny) * sxy,
        offset=np.hypot(*((lv_centre - (np.array([nx, ny]) - 1) / 2) * sxy)),  # heart from FOV centre, mm
        rv_angle=np.arctan2(*(rv_centre - lv_centre)[::-1]),  # where the RV lies around the LV
        heart_fraction=float((lab > 0).mean()),
        lv_ml=float((label == 3).sum() * np.prod(info.spacing) / 1000),
    )


@pytest.fixture(scope="module")
def variety():
    """{version: [(group, scanner, ED measures, ES measures), ...]} over the same patients."""
    out = {}
    for version in (1, 2):
        rows = []
        for index in _VARIETY_INDICES:
            info, frames = phantom.make_patient(index, 100, 0, version)
            ed, es = (_measure(info, *frames[phase]) for phase in ("ED", "ES"))
            rows.append((info.group, info.scanner, ed, es))
        out[version] = rows
    return out


def _values(rows, key, phase=2):
    return np.array([row[phase][key] for row in rows])


def test_v2_scanner_variety(variety):
    v1, v2 = variety[1], variety[2]
    assert {row[1] for row in v2} == {"1.5T", "3T"} and {row[1] for row in v1} == {"1.5T"}
    # Myocardium/blood contrast and SNR spread wider than in version 1.
    contrast2, contrast1 = _values(v2, "contrast"), _values(v1, "contrast")
    assert np.ptp(contrast2) > 0.18 and np.std(contrast2) > 1.3 * np.std(contrast1)
    snr2, snr1 = _values(v2, "snr"), _values(v1, "snr")
    assert snr2.max() / snr2.min() > 3.0 and snr2.max() / snr2.min() > 1.3 * snr1.max() / snr1.min()
    # Raw scanner units: hundreds to a few thousand (version 1 already spread them as widely).
    scale2 = _values(v2, "raw_scale")
    assert scale2.max() / scale2.min() > 4.0 and 100 < scale2.min() and scale2.max() < 20000
    # Physically plausible: myocardium stays darker than blood, SNR in a cine range.
    assert _values(v2, "contrast").max() < 0.6 and 5 < snr2.min() and snr2.max() < 80
    # 3 T patients: darker myocardium against blood than 1.5 T ones, on average.
    contrast = _values(v2, "contrast")
    is_3t = np.array([row[1] == "3T" for row in v2])
    assert contrast[is_3t].mean() < contrast[~is_3t].mean()


def test_v2_geometry_variety(variety):
    v1, v2 = variety[1], variety[2]
    assert np.ptp(_values(v2, "spacing")) > 0.4 and np.ptp(_values(v2, "spacing")) > 1.5 * np.ptp(_values(v1, "spacing"))
    assert _values(v2, "fov").min() > 270 and _values(v2, "fov").mean() > _values(v1, "fov").mean() + 40
    # The heart covers a smaller part of the field of view, and the part varies more.
    frac2, frac1 = _values(v2, "heart_fraction"), _values(v1, "heart_fraction")
    assert np.median(frac2) < np.median(frac1) and frac2.max() / frac2.min() > frac1.max() / frac1.min()
    assert _values(v2, "offset").max() > _values(v1, "offset").max() + 5
    # In-plane orientation: the RV's direction around the LV spreads (rotation and mirrored stacks).
    spread = {v: 1 - abs(np.exp(1j * _values(rows, "rv_angle")).mean()) for v, rows in variety.items()}
    assert spread[2] > 0.3 and spread[2] > 3 * spread[1]


def test_v2_within_patient_consistency_and_pathology(variety):
    rows = variety[2]
    # ED and ES come from one scan: their contrast and noise differ far less than between patients.
    for key in ("contrast", "snr", "raw_scale"):
        within = np.abs(_values(rows, key, 2) - _values(rows, key, 3))
        assert within.max() < 0.5 * np.ptp(_values(rows, key)), key
    for group, _, ed, es in rows:
        assert es["lv_ml"] < 0.95 * ed["lv_ml"], group  # the ES cavity is smaller
    # The groups still order as in ACDC: dilated LVs largest, hypertrophic ones smallest.
    lv = {}
    for group, _, ed, _ in variety[2]:
        lv.setdefault(group, []).append(ed["lv_ml"])
    assert min(lv["DCM"]) > max(lv["HCM"]) and np.mean(lv["DCM"]) > np.mean(lv["NOR"]) > np.mean(lv["HCM"])
