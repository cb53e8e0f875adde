"""The config schema, the shipped configs and the stage settings agree."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from sraseg.settings import SCHEMA_PATH

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())  # the packaged schema, as the stages and the workflow read it

# config section -> the stage settings dataclass that receives it
SECTIONS = {
    "generator": ("sraseg.generate.train", "GeneratorSettings"),
    "sample": ("sraseg.generate.sample", "SampleSettings"),
    "embed": ("sraseg.embed.run", "EmbedSettings"),
    "index": ("sraseg.embed.index", "IndexSettings"),
    "blend": ("sraseg.blend.run", "BlendSettings"),
    "train": ("sraseg.train.loop", "TrainSettings"),
    "content": ("sraseg.evaluate.content", "ContentSettings"),
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


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml", "acdc.yaml", "benchmark.yaml", "fives.yaml", "fives_phantom.yaml"])
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


# --- config mistakes: one line per problem, before any job starts ---


def _tiny() -> dict:
    return yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


def test_config_problems_are_one_line_each_with_did_you_mean(tmp_path):
    from sraseg.settings import config_problems

    assert config_problems(_tiny(), SCHEMA) == []
    config = _tiny()
    config["train"]["pretrain_iteration"] = 3
    config["train"]["learnig_rate"] = 0.1
    config["trian"] = {}
    config["train"]["lr"] = -1
    config["sample"]["sampler"] = "euler"
    config["train"]["channels"] = [4]
    problems = config_problems(config, SCHEMA)
    assert sorted(problems) == sorted([
        "unknown key 'train.pretrain_iteration'; did you mean 'pretrain_iterations'?",
        "unknown key 'train.learnig_rate'; did you mean 'lr'?",
        "unknown key 'trian'; did you mean 'train'?",
        "'train.lr' is -1; must be > 0",
        "'sample.sampler' is 'euler'; allowed: ddim, ddpm",
        "'train.channels' has 1 item; must have at least 2",
    ])  # fmt: skip


def test_acdc_raw_dir_must_exist(tmp_path):
    from sraseg.settings import config_problems

    config = _tiny()
    config["dataset"].update(source="acdc", raw_dir=str(tmp_path / "nowhere"))
    assert config_problems(config, SCHEMA) == [f"'dataset.raw_dir' is '{tmp_path / 'nowhere'}': no such folder"]
    config["dataset"]["raw_dir"] = None
    assert "'dataset.raw_dir' is not set" in config_problems(config, SCHEMA)[0]
    config["dataset"]["raw_dir"] = str(tmp_path)
    assert config_problems(config, SCHEMA) == []


def test_snakemake_names_a_misspelt_train_key_in_one_line(tmp_path):
    import subprocess

    from workflow_run import scratch, snakemake_command, snakemake_env

    workdir = scratch(tmp_path)
    config = _tiny()
    config["train"]["pretrain_iteration"] = config["train"].pop("pretrain_iterations")
    (workdir / "config" / "typo.yaml").write_text(yaml.safe_dump(config))
    cmd = snakemake_command(workdir, "typo.yaml", "-n", "--cores", "1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(), timeout=300)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "pretrain_iteration" in line]
    assert errors == ["config error: unknown key 'train.pretrain_iteration'; did you mean 'pretrain_iterations'?"]
    assert not (workdir / "results").exists()


# --- the schema is the one declaration of defaults, choices and bounds ---


@pytest.fixture
def edited_schema(tmp_path, monkeypatch):
    """Point the package at an edited copy of the schema; `edit(section, key, **fields)` changes it."""
    from sraseg import settings

    schema = yaml.safe_load(settings.SCHEMA_PATH.read_text())
    path = tmp_path / "config.schema.yaml"

    def edit(section: str, key: str, **fields):
        schema["properties"][section]["properties"][key].update(fields)
        path.write_text(yaml.safe_dump(schema))
        settings.load_schema.cache_clear()

    monkeypatch.setattr(settings, "SCHEMA_PATH", path)
    yield edit
    settings.load_schema.cache_clear()


def test_schema_default_is_the_parsed_default(edited_schema, capsys):
    from sraseg.cli import main
    from sraseg.generate.sample import validate_settings
    from sraseg.settings import parse_settings
    from sraseg.train.loop import TrainSettings

    assert parse_settings(TrainSettings, {"method": "sraseg"}, "train").pretrain_iterations == 10000
    edited_schema("train", "pretrain_iterations", default=1234)
    edited_schema("sample", "n_images", default=17)
    assert parse_settings(TrainSettings, {"method": "sraseg"}, "train").pretrain_iterations == 1234
    assert validate_settings({}).n_images == 17
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert re.search(r"^  pretrain_iterations +1234 ", capsys.readouterr().out, re.M)


def test_schema_bounds_and_choices_are_the_checks(edited_schema):
    from sraseg.errors import ConfigError
    from sraseg.generate.sample import validate_settings

    assert validate_settings({"batch_size": 3}).batch_size == 3
    edited_schema("sample", "batch_size", minimum=4)
    with pytest.raises(ConfigError, match=r"'sample\.batch_size' is 3; must be >= 4"):
        validate_settings({"batch_size": 3})
    edited_schema("sample", "device", enum=["cpu"])
    with pytest.raises(ConfigError, match=r"'sample\.device' is 'auto'; allowed: cpu"):
        validate_settings({"batch_size": 8})  # the default itself now violates the edited choices


def test_config_readme_reference_is_the_schema():
    from sraseg.settings import README_BEGIN, README_END, schema_reference

    text = (REPO / "config" / "README.md").read_text()
    assert README_BEGIN in text and README_END in text
    block = README_BEGIN + text.split(README_BEGIN, 1)[1].split(README_END, 1)[0] + README_END
    assert block == schema_reference(SCHEMA), "config/README.md is stale: run `python -m sraseg.settings --readme`"
    # and value by value: every default of every key appears in its row
    for section, spec in SCHEMA["properties"].items():
        for key, sub in spec.get("properties", {}).items():
            assert f"| `{key}` | `{json.dumps(sub['default'])}` |" in block, f"{section}.{key}"

