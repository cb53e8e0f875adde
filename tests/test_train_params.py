"""Which train settings each method reads: the schema's `x-methods` marks, which the workflow's train
rule goes by (`settings_read_by`: a setting only other methods read is left out of its params, so
changing it does not rerun the training). The proof that the marks are right is training: each method,
trained with each setting it does not read changed, ends with the same weights to the bit."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TINY, make_all

from sraseg.errors import ConfigError
from sraseg.method_settings import METHODS_KEY, blend_read_by, methods_reading, settings_read_by
from sraseg.settings import load_schema, section_schema
from sraseg.train import loop
from sraseg.train.methods import METHODS
from sraseg.train.settings import parse_train_settings

SMALL_NET = dict(channels=[8, 16, 32], dropout=[0.05, 0.1, 0.2])
# a few iterations of each phase; dense validations on, so dense_val_iterations is live where it is read
BASE = dict(TINY, **SMALL_NET, dense_val_every=1, checkpoint_every=100)
PROPERTIES = section_schema("train")["properties"]
MARKS = methods_reading("train")
# the blend section's keys training reads for its own maps, as "blend.<key>" (the stage's `blend` settings)
BLEND_MARKS = {f"blend.{key}": readers for key, readers in methods_reading("blend").items()}


def with_setting(settings: dict, key: str, value) -> dict:
    """`settings` with train.`key`, or with blend.<key> under `blend`, set to `value`."""
    section, _, name = key.rpartition(".")
    return dict(settings, blend={name: value}) if section == "blend" else dict(settings, **{key: value})


def other_value(key: str):
    """A valid value of train.`key` (or blend.<key>) other than BASE's (or the schema default): another enum
    choice, the flipped bool, another number within the schema's bounds that the stage accepts."""
    section, _, name = key.rpartition(".")
    spec = (section_schema(section)["properties"] if section else PROPERTIES)[name]
    current = BASE.get(key, spec["default"])
    if "enum" in spec:
        return next(v for v in spec["enum"] if v != current)
    if spec["type"] == "boolean":
        return not current
    high = spec.get("maximum", spec.get("exclusiveMaximum"))
    candidates = [current + 1, current + 2] if spec["type"] == "integer" else [
        current * 2, current + 1, (current + high) / 2 if high is not None else None, current / 2]
    for value in candidates:
        if value is None or value == current:
            continue
        try:
            parse_train_settings(with_setting(BASE, key, value))
        except ConfigError:
            continue
        return value
    raise AssertionError(f"no other valid value for train.{key}")


UNREAD = [(method, key) for method in METHODS for key, readers in (MARKS | BLEND_MARKS).items() if method not in readers]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("inputs"))


def _train(inputs, out_dir, method: str, changed: tuple = ()) -> dict:
    """A tiny run's end state: the published weights, the last student, teacher and SA head, the log."""
    end = {}
    publish = loop.publish

    def keep_models(ctx, *args):
        for name in ("student", "teacher", "head"):
            model = getattr(ctx, name)
            end.update({f"{name}.{k}": v.clone() for k, v in (model.state_dict() if model else {}).items()})
        publish(ctx, *args)

    loop.publish = keep_models
    try:
        settings = with_setting(dict(BASE, method=method), *changed) if changed else dict(BASE, method=method)
        loop.run(out_dir=out_dir, settings=settings, seed=3, **inputs)
    finally:
        loop.publish = publish
    end.update({f"published.{k}": v for k, v in load_file(str(out_dir / "model.safetensors")).items()})
    log = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(out_dir / "train_log.csv"))]
    return dict(weights=end, log=log)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Each method's run with BASE, trained once (lazily) for all its settings."""
    root, runs = tmp_path_factory.mktemp("reference"), {}

    def get(method: str) -> dict:
        if method not in runs:
            runs[method] = _train(inputs, root / method, method)
        return runs[method]

    return get


@pytest.mark.parametrize(("method", "key"), UNREAD, ids=[f"{m}-{k}" for m, k in UNREAD])
def test_a_setting_the_method_does_not_read_leaves_its_training_unchanged(method, key, inputs, reference, tmp_path):
    value = other_value(key)
    changed, base = _train(inputs, tmp_path, method, (key, value)), reference(method)
    assert changed["weights"].keys() == base["weights"].keys()
    differ = [k for k in base["weights"] if not torch.equal(base["weights"][k], changed["weights"][k])]
    assert not differ, f"{method} trained with {key} = {value!r} differs in {differ[:3]}: it reads {key}"
    assert changed["log"] == base["log"], f"{method}'s train_log.csv moved with {key} = {value!r}"


def test_the_marks_name_methods_and_leave_a_method_out():
    """Each mark lists known methods, some but not all; the experiments' overrides carry the same marks."""
    assert MARKS, "no train key is marked"
    for key, readers in MARKS.items():
        assert readers and set(readers) < set(METHODS), (key, readers)
    overrides = load_schema()["properties"]["experiments"]["additionalProperties"]["properties"]["train"]
    assert {k: tuple(s[METHODS_KEY]) for k, s in overrides["properties"].items() if METHODS_KEY in s} == MARKS


@pytest.mark.parametrize("method", METHODS)
def test_settings_read_by_keeps_unmarked_keys_and_the_methods_own(method):
    section = {key: spec["default"] for key, spec in PROPERTIES.items()}
    section.update(method=method, device="cuda", not_a_key=1)  # unknown keys stay for the stage to refuse
    kept = settings_read_by(method, section)
    assert kept == {k: v for k, v in section.items() if k not in MARKS or method in MARKS[k]}
    assert {"method", "device", "not_a_key", "lr", "channels"} <= set(kept)
    dropped = set(section) - set(kept)
    assert dropped == {k for k, readers in MARKS.items() if method not in readers}


def test_settings_read_by_examples():
    section = dict(sa_weight=0.2, pseudo_weight=1.0, bcp_loss="soft", lr=0.1)
    assert settings_read_by("labeled_only", section) == dict(lr=0.1)
    assert settings_read_by("bcp_real", section) == dict(pseudo_weight=1.0, bcp_loss="soft", lr=0.1)
    assert settings_read_by("sraseg", section) == dict(sa_weight=0.2, pseudo_weight=1.0, lr=0.1)


def test_blend_read_by_examples():
    """Training reads the blend section's map keys only (x-methods there): BCP the ratio of its boxes,
    sraseg all four; the bank's own keys (maps, pairing, ...) never reach a training."""
    blend = dict(maps="fresh", pairing="nearest", kernel="box", kernel_size=7, sigma=2.0, ratio=0.5, seed=3)
    assert blend_read_by("labeled_only", blend) == {}
    assert blend_read_by("bcp_synthetic", blend) == dict(ratio=0.5)
    assert blend_read_by("sraseg", blend) == dict(kernel="box", kernel_size=7, sigma=2.0, ratio=0.5)
    assert blend_read_by(None, blend) == blend_read_by("sraseg", blend)
