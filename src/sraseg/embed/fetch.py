"""fetch-weights: download a timm DINOv2 model's pretrained weights once (on a machine with internet)
and save them as one file that the embed stage loads offline (`embed.weights: FILE`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sraseg.embed.encoder import check_model_tag, sha256_file
from sraseg.errors import WeightsError

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(model: str = "vit_small_patch14_dinov2.lvd142m", out: Path | str = "dinov2.safetensors") -> str:
    """Download `model` with timm and write its state dict to `out` (.safetensors, else torch .pth).

    The file is written under a temporary name and renamed, so `out` is either complete or absent.

    Returns:
        SHA-256 hex digest of the written file (also logged).

    Raises:
        ConfigError: `model` is not a timm DINOv2 tag.
        WeightsError: the download failed (no network, no such pretrained tag) or the file cannot be written.
    """
    import timm

    check_model_tag(model, key="--model")
    out = Path(out)
    try:
        net = timm.create_model(model, pretrained=True, num_classes=0)
    except Exception as err:  # network errors come in many types (OSError, requests, huggingface_hub)
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise WeightsError(
            f"cannot download {model} ({type(err).__name__}: {reason}); needs internet access{offline}"
        ) from None
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"model": model, "format": "timm"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{out}: cannot write weights file ({err})") from None
    digest = sha256_file(out)
    log.info("wrote %s weights to %s (sha256 %s)", model, out, digest)
    return digest
