"""Real-partner rules on embeddings that resist hubness, and how concentrated a pairing is.

Far-off synthetic queries all land on the few real points nearest the centre of the real cloud
(hubness from the domain gap). `balanced_partners` removes each domain's mean embedding first and
then solves a capacity-constrained assignment, so no real slice can take more than its share.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["centre_domains", "balanced_partners", "partner_stats"]


def centre_domains(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each set minus its own mean, rows renormalised to unit length (float64).

    A row equal to its set's mean (zero after centring) stays zero: cosine 0 to everything.
    """
    out = []
    for x in (real, synthetic):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=0, keepdims=True)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        out.append(np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12))
    return out[0], out[1]


def balanced_partners(bank: np.ndarray, synthetic: np.ndarray, per_image: int = 1) -> tuple[np.ndarray, int]:
    """Capacity-constrained partners maximising the total per-domain-centred cosine.

    Every synthetic image gets `per_image` partners (bank entries = M * per_image); each bank row is
    used at most cap = ceil(M * per_image / L) times. Solved exactly as a linear assignment between
    the replicated synthetic rows and `cap` copies of every bank row (scipy's Jonker-Volgenant).

    Args:
        bank: float [L,D] real embeddings (the labeled slices that can be partners).
        synthetic: float [M,D] synthetic embeddings.
        per_image: partners per synthetic image (the blend maps per image).

    Returns:
        (partners int64 [M, per_image] rows of `bank`, cap).
    """
    real_c, syn_c = centre_domains(bank, synthetic)
    m, n_bank = len(syn_c), len(real_c)
    cap = math.ceil(m * per_image / n_bank)
    cosine = syn_c @ real_c.T  # [M,L]
    # rows: entry e = synthetic e // per_image; columns: slot c = bank row c % L (cap copies side by side)
    cost = -np.tile(np.repeat(cosine, per_image, axis=0), (1, cap))
    entries, slots = linear_sum_assignment(cost)
    partners = np.empty(m * per_image, dtype=np.int64)
    partners[entries] = slots % n_bank
    return partners.reshape(m, per_image), cap


def partner_stats(partners: np.ndarray, cosines: np.ndarray | None = None) -> dict:
    """How concentrated a pairing is: distinct partners, the largest share of entries one partner
    takes (and which), its use count, and the mean cosine of the pairs (None when not given)."""
    partners = np.asarray(partners).ravel()
    if not len(partners):
        return {"entries": 0, "distinct": 0, "top_share": 0.0, "top_real_id": -1, "max_uses": 0, "mean_cosine": None}
    ids, counts = np.unique(partners, return_counts=True)
    top = int(np.argmax(counts))
    mean_cos = None
    if cosines is not None and np.isfinite(np.asarray(cosines, dtype=np.float64)).any():
        mean_cos = float(np.nanmean(np.asarray(cosines, dtype=np.float64)))
    return {
        "entries": int(len(partners)),
        "distinct": int(len(ids)),
        "top_share": float(counts[top] / len(partners)),
        "top_real_id": int(ids[top]),
        "max_uses": int(counts[top]),
        "mean_cosine": mean_cos,
    }
