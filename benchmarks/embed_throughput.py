"""Throughput of the embed stage's embedding path versus the bare ViT forward, on the same images.

  embed path: `FrozenEncoder.embed_array` on grey float32 [N,S,S] numpy slices in [0,1] already in memory
              (batch copy to the device, bilinear resize, grey->3 channels, ImageNet normalisation, ViT,
              pooling, L2 normalisation, copy back to numpy). File IO is EXCLUDED.
  bare forward: `vit.forward_features` on pre-resized, pre-normalised [N,3,img,img] tensors already on the
              device, same batch size, same inference_mode/autocast.

The ratio embed/bare should be >= 0.9: the embedding path adds little beyond the network itself.
Random weights (throughput does not depend on them). Each measurement is repeated and the best taken.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/embed_throughput.py --n 64
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from sraseg.device import autocast, pick_device
from sraseg.embed.encoder import build_encoder

log = logging.getLogger("embed_throughput")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(vit: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
    with torch.inference_mode(), autocast(device):
        for x in batches:
            vit.forward_features(x)
    _sync(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images (default 64)")
    parser.add_argument("--input-size", type=int, default=256, help="side of the grey input slices (default 256)")
    parser.add_argument("--img-size", type=int, default=224, help="encoder input side (default 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--pooling", default="cls", choices=["cls", "mean_patch"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per path; the best is kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sraseg.embed.encoder").setLevel(logging.ERROR)  # the UNTRAINED banner is expected here

    device = pick_device(args.device)
    encoder = build_encoder(args.model, args.img_size, args.pooling, weights="random").to(device)
    rng = np.random.default_rng(0)
    images = rng.random((args.n, args.input_size, args.input_size), dtype=np.float32)
    # Bare-forward inputs: the same images, preprocessed once up front (not timed), already on the device.
    with torch.inference_mode():
        ready = [
            encoder.preprocess(torch.from_numpy(images[i : i + args.batch_size]).to(device))
            for i in range(0, args.n, args.batch_size)
        ]

    # Warm-up (allocator, cuDNN/oneDNN kernel choice) on one batch of each path.
    encoder.embed_array(images[: args.batch_size], args.batch_size)
    bare_forward(encoder.vit, ready[:1], device)

    # Interleave the two paths so background load on a shared machine hits both alike.
    t_embed, t_bare = [], []
    for _ in range(args.repeats):
        t_embed.append(best_time(lambda: encoder.embed_array(images, args.batch_size), 1, device))
        t_bare.append(best_time(lambda: bare_forward(encoder.vit, ready, device), 1, device))
    embed_ips = args.n / min(t_embed)
    bare_ips = args.n / min(t_bare)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    log.info(
        "model %s, %d images %dpx -> %dpx, batch %d, %s",
        args.model,
        args.n,
        args.input_size,
        args.img_size,
        args.batch_size,
        name,
    )
    log.info("embed path (preprocess+ViT+pool+normalise, no file IO): %8.1f images/s", embed_ips)
    log.info("bare ViT forward_features (pre-normalised tensors):     %8.1f images/s", bare_ips)
    log.info("ratio embed/bare: %.3f (goal >= 0.9)", embed_ips / bare_ips)


if __name__ == "__main__":
    main()
