"""Mean teacher: the EMA update and the teacher's pseudo-labels (argmax + largest connected component).

BatchNorm buffers: the teacher always runs in eval mode, so it uses its running mean/var. Those buffers
follow the same EMA as the weights (t = d*t + (1-d)*s, as timm's ModelEma does for every float entry of
the state dict), which keeps the statistics consistent with the averaged weights; the integer
`num_batches_tracked` is copied from the student.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from sraseg.device import autocast

__all__ = ["update_ema", "largest_components", "pseudo_labels"]

# In-plane 8-connectivity, no connection across slices (a [B,H,W] stack is labelled per slice).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = True


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """t = decay * t + (1 - decay) * s for every parameter and float buffer; integer buffers copied.

    The teacher is put (back) in eval mode.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        if t_buf.is_floating_point():
            t_buf.mul_(decay).add_(s_buf, alpha=1.0 - decay)
        else:
            t_buf.copy_(s_buf)
    teacher.eval()


def largest_components(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep, per slice and per foreground class, only the largest 8-connected blob; the rest -> 0.

    Args:
        labels: integer [B,H,W] in [0,num_classes).
    Returns:
        same dtype and shape; class 0 (background) untouched.
    """
    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    slice_index = np.broadcast_to(np.arange(labels.shape[0])[:, None, None], labels.shape)
    for c in range(1, num_classes):
        components, count = ndimage.label(labels == c, structure=_IN_PLANE)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        owner = np.zeros(count + 1, dtype=np.int64)  # the slice each component lies in
        owner[components.ravel()] = slice_index.ravel()
        ids = np.arange(1, count + 1)
        # order by slice, then size descending, then id: the first component of each slice wins
        order = np.lexsort((ids, -sizes[1:], owner[1:]))
        _, first = np.unique(owner[1:][order], return_index=True)
        keep = np.zeros(count + 1, dtype=bool)
        keep[ids[order][first]] = True
        out[keep[components]] = c
    return out


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Teacher pseudo-labels of un-mixed images: argmax, then the largest blob per class per slice.

    Args:
        images: float [B,1,H,W] in [0,1].
    Returns:
        long [B,H,W] in [0,num_classes) on the images' device.
    """
    teacher.eval()
    with autocast(images.device):
        logits = teacher(images)
    hard = logits.argmax(dim=1).cpu().numpy()
    return torch.from_numpy(largest_components(hard, num_classes)).to(images.device).long()
