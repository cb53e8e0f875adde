"""Tests of the generator stages (train-generator, sample) on a tiny prepared folder.

Everything is tiny (16 px, UNet channels [8, 16], a few steps) so the file runs in seconds on one core.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sraseg.device import seed_everything
from sraseg.errors import ConfigError, DatasetError, Preempted, WeightsError
from sraseg.generate import sample, train
from sraseg.generate.common import build_unet

SIZE = 24  # prepared image size; the generator trains at 16 (area downsampling)
TINY = dict(
    resolution=16,
    block_out_channels=[8, 16],
    steps=6,
    batch_size=4,
    warmup_steps=0,
    checkpoint_every=2,
    log_every=2,
    device="cpu",
)
# patient -> (split, labeled); 3 slices each
PATIENTS = {
    "patient001": ("train", True),
    "patient002": ("train", False),
    "patient003": ("train", False),
    "patient004": ("val", False),
    "patient005": ("test", False),
}


def _ring(rng: np.random.Generator) -> np.ndarray:
    """A bright disc inside a grey ring on a dark background, with a little noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = SIZE / 2 + rng.uniform(-2, 2, size=2)
    r = np.hypot(yy - cy, xx - cx)
    inner = rng.uniform(3, 5)
    img = 0.1 + 0.8 * (r < inner) + 0.4 * ((r >= inner) & (r < inner + 2.5))
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def make_prepared(root, poison_held_out: bool = True, labeled: bool = True):
    """A prepared folder in the CONTRACTS.md format; val/test images are NaN when `poison_held_out`,
    so any code that reads them produces a non-finite loss or an error."""
    rng = np.random.default_rng(0)
    rows, images = [], []
    for patient, (split, is_labeled) in PATIENTS.items():
        for z in range(3):
            rows.append(
                dict(
                    slice_id=len(rows),
                    case=f"{patient}_frame01",
                    patient=patient,
                    frame=1,
                    phase="ED",
                    slice=z,
                    split=split,
                    labeled=bool(is_labeled and labeled and split == "train"),
                )
            )
            img = _ring(rng)
            if poison_held_out and split != "train":
                img[:] = np.nan
            images.append(img)
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "slices.parquet", index=False)
    np.save(root / "images.npy", np.stack(images))
    np.save(root / "labels.npy", np.zeros((len(rows), SIZE, SIZE), np.uint8))
    # nested as the prepare stage writes it
    (root / "prepare.json").write_text(json.dumps({"settings": {"image_size": SIZE}}))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def generator(prepared, tmp_path_factory):
    """A generator trained 30 steps at a high learning rate (enough to move the loss)."""
    out = tmp_path_factory.mktemp("generator")
    train.run(prepared, out, dict(TINY, steps=30, lr=2e-3, batch_size=8, log_every=5, checkpoint_every=10))
    return out


def _fixed_loss(unet, prepared) -> float:
    """Diffusion loss on every train slice with fixed noise and evenly spread timesteps."""
    images, _ = train.load_training_images(prepared, "all_train", 16)
    scheduler = train.make_scheduler(train.validate_settings(TINY))
    gen = torch.Generator().manual_seed(123)
    images = images.repeat(4, 1, 1, 1)
    noise = torch.randn(images.shape, generator=gen)
    timesteps = torch.linspace(0, 999, images.shape[0]).long()
    with torch.no_grad():
        return float(train.diffusion_loss(unet.eval(), scheduler, images, noise, timesteps))


# ---------------------------------------------------------------- training


def test_training_lowers_loss_and_writes_outputs(generator, prepared):
    seed_everything(0)
    before = _fixed_loss(build_unet(16, [8, 16], 1, False, True), prepared)
    unet, _ = sample.load_generator(generator)
    after = _fixed_loss(unet, prepared)
    assert after < 0.7 * before, (before, after)

    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "train_log.csv", "generator.json"):  # fmt: skip
        assert (generator / name).is_file(), name
    assert not (generator / "last.ckpt").exists()  # the resume state does not outlive the job
    assert any((generator / "tensorboard").iterdir())
    log_table = pd.read_csv(generator / "train_log.csv")
    assert list(log_table.columns) == ["step", "loss", "lr", "seconds"]
    assert log_table["step"].tolist() == [5, 10, 15, 20, 25, 30]
    assert np.isfinite(log_table["loss"]).all()
    meta = json.loads((generator / "generator.json").read_text())
    assert meta["n_images"] == 9  # 3 train patients x 3 slices
    assert meta["settings"]["steps"] == 30 and np.isfinite(meta["final_loss"])


