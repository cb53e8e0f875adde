"""The pairing rules: which real labeled slice each synthetic image is blended with, and how
concentrated a pairing is. The blend stage pairs with them; the index stage reports each rule's hubness.

- "nearest": the image's neighbours (neighbours.parquet) in rank order, entry k takes neighbour k mod n;
- "random": uniform over the bank (seeded by the caller's stream);
- "balanced": per-domain centred cosine, a capacity-capped assignment (below).

Far-off synthetic queries all land on the few real points nearest the centre of the real cloud
(hubness from the domain gap). `balanced_partners` removes each domain's mean embedding first and
then solves a capacity-constrained assignment, so no real slice can take more than its share.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

__all__ = [
    "PAIRING_RULES",
    "HUBNESS_SEED",
    "nearest_partners",
    "random_partners",
    "centre_domains",
    "balanced_partners",
    "partner_stats",
    "pairing_hubness",
]

# one line per rule, as blend.json's pairing_rule states it; its keys are the schema's blend.pairing enum (a test checks)
PAIRING_RULES = {
    "nearest": "map k uses labeled neighbour k mod n in rank order",
    "random": "uniform over labeled train slices",
    "balanced": "per-domain centred cosine, assignment with each labeled slice used at most cap times",
}
HUBNESS_SEED = 0  # the index's hubness figure for "random" pairing is one draw of this seed


def nearest_partners(neighbours: pd.DataFrame, synthetic_ids: np.ndarray, per_image: int) -> pd.DataFrame:
    """Entry k of synthetic image s takes its neighbour k mod n in rank order (n: its rows in `neighbours`),
    so with n >= per_image the per_image nearest are each used once.

    Args:
        neighbours: rows (synthetic_id, rank, real_id, cosine, ...); every id of `synthetic_ids` has one or more.
        synthetic_ids: the images in entry order.

    Returns:
        the chosen rows of `neighbours`, entry (i, k) at position i * per_image + k.
    """
    ranked = neighbours.sort_values(["synthetic_id", "rank"], kind="stable")
    sid = ranked["synthetic_id"].to_numpy()
    wanted = np.asarray(synthetic_ids)
    first, stop = np.searchsorted(sid, wanted, side="left"), np.searchsorted(sid, wanted, side="right")
    if (stop == first).any():
        raise ValueError(f"synthetic id(s) {wanted[stop == first][:5].tolist()} have no neighbour")
    pick = first[:, None] + np.arange(per_image)[None, :] % (stop - first)[:, None]
    return ranked.iloc[pick.ravel()]


def random_partners(bank_size: int, n_images: int, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform bank rows (with replacement), int64 [n_images, per_image], drawn from `rng` in entry order."""
    return rng.integers(0, bank_size, size=n_images * per_image).reshape(n_images, per_image)


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


def pairing_hubness(bank: np.ndarray, bank_ids: np.ndarray, synthetic: np.ndarray, synthetic_ids: np.ndarray,
                    neighbours: pd.DataFrame, seed: int = HUBNESS_SEED) -> dict:
    """partner_stats of each rule with one partner per synthetic image; "random" is one draw of `seed`.

    Args:
        bank: float [L,D] unit embeddings of the bank; bank_ids: their slice ids [L].
        synthetic: float [M,D] unit embeddings; synthetic_ids: their ids [M].
        neighbours: the index's neighbours table (rank 0 is the nearest rule's partner).

    Returns:
        {rule: partner_stats} with the mean of the plain (uncentred) cosines; "balanced" also holds its cap.
    """
    nearest = nearest_partners(neighbours, synthetic_ids, 1)
    random_rows = random_partners(len(bank_ids), len(synthetic), 1, np.random.default_rng(seed))[:, 0]
    balanced_rows, cap = balanced_partners(bank, synthetic, 1)
    balanced_rows = balanced_rows[:, 0]

    def cos(rows):
        return np.einsum("ij,ij->i", synthetic.astype(np.float64), bank[rows].astype(np.float64))

    out = {
        "nearest": partner_stats(nearest["real_id"].to_numpy(), nearest["cosine"].to_numpy()),
        "random": partner_stats(bank_ids[random_rows], cos(random_rows)),
        "balanced": partner_stats(bank_ids[balanced_rows], cos(balanced_rows)),
    }
    out["balanced"]["cap"] = cap
    return out
