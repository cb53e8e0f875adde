"""A built-in short-axis cine-MRI cardiac phantom written in the official ACDC layout.

Each patient gets `patientXXX/patientXXX_frame01.nii.gz` (end-diastole), an end-systole frame
`patientXXX_frameYY.nii.gz` (YY in 8..14), a `_gt` label file for both, and `Info.cfg`. Volumes are
[X,Y,Z] int16 in raw scanner-like units (hundreds to a few thousand), Z ordered base -> apex.
Labels: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity (papillary muscles included), as in
ACDC. The RV free wall, atria, aorta and everything else are unlabeled background.

The anatomy is drawn per slice in millimetres around the LV centre, in polar coordinates: the LV
endo- and epicardial borders are star-shaped curves r(theta) made of a few random harmonics (smooth,
irregular, elliptical); the RV is a crescent on the septal side whose thickness tapers toward its
horns and toward the apex. Five groups (ACDC spelling DCM, HCM, MINF, NOR, RV) change cavity size,
wall thickness, ejection and RV size. The surroundings (body, subcutaneous and pericardial fat,
lungs, liver, aorta, spine) are drawn with textured intensities, then a partial-volume blur, a
smooth coil bias field and Rician noise (magnitude of complex Gaussian noise) are applied.

Versions (`VERSIONS`): version 1 is the original phantom, frozen so that results made with it stay
reproducible by seed. Version 2 widens the variety between patients toward real ACDC (several
scanners): per patient a 1.5 T or 3 T profile (tissue contrast, SNR, coil bias strength and
direction, banding, raw scale), field of view / pixel spacing / matrix size, slice count, heart
position, size and in-plane orientation (rotation, mirrored stacks), and wider group shapes. The ED
and ES frames of a patient share everything but the cardiac phase. The version is recorded in
`phantom.json` and, from version 2 on, in each NIfTI header's description (v1 bytes are unchanged).

Determinism: each patient draws from `numpy.random.default_rng([seed, index])` and NIfTI files are
gzipped with mtime 0, so the same seed and version give the same bytes.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from sraseg.errors import ConfigError
from sraseg.io import staged_outputs, write_json

__all__ = ["GROUPS", "VERSIONS", "LATEST", "DEFAULT_VERSION", "run", "make_patient", "write_nifti", "patient_id"]

log = logging.getLogger(__name__)

# ACDC's group names, in the order of the official release (patients 1-20 DCM, 21-40 HCM, ...).
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
_HARMONICS = 6  # border shapes use harmonics 1..6 of the polar angle
VERSIONS = (1, 2)  # generator versions; a version's output for a seed never changes
LATEST = 2
# The default stays 1 until version 2 is calibrated against ACDC (a short run showed it harder, not yet
# closer to ACDC's labeled-only gap: config/README.md); results published so far use version 1.
DEFAULT_VERSION = 1


def patient_id(index: int) -> str:
    """ACDC patient folder name for a 0-based index: 0 -> 'patient001'."""
    return f"patient{index + 1:03d}"


@dataclass
class _Patient:
    """Everything drawn for one patient (shared by its ED and ES frames)."""

    group: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    es_frame: int
    nb_frame: int
    height: float
    weight: float
    version: int = 1
    scanner: str = "1.5T"
    mirrored: bool = False


def _group_of(index: int, patients: int) -> str:
    # Contiguous blocks as in ACDC: exactly 20 per group for 100 patients, balanced otherwise.
    return GROUPS[index * len(GROUPS) // patients] if patients >= len(GROUPS) else GROUPS[index % len(GROUPS)]


def _coeffs(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Complex harmonic coefficients c_k (k=1.._HARMONICS) for r(theta) = R * (1 + Re sum c_k e^{ik theta})."""
    k = np.arange(1, _HARMONICS + 1)
    amp = rng.normal(0.0, scale, size=_HARMONICS) / k
    amp[0] *= 0.3  # a first harmonic only shifts the curve: keep it small
    return amp * np.exp(1j * rng.uniform(0, 2 * np.pi, size=_HARMONICS))


def _profile(t: float, end: float, power: float = 0.5) -> float:
    """Radius factor along the long axis: 1 at the base (t=0), 0 at t >= end."""
    if t < 0 or t >= end:
        return 0.0
    return float((1.0 - (t / end) ** 2) ** power)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 < 1.0


