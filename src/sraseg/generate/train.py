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
from sraseg.io import read_table, staged_outputs, write_csv, write_json
from sraseg.preempt import stop_on_signals
from sraseg.progress import Progress
from sraseg.resume import job_key
from sraseg.settings import check_choice, check_positive, parse_settings, settings_dict

__all__ = [
    "GeneratorSettings",
    "validate_settings",
    "select_rows",
    "load_training_images",
    "make_scheduler",
    "diffusion_loss",
    "train_step",
    "run",
]

log = logging.getLogger(__name__)

SECTION = "generator"
SOURCES = ("all_train", "labeled")
LR_SCHEDULES = ("cosine", "constant_with_warmup", "linear")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
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


def validate_settings(settings: dict | GeneratorSettings | None) -> GeneratorSettings:
    """Parse and check the generator settings.

    Raises:
        ConfigError: an unknown key, a wrong type, or a value outside its range (key and allowed values named).
    """
    s = settings if isinstance(settings, GeneratorSettings) else parse_settings(GeneratorSettings, settings, SECTION)
    s.block_out_channels = list(s.block_out_channels)
    check_choice(SECTION, "source", s.source, SOURCES)
    check_choice(SECTION, "lr_schedule", s.lr_schedule, LR_SCHEDULES)
    check_choice(SECTION, "beta_schedule", s.beta_schedule, BETA_SCHEDULES)
    check_choice(SECTION, "device", s.device, ("auto", "cpu", "cuda"))
    if not s.block_out_channels or not all(isinstance(c, int) and c > 0 for c in s.block_out_channels):
        raise ConfigError(
            f"'{SECTION}.block_out_channels' must be a non-empty list of positive ints; got {s.block_out_channels!r}"
        )
    check_resolution(s.resolution, s.block_out_channels, f"'{SECTION}.resolution'")
    for name in ("layers_per_block", "steps", "batch_size", "num_train_timesteps", "checkpoint_every", "log_every"):
        check_positive(SECTION, name, getattr(s, name))
    check_positive(SECTION, "lr", s.lr)
    check_positive(SECTION, "warmup_steps", s.warmup_steps, allow_zero=True)
    check_positive(SECTION, "fd_every", s.fd_every, allow_zero=True)
    check_positive(SECTION, "fd_samples", s.fd_samples)
    check_positive(SECTION, "fd_sampler_steps", s.fd_sampler_steps)
    if not 0.0 <= s.ema_decay < 1.0:
        raise ConfigError(f"'{SECTION}.ema_decay' must be in [0, 1); got {s.ema_decay!r}")
    if s.zero_terminal_snr and s.prediction_type != "v_prediction":
        # at the pure-noise level the noise says nothing about the image: epsilon cannot be turned into x0
        raise ConfigError(
            f"'{SECTION}.zero_terminal_snr' needs prediction_type 'v_prediction'; got '{s.prediction_type}'"
        )
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


