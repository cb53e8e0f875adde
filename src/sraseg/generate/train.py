"""Train the unconditional diffusion generator (diffusers UNet2DModel + DDPMScheduler) on real
training slices, with EMA weights and exact resume from `last.ckpt`.

Only train-split rows are ever read (`source="all_train"`: every train slice, labels unused;
`source="labeled"`: the labeled train slices). Validation and test slices never reach the generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr

from sraseg.device import autocast, pick_device, seed_everything
from sraseg.errors import ConfigError, DatasetError
from sraseg.generate.common import build_unet, check_resolution, open_images, read_slices, resize_stack
from sraseg.io import portable_path, read_table, staged_outputs, write_csv, write_json
from sraseg.preempt import stop_on_signals
from sraseg.progress import Progress
from sraseg.resume import job_key
from sraseg.settings import parse_settings, settings_dict

__all__ = [
    "GeneratorSettings",
    "validate_settings",
    "select_rows",
    "load_training_images",
    "make_scheduler",
    "diffusion_loss",
    "ForeachEMA",
    "train_step",
    "run",
]

log = logging.getLogger(__name__)

SECTION = "generator"
MAX_GRAD_NORM = 1.0  # as diffusers' train_unconditional example; keeps early steps stable
# Settings that do not change the trained weights; a resume may differ in these.
RESUME_FREE_KEYS = ("device",)
LOG_COLUMNS = ("step", "loss", "lr", "seconds")
CHECKPOINT_FORMAT = 2  # 2: the checkpoint carries its job key


@dataclass
class GeneratorSettings:
    """Settings of the train-generator stage (config section `generator`).

    Args:
        source (`str`, "all_train"): "all_train" = every train slice (labels unused) or "labeled" =
            the labeled train slices only. Val/test slices are never used.
        resolution (`int`, 64): side the slices are resized to for the diffusion model.
        block_out_channels (`list[int]`, [32, 64, 64]): UNet channels per level, finest first.
        layers_per_block (`int`, 1): ResNet blocks per UNet level.
        attention (`bool`, False): self-attention blocks at the coarsest UNet level.
        mid_attention (`bool`, True): self-attention in the UNet bottleneck (diffusers' default).
        steps (`int`, 2000): training iterations.
        batch_size (`int`, 16): images per iteration (drawn with replacement).
        lr (`float`, 2e-4): AdamW peak learning rate.
        lr_schedule (`str`, "cosine"): "cosine", "constant_with_warmup" or "linear" decay after warmup.
        warmup_steps (`int`, 100): linear learning-rate warmup iterations.
        num_train_timesteps (`int`, 1000): DDPM noise levels.
        beta_schedule (`str`, "squaredcos_cap_v2"): DDPM beta schedule ("linear", "scaled_linear", or the cosine "squaredcos_cap_v2").
        prediction_type (`str`, "v_prediction"): the UNet predicts "epsilon" (the noise) or "v_prediction".
        zero_terminal_snr (`bool`, True): rescale the betas so the last level is pure noise (needs v_prediction).
        timestep_spacing (`str`, "trailing"): "trailing" or "leading" noise levels for a sampler with fewer steps.
        clip_sample (`bool`, False): clip the predicted clean image to [-1, 1] at each sampling step.
        snr_gamma (`float`, 0.0): min-SNR-gamma loss weighting; 0 = uniform over noise levels.
        ema_decay (`float`, 0.999): upper bound of the EMA decay (warmed up as 1 - (1 + step)**-0.75).
        hflip (`bool`, False): random horizontal flips; off because cardiac orientation matters.
        checkpoint_every (`int`, 200): iterations between `last.ckpt` writes.
        log_every (`int`, 50): iterations per `train_log.csv` row.
        seed (`int`, 0): seeds model init, batch order, noise and timesteps.
        device (`str`, "auto"): "auto", "cpu" or "cuda".
        fd_every (`int`, 0): steps between FD-ratio probes written to fd_log.csv (0: off; needs the
            stand-in encoder's wheel, else a warning and no probe). See sraseg.generate.probe.
        fd_samples (`int`, 48): synthetic images (and real per half) in each probe.
        fd_sampler_steps (`int`, 20): DDIM steps of the probe's samples.
    """

    source: str = "all_train"
    resolution: int = 64
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = False
    mid_attention: bool = True
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    timestep_spacing: str = "trailing"
    clip_sample: bool = False
    snr_gamma: float = 0.0
    ema_decay: float = 0.999
    hflip: bool = False
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    fd_every: int = 0
    fd_samples: int = 48
    fd_sampler_steps: int = 20

    def cross_checks(self) -> None:
        """The rules across fields that the schema cannot say (parse_settings runs them).

        Raises:
            ConfigError: a resolution the UNet's levels cannot halve, or zero_terminal_snr without v_prediction.
        """
        check_resolution(self.resolution, self.block_out_channels, f"'{SECTION}.resolution'")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            # at the pure-noise level the noise says nothing about the image: epsilon cannot be turned into x0
            raise ConfigError(
                f"'{SECTION}.zero_terminal_snr' needs prediction_type 'v_prediction'; got '{self.prediction_type}'"
            )


def validate_settings(settings: dict | GeneratorSettings | None) -> GeneratorSettings:
    """Parse and check the generator settings against the schema's `generator` section (defaults,
    choices and bounds are declared there, not restated here) and `GeneratorSettings.cross_checks`.

    Raises:
        ConfigError: an unknown key, a wrong type, or a value outside its range (key and allowed values named).
    """
    if isinstance(settings, GeneratorSettings):
        settings = settings_dict(settings)  # an instance is held to the same bounds as a config
    s = parse_settings(GeneratorSettings, settings, SECTION)
    s.block_out_channels = list(s.block_out_channels)
    return s


def select_rows(slices, source: str) -> np.ndarray:
    """Row indices (== slice_id) the generator may train on: train split only, optionally labeled only.

    Args:
        slices: the prepared slices.parquet table.
        source: "all_train" or "labeled".

    Returns:
        int64 [K] sorted row indices.
    """
    keep = (slices["split"] == "train").to_numpy()
    if source == "labeled":
        keep = keep & slices["labeled"].to_numpy(dtype=bool)
    return np.flatnonzero(keep).astype(np.int64)


def load_training_images(prepared_dir: Path, source: str, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """Read the allowed train slices and resize them for the diffusion model.

    Args:
        prepared_dir: prepare stage output folder.
        source: "all_train" or "labeled".
        resolution: output side R.

    Returns:
        images: float32 [K,1,R,R] in [-1,1]; rows: int64 [K] the slice ids used.

    Raises:
        DatasetError: no slice matches `source`, a prepared file is missing/bad, or a used slice is not finite.
    """
    prepared_dir = Path(prepared_dir)
    slices = read_slices(prepared_dir)
    rows = select_rows(slices, source)
    if rows.size == 0:
        raise DatasetError(f"{prepared_dir / 'slices.parquet'}: no train slices for generator source '{source}'")
    images = open_images(prepared_dir, len(slices))
    out = torch.empty((rows.size, 1, resolution, resolution), dtype=torch.float32)
    chunk = 256  # bounds memory for large prepared stacks
    for start in range(0, rows.size, chunk):
        part = torch.from_numpy(np.asarray(images[rows[start : start + chunk]], dtype=np.float32))
        if not torch.isfinite(part).all():
            raise DatasetError(f"{prepared_dir / 'images.npy'}: non-finite values in train slices")
        out[start : start + part.shape[0]] = resize_stack(part[:, None], resolution)
    return out.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0), rows


def make_scheduler(s: GeneratorSettings) -> DDPMScheduler:
    """The training noise scheduler; saved beside the model, so sampling inherits its schedule,
    prediction type, spacing and clipping."""
    return DDPMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_schedule=s.beta_schedule,
        prediction_type=s.prediction_type,
        rescale_betas_zero_snr=s.zero_terminal_snr,
        timestep_spacing=s.timestep_spacing,
        clip_sample=s.clip_sample,
    )


def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """DDPM loss: MSE between the UNet's prediction and its target (the added noise for epsilon
    prediction, the velocity for v-prediction), optionally min-SNR-gamma weighted per sample.

    Args:
        clean: float32 [B,1,R,R] in [-1,1]; noise: same shape, N(0,1); timesteps: int64 [B].
        snr_gamma: > 0 weighs each sample by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), so the
            nearly clean levels, whose loss is easy and large in number, stop dominating the gradient.

    Returns:
        scalar float32 loss.
    """
    noisy = scheduler.add_noise(clean, noise, timesteps)
    pred = unet(noisy, timesteps).sample.float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = noise
    if snr_gamma <= 0:
        return F.mse_loss(pred, target.float())
    snr = compute_snr(scheduler, timesteps).float()
    weight = snr.clamp(max=snr_gamma)
    weight = weight / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight / snr
    per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


class ForeachEMA(EMAModel):
    """diffusers' EMAModel with its update done by foreach kernels over all parameters at once.

    The operations are EMAModel's own per-tensor ones, s -= (1 - decay) * (s - p) (a difference, a
    scaling, a difference), so the averages are bitwise the same; EMAModel's `foreach=True` fuses the
    scaling into the last difference, which rounds differently.
    """

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        shadow = [s for s, _ in trained]
        difference = torch._foreach_sub(shadow, [p for _, p in trained])
        torch._foreach_mul_(difference, 1 - decay)
        torch._foreach_sub_(shadow, difference)


def train_step(unet, scheduler, optimizer, lr_scheduler, ema, batch, noise, timesteps, device,
               snr_gamma=0.0) -> torch.Tensor:
    """One optimisation step (autocast on CUDA); returns the loss, detached and still on the device (the
    loop reads losses back at log steps only). Module-level so tests can interrupt it."""
    with autocast(device):
        loss = diffusion_loss(unet, scheduler, batch, noise, timesteps, snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    lr_scheduler.step()
    ema.step(unet.parameters())
    return loss.detach()
def _draw_batch(images: torch.Tensor, s: GeneratorSettings, gen: torch.Generator):
    """Batch indices, flips, noise and timesteps, all from the sampler's own generator (CPU)."""
    idx = torch.randint(0, images.shape[0], (s.batch_size,), generator=gen)
    batch = images[idx]
    if s.hflip:
        flip = torch.rand(s.batch_size, generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    noise = torch.randn(batch.shape, generator=gen)
    timesteps = torch.randint(0, s.num_train_timesteps, (s.batch_size,), generator=gen, dtype=torch.int64)
    return batch, noise, timesteps


def _resume_key(s: GeneratorSettings) -> dict:
    return {k: v for k, v in settings_dict(s).items() if k not in RESUME_FREE_KEYS}


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then an atomic rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, key: str) -> dict | None:
    """Read `last.ckpt` (weights_only); None when it belongs to another job (other settings or images).

    Raises:
        DatasetError: unreadable checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types
        raise DatasetError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start over") from err
    if state.get("key") != key:
        log.info("%s: written for other settings or images; training the generator fresh", path)
        return None
    return state



@dataclass
class _Training:
    """The generator's training run: the models, the optimizer and its schedule, the batch sampler's
    generator, and the loop's counters. last.ckpt holds all of it (with the global RNGs)."""

    unet: UNet2DModel
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: ForeachEMA
    gen: torch.Generator
    step: int = 0
    elapsed: float = 0.0
    log_rows: list = field(default_factory=list)
    loss_sum: float = 0.0  # losses of the log row in progress, summed in float64 as they are read back
    loss_count: int = 0
    pending: list = field(default_factory=list)  # the last steps' losses, on the device, not yet read back

    def read_back(self) -> None:
        """Add the pending losses to the row's sum (one host sync); a non-finite loss stops training."""
        first = self.step - len(self.pending)
        values = torch.stack(self.pending).tolist() if self.pending else []
        self.pending = []
        for i, loss in enumerate(values):
            if not np.isfinite(loss):
                raise ConfigError(f"'{SECTION}.lr': loss became {loss} at step {first + i + 1}; lower the learning rate")
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1

    def state(self, job: dict) -> dict:
        """last.ckpt's content: the run with every RNG, and `job` (settings, data_sha256, key)."""
        py_state = random.getstate()
        return {
            "model": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": _numpy_state(),
            "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
            "rng_sampler": self.gen.get_state(),
            "step": self.step,
            "elapsed": self.elapsed,
            "log_rows": self.log_rows,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            **job,
        }

    def restore(self, state: dict, device: torch.device) -> None:
        """Go on from a last.ckpt `state`: weights, optimizer, schedule, RNGs and counters."""
        self.unet.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng_torch"])
        _set_numpy_state(state["rng_numpy"])
        version, internal, gauss_next = state["rng_python"]
        random.setstate((version, tuple(internal), gauss_next))
        self.gen.set_state(state["rng_sampler"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.log_rows, self.loss_sum, self.loss_count = (list(state["log_rows"]), float(state["loss_sum"]),
                                                         int(state["loss_count"]))


def _build_training(s: GeneratorSettings, device: torch.device) -> _Training:
    """Everything built from the seed (a resume then overwrites it from the checkpoint)."""
    seed_everything(s.seed)
    unet = build_unet(s.resolution, s.block_out_channels, s.layers_per_block, s.attention, s.mid_attention).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.lr)
    return _Training(
        unet=unet,
        noise_scheduler=make_scheduler(s),
        optimizer=optimizer,
        lr_scheduler=get_scheduler(s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=s.steps),
        ema=ForeachEMA(unet.parameters(), decay=s.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75),
        gen=torch.Generator().manual_seed(s.seed),
    )


def _fd_probe(s: GeneratorSettings, prepared_dir: Path, images: torch.Tensor, rows: np.ndarray, out_dir: Path,
              step: int):
    """The FD-ratio probe of a fixed small sample at checkpoints, or None when fd_every is 0."""
    if not s.fd_every:
        return None
    from sraseg.generate.probe import FDProbe

    patients = read_table(prepared_dir / "slices.parquet", ("slice_id", "patient")).set_index("slice_id")
    return FDProbe.create(images, rows, patients.loc[rows, "patient"].astype(str).to_numpy(), s.fd_samples,
                          s.fd_every, s.steps, s.fd_sampler_steps, out_dir, step, s.seed)  # fmt: skip


def _train(t: _Training, s: GeneratorSettings, images: torch.Tensor, device: torch.device, out_dir: Path,
           job: dict, fd_probe) -> None:
    """Train from `t.step` to `s.steps`: a train_log.csv row every log_every steps, last.ckpt every
    checkpoint_every steps, at the end and when SIGTERM/SIGUSR1 arrives (then raises Preempted). Losses
    are read back only at log, probe and checkpoint steps."""
    from torch.utils.tensorboard import SummaryWriter

    ckpt_path = out_dir / "last.ckpt"
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=t.step if t.step else None)
    t.unet.train()
    started = time.perf_counter()
    progress = Progress(s.steps, "train generator", initial=t.step, logger=log)
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(writer.close)
        cleanup.callback(progress.close)
        while t.step < s.steps:
            # draw the batch and noise on the CPU from the sampler's generator (same on every device)
            batch, noise, timesteps = _draw_batch(images, s, t.gen)
            t.pending.append(train_step(
                t.unet, t.noise_scheduler, t.optimizer, t.lr_scheduler, t.ema,
                batch.to(device), noise.to(device), timesteps.to(device), device, s.snr_gamma,
            ))  # fmt: skip
            t.step += 1
            progress.update()
            logging_step = t.step % s.log_every == 0 or t.step == s.steps
            if logging_step or (fd_probe is not None and fd_probe.due(t.step)):
                t.read_back()

            if logging_step:  # one row per log_every steps (and the last step)
                now = time.perf_counter()
                t.elapsed, started = t.elapsed + now - started, now
                row = {"step": t.step, "loss": t.loss_sum / t.loss_count, "lr": t.optimizer.param_groups[0]["lr"],
                       "seconds": t.elapsed}
                t.log_rows.append(row)
                t.loss_sum, t.loss_count = 0.0, 0
                writer.add_scalar("loss", row["loss"], t.step)
                writer.add_scalar("lr", row["lr"], t.step)
                write_csv(out_dir / "train_log.csv", t.log_rows, LOG_COLUMNS)  # watchable while training
            if progress.due():
                progress.report(loss=f"{t.log_rows[-1]['loss']:.4f}" if t.log_rows else "-")

            if fd_probe is not None and (row := fd_probe.maybe_log(t.step, t.unet, t.ema, t.noise_scheduler, device)):
                writer.add_scalar("fd_ratio", row["fd_ratio"], t.step)

            # checkpointing: atomic last.ckpt every checkpoint_every steps, at the end, and on SIGTERM/SIGUSR1
            # (a preemption: this step is complete, so the checkpoint holds it and the job stops here)
            stopping = stop.signum is not None
            if t.step % s.checkpoint_every == 0 or t.step == s.steps or stopping:
                t.read_back()
                now = time.perf_counter()
                t.elapsed, started = t.elapsed + now - started, now
                _save_checkpoint(ckpt_path, t.state(job))
            if stopping:
                raise stop.stop(f"step {t.step} of {s.steps}", ckpt_path)


