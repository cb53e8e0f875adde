"""Sample synthetic slices from a trained generator with one recorded seed per image.

Image i starts from noise drawn by its own `torch.Generator` seeded with `image_seed(seed, i)`, and
any per-step noise (DDPM) comes from that same generator, so every image can be regenerated alone
and the result does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from sraseg.device import autocast, pick_device
from sraseg.errors import ConfigError, DatasetError, WeightsError
from sraseg.generate.common import check_resolution, open_images, prepared_image_size, read_slices, resize_stack
from sraseg.io import portable_path, staged_outputs, write_json
from sraseg.progress import track
from sraseg.settings import parse_settings, settings_dict

__all__ = [
    "SampleSettings",
    "validate_settings",
    "resolve_count",
    "image_seed",
    "load_generator",
    "make_sampler",
    "sample_images",
    "run",
]

log = logging.getLogger(__name__)

SECTION = "sample"
SEED_STRIDE = 1_000_003  # a prime: seeds of different base seeds do not collide for < 1e6 images
PREVIEW_COLUMNS = 8


@dataclass
class SampleSettings:
    """Settings of the sample stage (config section `sample`).

    Defaults, choices, bounds and one-line meanings live in the config schema (`sraseg sample
    --help` lists them); the defaults here mirror it for direct construction (tests/test_config.py).
    Notes: DDIM runs with eta=0 (deterministic); inference_steps None = 50 for DDIM, the generator's
    num_train_timesteps for DDPM; image i uses seed `image_seed(seed, i)`; image_size None = the
    prepared size.
    """

    n_images: int | str = 256
    sampler: str = "ddim"
    inference_steps: int | None = None
    batch_size: int = 32
    seed: int = 0
    image_size: int | None = None
    device: str = "auto"


def validate_settings(settings: dict | SampleSettings | None) -> SampleSettings:
    """Parse and check the sampling settings against the schema's `sample` section (defaults,
    choices and bounds are declared there, not restated here).

    Raises:
        ConfigError: an unknown key, wrong type, or out-of-range value (key named).
    """
    if isinstance(settings, SampleSettings):
        settings = settings_dict(settings)  # an instance is held to the same bounds as a config
    return parse_settings(SampleSettings, settings, SECTION)


def resolve_count(n_images: int | str, prepared_dir: Path) -> int:
    """The number of images to draw: `n_images`, or for "real_pool" the prepared train split's unlabeled
    slices (what SRA-Seg's synthetic set replaces; the paper draws as many).

    Raises:
        DatasetError: "real_pool" on a prepared folder whose train split has no unlabeled slice.
    """
    if isinstance(n_images, int):
        return n_images
    slices = read_slices(prepared_dir)
    count = int(((slices["split"] == "train") & ~slices["labeled"].astype(bool)).sum())
    if count == 0:
        raise DatasetError(f"{prepared_dir / 'slices.parquet'}: '{SECTION}.n_images: real_pool' but the train split "
                           "has no unlabeled slice; give a number of images")
    return count


def image_seed(seed: int, index: int) -> int:
    """The seed of synthetic image `index` under base `seed` (non-negative, fits int64)."""
    return (seed * SEED_STRIDE + index) % 2**63


def load_generator(generator_dir: Path | str) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load the EMA UNet and the training scheduler of the diffusers pipeline the train-generator
    stage saved (model_index.json, unet/, scheduler/; `DiffusionPipeline.from_pretrained` loads it too).

    Raises:
        DatasetError: the folder, its model_index.json or a unet/scheduler config is missing.
        WeightsError: a config or weights file is unreadable, truncated or does not fit the model,
            or the UNet's sample size is one it cannot take.
    """
    root = Path(generator_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: generator folder missing (run the train-generator stage first)")
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: missing; {root} is not a complete generator pipeline folder")
    try:
        unet = UNet2DModel.from_pretrained(root / "unet", local_files_only=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers/safetensors/json raise OSError, ValueError, SafetensorError...
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"{root / 'unet'}: cannot load the UNet ({type(err).__name__}: {detail})") from err
    try:
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"{root / 'scheduler'}: cannot load the scheduler ({type(err).__name__}: {detail})") from err
    size = unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    try:
        check_resolution(int(size), list(unet.config.block_out_channels), str(root / "unet" / "config.json"))
    except ConfigError as err:
        raise WeightsError(str(err)) from err
    if unet.config.in_channels != 1 or unet.config.out_channels != 1:
        raise WeightsError(f"{root / 'unet' / 'config.json'}: expected a 1-channel UNet, got in/out "
                           f"{unet.config.in_channels}/{unet.config.out_channels}")  # fmt: skip
    return unet.eval(), scheduler


def make_sampler(train_scheduler: DDPMScheduler, sampler: str, inference_steps: int | None):
    """The sampling scheduler with its timesteps set: DDIM from the DDPM config, or the DDPM itself.

    Returns:
        (scheduler, steps): a DDIMScheduler or DDPMScheduler ready for `step`, and its step count.
    """
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(train_scheduler.config)
        steps = inference_steps or 50
    else:
        scheduler = DDPMScheduler.from_config(train_scheduler.config)
        steps = inference_steps or scheduler.config.num_train_timesteps
    if steps > scheduler.config.num_train_timesteps:
        raise ConfigError(
            f"'{SECTION}.inference_steps' must be <= num_train_timesteps {scheduler.config.num_train_timesteps}; got {steps}"
        )
    scheduler.set_timesteps(steps)
    return scheduler, steps


@torch.inference_mode()
def sample_images(
    unet: UNet2DModel, scheduler, seeds: list[int], device: torch.device, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """Denoise one image per seed with diffusers' DDIMPipeline (eta=0) or DDPMPipeline.

    Args:
        unet: the generator UNet (eval mode, on `device`).
        scheduler: from `make_sampler` (its class picks the pipeline, its timesteps the step count).
        seeds: one seed per image; image i depends on seeds[i] only, not on batching.
        batch_size: images per UNet call.

    Returns:
        float32 [len(seeds),1,R,R] in [0,1] on the CPU (R = the UNet's sample size).
    """
    steps = len(scheduler.timesteps)
    if isinstance(scheduler, DDIMScheduler):
        pipe, extra = DDIMPipeline(unet=unet, scheduler=scheduler), {"eta": 0.0}  # eta=0: deterministic
    else:
        pipe, extra = DDPMPipeline(unet=unet, scheduler=scheduler), {}
    pipe.set_progress_bar_config(disable=True)
    # bf16 autocast on CUDA: the UNet's prediction back in fp32, so the scheduler's arithmetic and
    # DDPM's per-step noise (drawn in the prediction's dtype) stay fp32 as on the CPU
    hook = unet.register_forward_hook(lambda module, inputs, output: output.__class__(sample=output.sample.float()))
    out = []
    try:
        for start in track(range(0, len(seeds), batch_size), "sample", unit="batch", logger=log, disable=not progress):
            # one CPU generator per image: diffusers draws each image's initial (and, for DDPM, per-step)
            # noise from its own generator, so the result does not depend on the device or the batch
            gens = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds[start : start + batch_size]]
            with autocast(device):
                images = pipe(batch_size=len(gens), generator=gens, num_inference_steps=steps, output_type="np", **extra)
            out.append(torch.from_numpy(np.asarray(images.images, dtype=np.float32)).permute(0, 3, 1, 2))
    finally:
        hook.remove()
    return torch.cat(out)


def _preview(path: Path, synthetic: np.ndarray, real: np.ndarray) -> None:
    """A grid: a row of synthetic samples above a row of real training slices."""
    # a bare Figure renders with Agg and leaves pyplot's global backend alone
    from matplotlib.figure import Figure

    cols = max(len(synthetic), len(real), 1)
    fig = Figure(figsize=(1.6 * cols, 3.6))
    axes = fig.subplots(2, cols, squeeze=False)
    for r, (name, stack) in enumerate((("synthetic", synthetic), ("real (train)", real))):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(stack):
                ax.imshow(stack[c], cmap="gray", vmin=0.0, vmax=1.0)
        axes[r, 0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _real_examples(prepared_dir: Path, count: int) -> np.ndarray:
    """`count` train slices evenly spread over the train split (for the preview only)."""
    slices = read_slices(prepared_dir)
    rows = np.flatnonzero((slices["split"] == "train").to_numpy())
    if rows.size == 0:
        return np.zeros((0, 1, 1), np.float32)
    pick = rows[np.linspace(0, rows.size - 1, min(count, rows.size)).round().astype(int)]
    return np.asarray(open_images(prepared_dir, len(slices))[pick], dtype=np.float32)


def _generator_meta(generator_dir: Path) -> dict | None:
    """The generator's resolved settings and data hash, for the record (None when unreadable)."""
    path = generator_dir / "generator.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {key: meta.get(key) for key in ("settings", "n_images", "data_sha256", "final_loss")}


def run(
    generator_dir: Path | str,
    prepared_dir: Path | str,
    out_dir: Path | str,
    settings: dict | SampleSettings | None = None,
) -> Path:
    """Draw synthetic slices and write images.npy, synthetic.parquet, preview.png, sample.json.

    Args:
        generator_dir: train-generator output (a diffusers pipeline: model_index.json, unet/, scheduler/).
        prepared_dir: prepare output (image size, real slices for the preview).
        out_dir: synthetic folder; written all at once at the end.
        settings: the `sample` config section (see `SampleSettings`).

    Returns:
        out_dir. images.npy is float32 [M,S,S] in [0,1] (S = image_size).

    Raises:
        ConfigError: bad settings. DatasetError: missing generator/prepared files.
        WeightsError: a generator folder that cannot be loaded.
    """
    s = validate_settings(settings)
    generator_dir, prepared_dir, out_dir = Path(generator_dir), Path(prepared_dir), Path(out_dir)
    device = pick_device(s.device)
    unet, train_scheduler = load_generator(generator_dir)
    image_size = s.image_size or prepared_image_size(prepared_dir)
    scheduler, steps = make_sampler(train_scheduler, s.sampler, s.inference_steps)
    unet = unet.to(device)
    n_images = resolve_count(s.n_images, prepared_dir)
    seeds = [image_seed(s.seed, i) for i in range(n_images)]
    log.info("sample: %d images, %s %d steps, %d px -> %d px, device %s",
             n_images, s.sampler, steps, unet.config.sample_size, image_size, device)  # fmt: skip

    started = time.perf_counter()
    with staged_outputs(out_dir) as staged:
        images = np.lib.format.open_memmap(
            staged.path("images.npy"), mode="w+", dtype=np.float32, shape=(n_images, image_size, image_size)
        )
        # chunks of a few batches keep memory flat while images stream into the memmap
        chunk = s.batch_size * 4
        for start in track(range(0, n_images, chunk), "sample", unit="chunk", logger=log):
            part = sample_images(unet, scheduler, seeds[start : start + chunk], device, s.batch_size)
            images[start : start + part.shape[0]] = resize_stack(part, image_size).clamp(0.0, 1.0)[:, 0].numpy()
        images.flush()
        seconds = time.perf_counter() - started
        pd.DataFrame(
            {"synthetic_id": np.arange(n_images, dtype=np.int64), "seed": np.asarray(seeds, dtype=np.int64)}
        ).to_parquet(staged.path("synthetic.parquet"), index=False)
        _preview(
            staged.path("preview.png"),
            np.asarray(images[:PREVIEW_COLUMNS]),
            _real_examples(prepared_dir, PREVIEW_COLUMNS),
        )
        gen_meta = _generator_meta(generator_dir)
        write_json(
            staged.path("sample.json"),
            {
                "settings": settings_dict(s),
                "generator_dir": portable_path(generator_dir),
                "generator": gen_meta,
                "sampler": s.sampler,
                "inference_steps": steps,
                "generator_resolution": unet.config.sample_size,
                "image_size": image_size,
                "n_images": n_images,
                "seed_rule": f"seed_i = (seed * {SEED_STRIDE} + i) mod 2**63",
                "seconds": seconds,
                "seconds_per_image": seconds / n_images,
                "device": str(device),
            },
        )
        del images
    log.info("sample: %d images in %.1f s, written to %s", n_images, seconds, out_dir)
    return out_dir