def test_only_train_rows_are_read(prepared):
    slices = pd.read_parquet(prepared / "slices.parquet")
    train_rows = np.flatnonzero(slices["split"] == "train")
    labeled_rows = np.flatnonzero(slices["labeled"])
    assert train.select_rows(slices, "all_train").tolist() == train_rows.tolist()
    assert train.select_rows(slices, "labeled").tolist() == labeled_rows.tolist() == [0, 1, 2]
    # val/test images are NaN in this folder: reading any of them would show here
    images, rows = train.load_training_images(prepared, "all_train", 16)
    assert rows.tolist() == train_rows.tolist()
    assert torch.isfinite(images).all() and images.shape == (9, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    labeled, rows = train.load_training_images(prepared, "labeled", 16)
    assert rows.tolist() == [0, 1, 2] and torch.equal(labeled, images[:3])


def test_no_labeled_train_slices_raises(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", labeled=False)
    with pytest.raises(DatasetError, match="slices.parquet.*labeled"):
        train.run(prepared, tmp_path / "gen", dict(TINY, source="labeled"))
    assert not (tmp_path / "gen" / "unet").exists()


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(resolution=18, block_out_channels=[8, 16, 16]), "resolution 18"),
        (dict(resolution=4, block_out_channels=[8]), "'generator.resolution' is 4; must be >= 8"),  # the schema's bound
        (dict(source="val"), "source"),
        (dict(steps=0), "steps"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(colour=True), "colour"),
    ],
)
def test_bad_generator_settings_raise(bad, key):
    with pytest.raises(ConfigError, match=key):
        train.validate_settings(dict(TINY, **bad))


def test_resume_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    settings = dict(TINY, steps=7, checkpoint_every=3, log_every=2)
    full = train.run(prepared, tmp_path / "full", settings)

    # interrupt during step 5: the last checkpoint holds step 3, nothing final is published
    calls = {"n": 0}
    real_step = train.train_step

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train.run(prepared, tmp_path / "resumed", settings)
    monkeypatch.setattr(train, "train_step", real_step)
    resumed_dir = tmp_path / "resumed"
    assert (resumed_dir / "last.ckpt").is_file()
    assert not (resumed_dir / "unet").exists()
    assert pd.read_csv(resumed_dir / "train_log.csv")["step"].tolist() == [2, 4]  # grows while training
    assert torch.load(resumed_dir / "last.ckpt", weights_only=True)["step"] == 3

    train.run(prepared, resumed_dir, settings)
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = pd.read_csv(full / "train_log.csv")
    log_b = pd.read_csv(resumed_dir / "train_log.csv")
    assert log_a["step"].tolist() == log_b["step"].tolist() == [2, 4, 6, 7]
    np.testing.assert_array_equal(log_a["loss"], log_b["loss"])
    # the EMA weights are what was saved, and they differ from a fresh init
    seed_everything(0)
    fresh = build_unet(16, [8, 16], 1, False, True).state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)



def test_logged_loss_is_the_mean_of_the_step_losses_read_back_at_log_steps(prepared, tmp_path, monkeypatch):
    """train_step hands its loss back on the device (no host sync per step); each train_log.csv row is
    the mean of its steps' losses, summed in float64 in step order as when each step was read at once."""
    losses, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: losses.append(real_step(*a, **k)) or losses[-1])
    out = train.run(prepared, tmp_path / "out", dict(TINY, steps=7, checkpoint_every=3, log_every=2))
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for loss in losses)
    values = [float(loss) for loss in losses]
    want = []
    for first, last in ((0, 2), (2, 4), (4, 6), (6, 7)):
        total = 0.0
        for v in values[first:last]:
            total += v
        want.append(total / (last - first))
    assert pd.read_csv(out / "train_log.csv")["loss"].tolist() == want


