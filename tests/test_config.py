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
    "train": ("sraseg.train.settings", "TrainSettings"),
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
    if section == "train":
        stage_defaults.pop("blend")  # the blend section's map keys (BlendMapSettings): checked below
    assert schema_defaults == stage_defaults


def test_training_reads_the_blend_sections_marked_keys_with_their_defaults():
    """The blend map settings are declared once, in `blend`: training's `BlendMapSettings` holds exactly the
    keys the schema marks as read by training (x-methods), with the schema's defaults."""
    from sraseg.method_settings import methods_reading
    from sraseg.train.settings import BlendMapSettings, TrainSettings, parse_train_settings

    blend = SCHEMA["properties"]["blend"]["properties"]
    maps = dataclass_defaults("sraseg.train.settings", "BlendMapSettings")
    assert set(maps) == set(methods_reading("blend")) == {"kernel", "kernel_size", "sigma", "ratio"}
    assert maps == {key: blend[key]["default"] for key in maps}
    assert not {"blend_kernel", "blend_kernel_size", "blend_sigma", "blend_ratio"} & set(SCHEMA["properties"]["train"]["properties"])
    cfg = parse_train_settings({"method": "sraseg", "blend": {"kernel": "box", "kernel_size": 7}})
    assert cfg.blend == BlendMapSettings(kernel="box", kernel_size=7) and isinstance(cfg, TrainSettings)
    assert parse_train_settings({"method": "sraseg"}).blend == BlendMapSettings()


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

    path.write_text(yaml.safe_dump(schema))  # the copy, unedited until `edit` (the train stage reads its method enum)
    monkeypatch.setattr(settings, "SCHEMA_PATH", path)
    settings.load_schema.cache_clear()
    yield edit
    settings.load_schema.cache_clear()


def test_schema_default_is_the_parsed_default(edited_schema, capsys):
    from sraseg.cli import main
    from sraseg.generate.sample import validate_settings
    from sraseg.settings import parse_settings
    from sraseg.train.settings import TrainSettings

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



# --- every section walked: each schema bound is the stage's check, the stages check nothing else by hand ---

# Sections no stage dataclass parses: the workflow reads them itself (rule arguments, targets).
WORKFLOW_SECTIONS = {"device", "cpu_threads", "dataset", "phantom", "fives_phantom", "prepare", "experiments", "seeds"}


def test_every_schema_section_is_a_stage_section_or_the_workflows():
    assert set(SCHEMA["properties"]) == set(SECTIONS) | WORKFLOW_SECTIONS


def _outside(sub: dict, default) -> list[tuple[str, object]]:
    """(rule, value) for a value just outside each bound or choice of schema property `sub`."""
    kinds = sub.get("type") if isinstance(sub.get("type"), list) else [sub.get("type")]
    step = 1 if "integer" in kinds else 1e-3
    cases = []
    if "enum" in sub:
        cases.append(("enum", "not-a-choice" if isinstance(sub["enum"][0], str) else max(sub["enum"]) + 1))
    if "minimum" in sub:
        cases.append(("minimum", sub["minimum"] - step))
    if "maximum" in sub:
        cases.append(("maximum", sub["maximum"] + step))
    for rule in ("exclusiveMinimum", "exclusiveMaximum"):
        if rule in sub:
            cases.append((rule, sub[rule]))
    if "multipleOf" in sub:
        cases.append(("multipleOf", default + 1))
    if "minItems" in sub:
        cases.append(("minItems", list(default)[: sub["minItems"] - 1]))
    if "items" in sub:
        cases += [(f"items.{rule}", [bad, *list(default)[1:]]) for rule, bad in _outside(sub["items"], default[0])]
    return cases


STAGE_BOUNDS = [
    (section, key, rule, bad)
    for section in sorted(SECTIONS)
    for key, sub in SCHEMA["properties"][section]["properties"].items()
    for rule, bad in _outside(sub, sub["default"])
]


def test_the_walk_covers_every_kind_of_bound():
    assert {rule for _, _, rule, _ in STAGE_BOUNDS} == {
        "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems",
        "items.minimum", "items.maximum",
    }  # fmt: skip


@pytest.mark.parametrize(("section", "key", "rule", "bad"), STAGE_BOUNDS, ids=[f"{s}.{k}-{r}" for s, k, r, _ in STAGE_BOUNDS])
def test_each_schema_bound_is_enforced_by_the_stage(section, key, rule, bad):
    """A value just outside each bound or choice of the schema is refused by the stage's own parse, in
    one line naming `section.key`; the value at the bound's default passes."""
    from sraseg.errors import ConfigError
    from sraseg.settings import parse_settings

    cls = getattr(importlib.import_module(SECTIONS[section][0]), SECTIONS[section][1])
    parse_settings(cls, {key: SCHEMA["properties"][section]["properties"][key]["default"]}, section)
    with pytest.raises(ConfigError, match=re.escape(f"'{section}.{key}")) as err:
        parse_settings(cls, {key: bad}, section)
    assert "\n" not in str(err.value)


