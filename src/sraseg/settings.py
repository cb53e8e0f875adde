"""Typed stage settings: each stage declares a dataclass with defaults; `parse_settings` builds it
from a plain dict (a config section) and refuses unknown keys and wrong types, naming them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from sraseg.errors import ConfigError

__all__ = ["parse_settings", "settings_dict", "check_choice", "check_positive"]

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


def parse_settings(cls: type[T], data: dict | None, section: str) -> T:
    """Build dataclass `cls` from `data`; `section` names the config section in error messages.

    Raises:
        ConfigError: an unknown key (lists the known ones) or a value of the wrong type.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in '{section}'; known keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise ConfigError(f"'{section}.{name}' must be of type {hints[name]}; got {value!r}")
        if hints[name] is float and isinstance(value, int):
            data[name] = float(value)
    return cls(**data)


def settings_dict(settings: Any) -> dict:
    """The resolved settings as a plain dict (written beside a stage's outputs)."""
    return dataclasses.asdict(settings)


def check_choice(section: str, name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"'{section}.{name}' must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"'{section}.{name}' must be {bound}; got {value!r}")
