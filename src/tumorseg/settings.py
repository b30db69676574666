"""Settings read from files (YAML, TOML, JSON, a manifest) converted to their dataclass's types.

YAML reads `lr: 1e-4` as a string and a hand-edited file may say `epochs: "10"` or
`patch: 64,64,64`; each value is converted to its field's type here, or refused in one line
naming the key, instead of failing later inside a comparison with a Python-worded message.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .errors import TumorsegError

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
SEED_LIMIT = 2**32  # seeds: NumPy's generators take none larger
T = TypeVar("T")


def typed_settings(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with each converted to the type of `cls`'s field of that name (unknown keys kept)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            out[key] = value
            continue
        try:
            out[key] = _convert(value, hints[key])
        except (TypeError, ValueError):
            raise TumorsegError(f"{source}: {key} must be {_describe(hints[key])} (got {value!r})") from None
    return out


def _convert(value: Any, hint: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):  # from the API: np.int64(3), np.array([64, 64, 64])
        value = value.tolist()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner)
    if origin in (list, tuple):
        item = args[0]
        if isinstance(value, str):
            if item is str:
                return value  # "all" or "t1,flair": the config parses its own lists of names
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        items = [_convert(v, item) for v in value]
        if _fixed_length(origin, args) and len(items) != len(args):
            raise ValueError
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (str, int)) and text in _TRUE + _FALSE:
            return text in _TRUE
        raise TypeError
    if hint is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str):
            value = value.strip()
            value = int(value) if value.lstrip("+-").isdigit() else float(value)  # "10" exactly, "1e3" too
        if not isinstance(value, (int, float)) or not float(value).is_integer():
            raise TypeError
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if hint is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads `amp: off` as false
    if hint is str and not isinstance(value, str):
        raise TypeError
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin in (list, tuple):
        count = f"{len(args)} " if _fixed_length(origin, args) else ""
        return f"a list of {count}{_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _fixed_length(origin: Any, args: tuple) -> bool:
    """`tuple[int, int, int]` has a length; `tuple[str, ...]` and `list[int]` have none."""
    return origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)


def settings_object(value: Any, cls: type[T], command: str, from_file: Callable[[Any], T] | None = None) -> T:
    """The settings an API call was given as a `cls`: itself, the defaults for None, built from a dict
    of its fields (`cls.from_dict`) or, where `from_file` reads one, from a settings file; else one line."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls.from_dict(value)
    if from_file is not None and isinstance(value, (str, os.PathLike)):
        return from_file(value)
    kinds = [f"a {cls.__name__}", "a dict"] + (["a settings file"] if from_file else [])
    raise TumorsegError(f"{command}: config must be {', '.join(kinds[:-1])} or {kinds[-1]}, not {type(value).__name__}")