def _group_params(group: str, rng: np.random.Generator) -> dict:
    """Cavity radius (mm, ED, base), wall (mm), ES/ED radius ratio, RV extent (mm), RV ES ratio, RV arc."""
    if group == "NOR":
        p = dict(r=rng.uniform(22, 27), wall=rng.uniform(8, 10), es=rng.uniform(0.6, 0.7), rv=rng.uniform(18, 26))
        p.update(rv_es=rng.uniform(0.55, 0.7), arc=rng.uniform(80, 100))
    elif group == "MINF":
        p = dict(r=rng.uniform(25, 31), wall=rng.uniform(8, 10), es=rng.uniform(0.8, 0.9), rv=rng.uniform(17, 24))
        p.update(rv_es=rng.uniform(0.65, 0.8), arc=rng.uniform(80, 100))
    elif group == "DCM":
        p = dict(r=rng.uniform(30, 37), wall=rng.uniform(6, 7.5), es=rng.uniform(0.86, 0.94), rv=rng.uniform(18, 25))
        p.update(rv_es=rng.uniform(0.7, 0.85), arc=rng.uniform(80, 100))
    elif group == "HCM":
        p = dict(r=rng.uniform(17, 21), wall=rng.uniform(13, 17), es=rng.uniform(0.45, 0.6), rv=rng.uniform(15, 22))
        p.update(rv_es=rng.uniform(0.55, 0.7), arc=rng.uniform(75, 95))
    else:  # RV: abnormal, enlarged right ventricle
        p = dict(r=rng.uniform(20, 25), wall=rng.uniform(8, 10), es=rng.uniform(0.65, 0.75), rv=rng.uniform(32, 44))
        p.update(rv_es=rng.uniform(0.75, 0.88), arc=rng.uniform(100, 125))
    return p