def _publish(t: _Training, s: GeneratorSettings, out_dir: Path, device: torch.device, info: dict) -> float:
    """The EMA weights into the model, then all final files at once; last.ckpt goes (the job is done: a
    rerun, e.g. --forcerun, trains anew). Returns the final logged loss."""
    t.ema.copy_to(t.unet.parameters())
    unet = t.unet.to("cpu").eval()
    final_loss = t.log_rows[-1]["loss"] if t.log_rows else float("nan")
    with staged_outputs(out_dir) as staged:
        # a diffusers pipeline folder (model_index.json, unet/, scheduler/): DiffusionPipeline.from_pretrained loads it
        DDPMPipeline(unet=unet, scheduler=t.noise_scheduler).save_pretrained(staged.tmp_dir, safe_serialization=True)
        write_csv(staged.path("train_log.csv"), t.log_rows, LOG_COLUMNS)
        write_json(
            staged.path("generator.json"),
            {
                "settings": settings_dict(s),
                **info,
                "n_parameters": int(sum(p.numel() for p in unet.parameters())),
                "final_loss": final_loss,
                "train_seconds": t.elapsed,
                "device": str(device),
                "weights": "ema",
            },
        )
    (out_dir / "last.ckpt").unlink(missing_ok=True)
    return final_loss


