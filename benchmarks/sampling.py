"""Benchmark: generator training-step time and DDIM vs DDPM sampling time per image.

Builds the generator UNet from the given sizes, trains it a few steps on random images (only so the
weights are not the init; quality is irrelevant here), then samples the same seeds with DDIM and
DDPM and prints seconds per image for each and their ratio. Defaults finish in about two minutes on
two CPU cores.

    python benchmarks/sampling.py --resolution 64 --channels 32 64 64 --images 2
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from sraseg.device import pick_device, seed_everything
from sraseg.generate.common import build_unet, check_resolution
from sraseg.generate.sample import image_seed, make_sampler, sample_images
from sraseg.generate.train import GeneratorSettings, diffusion_loss, make_scheduler

log = logging.getLogger("benchmarks.sampling")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64, help="generator image side (default 64)")
    p.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 64], help="block_out_channels (default 32 64 64)"
    )
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="attention blocks at the coarsest level")
    p.add_argument("--no-mid-attention", action="store_true", help="drop the bottleneck attention")
    p.add_argument("--images", type=int, default=2, help="images sampled with each sampler (default 2)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps (default 3; 0 skips)")
    p.add_argument("--train-batch", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_resolution(args.resolution, args.channels, "--resolution")
    device = pick_device(args.device)
    seed_everything(0)
    unet = build_unet(args.resolution, args.channels, args.layers_per_block, args.attention, not args.no_mid_attention)
    unet = unet.to(device)
    settings = GeneratorSettings(resolution=args.resolution, block_out_channels=args.channels)
    scheduler = make_scheduler(settings)
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("UNet %s, %d px, %.2f M parameters, %d threads, %s",
             args.channels, args.resolution, n_params / 1e6, torch.get_num_threads(), device)  # fmt: skip

    # training steps (one warm-up step not timed)
    if args.train_steps > 0:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4)
        shape = (args.train_batch, 1, args.resolution, args.resolution)
        times = []
        for i in range(args.train_steps + 1):
            clean = torch.rand(shape, device=device) * 2 - 1
            noise = torch.randn(shape, device=device)
            t = torch.randint(0, 1000, (args.train_batch,), device=device)
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = diffusion_loss(unet, scheduler, clean, noise, t)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            _sync(device)
            if i:
                times.append((time.perf_counter() - start, time.process_time() - cpu_start))
        wall = sum(w for w, _ in times) / len(times)
        cpu = sum(c for _, c in times) / len(times)
        log.info("train: %.3f s/step wall, %.3f CPU-s/step at batch %d (2000 steps ~ %.1f min wall)",
                 wall, cpu, args.train_batch, wall * 2000 / 60)  # fmt: skip

    # sampling, the same seeds with both samplers
    unet.eval()
    seeds = [image_seed(0, i) for i in range(args.images)]
    results = {}
    for name, steps in (("ddim", args.ddim_steps), ("ddpm", args.ddpm_steps)):
        sampler, steps = make_sampler(scheduler, name, steps)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        sample_images(unet, sampler, seeds, device, batch_size=args.images)
        _sync(device)
        results[name] = (time.perf_counter() - start) / args.images
        cpu = (time.process_time() - cpu_start) / args.images
        log.info("%s-%d: %.3f s/image wall, %.3f CPU-s/image (batch %d)", name, steps, results[name], cpu, args.images)
    log.info("ddpm/ddim time ratio: %.1f", results["ddpm"] / results["ddim"])


if __name__ == "__main__":
    main()
