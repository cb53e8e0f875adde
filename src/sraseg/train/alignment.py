"""Similarity-alignment (SA) loss that trains the segmenter (the reference's version has no gradient).

A small trainable projection head maps the U-Net's pooled bottleneck features into the frozen DINOv2
embedding space. Two cosine terms:
1. each synthetic image s is pulled toward the DINOv2 embedding of its nearest real neighbour,
   e_nn(s) (neighbours.parquet rank 0);
2. an anchor: each real labeled image r is mapped onto its own embedding e(r), so the head cannot
   collapse to a constant.
L_SA = mean_s (1 - cos(h(f(s)), e_nn(s))) + mean_r (1 - cos(h(f(r)), e(r))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ProjectionHead", "sa_loss"]


class ProjectionHead(nn.Module):
    """Linear(in_dim, hidden)-ReLU-Linear(hidden, out_dim).

    Args:
        in_dim (`int`, 256): U-Net bottleneck width.
        out_dim (`int`): DINOv2 embedding width D (384 for ViT-S/14).
        hidden (`int`, 256): hidden width.
    """

    def __init__(self, in_dim: int = 256, out_dim: int = 384, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features float [B,in_dim] -> float [B,out_dim] (not normalised)."""
        return self.net(features)


def sa_loss(
    head: nn.Module,
    synthetic_features: torch.Tensor,
    neighbour_embeddings: torch.Tensor,
    real_features: torch.Tensor,
    real_embeddings: torch.Tensor,
) -> torch.Tensor:
    """L_SA on pooled bottleneck features.

    Args:
        head: projection head.
        synthetic_features: float [Bs,F], U-Net `encode` of un-mixed synthetic images.
        neighbour_embeddings: float [Bs,D], DINOv2 embedding of each one's nearest real neighbour.
        real_features: float [Br,F], U-Net `encode` of real labeled images.
        real_embeddings: float [Br,D], their own DINOv2 embeddings.
    Returns:
        float32 scalar in [0,4].
    """
    pull = 1.0 - F.cosine_similarity(head(synthetic_features.float()), neighbour_embeddings.float(), dim=1)
    anchor = 1.0 - F.cosine_similarity(head(real_features.float()), real_embeddings.float(), dim=1)
    return pull.mean() + anchor.mean()
