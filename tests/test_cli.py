"""The command line: one naming scheme, `--config FILE`, settings listed in `--help` from the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sraseg.cli import build_parser, main
from sraseg.settings import SCHEMA_PATH

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())  # the packaged schema, as the stages and the workflow read it


def _help(stage: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(("stage", "section"), [("train", "train"), ("sample", "sample"), ("train-generator", "generator"),
                                                ("content", "content")])
def test_help_lists_every_setting_with_its_schema_default(stage, section, capsys):
    text = _help(stage, capsys)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    for key, spec in SCHEMA["properties"][section]["properties"].items():
        assert key in rows, key
        assert json.dumps(spec["default"]) in rows[key], rows[key]
        assert spec["description"].split()[0] in rows[key]
    assert re.search(r"^  pretrain_iterations +10000 +Pre-training", text, re.M) or section != "train"


def test_config_file_gives_the_stage_its_section_and_the_experiment_overrides():
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    args = build_parser().parse_args(
        ["train", "--prepared-dir", "p", "--out-dir", "o", "--config", str(REPO / "config" / "tiny.yaml"),
         "--experiment", "sraseg", "--settings", '{"lr": 0.5}']
    )  # fmt: skip
    kwargs = args.kwargs(args)
    assert kwargs["settings"] == {**config["train"], "method": "sraseg", "lr": 0.5}
    assert kwargs["prepared_dir"] == Path("p") and kwargs["out_dir"] == Path("o")


def test_blend_draws_are_what_the_experiment_trains_with(tmp_path):
    """blend's --draws (maps: fresh): given, else selftrain_iterations x unlabeled_batch of the config's train
    section with the experiment's overrides, else of the train defaults (the reference's 50,000 x 12)."""
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["experiments"]["sraseg"]["train"] = {"selftrain_iterations": 7}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    base = ["blend", "--synthetic-dir", "s", "--prepared-dir", "p", "--neighbours", "n", "--out-dir", "o"]

    def draws(*extra):
        args = build_parser().parse_args(base + list(extra))
        return args.kwargs(args)["draws"]

    assert draws() == 50000 * 12
    assert draws("--config", str(REPO / "config" / "acdc.yaml")) == 50000 * 12
    assert draws("--config", str(path)) == 2 * 2  # tiny.yaml: 2 iterations x 2
    assert draws("--config", str(path), "--experiment", "sraseg") == 7 * 2
    assert draws("--config", str(path), "--draws", "5") == 5


def test_whole_acdc_config_is_accepted_by_train():
    args = build_parser().parse_args(["train", "--prepared-dir", "p", "--out-dir", "o", "--config", str(REPO / "config" / "acdc.yaml")])
    settings = args.kwargs(args)["settings"]
    acdc = yaml.safe_load((REPO / "config" / "acdc.yaml").read_text())
    assert settings == {**acdc.get("train", {}), "blend": dict(kernel="gaussian", kernel_size=5, sigma=1.0)}


def test_train_takes_the_blend_map_keys_from_the_blend_section():
    """Training's on-the-fly maps read the blend section (declared once): --config's kernel, kernel_size,
    sigma and ratio, with the experiment's overrides, go under `blend`; --settings may give its own."""
    base = ["train", "--prepared-dir", "p", "--out-dir", "o", "--config", str(REPO / "config" / "fives_phantom.yaml")]

    def settings(*extra):
        args = build_parser().parse_args(base + list(extra))
        return args.kwargs(args)["settings"]

    assert settings("--experiment", "sraseg")["blend"] == dict(kernel="box", kernel_size=7)
    assert settings("--settings", '{"blend": {"kernel": "hard"}}')["blend"] == dict(kernel="hard")


def test_config_mistakes_are_one_line_each(tmp_path, capsys):
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["train"]["learnig_rate"] = 0.1
    config["sample"]["sampler"] = "euler"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["train", "--prepared-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [
        "sraseg train: config error: 'sample.sampler' is 'euler'; allowed: ddim, ddpm",
        "sraseg train: config error: unknown key 'train.learnig_rate'; did you mean 'lr'?",
    ]
    assert not (tmp_path / "o").exists()


def test_earlier_flag_spellings_still_work():
    parser = build_parser()
    a = parser.parse_args(["sample", "--generator", "g", "--prepared", "p", "--out-dir", "o"])
    assert (a.generator_dir, a.prepared_dir) == (Path("g"), Path("p"))
    a = parser.parse_args(["phantom", "--out", "x"])
    assert a.out_dir == Path("x")
    a = parser.parse_args(["predict", "--model", "m.safetensors", "--prepared", "p", "--out-dir", "o"])
    assert (a.prepared_dir, a.output) == (Path("p"), Path("o"))


def test_missing_required_folder_is_named(capsys):
    assert main(["embed", "--prepared-dir", "p", "--out-dir", "o"]) == 2
    assert "--synthetic-dir" in capsys.readouterr().err


def test_fetch_weights_defaults_to_the_acdc_config_model(tmp_path):
    args = build_parser().parse_args(["fetch-weights", "--out-file", "w.safetensors"])
    acdc = yaml.safe_load((REPO / "config" / "acdc.yaml").read_text())
    assert args.kwargs(args)["model"] == acdc["embed"]["model"]
    bare = tmp_path / "bare.yaml"  # a config without embed.model: the schema's default
    bare.write_text("embed: {img_size: 56}\n")
    given = build_parser().parse_args(["fetch-weights", "--out-file", "w", "--config", str(bare)])
    assert given.kwargs(given)["model"] == SCHEMA["properties"]["embed"]["properties"]["model"]["default"]


def _visible_flags(stage: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[stage]
    return {opt for action in sub._actions if action.help != "==SUPPRESS==" for opt in action.option_strings}


def test_workflow_calls_use_the_current_flag_names():
    """Every flag a rule passes is one `--help` shows (not an old alias)."""
    calls = 0
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        # a rule's shell is adjacent string literals: join them, then split per sraseg call
        text = "".join(re.findall(r'"([^"\n]*)"', path.read_text()))
        for stage, rest in re.findall(r"python -m sraseg ([a-z-]+)(.*?)>", text):
            calls += 1
            for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest):
                assert flag in _visible_flags(stage), f"{path.name}: sraseg {stage} {flag}"
    assert calls >= 10


def test_whole_file_given_to_settings_points_to_config(capsys):
    code = main(["train", "--prepared-dir", "p", "--out-dir", "o", "--settings", str(REPO / "config" / "acdc.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "use --config FILE" in err[0]