def test_non_finite_loss_names_its_step(prepared, tmp_path, monkeypatch):
    calls, real_step = [], train.train_step

    def nan_at_3(*args, **kwargs):
        calls.append(1)
        loss = real_step(*args, **kwargs)
        return torch.full_like(loss, float("nan")) if len(calls) == 3 else loss

    monkeypatch.setattr(train, "train_step", nan_at_3)
    with pytest.raises(ConfigError, match="loss became nan at step 3; lower the learning rate"):
        train.run(prepared, tmp_path / "out", dict(TINY, steps=7, checkpoint_every=5, log_every=4))
    assert not (tmp_path / "out" / "last.ckpt").exists()  # caught at step 4's log, before any checkpoint


def test_foreach_ema_equals_diffusers_ema_bitwise():
    """ForeachEMA runs EMAModel's per-tensor update as foreach kernels: the same averages, bit for bit
    (EMAModel's own foreach=True agrees only within float rounding)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = build_unet(16, [8, 16], 1, False, True)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)  # copied, not averaged, by both
    kwargs = dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    looped, fused = EMAModel(model.parameters(), **kwargs), train.ForeachEMA(model.parameters(), **kwargs)
    diffusers_foreach = EMAModel(model.parameters(), foreach=True, **kwargs)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in (looped, fused, diffusers_foreach):
            ema.step(model.parameters())
    assert fused.optimization_step == looped.optimization_step == 5
    assert fused.cur_decay_value == looped.cur_decay_value
    for a, b, c in zip(looped.shadow_params, fused.shadow_params, diffusers_foreach.shadow_params):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)
    assert torch.equal(fused.shadow_params[0], frozen)

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_writes_checkpoint_then_rerun_resumes_exactly(signum, prepared, tmp_path, monkeypatch):
    """SIGTERM/SIGUSR1 (SLURM's notice before a kill or preemption) after step 5: last.ckpt holds step 5,
    not the periodic 3; the run stops with Preempted and a rerun ends as an uninterrupted run."""
    settings = dict(TINY, steps=7, checkpoint_every=3, log_every=2)
    full = train.run(prepared, tmp_path / "full", settings)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    calls, real_step = [], train.train_step

    def step_then_signal(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(train, "train_step", step_then_signal)
    stopped_dir = tmp_path / "stopped"
    with pytest.raises(Preempted, match=f"received {signal.Signals(signum).name} at step 5 of 7: wrote .*last.ckpt"):
        train.run(prepared, stopped_dir, settings)
    assert torch.load(stopped_dir / "last.ckpt", weights_only=True)["step"] == 5
    assert not (stopped_dir / "unet").exists()
    assert {s: signal.getsignal(s) for s in before} == before  # the run's handlers are gone

    calls.clear()
    train.run(prepared, stopped_dir, settings)
    assert len(calls) == 2  # resumed after step 5
    a = load_file(full / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(stopped_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a, log_b = pd.read_csv(full / "train_log.csv"), pd.read_csv(stopped_dir / "train_log.csv")
    assert log_a["step"].tolist() == log_b["step"].tolist() == [2, 4, 6, 7]
    np.testing.assert_array_equal(log_a["loss"], log_b["loss"])


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler, steps", [("ddim", 8), ("ddpm", 12)])
def test_sampling_is_per_image_deterministic(generator, sampler, steps):
    unet, train_scheduler = sample.load_generator(generator)
    scheduler, _ = sample.make_sampler(train_scheduler, sampler, steps)
    seeds = [sample.image_seed(3, i) for i in range(7)]
    cpu = torch.device("cpu")
    batched = sample.sample_images(unet, scheduler, seeds, cpu, batch_size=4)
    alone = sample.sample_images(unet, scheduler, [seeds[5]], cpu)
    again = sample.sample_images(unet, scheduler, seeds[4:6], cpu, batch_size=2)
    assert batched.shape == (7, 1, 16, 16)
    assert torch.isfinite(batched).all() and batched.min() >= 0 and batched.max() <= 1
    assert batched.std(dim=0).mean() > 1e-3  # images differ from one another
    torch.testing.assert_close(alone[0], batched[5], atol=1e-5, rtol=0)
    torch.testing.assert_close(again, batched[4:6], atol=1e-5, rtol=0)


def test_sample_run_writes_outputs(generator, prepared, tmp_path):
    out = sample.run(
        generator, prepared, tmp_path / "synthetic", dict(n_images=5, batch_size=2, inference_steps=6, seed=2)
    )
    images = np.load(out / "images.npy")
    assert images.shape == (5, SIZE, SIZE) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std(axis=0).mean() > 1e-3
    table = pd.read_parquet(out / "synthetic.parquet")
    assert table["synthetic_id"].tolist() == list(range(5))
    assert table["seed"].tolist() == [sample.image_seed(2, i) for i in range(5)]
    assert table["synthetic_id"].dtype == np.int64 and table["seed"].dtype == np.int64
    meta = json.loads((out / "sample.json").read_text())
    assert meta["sampler"] == "ddim" and meta["inference_steps"] == 6 and meta["image_size"] == SIZE
    assert (out / "preview.png").stat().st_size > 1000

    # the same seed gives the same images; image 3 regenerated alone matches too
    again = sample.run(
        generator, prepared, tmp_path / "again", dict(n_images=4, batch_size=4, inference_steps=6, seed=2)
    )
    np.testing.assert_allclose(np.load(again / "images.npy"), images[:4], atol=1e-5)
    unet, train_scheduler = sample.load_generator(generator)
    scheduler, _ = sample.make_sampler(train_scheduler, "ddim", 6)
    one = sample.sample_images(unet, scheduler, [int(table["seed"][3])], torch.device("cpu"))
    one = torch.nn.functional.interpolate(one, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(one[0, 0].numpy(), images[3], atol=1e-5)


def test_sample_image_size_override(generator, prepared, tmp_path):
    out = sample.run(generator, prepared, tmp_path / "s", dict(n_images=2, inference_steps=3, image_size=8))
    assert np.load(out / "images.npy").shape == (2, 8, 8)
    # the generator's own resolution: no resize at all
    out = sample.run(generator, prepared, tmp_path / "t", dict(n_images=2, inference_steps=3, image_size=16))
    assert np.load(out / "images.npy").shape == (2, 16, 16)


def test_real_pool_draws_as_many_images_as_unlabeled_train_slices(generator, prepared, tmp_path):
    slices = pd.read_parquet(prepared / "slices.parquet")
    unlabeled = int(((slices["split"] == "train") & ~slices["labeled"]).sum())
    assert 0 < unlabeled < int((slices["split"] == "train").sum())  # the count is neither all train nor none
    out = sample.run(generator, prepared, tmp_path / "s", dict(n_images="real_pool", inference_steps=2))
    assert np.load(out / "images.npy").shape[0] == unlabeled
    meta = json.loads((out / "sample.json").read_text())
    assert meta["n_images"] == unlabeled and meta["settings"]["n_images"] == "real_pool"


def test_real_pool_without_unlabeled_slices_raises(generator, tmp_path):
    every_train_labeled = make_prepared(tmp_path / "prepared")
    slices = pd.read_parquet(every_train_labeled / "slices.parquet")
    slices.assign(labeled=slices["split"] == "train").to_parquet(every_train_labeled / "slices.parquet", index=False)
    with pytest.raises(DatasetError, match="no unlabeled slice"):
        sample.run(generator, every_train_labeled, tmp_path / "s", dict(n_images="real_pool"))
    assert not (tmp_path / "s").exists()


def test_zero_images_raises(generator, prepared, tmp_path):
    with pytest.raises(ConfigError, match="n_images"):
        sample.run(generator, prepared, tmp_path / "s", dict(n_images=0))
    assert not (tmp_path / "s").exists()


def test_missing_generator_folder_raises(prepared, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        sample.run(missing, prepared, tmp_path / "s", dict(n_images=1))


def _copy_generator(generator, dst):
    import shutil

    shutil.copytree(generator, dst)
    return dst


def test_missing_model_config_raises(generator, tmp_path):
    broken = _copy_generator(generator, tmp_path / "g")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(DatasetError, match=r"unet/config\.json"):
        sample.load_generator(broken)


def test_truncated_weights_raise(generator, tmp_path):
    broken = _copy_generator(generator, tmp_path / "g")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match=str(broken / "unet")):
        sample.load_generator(broken)


def test_corrupt_config_json_raises(generator, tmp_path):
    broken = _copy_generator(generator, tmp_path / "g")
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=str(broken / "unet")):
        sample.load_generator(broken)


def test_unusable_unet_resolution_raises(generator, tmp_path):
    broken = _copy_generator(generator, tmp_path / "g")
    config_path = broken / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] = 15  # odd: the UNet halves it once
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="resolution 15"):
        sample.load_generator(broken)


def test_bad_sample_settings_raise():
    with pytest.raises(ConfigError, match="sampler"):
        sample.validate_settings(dict(sampler="euler"))
    with pytest.raises(ConfigError, match="inference_steps"):
        sample.validate_settings(dict(inference_steps=0))
    with pytest.raises(ConfigError, match="n_images"):
        sample.validate_settings(dict(n_images="all"))


def test_default_inference_steps(generator):
    _, train_scheduler = sample.load_generator(generator)
    ddim, steps = sample.make_sampler(train_scheduler, "ddim", None)
    assert steps == 50 and len(ddim.timesteps) == 50
    ddpm, steps = sample.make_sampler(train_scheduler, "ddpm", None)
    assert steps == 1000 and len(ddpm.timesteps) == 1000
    with pytest.raises(ConfigError, match="inference_steps"):
        sample.make_sampler(train_scheduler, "ddim", 1001)


def test_image_seeds_are_distinct():
    seeds = {sample.image_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and min(seeds) >= 0


# ---------------------------------------------------------------- the diffusers pipeline


def test_generator_folder_is_a_diffusers_pipeline(generator):
    """A diffusers user loads the generator with DiffusionPipeline and samples; our sampler draws the same image."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    assert json.loads((generator / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DiffusionPipeline.from_pretrained(generator, local_files_only=True)
    assert isinstance(pipe, DDPMPipeline)
    pipe.set_progress_bar_config(disable=True)
    seed, steps = 11, 8
    image = pipe(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 output_type="np").images  # fmt: skip
    assert image.shape == (1, 16, 16, 1)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.01

    unet, train_scheduler = sample.load_generator(generator)
    scheduler, _ = sample.make_sampler(train_scheduler, "ddpm", steps)
    ours = sample.sample_images(unet, scheduler, [seed], torch.device("cpu"))
    np.testing.assert_allclose(ours[0, 0].numpy(), image[0, :, :, 0], atol=1e-5)


def test_missing_model_index_raises(generator, tmp_path):
    broken = _copy_generator(generator, tmp_path / "g")
    (broken / "model_index.json").unlink()
    with pytest.raises(DatasetError, match=r"model_index\.json"):
        sample.load_generator(broken)


def test_bf16_autocast_keeps_sampling_in_fp32(generator, monkeypatch):
    """The CUDA path (bf16 autocast) on the CPU: the pipeline still gets fp32 predictions and noise."""
    unet, train_scheduler = sample.load_generator(generator)
    scheduler, _ = sample.make_sampler(train_scheduler, "ddpm", 6)
    fp32 = sample.sample_images(unet, scheduler, [3, 4], torch.device("cpu"))
    seen = []
    unet.register_forward_hook(lambda module, inputs, output: seen.append(output.sample.dtype))
    monkeypatch.setattr(sample, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16 = sample.sample_images(unet, scheduler, [3, 4], torch.device("cpu"))
    assert torch.bfloat16 in seen  # autocast really ran the UNet in bf16
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.1 and not torch.equal(bf16, fp32)


# ---------------------------------------------------------------- noise schedule (issue 21)


class _Constant(torch.nn.Module):
    """A stand-in UNet that predicts a fixed tensor, so a loss can be computed by hand."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, sample, timesteps):
        return type("Out", (), {"sample": self.prediction})()


def test_default_schedule_ends_at_pure_noise_and_samples_from_it():
    s = train.validate_settings(TINY)
    scheduler = train.make_scheduler(s)
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)  # zero terminal SNR
    assert scheduler.config.prediction_type == "v_prediction"
    # the sampler inherits the training scheduler's config: trailing spacing visits the last level first
    ddim, _ = sample.make_sampler(scheduler, "ddim", 10)
    assert int(ddim.timesteps[0]) == s.num_train_timesteps - 1
    assert ddim.config.rescale_betas_zero_snr and not ddim.config.clip_sample
    old = train.make_scheduler(train.validate_settings(dict(TINY, beta_schedule="linear", prediction_type="epsilon",
                                                           zero_terminal_snr=False, timestep_spacing="leading")))  # fmt: skip
    assert float(old.alphas_cumprod[-1]) > 1e-5
    old_ddim, _ = sample.make_sampler(old, "ddim", 10)
    assert int(old_ddim.timesteps[0]) < s.num_train_timesteps - 1  # leading skips the noisiest levels


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ConfigError, match="zero_terminal_snr.*v_prediction"):
        train.validate_settings(dict(TINY, prediction_type="epsilon", zero_terminal_snr=True))


def test_loss_target_follows_the_prediction_type():
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand((3, 1, 4, 4), generator=gen) * 2 - 1
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.tensor([10, 500, 999])
    v_sched = train.make_scheduler(train.validate_settings(TINY))
    velocity = v_sched.alphas_cumprod[t].sqrt()[:, None, None, None] * noise - (
        1 - v_sched.alphas_cumprod[t]
    ).sqrt()[:, None, None, None] * clean
    assert float(train.diffusion_loss(_Constant(velocity), v_sched, clean, noise, t)) == pytest.approx(0.0, abs=1e-10)
    assert float(train.diffusion_loss(_Constant(noise), v_sched, clean, noise, t)) > 0.1
    eps_sched = train.make_scheduler(train.validate_settings(dict(TINY, prediction_type="epsilon", zero_terminal_snr=False)))
    assert float(train.diffusion_loss(_Constant(noise), eps_sched, clean, noise, t)) == pytest.approx(0.0, abs=1e-10)


def test_min_snr_weights_by_hand():
    """min(SNR, gamma) / (SNR + 1) per sample for v-prediction, min(SNR, gamma) / SNR for epsilon."""
    clean = torch.zeros((2, 1, 2, 2))
    noise = torch.zeros_like(clean)
    t = torch.tensor([5, 900])
    errors = torch.tensor([1.0, 2.0])[:, None, None, None].expand(2, 1, 2, 2)  # per-sample MSE 1 and 4
    for kind, zero_snr in (("v_prediction", True), ("epsilon", False)):
        sched = train.make_scheduler(train.validate_settings(dict(TINY, prediction_type=kind, zero_terminal_snr=zero_snr)))
        a = sched.alphas_cumprod[t].double()
        snr = a / (1 - a)
        weight = snr.clamp(max=5.0) / (snr + 1 if kind == "v_prediction" else snr)
        expected = float((torch.tensor([1.0, 4.0], dtype=torch.float64) * weight).mean())
        got = float(train.diffusion_loss(_Constant(errors), sched, clean, noise, t, snr_gamma=5.0))
        assert got == pytest.approx(expected, rel=1e-5), kind
        assert got != pytest.approx(2.5, rel=1e-3)  # not the unweighted mean


def test_generator_fd_probe_logs_ratio_and_degrades_without_wheel(tmp_path, monkeypatch, caplog):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from sraseg.generate.probe import FDProbe, read_fd_log

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((16, 1, 16, 16), dtype=np.float32) * 2 - 1)
    patients = np.repeat([f"p{i}" for i in range(4)], 4)
    probe = FDProbe.create(images, np.arange(16), patients, n=6, every=2, total=5, sampler_steps=2,
                           out_dir=tmp_path, resume_step=0)  # fmt: skip
    assert probe is not None and probe.floor > 0
    unet = build_unet(16, [8, 16], 1, False, False)
    ema = EMAModel(unet.parameters(), decay=0.9)
    scheduler = DDPMScheduler(num_train_timesteps=20)
    before = [p.detach().clone() for p in unet.parameters()]
    assert probe.maybe_log(1, unet, ema, scheduler, torch.device("cpu")) is None  # not due
    for step in (2, 4, 5):  # every 2 steps and the last one
        row = probe.maybe_log(step, unet, ema, scheduler, torch.device("cpu"))
        assert row["fd_ratio"] == pytest.approx(row["fd"] / row["fd_floor"]) and row["fd"] > 0
    assert unet.training and all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))  # weights restored
    assert [r["step"] for r in read_fd_log(tmp_path / "fd_log.csv")] == [2, 4, 5]
    # A resumed run at step 2 drops the later rows it is about to redo.
    FDProbe.create(images, np.arange(16), patients, 6, 2, 5, 2, tmp_path, resume_step=2)
    assert [r["step"] for r in read_fd_log(tmp_path / "fd_log.csv")] == [2]

    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with caplog.at_level("WARNING"):
        assert FDProbe.create(images, np.arange(16), patients, 6, 2, 5, 2, tmp_path / "x", resume_step=0) is None
    assert "FD probe off" in caplog.text
