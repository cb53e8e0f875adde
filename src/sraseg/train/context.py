"""The training context: settings, inputs on the device, models and the step counter, with the batch
helpers every method's step uses (augmented labeled slices, seeded blend maps, row gathering)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from sraseg.blend.maps import make_blend_maps
from sraseg.train.alignment import ProjectionHead
from sraseg.train.data import augment, sample_indices
from sraseg.train.settings import TrainSettings
from sraseg.train.unet import UNet

__all__ = ["TrainContext", "INPUT_FIELDS"]


def _on_device(value, device: torch.device, moved: dict):
    """`value` with its tensors on `device`: a tensor, or a dataclass (Prepared, BlendBank, EmbedTargets)
    copied with its tensor fields moved. `moved` keeps tensors shared between fields shared."""
    if isinstance(value, torch.Tensor):
        key = id(value)
        if key not in moved:
            moved[key] = value.to(device)
        return moved[key]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _on_device(getattr(value, f.name), device, moved) for f in dataclasses.fields(value)
                   if isinstance(getattr(value, f.name), torch.Tensor)}
        return dataclasses.replace(value, **changes) if changes else value
    return value


INPUT_FIELDS = ("prepared", "unlabeled", "synthetic", "bank", "embed")


@dataclass
class TrainContext:
    """Everything one training iteration reads: settings, data, models and the step counter.

    `run` builds it; `benchmarks/train_step.py` builds one the same way to time the step functions.
    The inputs (prepared slices, unlabeled pool, synthetic images, blend bank, embedding targets) live on
    `device`: assigning one moves its tensors there once (labels stay uint8), so a batch is gathered on
    the device and nothing is copied per step but the CPU generator's indices and draws.
    """

    cfg: TrainSettings
    seed: int
    device: torch.device
    generator: torch.Generator
    prepared: object
    student: UNet
    teacher: UNet | None = None
    head: ProjectionHead | None = None
    unlabeled: torch.Tensor | None = None  # bcp self-train pool, float32 [U,S,S]
    synthetic: torch.Tensor | None = None  # float32 [M,S,S]
    bank: object = None
    bank_real_pos: np.ndarray | None = None  # row in the labeled arrays of each bank entry's real slice
    embed: object = None
    bank_real_embed_rows: np.ndarray | None = None  # row in real.npy of each bank entry's real slice
    bank_sa_rows: np.ndarray | None = None  # row in real.npy of each bank entry's SA target
    step: int = 0
    _moved: dict = field(default_factory=dict, init=False, repr=False)
    _map_generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __setattr__(self, name: str, value) -> None:
        if name in INPUT_FIELDS and value is not None and "_moved" in self.__dict__:
            value = _on_device(value, self.device, self._moved)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        for name in INPUT_FIELDS:  # _moved exists only now: place what __init__ assigned
            setattr(self, name, getattr(self, name))

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move (non-blocking: a small host tensor is staged without waiting for the device) and use
        channels-last for image batches on CUDA."""
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def rows(self, data: torch.Tensor, index) -> torch.Tensor:
        """data[index] gathered on data's device; `index` a CPU tensor or numpy array of rows."""
        index = torch.as_tensor(index)
        return data[index.to(data.device, non_blocking=True)]

    def blend_maps(self, count: int, kind: str) -> torch.Tensor:
        """`count` fresh maps built on the device from a generator seeded by (seed, step): the same maps on
        a rerun and after a resume, with no generator state to save."""
        if self._map_generator is None:
            self._map_generator = torch.Generator(device=self.device)
        self._map_generator.manual_seed(int(np.random.SeedSequence([self.seed, self.step]).generate_state(1, np.uint64)[0]))
        size = self.prepared.image_size
        maps_cfg = self.cfg.blend  # the blend section's kernel_size, sigma and ratio
        maps = make_blend_maps(count, size, size, self._map_generator, kind, maps_cfg.kernel_size, maps_cfg.sigma,
                               maps_cfg.ratio)
        return self.to_device(maps)

    def labeled_batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented labeled slices: images float [n,1,S,S], labels long [n,S,S] on the device."""
        idx = sample_indices(len(self.prepared.labeled_images), count, self.generator)
        images = self.to_device(self.rows(self.prepared.labeled_images, idx)[:, None])
        labels = self.to_device(self.rows(self.prepared.labeled_labels, idx)[:, None].float())  # on the device
        images, labels = augment(images, labels, self.generator, self.cfg.augment)
        return images, labels[:, 0].round().long()