def _inside(sub: dict, default) -> list[tuple[str, object]]:
    """(rule, value) for each value at the edge of what schema property `sub` allows, and each choice."""
    kinds = sub.get("type") if isinstance(sub.get("type"), list) else [sub.get("type")]
    step = 1 if "integer" in kinds else 1e-3
    cases = [(f"enum:{choice}", choice) for choice in sub.get("enum", [])]
    cases += [(rule, sub[rule]) for rule in ("minimum", "maximum") if rule in sub]
    if "exclusiveMinimum" in sub:
        cases.append(("exclusiveMinimum", sub["exclusiveMinimum"] + step))
    if "exclusiveMaximum" in sub:
        cases.append(("exclusiveMaximum", sub["exclusiveMaximum"] - step))
    if "minItems" in sub:
        cases.append(("minItems", list(default)[: sub["minItems"]]))
    if "items" in sub:
        cases += [(f"items.{rule}", [edge, *list(default)[1:]]) for rule, edge in _inside(sub["items"], default[0])]
    return cases


# The other keys a value at the edge needs, where a cross-field rule ties them.
COMPANIONS = {
    ("generator", "prediction_type", "enum:epsilon"): {"zero_terminal_snr": False},
    ("train", "channels", "minItems"): {"dropout": [0.05, 0.1]},
    ("train", "dropout", "minItems"): {"channels": [16, 32]},
}
STAGE_EDGES = [
    (section, key, rule, edge)
    for section in sorted(SECTIONS)
    for key, sub in SCHEMA["properties"][section]["properties"].items()
    for rule, edge in _inside(sub, sub["default"])
]


@pytest.mark.parametrize(("section", "key", "rule", "edge"), STAGE_EDGES, ids=[f"{s}.{k}-{r}" for s, k, r, _ in STAGE_EDGES])
def test_the_stage_accepts_everything_the_schema_allows(section, key, rule, edge):
    """Each choice and each value at a bound's edge passes the stage's parse: a stage refuses nothing the
    schema allows key by key (only the cross-field rules below tie keys together)."""
    from sraseg.settings import parse_settings

    cls = getattr(importlib.import_module(SECTIONS[section][0]), SECTIONS[section][1])
    settings = parse_settings(cls, {key: edge, **COMPANIONS.get((section, key, rule), {})}, section)
    assert getattr(settings, key) == edge


@pytest.mark.parametrize(
    ("section", "settings", "needle"),
    [
        ("generator", dict(resolution=18, block_out_channels=[8, 16, 16]), r"'generator\.resolution'.*resolution 18"),
        ("generator", dict(prediction_type="epsilon", zero_terminal_snr=True), r"'generator\.zero_terminal_snr' needs .*v_prediction"),
        ("train", dict(pretrain_iterations=0, selftrain_iterations=0), r"'train\.pretrain_iterations' \+ 'train\.selftrain_iterations' must be > 0"),
        ("train", dict(channels=[4, 8, 16], dropout=[0.1, 0.2]), r"'train\.channels' and 'train\.dropout' need the same length"),
        ("blend", dict(kernel_size=4), r"'blend\.kernel_size' is 4; must be odd"),
    ],
)
def test_cross_checks_say_what_the_schema_cannot(section, settings, needle):
    """Each stage's `cross_checks` (run by parse_settings) holds only rules the schema cannot state: every
    value here is valid key by key under the schema, and the stage still refuses the combination."""
    from sraseg.errors import ConfigError
    from sraseg.settings import config_problems, parse_settings

    assert config_problems({section: settings}, SCHEMA, check_paths=False) == []
    cls = getattr(importlib.import_module(SECTIONS[section][0]), SECTIONS[section][1])
    with pytest.raises(ConfigError, match=needle):
        parse_settings(cls, settings, section)


def test_train_method_is_checked_against_the_experiments_enum():
    """`method` comes from the experiment (not a `train` key): the train stage checks it against the
    schema's experiments.<name>.method choices."""
    from sraseg.errors import ConfigError
    from sraseg.settings import parse_settings
    from sraseg.train.methods import METHODS
    from sraseg.train.settings import TrainSettings

    assert ", ".join(METHODS).startswith("labeled_only, bcp_real, bcp_synthetic, sraseg")  # the table's order
    with pytest.raises(ConfigError, match=rf"^'train\.method' is 'fixmatch'; allowed: {', '.join(METHODS)}$"):
        parse_settings(TrainSettings, {"method": "fixmatch"}, "train")


