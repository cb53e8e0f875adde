"""Frechet distance between two embedding sets (FD-DINOv2 when the embeddings come from DINOv2)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "gaussian_stats", "patient_halves", "real_floor"]

log = logging.getLogger(__name__)


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D,D] (float64, unbiased) of rows x [N,D]; a single row has zero covariance."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    if len(x) < 2:
        return mu, np.zeros((x.shape[1], x.shape[1]))
    return mu, np.cov(x, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> dict:
    """Frechet distance between Gaussians fitted to two sets of row vectors.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)).
    With fewer rows than dimensions the covariances are singular and sqrtm can come back non-finite
    or clearly complex; then eps*I is added to both covariances (as FID implementations do) and the
    offset is recorded.

    Args:
        a: float [Na,D] (Na >= 1).
        b: float [Nb,D] (same D).
        eps: diagonal offset used only when the plain product has no usable square root.

    Returns:
        dict with fd (float, >= 0 up to rounding), mean_term, trace_term, eps_used, n_a, n_b, dim.

    Raises:
        ValueError: empty sets or different dimensions.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need two non-empty [N,D] sets of the same D; got {a.shape} and {b.shape}")
    mu_a, cov_a = gaussian_stats(a)
    mu_b, cov_b = gaussian_stats(b)
    eps_used = 0.0
    covmean = _sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all() or _too_complex(covmean):
        eps_used = eps
        offset = np.eye(a.shape[1]) * eps
        covmean = _sqrtm((cov_a + offset) @ (cov_b + offset))
        log.info("Frechet distance: singular covariance product, added %g*I", eps)
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    mean_term = float(diff @ diff)
    trace_term = float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return {
        "fd": mean_term + trace_term,
        "mean_term": mean_term,
        "trace_term": trace_term,
        "eps_used": eps_used,
        "n_a": int(len(a)),
        "n_b": int(len(b)),
        "dim": int(a.shape[1]),
    }


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # Singular products (fewer rows than dimensions) are expected here; accuracy is checked by the caller.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(m)


def _too_complex(m: np.ndarray) -> bool:
    # Small imaginary parts are rounding noise of sqrtm on near-singular input; large ones mean trouble.
    return np.iscomplexobj(m) and np.abs(m.imag).max() > 1e-3 * max(np.abs(m.real).max(), 1e-12)


def patient_halves(patients: np.ndarray, seed: int = 0) -> np.ndarray:
    """Split rows into two patient-disjoint halves of about equal size.

    Patients are shuffled (seeded) and each goes, whole, to the half with fewer rows so far.

    Args:
        patients: [N] patient id of each row.

    Returns:
        bool [N], True for rows of half A (False: half B).

    Raises:
        ValueError: fewer than two patients.
    """
    patients = np.asarray(patients)
    names, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise ValueError(f"need at least two patients for patient-disjoint halves; got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    in_a = np.zeros(len(names), dtype=bool)
    size_a = size_b = 0
    for p in order:
        if size_a <= size_b:
            in_a[p], size_a = True, size_a + counts[p]
        else:
            size_b += counts[p]
    return in_a[inverse]


def real_floor(real: np.ndarray, patients: np.ndarray, seed: int = 0) -> dict:
    """The FD between two patient-disjoint halves of a real set: what two samples of the SAME
    distribution score, the floor a synthetic set's FD is measured against.

    Returns:
        frechet_distance's dict of the two halves.
    """
    half_a = patient_halves(patients, seed)
    return frechet_distance(real[half_a], real[~half_a])