def make_patient(
    index: int, patients: int, seed: int, version: int = DEFAULT_VERSION
) -> tuple[_Patient, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Draw one patient and render its ED and ES frames.

    Args:
        index: 0-based patient index; patients: total count (sets the group); seed: dataset seed;
        version: generator version (1: the original phantom, 2: scanner-like inter-patient variety).

    Returns:
        (patient parameters, {"ED": (image, label), "ES": (image, label)}) with image int16 [X,Y,Z]
        (raw units, >= 0) and label uint8 [X,Y,Z] in {0,1,2,3}.

    Raises:
        ConfigError: an unknown version.
    """
    _check_version(version)
    rng = np.random.default_rng([seed, index])
    group = _group_of(index, patients)
    info, anat = (_draw_v1 if version == 1 else _draw_v2)(rng, group)
    nx, ny, nz = info.shape
    # Smooth random fields shared by both frames (tissue texture, blood flow, bias wiggle).
    tex_px, flow_px = anat.get("field_px", (3.0, 5.0))
    texture = _smooth_field(rng, (nx, ny, nz), tex_px)
    flow = _smooth_field(rng, (nx, ny, nz), flow_px)
    wiggle = _low_frequency(rng, nx, ny)
    band = _low_frequency(rng, nx, ny) if anat.get("banding") else None
    frames = {}
    for phase in ("ED", "ES"):
        tissue, label = _render(info, anat, phase)
        image = _image(info, anat, tissue, label, texture, flow, wiggle, rng, band)
        frames[phase] = (image, label)
    return info, frames


def _check_version(version: int) -> None:
    if isinstance(version, bool) or version not in VERSIONS:
        raise ConfigError(f"phantom version must be one of {list(VERSIONS)}; got {version!r}")


def _draw_v1(rng: np.random.Generator, group: str) -> tuple[_Patient, dict]:
    """Version 1: the original phantom (one scanner-like profile, narrow geometry). Frozen: any
    change to the order or kind of draws here changes every v1 dataset."""
    nx, ny = int(rng.integers(16, 23)) * 8, int(rng.integers(16, 23)) * 8
    nz = int(rng.integers(8, 13))
    sxy = round(float(rng.uniform(1.4, 1.8)), 4)
    sz = float(np.clip(round(rng.normal(8.0, 1.2) * 2) / 2, 5.0, 10.0))
    affine = _affine(rng, nx, ny, nz, sxy, sz)
    es_frame = int(rng.integers(8, 15))
    info = _Patient(
        group=group,
        shape=(nx, ny, nz),
        spacing=(sxy, sxy, sz),
        affine=affine,
        es_frame=es_frame,
        nb_frame=int(rng.integers(max(es_frame + 10, 25), 36)),
        height=round(float(rng.uniform(150, 195)), 1),
        weight=round(float(rng.uniform(50, 110)), 1),
    )
    g = _group_params(group, rng)

    # Shared anatomy: pose, border shapes, long-axis extent, tissue contrast.
    anat = dict(
        g=g,
        centre=rng.normal(0, 7, size=2).clip(-18, 18),
        angle=np.deg2rad(rng.normal(0, 20)),
        drift=rng.normal(0, 2.0, size=2),  # mm per slice of LV centre drift base -> apex
        endo_c=(_coeffs(rng, 0.07), _coeffs(rng, 0.07)),  # base set, apex set
        epi_c=(_coeffs(rng, 0.05), _coeffs(rng, 0.05)),
        ellip=(rng.uniform(0.03, 0.12), rng.uniform(0, np.pi)),
        rv_dir=np.pi + rng.normal(0, np.deg2rad(12)),
        rv_shape=rng.uniform(1.5, 3.0),
        rv_wall=rng.uniform(2.5, 4.0),
        rv_c=_coeffs(rng, 0.10),
        rv_end=rng.uniform(0.62, 0.85),
        fat_c=_coeffs(rng, 1.0),
        fat_mm=rng.uniform(0.5, 3.0),
        minf=(rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(25, 45)), rng.uniform(0.5, 0.65), rng.uniform(0, 0.4)),
        papillary=rng.random() < 0.6,
        pap=(rng.normal(0, 0.3, size=2), rng.uniform(2.5, 4.5, size=2)),
        base=rng.uniform(-0.6, 0.9) * sz,
        tail=rng.uniform(-0.6, 0.4) * sz,
        shorten=rng.uniform(0.08, 0.15) * (0.5 if group in ("DCM", "MINF") else 1.0),
        body=(rng.uniform(140, 175), rng.uniform(100, 130), rng.uniform(6, 16), rng.normal(0, 8)),
        lung=(rng.uniform(42, 60), rng.uniform(70, 95), rng.uniform(-5, 15)),
        liver=(rng.uniform(0.25, 0.6), rng.uniform(80, 110), rng.uniform(60, 85)),
        contrast=dict(
            blood=1.0,
            rv_blood=rng.uniform(0.85, 1.05),
            myo=rng.uniform(0.24, 0.38),
            muscle=rng.uniform(0.26, 0.42),
            fat=rng.uniform(0.72, 1.0),
            lung=rng.uniform(0.03, 0.1),
            liver=rng.uniform(0.33, 0.5),
            aorta=rng.uniform(0.7, 1.0),
            spine=rng.uniform(0.2, 0.35),
            air=0.0,
        ),
        scale=rng.uniform(250, 1800),
        noise=rng.uniform(0.03, 0.07),
        blur=rng.uniform(0.5, 1.0),
        bias=(rng.uniform(0.2, 0.45), rng.uniform(0, 2 * np.pi)),
    )
    return info, anat


def _affine(rng: np.random.Generator, nx: int, ny: int, nz: int, sxy: float, sz: float) -> np.ndarray:
    """Oblique short-axis orientation in scanner space, origin near the isocentre."""
    rot = Rotation.from_euler("xyz", rng.uniform(-35, 35, size=3), degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([sxy, sxy, sz])
    affine[:3, 3] = -affine[:3, :3] @ (np.array([nx, ny, nz]) / 2.0) + rng.normal(0, 20, size=3)
    return affine


# Version 2 scanner profiles: bSSFP tissue levels relative to LV blood (= 1), signal-to-noise ratio
# of blood, coil bias strength (log-intensity change across the FOV), bias wiggle, raw intensity
# scale and the chance of off-resonance banding. 3 T: darker myocardium and liver against blood,
# more SNR but stronger B1/coil inhomogeneity and more banding; raw units differ by vendor setup.
_SCANNERS = {
    "1.5T": dict(
        rv_blood=(0.85, 1.05), myo=(0.22, 0.46), muscle=(0.24, 0.45), fat=(0.75, 1.05), lung=(0.03, 0.10),
        liver=(0.30, 0.50), aorta=(0.70, 1.00), spine=(0.20, 0.35),
        snr=(9.0, 30.0), bias=(0.10, 0.50), wiggle=(0.05, 0.15), scale=(150.0, 1500.0), banding=0.1,
    ),
    "3T": dict(
        rv_blood=(0.75, 1.00), myo=(0.12, 0.30), muscle=(0.16, 0.35), fat=(0.55, 0.95), lung=(0.02, 0.08),
        liver=(0.20, 0.38), aorta=(0.60, 1.00), spine=(0.15, 0.30),
        snr=(14.0, 45.0), bias=(0.35, 0.85), wiggle=(0.10, 0.30), scale=(400.0, 4000.0), banding=0.45,
    ),
}
_TISSUE_LEVELS = ("rv_blood", "myo", "muscle", "fat", "lung", "liver", "aorta", "spine")
_P_3T = 0.4  # share of patients from the 3 T scanner
_P_MIRROR = 0.25  # share of stacks stored mirrored (RV on the other side of the LV)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _group_params_v2(group: str, rng: np.random.Generator, size: float) -> dict:
    """Version 2 group shapes: wider, overlapping ranges (as between real patients of one group),
    scaled by the patient's heart size. Keys as `_group_params`, plus HCM's septal asymmetry."""
    u = rng.uniform
    if group == "NOR":
        p = dict(r=u(20, 28), wall=u(7, 11), es=u(0.55, 0.72), rv=u(16, 28), rv_es=u(0.5, 0.72), arc=u(75, 105))
    elif group == "MINF":
        p = dict(r=u(24, 34), wall=u(7, 11), es=u(0.75, 0.92), rv=u(15, 26), rv_es=u(0.6, 0.82), arc=u(75, 105))
    elif group == "DCM":
        p = dict(r=u(29, 40), wall=u(5.5, 8), es=u(0.84, 0.96), rv=u(16, 28), rv_es=u(0.68, 0.88), arc=u(75, 110))
    elif group == "HCM":
        p = dict(r=u(15, 23), wall=u(12, 20), es=u(0.38, 0.6), rv=u(13, 24), rv_es=u(0.5, 0.72), arc=u(70, 100))
    else:  # RV: abnormal, enlarged right ventricle
        p = dict(r=u(18, 26), wall=u(7, 10), es=u(0.6, 0.78), rv=u(30, 48), rv_es=u(0.72, 0.9), arc=u(100, 135))
    p["septal"] = u(0.1, 0.3) if group == "HCM" else 0.0
    for key in ("r", "wall", "rv"):
        p[key] *= size
    return p


def _draw_v2(rng: np.random.Generator, group: str) -> tuple[_Patient, dict]:
    """Version 2: scanner-like variety between patients (1.5 T / 3 T contrast, SNR, coil bias,
    banding, raw scale), field of view, pixel spacing and matrix size, heart position, size and
    in-plane orientation (rotation, mirrored stacks), and wider pathology shapes."""
    scanner = "3T" if rng.random() < _P_3T else "1.5T"
    prof = _SCANNERS[scanner]
    # Geometry: a field of view of 280-420 mm; mostly 1.2-1.9 mm pixels, a few fine 0.7-1.2 mm ones.
    sxy = round(float(rng.uniform(0.7, 1.2) if rng.random() < 0.12 else rng.uniform(1.2, 1.9)), 4)
    fov = rng.uniform(280, 420)
    n_long = int(np.clip(round(fov / sxy / 8), 19, 54)) * 8  # 152..432 px, as in ACDC
    n_short = int(np.clip(round(n_long * (1.0 if rng.random() < 0.4 else rng.uniform(0.75, 0.95)) / 8), 19, 54)) * 8
    nx, ny = (n_long, n_short) if rng.random() < 0.5 else (n_short, n_long)
    sz = float(np.clip(round(rng.normal(8.0, 1.5) * 2) / 2, 5.0, 10.0))
    nz = int(np.clip(round(rng.uniform(60, 110) / sz) + 1, 6, 18))
    affine = _affine(rng, nx, ny, nz, sxy, sz)
    es_frame = int(rng.integers(8, 15))
    info = _Patient(
        group=group,
        shape=(nx, ny, nz),
        spacing=(sxy, sxy, sz),
        affine=affine,
        es_frame=es_frame,
        nb_frame=int(rng.integers(max(es_frame + 10, 25), 36)),
        height=round(float(rng.uniform(150, 195)), 1),
        weight=round(float(rng.uniform(50, 110)), 1),
        version=2,
        scanner=scanner,
    )
    size = float(np.clip(np.exp(rng.normal(0, 0.08)), 0.82, 1.2))  # heart size beyond the group's
    g = _group_params_v2(group, rng, size)
    contrast = dict(blood=1.0, air=0.0, **{name: rng.uniform(*prof[name]) for name in _TISSUE_LEVELS})
    blur_mm = rng.uniform(0.8, 1.8)
    endo_irregular, epi_irregular = rng.uniform(0.05, 0.11), rng.uniform(0.035, 0.075)
    anat = dict(
        g=g,
        centre=rng.normal(0, 12, size=2).clip(-35, 35),
        angle=np.deg2rad(rng.normal(0, 30)),
        mirror=bool(rng.random() < _P_MIRROR),
        drift=rng.normal(0, 2.0, size=2),
        endo_c=(_coeffs(rng, endo_irregular), _coeffs(rng, endo_irregular)),
        epi_c=(_coeffs(rng, epi_irregular), _coeffs(rng, epi_irregular)),
        ellip=(rng.uniform(0.0, 0.16), rng.uniform(0, np.pi)),
        rv_dir=np.pi + rng.normal(0, np.deg2rad(15)),
        rv_shape=rng.uniform(1.3, 3.2),
        rv_wall=rng.uniform(2.5, 4.0),
        rv_c=_coeffs(rng, rng.uniform(0.06, 0.14)),
        rv_end=rng.uniform(0.58, 0.88),
        fat_c=_coeffs(rng, 1.0),
        fat_mm=rng.uniform(0.5, 4.0),
        minf=(rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(20, 60)), rng.uniform(0.4, 0.72), rng.uniform(0, 0.45)),
        papillary=rng.random() < 0.7,
        pap=(rng.normal(0, 0.3, size=2), rng.uniform(2.5, 5.0, size=2)),
        base=rng.uniform(-0.6, 0.9) * sz,
        tail=rng.uniform(-0.6, 0.4) * sz,
        shorten=rng.uniform(0.08, 0.17) * (0.5 if group in ("DCM", "MINF") else 1.0),
        body=(rng.uniform(130, 190), rng.uniform(95, 145), rng.uniform(5, 25), rng.normal(0, 10)),
        lung=(rng.uniform(40, 65), rng.uniform(65, 100), rng.uniform(-5, 15)),
        liver=(rng.uniform(0.2, 0.65), rng.uniform(75, 115), rng.uniform(55, 90)),
        contrast=contrast,
        scale=_log_uniform(rng, *prof["scale"]),
        noise=1.0 / _log_uniform(rng, *prof["snr"]),
        blur=blur_mm / sxy,
        bias=(rng.uniform(*prof["bias"]), rng.uniform(0, 2 * np.pi)),
        wiggle=rng.uniform(*prof["wiggle"]),
        texture=rng.uniform(0.04, 0.12),
        field_px=(3.0 * 1.6 / sxy, 5.0 * 1.6 / sxy),  # texture and flow scales fixed in mm
        banding=(rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.85))
        if rng.random() < prof["banding"]
        else None,
    )
    info.mirrored = anat["mirror"]
    return info, anat


def _low_frequency(rng: np.random.Generator, nx: int, ny: int) -> np.ndarray:
    """A very smooth random 2-D field [X,Y] float32 (a few random cosine waves), about unit amplitude."""
    gx = np.linspace(0, 1, nx, dtype=np.float32)[:, None]
    gy = np.linspace(0, 1, ny, dtype=np.float32)[None, :]
    field = np.zeros((nx, ny), dtype=np.float32)
    for _ in range(4):
        fx, fy = rng.uniform(0.3, 1.5, size=2) * rng.choice([-1, 1], size=2)
        field += np.cos(2 * np.pi * (fx * gx + fy * gy) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return field / 2.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (sigma, sigma, 0.5)[: len(shape)])
    return field / max(float(field.std()), 1e-6)


# Tissue codes of the rendered map (intensities come from anat["contrast"]).
_TISSUES = ("air", "muscle", "fat", "lung", "liver", "aorta", "spine", "myo", "blood", "rv_blood")
_T = {name: i for i, name in enumerate(_TISSUES)}


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _fourier_basis(u: np.ndarray, v: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """[2K,X,Y] float64: cos(k theta) then sin(k theta) for k = 1..K, by powers of e^{i theta}."""
    z1 = (u + np.complex64(1j) * v) / np.maximum(rho, np.float32(1e-6))
    powers = [z1]
    for _ in range(_HARMONICS - 1):
        powers.append(powers[-1] * z1)
    stack = np.stack(powers)
    return np.concatenate([stack.real, stack.imag])


def _harmonics(coeffs: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Re sum_k c_k e^{ik theta} [X,Y] for complex coefficients c [K] and a `_fourier_basis`."""
    weights = np.concatenate([coeffs.real, -coeffs.imag]).astype(basis.dtype)
    return (weights @ basis.reshape(len(weights), -1)).reshape(basis.shape[1:])


@dataclass
class _Frame:
    """One frame's geometry: the millimetre grid in the heart's canonical frame (u0, v0 [X,Y]), the
    cavity radius and wall at the base, the RV's extent and arc, and the long axis (base plane, length)."""

    u0: np.ndarray
    v0: np.ndarray
    es: bool
    r_base: float
    w_base: float
    rv_ext: float
    arc: float
    z_base: float
    length: float


def _frame(info: _Patient, anat: dict, phase: str) -> _Frame:
    nx, ny, nz = info.shape
    sxy, _, sz = info.spacing
    g = anat["g"]
    es = phase == "ES"
    # Millimetre grid around the FOV centre, rotated into the heart's canonical frame.
    x = ((np.arange(nx) - (nx - 1) / 2.0) * sxy - anat["centre"][0]).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2.0) * sxy - anat["centre"][1]).astype(np.float32)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    ca, sa = np.float32(np.cos(anat["angle"])), np.float32(np.sin(anat["angle"]))
    u0, v0 = ca * xx + sa * yy, -sa * xx + ca * yy
    if anat.get("mirror"):
        u0 = -u0  # a mirrored stack: the RV lies on the other side of the LV

    # Cavity radius and wall at the base; at ES the cavity shrinks and the wall thickens (same area).
    r_ed, w_ed = g["r"], g["wall"]
    r_base = r_ed * (g["es"] if es else 1.0)
    w_base = np.sqrt(r_base**2 + 2 * r_ed * w_ed + w_ed**2) - r_base if es else w_ed
    rv_ext = g["rv"] * (g["rv_es"] if es else 1.0)
    arc = np.deg2rad(g["arc"] * (0.9 if es else 1.0))
    # Long axis: base plane (moves toward the fixed apex at ES) .. apex.
    z_apex = (nz - 1) * sz + anat["tail"]
    z_base = anat["base"]
    length = z_apex - z_base
    if es:
        z_base += anat["shorten"] * length
        length = z_apex - z_base
    return _Frame(u0, v0, es, r_base, w_base, rv_ext, arc, z_base, length)