def test_formerly_drifted_bounds_agree():
    """generator.ema_decay must be < 1 and train.num_classes >= 2 (ACDC 4, FIVES 2), for the workflow's
    check and the stage's alike; an instance built in Python is held to the same bounds."""
    from sraseg.errors import ConfigError
    from sraseg.generate.train import GeneratorSettings, validate_settings
    from sraseg.settings import config_problems, parse_settings
    from sraseg.train.settings import TrainSettings

    assert config_problems({"generator": {"ema_decay": 1.0}}, SCHEMA, check_paths=False) == ["'generator.ema_decay' is 1.0; must be < 1"]
    for given in ({"ema_decay": 1.0}, GeneratorSettings(ema_decay=1.0)):
        with pytest.raises(ConfigError, match=r"'generator\.ema_decay' is 1\.0; must be < 1"):
            validate_settings(given)
    assert validate_settings(GeneratorSettings(ema_decay=0.5)).ema_decay == 0.5
    for classes in (2, 4):
        assert config_problems({"train": {"num_classes": classes}}, SCHEMA, check_paths=False) == []
        assert parse_settings(TrainSettings, {"num_classes": classes}, "train").num_classes == classes
    assert config_problems({"train": {"num_classes": 1}}, SCHEMA, check_paths=False) == ["'train.num_classes' is 1; must be >= 2"]


# Code that dispatches on a setting's values keeps its one table; each equals the schema's enum.
DISPATCH_TABLES = [
    ("sraseg.blend.maps", "KERNELS", "blend", "kernel"),
    ("sraseg.embed.pairing", "PAIRING_RULES", "blend", "pairing"),
    ("sraseg.embed.common", "POOLINGS", "embed", "pooling"),
    ("sraseg.train.data", "AUGMENTATIONS", "train", "augment"),
    ("sraseg.train.data", "PAIR_AUGMENTS", "train", "pair_augment"),
    ("sraseg.train.teacher", "TEACHER_MODES", "train", "teacher_mode"),
    ("sraseg.train.methods", "METHODS", "experiments", "method"),
]


@pytest.mark.parametrize(("module", "name", "section", "key"), DISPATCH_TABLES)
def test_code_tables_of_choices_equal_the_schema_enum(module, name, section, key):
    from sraseg.settings import choices

    assert set(getattr(importlib.import_module(module), name)) == set(choices(section, key))


def test_every_stage_device_takes_the_same_choices():
    from sraseg.cli import _devices
    from sraseg.settings import choices

    with_device = [section for section in SECTIONS if "device" in SCHEMA["properties"][section]["properties"]]
    assert len(with_device) == 6 and {choices(section, "device") for section in with_device} == {("auto", "cpu", "cuda")}
    assert _devices() == ["auto", "cpu", "cuda"]


def test_experiment_section_is_the_one_merge_of_overrides():
    """The section with the experiment's overrides on top (train: and its method); the workflow's rules
    and the CLI's --config/--experiment both use it."""
    from sraseg.errors import ConfigError
    from sraseg.settings import experiment_section

    config = _tiny()
    config["experiments"]["sraseg"]["train"] = {"lr": 0.5}
    config["experiments"]["sraseg"]["blend"] = {"pairing": "nearest"}
    assert experiment_section(config, "train", "sraseg") == {**config["train"], "lr": 0.5, "method": "sraseg"}
    assert experiment_section(config, "blend", "sraseg") == {**config.get("blend", {}), "pairing": "nearest"}
    assert experiment_section(config, "train") == config["train"]
    assert experiment_section(config, "sample", "sraseg") == config["sample"]
    with pytest.raises(ConfigError, match="'nope' is not in the config's experiments"):
        experiment_section(config, "train", "nope")
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert not re.search(r"EXPERIMENTS\[[^]]+\]\.get\(\"(train|blend)\"", common), "merge overrides with experiment_section"


def test_the_schema_ships_in_the_package():
    import tomllib

    import sraseg

    assert SCHEMA_PATH.parent == Path(sraseg.__file__).resolve().parent and SCHEMA_PATH.is_file()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert SCHEMA_PATH.name in pyproject["tool"]["setuptools"]["package-data"]["sraseg"]
    assert not (REPO / "workflow" / "schemas").exists(), "one schema file: the package's"


def test_training_refuses_an_even_blend_kernel_as_the_blend_stage_does():
    from sraseg.errors import ConfigError
    from sraseg.settings import config_problems
    from sraseg.train.settings import parse_train_settings

    assert config_problems({"blend": {"kernel_size": 4}}, SCHEMA, check_paths=False) == []
    with pytest.raises(ConfigError, match=r"'blend\.kernel_size' is 4; must be odd"):
        parse_train_settings({"method": "sraseg", "blend": {"kernel_size": 4}})

