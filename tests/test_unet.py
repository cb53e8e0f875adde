"""The U-Net: size, shapes, bottleneck features, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from sraseg.errors import SrasegError, WeightsError
from sraseg.train.unet import UNet, load_model, save_model


def test_parameter_count_matches_reference():
    count = sum(p.numel() for p in UNet().parameters())
    assert abs(count - 1.8e6) / 1.8e6 < 0.10, count


def test_shapes_and_features():
    torch.manual_seed(0)
    model = UNet().eval()
    x = torch.rand(3, 1, 32, 32)
    logits, features = model(x, return_features=True)
    assert logits.shape == (3, 4, 32, 32)
    assert features.shape == (3, 256)
    assert torch.allclose(model.encode(x), features)
    assert torch.equal(model(x), logits)
    assert features.std() > 0


def test_mismatched_channels_and_dropout_refused():
    with pytest.raises(ValueError):
        UNet(channels=[8, 16, 32], dropout=[0.1, 0.2])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = UNet(channels=[8, 16, 32], dropout=[0.0, 0.1, 0.2])
    model.train()
    model(torch.rand(4, 1, 16, 16))  # move BatchNorm running stats off their defaults
    model.eval()
    path = tmp_path / "model.safetensors"
    save_model(path, model, dict(image_size=16, method="labeled_only"))
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["channels"] == [8, 16, 32] and meta["method"] == "labeled_only" and meta["image_size"] == 16
    loaded, meta2 = load_model(path)
    assert meta2 == meta and not loaded.training
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_load_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    save_model(path, UNet(channels=[8, 16], dropout=[0.0, 0.0]), dict(image_size=16, method="x"))
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["channels"] = [8, 32]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="do not match"):
        load_model(path)
    (tmp_path / "model.json").write_text('{"channels": [8, 32], "dropo')  # cut off mid-write
    with pytest.raises(SrasegError, match=r"model\.json: not valid JSON"):
        load_model(path)