def _heart(info: _Patient, anat: dict, fr: _Frame, z: int) -> dict:
    """Slice z's position t on the long axis (0 base, 1 apex), its grid (u, v, rho, theta [X,Y]) and the
    heart's borders there: LV cavity r_endo, epicardium r_epi, RV cavity rv_cav, heart_out and fat."""
    g = anat["g"]
    w_ed = g["wall"]
    r_base, w_base = fr.r_base, fr.w_base
    t = (z * info.spacing[2] - fr.z_base) / fr.length
    du, dv = (anat["drift"] * z).astype(np.float32)
    u, v = fr.u0 - du, fr.v0 - dv
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    basis = _fourier_basis(u, v, rho)

    def border(coeffs: np.ndarray, basis: np.ndarray = basis) -> np.ndarray:
        return 1.0 + _harmonics(coeffs, basis)

    mix = float(np.clip(t, 0, 1))
    endo_c = (1 - mix) * anat["endo_c"][0] + mix * anat["endo_c"][1]
    endo_c[1] += anat["ellip"][0] * np.exp(-2j * anat["ellip"][1])
    epi_c = (1 - mix) * anat["epi_c"][0] + mix * anat["epi_c"][1]
    r_endo = r_base * _profile(t, 0.9) * border(endo_c)
    r_epi_mean = (r_base + w_base) * _profile(t, 1.0, 0.6)
    r_epi = r_epi_mean * border(epi_c)
    if info.group == "MINF":
        # Thinned infarct segment over part of the long axis: the wall thins, the cavity bulges.
        centre, width, depth, t0 = anat["minf"]
        ang = _wrap(theta - centre)
        win = np.exp(-((ang / width) ** 4)) * _profile(abs(t - t0 - 0.25) / 0.45, 1.0, 1.0) if 0 <= t <= 1 else 0
        wall = r_epi - r_endo
        r_endo = r_endo + 0.3 * depth * wall * win * (r_endo > 0)
        r_epi = r_endo + wall * (1 - depth * win)
    if g.get("septal"):
        # Asymmetric septal hypertrophy (HCM): the wall thickens inward on the RV side.
        bump = np.clip(np.cos(_wrap(theta - anat["rv_dir"])), 0, None) ** 2
        r_endo = r_endo - g["septal"] * w_ed * bump * (r_endo > 0)
    r_endo = np.maximum(r_endo, 0.0)
    r_epi = np.where(r_epi_mean > 0, np.maximum(r_epi, r_endo + 3.5), 0.0)
    # RV crescent on the septal side: thickness tapers toward the horns and toward the apex.
    ext = fr.rv_ext * _profile(t, anat["rv_end"], 0.6)
    dth = _wrap(theta - anat["rv_dir"]) / fr.arc
    crescent = np.clip(1 - np.abs(dth) ** anat["rv_shape"], 0, None) ** 0.5
    thick = ext * crescent * border(anat["rv_c"])
    rv_cav = np.maximum(thick - anat["rv_wall"], 0.0)
    heart_out = r_epi + np.where(thick > 0, thick + anat["rv_wall"] * (crescent > 0) * (ext > 0), 0.0)
    fat = np.clip(_harmonics(anat["fat_c"], basis) - 0.15, 0, None) * anat["fat_mm"] * 3
    return dict(t=t, u=u, v=v, rho=rho, r_endo=r_endo, r_epi=r_epi, rv_cav=rv_cav, heart_out=heart_out, fat=fat)


