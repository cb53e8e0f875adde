"""FD-ratio probe of the generator during training: a fixed small synthetic sample (fixed seeds,
EMA weights, DDIM) against real train slices, in the stand-in encoder's feature space.

fd_ratio = FD(real half A, synthetic) / FD(real half A, real half B), where A and B are
patient-disjoint and all three sets have the same size n, so the ratio does not depend on n's bias
the way two FDs at different set sizes would. Rows go to `fd_log.csv` (step, fd, fd_floor,
fd_ratio, seconds) next to the generator's train_log.csv.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sraseg.embed.common import STAND_IN_MODEL
from sraseg.embed.frechet import frechet_distance, patient_halves
from sraseg.errors import WeightsError
from sraseg.io import write_csv

__all__ = ["FDProbe", "FD_LOG", "FD_COLUMNS", "read_fd_log"]

log = logging.getLogger(__name__)

FD_LOG = "fd_log.csv"
FD_COLUMNS = ("step", "fd", "fd_floor", "fd_ratio", "seconds")
PROBE_IMG_SIZE = 112  # encoder input side: enough for MobileNetV2's 7x downsampling, cheap on 2 cores
_SEED_BASE = 7_000_000  # the probe's own noise seeds, apart from the sample stage's


def read_fd_log(path: Path | str) -> list[dict]:
    """Rows of an fd_log.csv as dicts of floats (step as int); [] when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [
            {k: (int(float(v)) if k == "step" else float(v)) for k, v in row.items() if k in FD_COLUMNS}
            for row in csv.DictReader(handle)
        ]


class FDProbe:
    """Created once per generator run; `maybe_log(step, ...)` samples and appends a row when due."""

    def __init__(self, encoder, real_a: np.ndarray, floor: float, seeds: list[int], every: int, total: int,
                 sampler_steps: int, path: Path):  # fmt: skip
        self.encoder, self.real_a, self.floor = encoder, real_a, floor
        self.seeds, self.every, self.total, self.sampler_steps, self.path = seeds, every, total, sampler_steps, path
        self.seconds = 0.0

    @classmethod
    def create(cls, images: torch.Tensor, slice_ids: np.ndarray, patients: np.ndarray, n: int, every: int,
               total: int, sampler_steps: int, out_dir: Path, resume_step: int, seed: int = 0) -> FDProbe | None:  # fmt: skip
        """Embed the two real halves and the floor; None (after a warning) when the stand-in is not installed.

        Args:
            images: the generator's training images float [K,1,R,R] in [-1,1]; slice_ids: their ids [K];
            patients: patient of each of those K rows.
            n: images per set (synthetic sample, half A, half B), capped by the smaller half.
            every: steps between probes (0 disables the probe); total: the run's last step is probed too.
            resume_step: rows after this step in an existing fd_log.csv are dropped (a resumed run redoes them).
        """
        if every <= 0 or n <= 0:
            return None
        from sraseg.embed.encoder import build_encoder

        try:
            encoder = build_encoder(STAND_IN_MODEL, PROBE_IMG_SIZE)
        except WeightsError as err:
            log.warning("generator FD probe off: %s", err)
            return None
        try:
            half_a = patient_halves(patients, seed)
        except ValueError as err:
            log.warning("generator FD probe off: %s", err)
            return None
        rng = np.random.default_rng(seed)
        n = min(n, int(half_a.sum()), int((~half_a).sum()))
        pick_a = rng.choice(np.flatnonzero(half_a), n, replace=False)
        pick_b = rng.choice(np.flatnonzero(~half_a), n, replace=False)
        real = ((images[:, 0] + 1.0) / 2.0).clamp(0.0, 1.0).numpy()
        emb_a = encoder.embed_array(real[pick_a])
        emb_b = encoder.embed_array(real[pick_b])
        floor = frechet_distance(emb_a, emb_b)["fd"]
        path = Path(out_dir) / FD_LOG
        kept = [r for r in read_fd_log(path) if r["step"] <= resume_step]
        write_csv(path, kept, FD_COLUMNS)
        log.info("generator FD probe: %d synthetic vs %d real (patient-disjoint floor %.4f) every %d steps",
                 n, n, floor, every)  # fmt: skip
        return cls(encoder, emb_a, floor, [_SEED_BASE + i for i in range(n)], every, total, sampler_steps, path)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def maybe_log(self, step: int, unet, ema, train_scheduler, device) -> dict | None:
        """At a due step: sample with the EMA weights (restored afterwards), append and return the row."""
        if not self.due(step):
            return None
        from sraseg.generate.sample import make_sampler, sample_images

        started = time.perf_counter()
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        unet.eval()
        try:
            sampler, _ = make_sampler(train_scheduler, "ddim", self.sampler_steps)
            synthetic = sample_images(unet, sampler, self.seeds, device, batch_size=len(self.seeds))[:, 0].numpy()
        finally:
            unet.train()
            ema.restore(unet.parameters())
        fd = frechet_distance(self.real_a, self.encoder.embed_array(synthetic))["fd"]
        self.seconds += time.perf_counter() - started
        row = {"step": step, "fd": fd, "fd_floor": self.floor, "fd_ratio": fd / self.floor if self.floor > 0 else
               float("nan"), "seconds": self.seconds}  # fmt: skip
        write_csv(self.path, [*read_fd_log(self.path), row], FD_COLUMNS)
        log.info("generator step %d: FD %.4f = %.2f x real floor", step, fd, row["fd_ratio"])
        return row