def run(prepared_dir: Path | str, out_dir: Path | str, settings: dict | GeneratorSettings | None = None) -> Path:
    """Train the generator and write the pipeline `out_dir/{model_index.json,unet/,scheduler/}`, `train_log.csv`, `generator.json`.

    Args:
        prepared_dir: prepare stage output (slices.parquet, images.npy).
        out_dir: generator folder; `last.ckpt` and `tensorboard/` live here during training, the
            final files appear only when training ends (`train_log.csv` grows at each log step). A
            rerun with the same settings and images resumes from `last.ckpt`; any other run starts
            fresh. `last.ckpt` is deleted once the model is published.
        settings: the `generator` config section (see `GeneratorSettings`).

    Returns:
        out_dir.

    Raises:
        ConfigError: bad settings.
        DatasetError: missing/bad prepared files, no train slices for the source, unreadable checkpoint.
        Preempted: SIGTERM or SIGUSR1 arrived; last.ckpt holds the step reached and a rerun resumes from it.
    """
    # inputs
    s = validate_settings(settings)
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    device = pick_device(s.device)
    images, rows = load_training_images(prepared_dir, s.source, s.resolution)
    data_sha = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    log.info("generator: %d %s slices at %dx%d, device %s", len(rows), s.source, s.resolution, s.resolution, device)

    # models, then resume: the checkpoint belongs to one job, these settings (the seed among them) and these images
    t = _build_training(s, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.ckpt"
    key = job_key(_resume_key(s), [data_sha], format=CHECKPOINT_FORMAT)
    state = _load_checkpoint(ckpt_path, key) if ckpt_path.is_file() else None
    if state is None:
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)  # another job's curves
    else:
        t.restore(state, device)
        log.info("generator: resuming from %s at step %d/%d", ckpt_path, t.step, s.steps)
        del state

    # the loop, then publish
    job = {"settings": _resume_key(s), "data_sha256": data_sha, "key": key}
    _train(t, s, images, device, out_dir, job, _fd_probe(s, prepared_dir, images, rows, out_dir, t.step))
    final_loss = _publish(t, s, out_dir, device, {"prepared_dir": portable_path(prepared_dir), "n_images": int(rows.size),
                                                   "data_sha256": data_sha})
    log.info("generator: done, final loss %.4f, written to %s", final_loss, out_dir)
    return out_dir