def _paint(info: _Patient, anat: dict, fr: _Frame, h: dict) -> tuple[np.ndarray, np.ndarray]:
    """Tissue codes and labels uint8 [X,Y] of one slice, painted from outside in."""
    nx, ny = info.shape[:2]
    r_ed, w_ed = anat["g"]["r"], anat["g"]["wall"]
    u0, v0, u, v, rho, t = fr.u0, fr.v0, h["u"], h["v"], h["rho"], h["t"]
    r_endo, r_epi, rv_cav, heart_out = h["r_endo"], h["r_epi"], h["rv_cav"], h["heart_out"]
    bu, bv, fat_ring, body_shift = anat["body"]
    lung_a, lung_b, lung_v = anat["lung"]
    liver_t0, liver_a, liver_b = anat["liver"]
    body = _ellipse(u0, v0, 0, 20 + body_shift, bu, bv)
    inner = _ellipse(u0, v0, 0, 20 + body_shift, bu - fat_ring, bv - fat_ring)
    sl = np.full((nx, ny), _T["air"], dtype=np.uint8)
    sl[body] = _T["fat"]
    sl[inner] = _T["muscle"]
    clear = rho > np.maximum(heart_out, fr.r_base + fr.w_base if t < 0 else 0) + h["fat"] + 4
    for side in (-1, 1):
        lung = _ellipse(u0, v0, side * (r_ed + w_ed + lung_a * 0.9), lung_v, lung_a, lung_b) & inner & clear
        sl[lung] = _T["lung"]
    if t > liver_t0:
        grow = min(1.0, (t - liver_t0) / (1.2 - liver_t0))
        liver = _ellipse(u0, v0, -0.3 * liver_a, 0.25 * liver_b, liver_a * grow, liver_b * grow) & inner & clear
        sl[liver] = _T["liver"]
    spine_v = 20 + bv * 0.7 + body_shift
    sl[_ellipse(u0, v0, 0, spine_v, 16, 14) & inner] = _T["spine"]
    sl[_ellipse(u0, v0, 0, spine_v, 8, 7) & inner] = _T["fat"]  # marrow
    sl[_ellipse(u0, v0, 18, spine_v - 30, 11, 11) & inner] = _T["aorta"]
    sl[(rho < heart_out + h["fat"]) & (heart_out > 0) & inner] = _T["fat"]
    size = (r_ed + w_ed) * max(0.0, 1 + 1.5 * t)
    if t < 0 and size > 8:
        # Above the valve plane: atria, bright blood that is not labeled.
        atria = _ellipse(u, v, 0, 0, size, size * 0.8) | _ellipse(u, v, -size, -4, size * 0.7, size * 0.6)
        sl[atria & inner] = _T["myo"]
        atria_in = _ellipse(u, v, 0, 0, size - 3, size * 0.8 - 3) | _ellipse(
            u, v, -size, -4, size * 0.7 - 3, size * 0.6 - 3
        )
        sl[atria_in & inner] = _T["blood"]
    lab = np.zeros((nx, ny), dtype=np.uint8)
    rv_out = (rho >= r_epi) & (rho < heart_out) & (heart_out > r_epi)
    sl[rv_out] = _T["myo"]  # RV free wall: myocardium-like, labeled background as in ACDC
    rv = (rho >= r_epi) & (rho < r_epi + rv_cav) & (rv_cav > 0)
    sl[rv] = _T["rv_blood"]
    lab[rv] = 1
    epi = rho < r_epi
    sl[epi] = _T["myo"]
    lab[epi] = 2
    lv = rho < r_endo
    sl[lv] = _T["blood"]
    lab[lv] = 3
    if anat["papillary"] and 0.2 < t < 0.75:
        # Dark papillary muscles inside the pool, labeled as LV cavity (ACDC convention).
        for ang0, rad in zip(anat["pap"][0], anat["pap"][1]):
            a = anat["rv_dir"] + np.pi + ang0 + (0.5 if rad > 3.5 else -0.5)
            rmax = fr.r_base * _profile(t, 0.9)
            pu, pv = 0.6 * rmax * np.cos(a), 0.6 * rmax * np.sin(a)
            pap = _ellipse(u, v, pu, pv, rad * (1.3 if fr.es else 1.0), rad * (1.3 if fr.es else 1.0)) & lv
            sl[pap] = _T["myo"]
    return sl, lab


