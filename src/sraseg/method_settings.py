"""The train settings each method reads, from the config schema's `x-methods` marks.

A `train` key marked `x-methods: [...]` is read only by the methods listed; an unmarked key by every
method. The workflow's train rule puts only what its experiment's method reads into its params (and the
`--settings` JSON; the stage fills the schema default for the rest), so a setting one method reads reruns
that method's trainings only. tests/test_train_params.py checks the marks: each method trained with each
key it does not read changed gives the same weights.

The `blend` section's marked keys (kernel, kernel_size, sigma, ratio) are training's too: its on-the-fly
maps read them, so the train rule passes them under `blend` for the methods listed (`blend_read_by`).
There an unmarked key (maps, pairing, ...) is the blend stage's alone, never training's.

A module of its own: every stage imports `sraseg.settings` and the workflow hashes the stages' code, so
code here, read by the workflow and the tests only, changes no stage's hash.
"""

from __future__ import annotations

from sraseg.settings import section_schema

__all__ = ["METHODS_KEY", "methods_reading", "settings_read_by", "blend_read_by"]

# the schema keyword naming the methods that read a key (an x- keyword: JSON Schema validators ignore it)
METHODS_KEY = "x-methods"


def methods_reading(section: str = "train") -> dict[str, tuple[str, ...]]:
    """{key: the methods that read it} for each key of `section` the schema marks with `x-methods`."""
    properties = (section_schema(section) or {}).get("properties") or {}
    return {key: tuple(spec[METHODS_KEY]) for key, spec in properties.items() if METHODS_KEY in spec}


def settings_read_by(method: str, settings: dict) -> dict:
    """`settings` (a `train` section, e.g. `experiment_section(config, "train", exp)`) without the keys
    the schema marks as read by other methods only; unmarked keys (`method`, `device`, unknown ones,
    which the stage then refuses) stay."""
    marks = methods_reading("train")
    return {key: value for key, value in settings.items() if key not in marks or method in marks[key]}


def blend_read_by(method: str | None, blend: dict) -> dict:
    """The keys of `blend` (e.g. `experiment_section(config, "blend", exp)`) that training reads for its
    on-the-fly maps, those the schema marks with `x-methods`: the ones `method` reads, or all of them for
    None (the method not known yet)."""
    marks = methods_reading("blend")
    return {key: value for key, value in blend.items() if key in marks and (method is None or method in marks[key])}
