"""Shared test setup: no network, deterministic torch, and small builders for stage inputs."""

from __future__ import annotations

import os

# Tests never reach a model hub; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
