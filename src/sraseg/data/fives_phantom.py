"""A built-in colour fundus phantom with binary vessel masks, written in the FIVES release layout.

The layout follows the published description of FIVES (Jin et al., "FIVES: A Fundus Image Dataset
for Artificial Intelligence based Vessel Segmentation", Scientific Data 9:475, 2022) and the folder
tree readers of the downloaded release use:

    train/Original/1_A.png      colour fundus photograph (RGB PNG)
    train/Ground truth/1_A.png  its vessel mask, the same file name (0 background, 255 vessel)
    test/Original/...           the same for the test split
    test/Ground truth/...

A file name is `<number>_<condition>.png`: the number restarts at 1 in each split (so `1_A.png`
exists in both train and test, two different eyes) and the letter is the condition, A (age-related
macular degeneration), D (diabetic retinopathy), G (glaucoma) or N (normal). The release has 600
train and 200 test images, 200 per condition, 2048 x 2048 px; this phantom numbers its images in
condition blocks (A first, then D, G, N) as we understand the release does, and writes masks as
RGB PNGs with three equal channels, as the release's masks are read by others (`mask[:, :, 0]`).
What we did not take from the release: its image size (the phantom is small, 256 px by default)
and its counts (configurable; 48 train and 16 test by default, 3:1 as in the release).

Each image is drawn in pixel units scaled to a 256 px eye: a bright disc-shaped field of view on a
dark surround, an orange-red fundus with choroidal texture, vignetting and a smooth illumination
gradient, a bright optic disc with a paler cup, a dark macula with the fovea at its centre, about
2.5 disc diameters from the disc on the temporal side, and vessel trees that leave the disc:
arcades curving around the macula and nasal trunks, each segment a noisy curved walk that splits
into two thinner children until the width falls under a pixel. Veins are wider and darker than
arteries. The mask is the union of the vessels' discs (exact at the pixel centres), clipped to the
field of view; the image sees them blurred, so the thinnest vessels are faint, as in a photograph.

Conditions change lesions and image quality, not the vessel mask's rules:
  A: drusen (small yellow spots) around the macula, sometimes a pale atrophic patch or a dark
     macular haemorrhage; more haze and blur (older eyes, lens opacity).
  D: red dots and blots (microaneurysms, haemorrhages), yellow hard exudates near the macula,
     white fluffy cotton-wool spots; stronger, uneven illumination and darker exposures.
  G: a large cup (cup-to-disc ratio 0.6-0.85 against 0.25-0.45 elsewhere) and a pale
     peripapillary atrophy crescent; slightly thinner vessels.
  N: none of these; the cleanest exposures.

Determinism: image `i` (train first, then test) draws from `numpy.random.default_rng([seed, i])`;
PNGs carry no time stamp, so the same seed gives the same bytes. `phantom.json` records the
settings and, per image, the condition, the eye, and the disc, fovea and field-of-view geometry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from sraseg.errors import ConfigError
from sraseg.io import staged_outputs, write_json

__all__ = [
    "CONDITIONS",
    "CONDITION_NAMES",
    "RELEASE_SPLITS",
    "IMAGE_DIR",
    "MASK_DIR",
    "VERSION",
    "release_names",
    "make_image",
    "run",
]

log = logging.getLogger(__name__)

CONDITIONS = ("A", "D", "G", "N")
CONDITION_NAMES = {"A": "AMD", "D": "diabetic retinopathy", "G": "glaucoma", "N": "normal"}
RELEASE_SPLITS = ("train", "test")
IMAGE_DIR = "Original"
MASK_DIR = "Ground truth"
VERSION = 1  # the generator's version; its output for a seed never changes

_REF = 256.0  # lengths below are in pixels of a 256 px image and scale with the size
_MIN_RADIUS = 0.5  # a vessel ends when its radius falls under this (a one-pixel line at 256 px)

# Image quality per condition: illumination gradient strength, vignetting, haze (contrast loss
# toward a flat veil), blur sigma (px at 256), exposure, vessel width factor.
_QUALITY = {
    "A": dict(gradient=(0.1, 0.5), vignette=(0.2, 0.45), haze=(0.1, 0.35), blur=(0.5, 1.0), exposure=(0.8, 1.05), width=(0.95, 1.05)),
    "D": dict(gradient=(0.25, 0.7), vignette=(0.25, 0.55), haze=(0.05, 0.25), blur=(0.4, 0.8), exposure=(0.6, 1.0), width=(0.95, 1.1)),
    "G": dict(gradient=(0.1, 0.4), vignette=(0.2, 0.4), haze=(0.05, 0.2), blur=(0.3, 0.7), exposure=(0.8, 1.05), width=(0.8, 0.92)),
    "N": dict(gradient=(0.0, 0.3), vignette=(0.15, 0.35), haze=(0.0, 0.1), blur=(0.3, 0.6), exposure=(0.85, 1.05), width=(0.95, 1.05)),
}


def release_names(count: int) -> list[tuple[int, str]]:
    """(number, condition) of `count` images of one split, numbered from 1 in condition blocks.

    With at least four images every condition gets a contiguous block of near-equal size (A, D,
    G, N); with fewer the conditions are dealt in turn.
    """
    if count >= len(CONDITIONS):
        return [(i + 1, CONDITIONS[i * len(CONDITIONS) // count]) for i in range(count)]
    return [(i + 1, CONDITIONS[i % len(CONDITIONS)]) for i in range(count)]


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise [size,size] float32 with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _blob(rr: np.ndarray, cc: np.ndarray, centre: tuple[float, float], radius: float, soft: float = 1.0) -> np.ndarray:
    """A soft disc in [0,1]: 1 inside `radius`, a logistic edge `soft` px wide."""
    dist = np.hypot(rr - centre[0], cc - centre[1])
    return (1.0 / (1.0 + np.exp(np.clip((dist - radius) / max(soft, 1e-3), -50, 50)))).astype(np.float32)


def _walk(rng, start, angle, radius, bend, scale, fov, depth, out, kind_out, kind):
    """Grow one vessel segment and its children (iteratively, a stack of pending segments).

    Each segment is a curved noisy walk of a length proportional to its width; it then splits into
    a main child (70-85 % of the radius, keeping most of the bend) and a side child (50-70 %) at
    20-45 degrees to either side. Centre points every half pixel go to `out` as (row, col, radius).
    """
    stack = [(np.asarray(start, dtype=np.float64), angle, radius, bend, depth)]
    step = 0.5
    centre, fov_radius = fov
    while stack:
        pos, ang, rad, curve, level = stack.pop()
        if rad < _MIN_RADIUS * scale or level > 9:
            continue
        length = rng.uniform(20.0, 40.0) * scale * (rad / scale) ** 0.5
        n = max(int(length / step), 2)
        wiggle = np.cumsum(rng.normal(0.0, 0.025, n))
        angles = ang + curve * np.arange(n) / scale + wiggle
        steps = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
        path = pos + np.cumsum(steps, axis=0)
        inside = np.hypot(path[:, 0] - centre[0], path[:, 1] - centre[1]) < fov_radius + 2 * scale
        if not inside.all():
            path = path[: int(np.argmin(inside))]  # stop at the rim of the field of view
            if len(path) == 0:
                continue
            out.append(np.column_stack([path, np.full(len(path), rad)]))
            kind_out.append(np.full(len(path), kind))
            continue
        out.append(np.column_stack([path, np.full(n, rad)]))
        kind_out.append(np.full(n, kind))
        end, end_angle = path[-1], angles[-1]
        side = rng.choice([-1.0, 1.0])
        main = rad * rng.uniform(0.7, 0.85)
        branch = rad * rng.uniform(0.5, 0.7)
        stack.append((end, end_angle - side * np.deg2rad(rng.uniform(5, 15)), main, curve * 0.9, level + 1))
        stack.append((end, end_angle + side * np.deg2rad(rng.uniform(20, 45)), branch,
                      rng.normal(0.0, 0.002), level + 1))  # fmt: skip


def _rasterise(points: np.ndarray, size: int) -> np.ndarray:
    """Union of discs (row, col, radius) as a bool [size,size] mask, exact at pixel centres up to
    the centre's rounding: for each radius bin (a quarter pixel), pixels within that radius of a
    centre of the bin (Euclidean distance transform)."""
    mask = np.zeros((size, size), dtype=bool)
    if len(points) == 0:
        return mask
    ij = np.floor(points[:, :2]).astype(np.int64)
    keep = (ij >= 0).all(1) & (ij < size).all(1)
    ij, radii = ij[keep], np.round(points[keep, 2] * 4.0) / 4.0
    for radius in np.unique(radii):
        centres = np.ones((size, size), dtype=bool)
        sel = ij[radii == radius]
        centres[sel[:, 0], sel[:, 1]] = False
        mask |= ndimage.distance_transform_edt(centres) <= radius
    return mask


@dataclass
class _Eye:
    """Where things are in one photograph: the field of view (centre, radius), the eye side and its
    nasal direction (+1 right eye: the disc lies toward larger columns), the optic disc (centre,
    radius, cup-to-disc ratio) and the fovea."""

    fov_c: tuple[float, float]
    fov_r: float
    eye: str
    nasal: float
    disc_r: float
    disc: tuple[float, float]
    fovea: tuple[float, float]
    cdr: float


def _eye(rng: np.random.Generator, condition: str, size: int, s: float) -> _Eye:
    """Geometry: field of view, eye side, optic disc and fovea (disc-fovea about 2.5 disc diameters)."""
    fov_c = (size / 2 + rng.normal(0, 2 * s), size / 2 + rng.normal(0, 2 * s))
    fov_r = size * rng.uniform(0.44, 0.48)
    eye = "right" if rng.random() < 0.5 else "left"
    nasal = 1.0 if eye == "right" else -1.0  # the disc sits on the nasal side of the image centre
    disc_r = rng.uniform(13.0, 17.0) * s
    disc = (fov_c[0] + rng.normal(0, 4 * s), fov_c[1] + nasal * rng.uniform(48, 62) * s)
    fovea = (disc[0] + rng.uniform(3, 10) * s, disc[1] - nasal * 5.0 * disc_r * rng.uniform(0.9, 1.1))
    cdr = rng.uniform(0.6, 0.85) if condition == "G" else rng.uniform(0.25, 0.45)
    return _Eye(fov_c, fov_r, eye, nasal, disc_r, disc, fovea, cdr)


def _vessel_trees(rng: np.random.Generator, q: dict, geo: _Eye, size: int, s: float, fov_mask: np.ndarray):
    """(veins, arteries) bool [size,size] inside the field of view: four arcades from the disc around
    the macula (veins and arteries, superior and inferior) and three or four nasal trunks."""
    points, kinds = [], []
    fov = (geo.fov_c, geo.fov_r)
    disc, disc_r, nasal = geo.disc, geo.disc_r, geo.nasal
    # Directions are angles a of (row, col) = (sin a, cos a); the fovea lies toward -nasal columns.
    tcol = -nasal
    for vertical in (-1.0, 1.0):  # superior, inferior
        for kind, width in (("vein", rng.uniform(1.6, 1.9)), ("artery", rng.uniform(1.2, 1.5))):
            theta = np.deg2rad(rng.uniform(55, 80))  # mostly vertical, tilted toward the fovea
            ang = np.arctan2(vertical * np.sin(theta), tcol * np.cos(theta))
            bend = -vertical * tcol * rng.uniform(0.004, 0.006)  # turn toward the fovea's side
            start = (disc[0] + vertical * disc_r * 0.3, disc[1] + rng.normal(0, disc_r * 0.2))
            _walk(rng, start, ang, width * q["width"] * s, bend, s, fov, 0, points, kinds, kind)
    for _ in range(int(rng.integers(3, 6))):
        ang = np.arctan2(0.0, nasal) + rng.uniform(-1.1, 1.1)  # toward the nasal side
        kind = "vein" if rng.random() < 0.5 else "artery"
        width = rng.uniform(1.0, 1.4) * (1.15 if kind == "vein" else 1.0)
        _walk(rng, disc, ang, width * q["width"] * s, rng.normal(0, 0.002), s, fov, 1, points, kinds, kind)
    pts = np.concatenate(points)
    kind_of = np.concatenate(kinds)
    veins = _rasterise(pts[kind_of == "vein"], size) & fov_mask
    arteries = _rasterise(pts[kind_of == "artery"], size) & fov_mask
    return veins, arteries


def _fundus(rng: np.random.Generator, geo: _Eye, rr: np.ndarray, cc: np.ndarray, size: int, s: float):
    """(rgb float32 [size,size,3], the disc's map): orange-red with choroidal texture, then macula, disc and cup."""
    fovea, disc, disc_r, cdr = geo.fovea, geo.disc, geo.disc_r, geo.cdr
    base = np.array([rng.uniform(0.72, 0.92), rng.uniform(0.33, 0.48), rng.uniform(0.12, 0.22)], dtype=np.float32)
    texture = 0.05 * _smooth_noise(rng, size, 2.5 * s) + 0.04 * _smooth_noise(rng, size, 10 * s)
    rgb = base[None, None, :] * (1.0 + texture[..., None])
    macula = np.exp(-(((rr - fovea[0]) ** 2 + (cc - fovea[1]) ** 2) / (2 * (18 * s) ** 2)))
    pit = np.exp(-(((rr - fovea[0]) ** 2 + (cc - fovea[1]) ** 2) / (2 * (4 * s) ** 2)))
    rgb *= (1.0 - rng.uniform(0.2, 0.35) * macula - 0.1 * pit)[..., None]
    disc_map = _blob(rr, cc, disc, disc_r, 1.5 * s)
    cup_map = _blob(rr, cc, (disc[0], disc[1] - geo.nasal * 0.15 * disc_r * (1 - cdr)), cdr * disc_r, 1.5 * s)
    rgb += disc_map[..., None] * np.array([0.2, 0.35, 0.25], dtype=np.float32)
    rgb += cup_map[..., None] * np.array([0.1, 0.15, 0.2], dtype=np.float32)
    return rgb, disc_map


def _lesions(rng: np.random.Generator, condition: str, rgb: np.ndarray, geo: _Eye, disc_map: np.ndarray,
             rr: np.ndarray, cc: np.ndarray, size: int, s: float) -> np.ndarray:  # fmt: skip
    """The condition's lesions painted over the fundus `rgb` (in place where it can); the result."""
    fovea, fov_c, disc, disc_r = geo.fovea, geo.fov_c, geo.disc, geo.disc_r

    def spots(n, centre, spread, radius, colour, soft, alpha):
        # Small soft discs painted over the fundus, each in its own window (lesions are local).
        for _ in range(n):
            off = rng.normal(0, spread, 2)
            at, rad = (centre[0] + off[0], centre[1] + off[1]), rng.uniform(*radius)
            reach = rad + 8 * soft + 1
            r0, r1 = int(max(at[0] - reach, 0)), int(min(at[0] + reach + 1, size))
            c0, c1 = int(max(at[1] - reach, 0)), int(min(at[1] + reach + 1, size))
            if r0 >= r1 or c0 >= c1:
                continue
            blob = alpha * _blob(rr[r0:r1, c0:c1], cc[r0:r1, c0:c1], at, rad, soft)[..., None]
            rgb[r0:r1, c0:c1] = rgb[r0:r1, c0:c1] * (1 - blob) + blob * np.asarray(colour, dtype=np.float32)

    if condition == "A":
        spots(int(rng.integers(10, 50)), fovea, 12 * s, (0.7 * s, 2.5 * s), (0.95, 0.85, 0.45), 0.6 * s, 0.7)
        if rng.random() < 0.35:  # geographic atrophy: a pale patch
            spots(1, fovea, 3 * s, (8 * s, 16 * s), (0.9, 0.65, 0.45), 2 * s, 0.6)
        elif rng.random() < 0.3:  # a dark macular haemorrhage (wet AMD)
            spots(1, fovea, 3 * s, (6 * s, 12 * s), (0.35, 0.05, 0.03), 2 * s, 0.7)
    elif condition == "D":
        spots(int(rng.integers(10, 40)), fov_c, 0.25 * size, (0.5 * s, 3 * s), (0.45, 0.06, 0.04), 0.5 * s, 0.8)
        spots(int(rng.integers(5, 30)), fovea, 20 * s, (0.6 * s, 2 * s), (0.98, 0.9, 0.4), 0.4 * s, 0.8)
        spots(int(rng.integers(0, 4)), fov_c, 0.2 * size, (3 * s, 6 * s), (0.95, 0.92, 0.85), 2 * s, 0.6)
    elif condition == "G":
        crescent = _blob(rr, cc, (disc[0], disc[1] - geo.nasal * 0.25 * disc_r), disc_r * rng.uniform(1.15, 1.35), 1.5 * s)
        atrophy = np.clip(crescent - disc_map, 0, 1) * rng.uniform(0.3, 0.6)
        rgb = rgb * (1 - atrophy[..., None]) + atrophy[..., None] * np.array([0.9, 0.75, 0.6], dtype=np.float32)
    return rgb


def _photograph(rng: np.random.Generator, q: dict, rgb: np.ndarray, veins: np.ndarray, arteries: np.ndarray,
                geo: _Eye, rr: np.ndarray, cc: np.ndarray, fov_mask: np.ndarray, in_fov: np.ndarray,
                s: float) -> np.ndarray:  # fmt: skip
    """uint8 [size,size,3]: the fundus with its vessels, blur, illumination, surround and noise."""
    # Vessels: dark red, veins darker; blurred, so one-pixel vessels are faint.
    blur = q["blur"] * s
    darken = rng.uniform(0.45, 0.6) * ndimage.gaussian_filter(veins.astype(np.float32), blur)
    darken += rng.uniform(0.3, 0.45) * ndimage.gaussian_filter(arteries.astype(np.float32), blur)
    rgb *= 1.0 - np.clip(darken, 0, 0.8)[..., None] * np.array([0.55, 1.0, 1.0], dtype=np.float32)
    rgb = ndimage.gaussian_filter(rgb, (blur, blur, 0))

    # Illumination: a smooth gradient, vignetting toward the rim, haze and exposure, then the
    # dark surround outside the field of view and sensor noise.
    fov_c, fov_r = geo.fov_c, geo.fov_r
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((rr - fov_c[0]) * np.sin(direction) + (cc - fov_c[1]) * np.cos(direction)) / fov_r
    radial = np.hypot(rr - fov_c[0], cc - fov_c[1]) / fov_r
    light = np.exp(q["gradient"] * ramp) * (1.0 - q["vignette"] * np.clip(radial, 0, 1) ** 2.5) * q["exposure"]
    rgb = rgb * light[..., None]
    rgb = (1 - q["haze"]) * rgb + q["haze"] * float(rgb[fov_mask].mean())
    rgb = rgb * in_fov[..., None] + rng.uniform(0.0, 0.02)
    rgb += rng.normal(0, rng.uniform(0.006, 0.015), rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def make_image(index: int, condition: str, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one fundus photograph and its vessel mask.

    Args:
        index: the image's 0-based index in the dataset (train first, then test), part of its seed;
        condition: one of `CONDITIONS`; size: side in pixels (>= 64); seed: dataset seed.

    Returns:
        (image uint8 [size,size,3] RGB, mask uint8 [size,size] in {0,1} (1 vessel), geometry dict:
        eye, disc centre (row, col) and radius, cup-to-disc ratio, fovea centre, field-of-view centre
        and radius, vessel fraction of the field of view).
    """
    rng = np.random.default_rng([seed, index])
    q = {key: rng.uniform(*span) for key, span in _QUALITY[condition].items()}
    s = size / _REF
    rr, cc = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # every draw below comes from `rng` in a fixed order: same seed, same bytes
    geo = _eye(rng, condition, size, s)
    in_fov = _blob(rr, cc, geo.fov_c, geo.fov_r, 0.6 * s)
    fov_mask = np.hypot(rr - geo.fov_c[0], cc - geo.fov_c[1]) < geo.fov_r
    veins, arteries = _vessel_trees(rng, q, geo, size, s, fov_mask)
    mask = (veins | arteries).astype(np.uint8)
    rgb, disc_map = _fundus(rng, geo, rr, cc, size, s)
    rgb = _lesions(rng, condition, rgb, geo, disc_map, rr, cc, size, s)
    image = _photograph(rng, q, rgb, veins, arteries, geo, rr, cc, fov_mask, in_fov, s)
    geometry = dict(
        eye=geo.eye,
        disc=[round(float(v), 2) for v in geo.disc],
        disc_radius=round(float(geo.disc_r), 2),
        cup_to_disc=round(float(geo.cdr), 3),
        fovea=[round(float(v), 2) for v in geo.fovea],
        fov=[round(float(v), 2) for v in geo.fov_c],
        fov_radius=round(float(geo.fov_r), 2),
        vessel_fraction=round(float(mask[fov_mask].mean()), 4),
    )
    return image, mask, geometry


def _check(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"fives phantom {name} must be an integer >= {low}; got {value!r}")


def run(out_dir: Path, train: int = 48, test: int = 16, size: int = 256, seed: int = 0) -> None:
    """Write the FIVES-layout phantom to `out_dir`; all or nothing.

    Args:
        out_dir: folder to fill with train/ and test/ (each Original/ and Ground truth/) and phantom.json.
        train, test: images per release split (>= 1 each; conditions in blocks, see `release_names`).
        size: image side in pixels (>= 64); seed: dataset seed (same seed, same bytes).

    Raises:
        ConfigError: a count < 1, a size < 64 or a negative seed.
    """
    _check("train", train, 1)
    _check("test", test, 1)
    _check("size", size, 64)
    _check("seed", seed, 0)
    out_dir = Path(out_dir)
    log.info("writing a FIVES-layout fundus phantom (%d train, %d test, %d px, seed %d) to %s",
             train, test, size, seed, out_dir)  # fmt: skip
    jobs = [(split, number, cond) for split, count in zip(RELEASE_SPLITS, (train, test))
            for number, cond in release_names(count)]  # fmt: skip
    images = {}
    with staged_outputs(out_dir) as st:
        for index, (split, number, cond) in enumerate(tqdm(jobs, desc="fives phantom", unit="image")):
            image, mask, geometry = make_image(index, cond, size, seed)
            name = f"{number}_{cond}.png"
            Image.fromarray(image, mode="RGB").save(st.path(f"{split}/{IMAGE_DIR}/{name}"))
            mask_rgb = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
            Image.fromarray(mask_rgb, mode="RGB").save(st.path(f"{split}/{MASK_DIR}/{name}"))
            images[f"{split}/{name}"] = dict(condition=cond, **geometry)
        counts = {split: {c: sum(1 for s, _, k in jobs if s == split and k == c) for c in CONDITIONS}
                  for split in RELEASE_SPLITS}  # fmt: skip
        write_json(
            st.path("phantom.json"),
            dict(layout="FIVES", version=VERSION, seed=seed, size=size, train=train, test=test,
                 conditions=CONDITION_NAMES, counts=counts, images=images),  # fmt: skip
        )
    log.info("fives phantom written: %d images", len(jobs))