def _render(info: _Patient, anat: dict, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Tissue codes uint8 [X,Y,Z] and labels uint8 [X,Y,Z] for one frame."""
    fr = _frame(info, anat, phase)
    tissue = np.zeros(info.shape, dtype=np.uint8)
    label = np.zeros(info.shape, dtype=np.uint8)
    for z in range(info.shape[2]):
        tissue[:, :, z], label[:, :, z] = _paint(info, anat, fr, _heart(info, anat, fr, z))
    return tissue, label


def _image(info, anat, tissue, label, texture, flow, wiggle, rng, band=None) -> np.ndarray:
    """Intensities int16 [X,Y,Z] from tissue codes: texture, blur, bias field, banding (v2), Rician
    noise, scale. `band` is a smooth [X,Y] field whose level lines become dark bSSFP bands."""
    nx, ny, _ = info.shape
    c = anat["contrast"]
    levels = np.array([c[name] for name in _TISSUES], dtype=np.float32)
    img = levels[tissue]
    img *= 1.0 + anat.get("texture", 0.07) * texture
    blood = (tissue == _T["blood"]) | (tissue == _T["rv_blood"]) | (tissue == _T["aorta"])
    img[blood] *= 1.0 + 0.05 * flow[blood]
    lung = tissue == _T["lung"]
    img[lung] *= np.clip(1.0 + 0.5 * texture[lung], 0.3, None)  # vessels and airways
    img = ndimage.gaussian_filter(img, (anat["blur"], anat["blur"], 0.3))  # partial volume
    # Coil bias: one side brighter, plus a very smooth wiggle.
    amp, direction = anat["bias"]
    gx = (np.arange(nx) / (nx - 1) - 0.5)[:, None]
    gy = (np.arange(ny) / (ny - 1) - 0.5)[None, :]
    bias = np.exp(2 * amp * (np.cos(direction) * gx + np.sin(direction) * gy) + anat.get("wiggle", 0.08) * wiggle)
    img *= bias[:, :, None].astype(np.float32)
    if band is not None:
        # bSSFP off-resonance banding: signal voids along the lines where the phase crosses pi.
        cycles, offset, depth = anat["banding"]
        phase = np.pi * cycles * band + offset
        img *= (1.0 - depth * np.exp(-(1.0 + np.cos(phase)) / 0.04)).astype(np.float32)[:, :, None]
    # Rician noise: magnitude of the signal plus complex Gaussian noise.
    sigma = anat["noise"]
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.hypot(real, imag) * anat["scale"]
    return np.clip(np.rint(img), 0, 32767).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str | None = None) -> None:
    """Write a NIfTI-1 file, gzipped with mtime 0 so identical data give identical bytes.
    `description` (at most 80 ASCII characters) goes into the header's descrip field."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    if description is not None:
        img.header["descrip"] = description.encode("ascii")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz:
        gz.write(img.to_bytes())


def _info_cfg(info: _Patient) -> str:
    return (
        f"ED: 1\nES: {info.es_frame}\nGroup: {info.group}\nHeight: {info.height:.1f}\n"
        f"Weight: {info.weight:.1f}\nNbFrame: {info.nb_frame}\n"
    )


def run(out_dir: Path, patients: int = 100, seed: int = 0, version: int = DEFAULT_VERSION) -> None:
    """Write the phantom dataset to `out_dir` (ACDC layout); all or nothing.

    Args:
        out_dir: folder to fill with patientXXX/ sub-folders and phantom.json.
        patients: number of patients (>= 1); groups are assigned in ACDC order, 20 each for 100.
        seed: dataset seed; the same seed and version give byte-identical files.
        version: generator version (see `VERSIONS`); 1 writes what the original phantom wrote.

    Raises:
        ConfigError: patients < 1, a negative seed or an unknown version.
    """
    if not isinstance(patients, int) or patients < 1:
        raise ConfigError(f"phantom patients must be a positive integer; got {patients!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"phantom seed must be a non-negative integer; got {seed!r}")
    _check_version(version)
    out_dir = Path(out_dir)
    log.info("writing a %d-patient cardiac phantom v%d (seed %d) to %s", patients, version, seed, out_dir)
    counts = dict.fromkeys(GROUPS, 0)
    profiles = {}
    # v1 files keep their original bytes (no description); later versions name themselves in the header.
    descrip = None if version == 1 else f"sraseg phantom v{version} seed {seed}"
    with staged_outputs(out_dir) as st:
        for index in tqdm(range(patients), desc="phantom", unit="patient"):
            pid = patient_id(index)
            info, frames = make_patient(index, patients, seed, version)
            counts[info.group] += 1
            profiles[pid] = dict(group=info.group, scanner=info.scanner, mirrored=info.mirrored)
            for phase, frame in (("ED", 1), ("ES", info.es_frame)):
                image, label = frames[phase]
                write_nifti(st.path(f"{pid}/{pid}_frame{frame:02d}.nii.gz"), image, info.affine, descrip)
                write_nifti(st.path(f"{pid}/{pid}_frame{frame:02d}_gt.nii.gz"), label, info.affine, descrip)
            st.path(f"{pid}/Info.cfg").write_text(_info_cfg(info))
        summary = dict(patients=patients, seed=seed, version=version, groups=counts, layout="ACDC")
        if version > 1:
            summary["profiles"] = profiles
        write_json(st.path("phantom.json"), summary)
    log.info("phantom written: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
