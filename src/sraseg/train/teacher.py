"""Mean teacher: the EMA update and the teacher's pseudo-labels (argmax + largest connected component).

BatchNorm buffers: the teacher's running mean/var follow the same EMA as the weights (t = d*t + (1-d)*s,
as timm's ModelEma does for every float entry of the state dict), which keeps the statistics consistent
with the averaged weights; the integer `num_batches_tracked` is copied from the student. The teacher
lives in eval mode. `pseudo_labels` runs it either so (`train.teacher_mode: eval`: running statistics,
dropout off) or, as the reference does, in train mode (`train`: dropout on, BatchNorm normalising the
unlabeled batch with the batch's own statistics); train mode here never writes the running statistics,
so they stay the EMA of the student's and the EMA update sees the buffers it left.

The component filter has two routes giving identical labels: scipy on the host for CPU tensors, and a
torch route that stays on the tensors' device (no copy to the host, no host sync) for CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sraseg.device import autocast

__all__ = ["TEACHER_MODES", "update_ema", "largest_components", "largest_components_torch", "teacher_mode",
           "teacher_logits", "pseudo_labels"]

TEACHER_MODES = ("eval", "train")

# In-plane 8-connectivity: the 8 neighbours of a pixel (dy, dx); no connection across slices.
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """t = decay * t + (1 - decay) * s for every parameter and float buffer; integer buffers copied.

    One fused foreach update for all float tensors (a few kernels instead of one per tensor). The
    teacher is put (back) in eval mode.
    """
    t_float, s_float, t_int, s_int = [], [], [], []
    pairs = list(zip(teacher.parameters(), student.parameters())) + list(zip(teacher.buffers(), student.buffers()))
    for t, s in pairs:
        if t.is_floating_point():
            t_float.append(t)
            s_float.append(s.detach())
        else:
            t_int.append(t)
            s_int.append(s)
    torch._foreach_mul_(t_float, decay)
    torch._foreach_add_(t_float, s_float, alpha=1.0 - decay)
    if t_int:
        torch._foreach_copy_(t_int, s_int)
    teacher.eval()


def _largest_components_scipy(labels: np.ndarray, num_classes: int) -> np.ndarray:
    from scipy import ndimage  # host route only

    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True  # 8-connected within a slice, never across slices
    out = np.zeros_like(labels)
    slice_index = np.broadcast_to(np.arange(labels.shape[0])[:, None, None], labels.shape)
    for c in range(1, num_classes):
        components, count = ndimage.label(labels == c, structure=in_plane)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        owner = np.zeros(count + 1, dtype=np.int64)  # the slice each component lies in
        owner[components.ravel()] = slice_index.ravel()
        ids = np.arange(1, count + 1)
        # order by slice, then size descending, then id (raster order of the first pixel): first wins
        order = np.lexsort((ids, -sizes[1:], owner[1:]))
        _, first = np.unique(owner[1:][order], return_index=True)
        keep = np.zeros(count + 1, dtype=bool)
        keep[ids[order][first]] = True
        out[keep[components]] = c
    return out


def largest_components(labels, num_classes: int, route: str = "auto"):
    """Keep, per slice and per foreground class, only the largest 8-connected blob; the rest -> 0.
    Among blobs of equal size the one whose first pixel comes first in raster order wins.

    Args:
        labels: integer [B,H,W] in [0,num_classes), a numpy array or a tensor.
        route: "auto" (scipy for numpy arrays and CPU tensors, torch for other devices), "scipy" or
            "torch"; both give identical labels. On CUDA, auto replays the torch route as a CUDA graph.
    Returns:
        same type, dtype, shape (and device); class 0 (background) untouched.
    """
    if isinstance(labels, np.ndarray):
        if route == "torch":
            return largest_components_torch(torch.from_numpy(labels), num_classes).numpy()
        return _largest_components_scipy(labels, num_classes)
    if route == "auto" and labels.device.type == "cuda":
        return _graphed_filter(labels, num_classes)
    if route == "torch" or (route == "auto" and labels.device.type != "cpu"):
        return largest_components_torch(labels, num_classes)
    kept = _largest_components_scipy(labels.numpy(), num_classes)
    return torch.from_numpy(kept)


def _neighbours(x: torch.Tensor, fill: int) -> torch.Tensor:
    """[B,H,W] -> [8,B,H,W]: the value at each in-plane neighbour offset, `fill` outside the slice."""
    _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    return torch.stack([padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _OFFSETS])


def _stars(parent: torch.Tensor, n: int) -> torch.Tensor:
    """star[u]: u's tree has depth <= 1 (Awerbuch-Shiloach's star test); `parent` has a dummy slot n."""
    grand = parent[parent]
    deep = parent != grand
    star = torch.ones_like(parent, dtype=torch.bool)
    star = star.scatter(0, torch.where(deep, grand, n), torch.zeros_like(star))  # grandparents of deep nodes
    star = star & ~deep
    return star & star[parent]


def _hook(parent: torch.Tensor, where_: torch.Tensor, value: torch.Tensor, n: int) -> torch.Tensor:
    """parent[parent[u]] = value[u] for u with where_[u] (the smallest value wins on a shared root);
    non-writers are sent to the dummy slot n."""
    target = torch.where(where_, parent[:n], n)
    return parent.scatter_reduce(0, target, value, "amin", include_self=False)


@torch.no_grad()
def largest_components_torch(labels: torch.Tensor, num_classes: int, rounds: int | None = None) -> torch.Tensor:
    """The component filter on the labels' own device, without reading anything back to the host.

    Connected components by the Awerbuch-Shiloach algorithm (star hooking + pointer jumping) on the
    8-neighbour graph joining equal nonzero labels of a slice. It provably converges within
    log_{3/2}(pixels per slice) rounds, so a fixed number of rounds needs no convergence test (which
    would sync with the host). Then per (slice, class): the component with most pixels, ties to the one
    whose first pixel comes first in raster order, exactly as the scipy route. Every operation has a fixed
    shape and no host value, so on CUDA the whole filter can be captured as one CUDA graph.

    Args:
        rounds: hooking rounds; None: the bound for H*W pixels per slice (fewer only for benchmarks).
    """
    b, h, w = labels.shape
    n = b * h * w
    device = labels.device
    lab = labels.long()
    fg = lab != 0
    # for every pixel: its 8 neighbours' flat indices, and whether the edge exists (same nonzero class)
    index = torch.arange(n, device=device).view(b, h, w)
    nb_index = _neighbours(index, -1).reshape(8, n)
    edge = ((_neighbours(lab, -1) == lab) & fg).reshape(8, n)
    nb_index = torch.where(edge, nb_index, 0)
    big = n  # a Python scalar: no host-to-device copy (which a CUDA graph capture would refuse)
    parent = torch.arange(n + 1, device=device)  # slot n: the dummy target of masked writes
    if rounds is None:
        rounds = math.ceil(math.log(max(h * w, 2)) / math.log(1.5)) + 2
    for _ in range(rounds):
        # conditional star hooking: a star's root hooks onto a smaller neighbouring parent
        star = _stars(parent, n)[:n]
        p = parent[:n]
        nb_parent = parent[nb_index]
        low = torch.where(edge, nb_parent, big).amin(0)
        parent = _hook(parent, star & (low < p), low, n)
        # unconditional star hooking: a star left alone hooks onto any neighbouring other tree
        star = _stars(parent, n)[:n]
        p = parent[:n]
        nb_parent = parent[nb_index]
        other = edge & (nb_parent != p)
        pick = torch.where(other, nb_parent, big).amin(0)
        parent = _hook(parent, star & (pick < big), pick, n)
        # shortcutting
        parent = parent[parent]
    root = parent[:n]
    # per component: pixel count and first pixel; per (slice, class): the winner
    ones = fg.reshape(n).long()
    size = torch.zeros(n, dtype=torch.long, device=device).scatter_add_(0, root, ones)
    first = torch.full((n,), n, dtype=torch.long, device=device).scatter_reduce_(
        0, root, torch.arange(n, device=device), "amin")
    group = (torch.arange(b, device=device).view(b, 1, 1) * num_classes + lab).reshape(n)
    my_size, my_first = size[root], first[root]
    groups = b * num_classes
    best_size = torch.zeros(groups, dtype=torch.long, device=device).scatter_reduce_(0, group, my_size, "amax")
    candidate = torch.where(my_size == best_size[group], my_first, big)
    best_first = torch.full((groups,), n, dtype=torch.long, device=device).scatter_reduce_(
        0, group, candidate, "amin")
    keep = fg.reshape(n) & (my_first == best_first[group])
    return torch.where(keep, labels.reshape(n), torch.zeros_like(labels.reshape(n))).view(b, h, w)


# (shape, dtype, device, num_classes) -> (input buffer, output buffer, graph or None)
_GRAPHS: dict[tuple, tuple] = {}


def _graphed_filter(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The torch route on CUDA as one CUDA graph per input shape, captured on first use: its ~1,000 small
    kernels are queued by one launch instead of ~1,000 host round trips. Eager if the capture fails."""
    key = (tuple(labels.shape), labels.dtype, labels.device, num_classes)
    if key not in _GRAPHS:
        _GRAPHS[key] = _capture(labels, num_classes)
    static_in, static_out, graph = _GRAPHS[key]
    if graph is None:
        return largest_components_torch(labels, num_classes)
    static_in.copy_(labels)
    graph.replay()
    return static_out.clone()


