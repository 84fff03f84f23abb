"""Type checks of config values against a dataclass's field annotations.

YAML gives strings, numbers, lists and mappings; a value of the wrong type would otherwise fail
deep inside a strategy (``'<' not supported between instances of 'str' and 'int'``) or inside
Ray. One generic check, driven by the annotations, names the dotted field and the expected type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from evoray.errors import ConfigError


def check_fields(cls: type, values: Mapping[str, Any], where: str, source: str = "") -> None:
    """ConfigError naming ``{source}: {where}{field}`` for the first value of ``values`` whose
    type does not match ``cls``'s annotation of that field (unknown names are not checked)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            check_value(values[f.name], hints[f.name], f"{where}{f.name}", source)


def check_value(value: Any, hint: Any, name: str, source: str = "") -> None:
    """ConfigError naming ``name`` and the expected type unless ``value`` matches ``hint``."""
    if _matches(value, hint):
        return
    got = f"{value!r} ({_yaml_type(value)})"
    hint_text = ""
    if isinstance(value, str) and _number(hint) and _parses_as_float(value):
        hint_text = " (YAML reads a number like 1e-10 as a string: write 1.0e-10)"
    prefix = f"{source}: " if source else ""
    raise ConfigError(f"{prefix}{name}: expected {describe(hint)}, got {got}{hint_text}")


def describe(hint: Any) -> str:
    """A type annotation in a user's words."""
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if args and len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        hint, describe(hint)
    )


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(
                _matches(v, a) for v, a in zip(value, args, strict=True)
            )
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        return True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not understand: leave it to the dataclass


def _number(hint: Any) -> bool:
    if hint in (int, float):
        return True
    return any(_number(a) for a in typing.get_args(hint))


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _yaml_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
