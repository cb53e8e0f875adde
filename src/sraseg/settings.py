"""Typed stage settings. The config schema (config.schema.yaml beside this module, shipped in the
package; the workflow validates its config with the same file) is the one declaration of every
setting's default, choices and bounds; each stage's dataclass names its fields (and keeps the same
defaults for direct construction, checked by a test). `parse_settings` fills a config section's
missing keys from the schema, validates it with jsonschema (one line per problem, did-you-mean for
unknown keys), builds the dataclass and runs its `cross_checks()`: the rules across several fields
that the schema cannot say, written once per stage."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from sraseg.errors import ConfigError

__all__ = [
    "parse_settings",
    "settings_dict",
    "SCHEMA_PATH",
    "load_schema",
    "config_problems",
    "did_you_mean",
    "ConfigProblems",
    "section_schema",
    "choices",
    "experiment_section",
]

# The one declaration of every workflow setting (defaults, choices, bounds, one-line meanings).
SCHEMA_PATH = Path(__file__).resolve().with_name("config.schema.yaml")

T = TypeVar("T")


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def section_schema(section: str) -> dict | None:
    """The schema of config section `section`, or None (no such section, or no schema file)."""
    try:
        return load_schema()["properties"].get(section)
    except ConfigError:
        return None


def choices(section: str, key: str) -> tuple:
    """The values setting `section.key` allows, as the schema's enum lists them: code that needs the
    list (a CLI's choices, a dispatch table's test) reads it here instead of spelling it again.
    `experiments` names a key of one experiment, e.g. `choices("experiments", "method")`."""
    spec = load_schema()["properties"][section]
    properties = spec["properties"] if "properties" in spec else spec["additionalProperties"]["properties"]
    return tuple(properties[key]["enum"])


def experiment_section(config: dict, section: str, experiment: str | None = None) -> dict:
    """Config section `section` as experiment `experiment` runs it: the section's keys with the
    experiment's overrides on top and, for `train`, the experiment's method (the workflow's rules and
    the CLI's `--config/--experiment` both merge here). None: the section as written.

    Raises:
        ConfigError: `experiment` is not one of the config's experiments.
    """
    merged = dict(config.get(section) or {})
    if experiment is None:
        return merged
    experiments = config.get("experiments") or {}
    if experiment not in experiments:
        raise ConfigError(f"experiment {experiment!r} is not in the config's experiments ({', '.join(experiments)})")
    merged.update(experiments[experiment].get(section) or {})
    if section == "train":
        merged["method"] = experiments[experiment]["method"]
    return merged


def _plain(value: Any) -> Any:
    """Tuples as lists, so jsonschema's `array` accepts what Python callers pass."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def parse_settings(cls: type[T], data: dict | None, section: str) -> T:
    """Build dataclass `cls` from `data`; `section` names the config section (and its schema).

    Keys missing from `data` take the schema's default (the dataclass default where the schema has
    none, e.g. train's `method`); the values are checked against the schema's types, choices and bounds,
    then by the dataclass's own `cross_checks()` where it has one (rules across several fields, which
    the schema cannot say; each raises a ConfigError naming `section.key`).

    Raises:
        ConfigError: an unknown key (with the closest known one), a value of the wrong type, or a
            broken cross-field rule; ConfigProblems (a ConfigError) for every schema violation at once,
            one line each.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            "; ".join(f"unknown key '{section}.{key}', {did_you_mean(key, fields)}" for key in unknown)
        )
    spec = section_schema(section)
    if spec is not None:
        declared = spec.get("properties", {})
        for key, sub in declared.items():
            if key in fields and key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
        checked = {key: _plain(value) for key, value in data.items() if key in declared}
        problems = config_problems({section: checked}, {"type": "object", "properties": {section: spec}}, False)
        if problems:
            raise ConfigProblems(problems)
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise ConfigError(f"'{section}.{name}' must be of type {hints[name]}; got {value!r}")
        if hints[name] is float and isinstance(value, int):
            data[name] = float(value)
    settings = cls(**data)
    if hasattr(settings, "cross_checks"):
        settings.cross_checks()
    return settings


def settings_dict(settings: Any) -> dict:
    """The resolved settings as a plain dict (written beside a stage's outputs)."""
    return dataclasses.asdict(settings)


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The config schema (SCHEMA_PATH, shipped in the package) as a dict.

    Raises:
        ConfigError: the schema file is not there (a broken install: reinstall sraseg).
    """
    import yaml

    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"{SCHEMA_PATH}: config schema not found (a broken install: reinstall sraseg)")
    return yaml.safe_load(SCHEMA_PATH.read_text())


# Names people bring from other tools, mapped to ours (only used to suggest the right key).
_ALIASES = {"learning_rate": "lr", "iterations": "selftrain_iterations", "num_inference_steps": "inference_steps"}


def did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    """'did you mean X?' for the closest known key (or a familiar alias of one), else the known keys."""
    known = sorted(known)
    candidates = {k: k for k in known} | {a: k for a, k in _ALIASES.items() if k in known}
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return f"did you mean '{candidates[close[0]]}'?" if close else f"known keys: {', '.join(known)}"


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error) -> list[str]:
    """One line per problem of a jsonschema error: the key, the value, what is allowed."""
    key, value, rule, want = _where(error.absolute_path), error.instance, error.validator, error.validator_value
    if rule == "additionalProperties" and isinstance(value, dict):
        known = set(error.schema.get("properties", {}))
        prefix = f"{key}." if error.absolute_path else ""
        return [f"unknown key '{prefix}{extra}'; {did_you_mean(extra, known)}" for extra in sorted(set(value) - known)]
    if rule == "enum":
        return [f"'{key}' is {value!r}; allowed: {', '.join(map(str, want))}"]
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if rule in bounds:
        return [f"'{key}' is {value!r}; must be {bounds[rule]} {want}"]
    if rule == "type":
        kinds = " or ".join(want) if isinstance(want, list) else want
        return [f"'{key}' is {value!r}; must be of type {kinds}"]
    if rule in ("minItems", "maxItems"):
        return [f"'{key}' has {len(value)} item{'' if len(value) == 1 else 's'}; must have {'at least' if rule == 'minItems' else 'at most'} {want}"]
    if rule == "required":
        missing = [name for name in want if name not in value]
        return [f"'{key}' lacks the required key(s) {', '.join(missing)}"]
    return [f"'{key}' is {value!r}: {' '.join(error.message.split())[:160]}"]


class ConfigProblems(ConfigError):
    """Several config mistakes at once; `problems` holds one line per mistake."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def config_problems(config: dict, schema: dict | None = None, check_paths: bool = True) -> list[str]:
    """Every problem of a workflow config, one line each (unknown keys get a did-you-mean).

    With `check_paths`, also what the schema cannot say: with `dataset.source: acdc`,
    `dataset.raw_dir` must be an existing folder (a typo there must not silently reuse earlier results).
    """
    import jsonschema

    schema = load_schema() if schema is None else schema
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems: list[str] = []
    for error in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        # a oneOf/anyOf failure: its closest sub-error says the most
        best = jsonschema.exceptions.best_match([error]) if error.context else error
        problems += [line for line in _describe(best) if line not in problems]
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    if check_paths and dataset.get("source") == "acdc":
        raw = dataset.get("raw_dir")
        if not raw:
            problems.append("'dataset.raw_dir' is not set; source acdc needs the ACDC-layout folder (patientXXX/...)")
        elif not Path(raw).is_dir():
            problems.append(f"'dataset.raw_dir' is {raw!r}: no such folder")
    return problems


README_BEGIN = "<!-- BEGIN generated from src/sraseg/config.schema.yaml: python -m sraseg.settings --readme -->"
README_END = "<!-- END generated -->"


def _allowed(sub: dict) -> str:
    """What a schema property accepts, in words: type, choices, bounds, list length."""
    if "enum" in sub:
        return "one of " + ", ".join(f"`{json.dumps(v).strip(chr(34))}`" for v in sub["enum"])
    kinds = sub.get("type", "any")
    kinds = " or ".join(kinds) if isinstance(kinds, list) else kinds
    bounds = [f"{sign} {sub[key]}" for key, sign in
              (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in sub]  # fmt: skip
    text = kinds + (" " + ", ".join(bounds) if bounds else "")
    if "pattern" in sub:  # a name, not a path: it never holds a folder, a space or a shell character
        text += f" matching `{sub['pattern']}`"
    if "items" in sub:
        n_min, n_max = sub.get("minItems"), sub.get("maxItems")
        count = f"{n_min} " if n_min is not None and n_min == n_max else (f"≥ {n_min} " if n_min else "")
        text = f"list of {count}({_allowed(sub['items'])})"
    return text


def schema_reference(schema: dict | None = None) -> str:
    """The markdown tables (key, default, allowed values) of every section, as config/README.md holds them."""
    schema = load_schema() if schema is None else schema
    parts = [README_BEGIN, "", "## Reference: every key with its default and allowed values", ""]
    for section, spec in schema["properties"].items():
        props = spec.get("properties")
        if not props:
            parts += [f"- `{section}`: default `{json.dumps(spec.get('default'))}`", ""]
            continue
        parts += [f"### `{section}`", "", "| key | default | allowed |", "|---|---|---|"]
        parts += [f"| `{key}` | `{json.dumps(sub.get('default'))}` | {_allowed(sub)} |" for key, sub in props.items()]
        parts.append("")
    parts.append(README_END)
    return "\n".join(parts)


def _write_readme(path: Path) -> None:
    text = path.read_text()
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + schema_reference() + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + schema_reference() + "\n"
    path.write_text(text)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--readme"]:
        print(schema_reference())
    else:
        _write_readme(Path(sys.argv[2]) if len(sys.argv) > 2 else SCHEMA_PATH.parents[2] / "config" / "README.md")