def _capture(labels: torch.Tensor, num_classes: int) -> tuple:
    static_in = labels.clone()
    try:
        side = torch.cuda.Stream(labels.device)
        side.wait_stream(torch.cuda.current_stream(labels.device))
        with torch.cuda.stream(side):  # warm-up off the capture (allocator, kernel selection)
            largest_components_torch(static_in, num_classes)
        torch.cuda.current_stream(labels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = largest_components_torch(static_in, num_classes)
        return static_in, static_out, graph
    except RuntimeError as err:
        logging.getLogger(__name__).warning("component filter: CUDA graph capture failed (%s); running eagerly",
                                            str(err).splitlines()[0])
        return static_in, None, None


@contextlib.contextmanager
def teacher_mode(teacher: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run `teacher` in `mode` inside the block; it is back in eval mode after it.

    eval: dropout off, BatchNorm on its running statistics. train (the reference): dropout on and
    BatchNorm on the statistics of the batch it is given, with every BatchNorm's `track_running_stats`
    off for the block, so neither the running mean/var nor `num_batches_tracked` change (a plain
    `train()` would move them toward the unlabeled batches and away from the EMA of the student's).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}; got {mode!r}")
    norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    teacher.train(mode == "train")
    if mode == "train":
        for m in norms:
            m.track_running_stats = False  # batch statistics, running buffers neither read nor written
    try:
        yield teacher
    finally:
        for m, value in zip(norms, tracked):
            m.track_running_stats = value
        teacher.eval()


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, mode: str = "eval") -> torch.Tensor:
    """The teacher's logits for `images` [B,1,H,W] in `mode` (see `teacher_mode`), under autocast."""
    with teacher_mode(teacher, mode), autocast(images.device):
        return teacher(images)


@torch.no_grad()
def pseudo_labels(teacher: nn.Module, images: torch.Tensor, num_classes: int, mode: str = "eval",
                  largest_component: bool = True) -> torch.Tensor:
    """Teacher pseudo-labels of un-mixed images: argmax, then (by default, as the reference) the largest
    blob per class per slice.

    Args:
        images: float [B,1,H,W] in [0,1].
        mode: "eval" (running statistics, dropout off) or "train" (the reference: the batch's own
            statistics, dropout on; the running statistics are left as they are).
        largest_component: keep only each class's largest connected blob per slice (right for one heart;
            for vessel trees it deletes every segment not connected to the largest).
    Returns:
        long [B,H,W] in [0,num_classes) on the images' device (on CUDA computed there, no host sync).
    """
    labels = teacher_logits(teacher, images, mode).argmax(dim=1)
    return largest_components(labels, num_classes) if largest_component else labels


@torch.no_grad()
def confident_pseudo_labels(teacher: nn.Module, images: torch.Tensor, num_classes: int, min_confidence: float,
                            mode: str = "eval", largest_component: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`pseudo_labels` and, from the same teacher pass, where the teacher is sure of them
    (`train.pseudo_min_confidence`).

    Returns:
        (labels long [B,H,W], keep float [B,1,H,W]: 1 where the teacher's top softmax probability is at
        least `min_confidence`, else 0).
    """
    logits = teacher_logits(teacher, images, mode).float()
    labels = logits.argmax(dim=1)
    labels = largest_components(labels, num_classes) if largest_component else labels
    keep = (logits.softmax(dim=1).amax(dim=1, keepdim=True) >= min_confidence).float()
    return labels, keep