def train_step(unet, scheduler, optimizer, lr_scheduler, ema, batch, noise, timesteps, device, snr_gamma=0.0) -> float:
    """One optimisation step (autocast on CUDA); returns the loss. Module-level so tests can interrupt it."""
    with autocast(device):
        loss = diffusion_loss(unet, scheduler, batch, noise, timesteps, snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    lr_scheduler.step()
    ema.step(unet.parameters())
    return float(loss.detach())


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
    s = validate_settings(settings)
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    device = pick_device(s.device)
    images, rows = load_training_images(prepared_dir, s.source, s.resolution)
    data_sha = hashlib.sha256(images.numpy().tobytes()).hexdigest()
    log.info("generator: %d %s slices at %dx%d, device %s", len(rows), s.source, s.resolution, s.resolution, device)

    # build everything from the seed, then overwrite from the checkpoint when resuming
    seed_everything(s.seed)
    unet = build_unet(s.resolution, s.block_out_channels, s.layers_per_block, s.attention, s.mid_attention).to(device)
    noise_scheduler = make_scheduler(s)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=s.lr)
    lr_scheduler = get_scheduler(s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=s.steps)
    ema = EMAModel(unet.parameters(), decay=s.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(s.seed)
    step, elapsed, log_rows, loss_sum, loss_count = 0, 0.0, [], 0.0, 0

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.ckpt"
    # the checkpoint belongs to one job: these settings (the seed among them) and these images
    key = job_key(_resume_key(s), [data_sha], format=CHECKPOINT_FORMAT)
    state = _load_checkpoint(ckpt_path, key) if ckpt_path.is_file() else None
    if state is None:
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)  # another job's curves
    else:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        ema.to(device)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng_torch"])
        _set_numpy_state(state["rng_numpy"])
        version, internal, gauss_next = state["rng_python"]
        random.setstate((version, tuple(internal), gauss_next))
        gen.set_state(state["rng_sampler"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log_rows, loss_sum, loss_count = list(state["log_rows"]), float(state["loss_sum"]), int(state["loss_count"])
        log.info("generator: resuming from %s at step %d/%d", ckpt_path, step, s.steps)

    def checkpoint() -> None:
        py_state = random.getstate()
        _save_checkpoint(
            ckpt_path,
            {
                "model": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_numpy": _numpy_state(),
                "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
                "rng_sampler": gen.get_state(),
                "step": step,
                "elapsed": elapsed,
                "log_rows": log_rows,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "settings": _resume_key(s),
                "data_sha256": data_sha,
                "key": key,
            },
        )

    fd_probe = None  # FD ratio of a fixed small sample at checkpoints (sraseg.generate.probe)
    if s.fd_every:
        from sraseg.generate.probe import FDProbe

        patients = read_table(prepared_dir / "slices.parquet", ("slice_id", "patient")).set_index("slice_id")
        fd_probe = FDProbe.create(images, rows, patients.loc[rows, "patient"].astype(str).to_numpy(), s.fd_samples,
                                  s.fd_every, s.steps, s.fd_sampler_steps, out_dir, step, s.seed)  # fmt: skip

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step if step else None)
    unet.train()
    started = time.perf_counter()
    progress = Progress(s.steps, "train generator", initial=step, logger=log)
    with stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(writer.close)
        cleanup.callback(progress.close)
        while step < s.steps:
            # draw the batch and noise on the CPU from the sampler's generator (same on every device)
            batch, noise, timesteps = _draw_batch(images, s, gen)
            loss = train_step(
                unet, noise_scheduler, optimizer, lr_scheduler, ema,
                batch.to(device), noise.to(device), timesteps.to(device), device, s.snr_gamma,
            )  # fmt: skip
            if not np.isfinite(loss):
                raise ConfigError(f"'{SECTION}.lr': loss became {loss} at step {step + 1}; lower the learning rate")
            step += 1
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            progress.update()

            # logging: one row per log_every steps (and the last step)
            if step % s.log_every == 0 or step == s.steps:
                now = time.perf_counter()
                elapsed, started = elapsed + now - started, now
                row = {
                    "step": step,
                    "loss": loss_sum / loss_count,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": elapsed,
                }
                log_rows.append(row)
                loss_sum, loss_count = 0.0, 0
                writer.add_scalar("loss", row["loss"], step)
                writer.add_scalar("lr", row["lr"], step)
                write_csv(out_dir / "train_log.csv", log_rows, LOG_COLUMNS)  # watchable while training
            if progress.due():
                progress.report(loss=f"{log_rows[-1]['loss']:.4f}" if log_rows else "-")

            if fd_probe is not None and (row := fd_probe.maybe_log(step, unet, ema, noise_scheduler, device)):
                writer.add_scalar("fd_ratio", row["fd_ratio"], step)

            # checkpointing: atomic last.ckpt every checkpoint_every steps, at the end, and on SIGTERM/SIGUSR1
            # (a preemption: this step is complete, so the checkpoint holds it and the job stops here)
            stopping = stop.signum is not None
            if step % s.checkpoint_every == 0 or step == s.steps or stopping:
                now = time.perf_counter()
                elapsed, started = elapsed + now - started, now
                checkpoint()
            if stopping:
                raise stop.stop(f"step {step} of {s.steps}", ckpt_path)

    # publish: EMA weights into the model, then all final files at once
    ema.copy_to(unet.parameters())
    unet = unet.to("cpu").eval()
    final_loss = log_rows[-1]["loss"] if log_rows else float("nan")
    with staged_outputs(out_dir) as staged:
        # a diffusers pipeline folder (model_index.json, unet/, scheduler/): DiffusionPipeline.from_pretrained loads it
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(staged.tmp_dir, safe_serialization=True)
        write_csv(staged.path("train_log.csv"), log_rows, LOG_COLUMNS)
        write_json(
            staged.path("generator.json"),
            {
                "settings": settings_dict(s),
                "prepared_dir": str(prepared_dir.resolve()),
                "n_images": int(rows.size),
                "data_sha256": data_sha,
                "n_parameters": int(sum(p.numel() for p in unet.parameters())),
                "final_loss": final_loss,
                "train_seconds": elapsed,
                "device": str(device),
                "weights": "ema",
            },
        )
    ckpt_path.unlink(missing_ok=True)  # the job is done: a rerun (e.g. --forcerun) trains anew
    log.info("generator: done, final loss %.4f, written to %s", final_loss, out_dir)
    return out_dir
