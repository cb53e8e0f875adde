"""The config schema, the shipped configs and the stage settings agree."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

# config section -> the stage settings dataclass that receives it
SECTIONS = {
    "generator": ("sraseg.generate.train", "GeneratorSettings"),
    "sample": ("sraseg.generate.sample", "SampleSettings"),
    "embed": ("sraseg.embed.run", "EmbedSettings"),
    "index": ("sraseg.embed.index", "IndexSettings"),
    "blend": ("sraseg.blend.run", "BlendSettings"),
    "train": ("sraseg.train.loop", "TrainSettings"),
}


def dataclass_defaults(module: str, name: str) -> dict:
    cls = getattr(importlib.import_module(module), name)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_defaults_equal_stage_defaults(section: str):
    schema_defaults = {k: v["default"] for k, v in SCHEMA["properties"][section]["properties"].items()}
    stage_defaults = dataclass_defaults(*SECTIONS[section])
    stage_defaults.pop("method", None)  # the experiment's method, not a train-section key
    assert schema_defaults == stage_defaults


def test_every_schema_key_has_a_description_and_a_readme_line():
    readme = (REPO / "config" / "README.md").read_text()
    for section, spec in SCHEMA["properties"].items():
        assert "default" in spec, section
        for key, sub in spec.get("properties", {}).items():
            assert "description" in sub and "default" in sub, f"{section}.{key}"
            assert f"`{key}`" in readme, f"config/README.md does not explain {section}.{key}"


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml", "acdc.yaml", "benchmark.yaml"])
def test_shipped_configs_are_valid(name: str):
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"{name} not shipped")
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


def test_unknown_key_is_refused():
    with pytest.raises(jsonschema.ValidationError, match="imag_size"):
        jsonschema.validate({"prepare": {"imag_size": 64}}, SCHEMA)


def test_acdc_splits_are_the_standard_ones():
    splits = REPO / "config" / "splits" / "acdc"
    read = {p.stem: p.read_text().split() for p in splits.glob("*.txt")}
    assert (len(read["train"]), len(read["val"]), len(read["test"])) == (70, 10, 20)
    assert not set(read["train"]) & set(read["val"]) and not set(read["train"]) & set(read["test"])
    for n in (3, 7, 14):
        assert read[f"labeled_{n}"] == read["train"][:n]
    assert read["labeled_7"] == ["patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049"]
