"""Constants and messages of the embed stages that must not pull in torch/timm (fast CLI errors)."""

from __future__ import annotations

__all__ = ["POOLINGS", "fetch_hint"]

POOLINGS = ("cls", "mean_patch")


def fetch_hint(model: str) -> str:
    """How to get weights onto a machine without internet (part of every missing-weights message)."""
    return (
        f"run `sraseg fetch-weights --model {model} --out-file FILE` on a machine with internet "
        "and set embed.weights_file to FILE"
    )
