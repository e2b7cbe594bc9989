"""Typed reading of the files ddimctl did not write itself (or that anyone may have edited): config
files, sidecars, records. Every one is untrusted input, so each field is read once, with its type
and range, and a wrong one is a one-line error naming the file, the field and what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DdimctlError
from .files import read_regular

_MISSING = object()


def is_whole_number(text: str) -> bool:
    """0-9 digits only: str.isdigit() also takes '²' and other Unicode digits int() may refuse."""
    return bool(text) and text.isascii() and text.isdigit()


MAX_JSON_DEPTH = 64  # nesting of arrays and objects: a config has 3 or 4


def read_json_object(path: Path) -> dict:
    """The one reader of every JSON file ddimctl reads: a regular file (files.read_regular) holding a
    JSON object; unreadable, too large, not UTF-8, not JSON, nested beyond MAX_JSON_DEPTH or not an
    object: one line."""
    try:
        text = read_regular(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DdimctlError(f"{path}: not a UTF-8 text file, so not a JSON config") from e
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(text) > MAX_JSON_DEPTH:
        raise DdimctlError(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep; not a config ddimctl reads")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DdimctlError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise DdimctlError(f"{path}: expected a JSON object {{...}}, found a {type(data).__name__}")
    return data


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count),
    found without parsing: the parser itself would recurse once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


class Fields:
    """One untrusted object (from a JSON or TOML file), read field by field."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise DdimctlError(f"{where}: expected an object of fields, found a {type(data).__name__}")
        self.data, self.where = data, where

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _fail(self, key: str, expected: str):
        return DdimctlError(f"{self.where}: field {key!r} is {self.data[key]!r}, expected {expected}")

    def _get(self, key: str, default):
        if key not in self.data:
            if default is _MISSING:
                raise DdimctlError(f"{self.where}: the field {key!r} is missing")
            return default, False
        return self.data[key], True

    def integer(self, key: str, default=_MISSING, low: int | None = None, high: int | None = None) -> int:
        value, given = self._get(key, default)
        if not given:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low) or (
                high is not None and value > high):
            raise self._fail(key, f"an integer{_range(low, high)}")
        return value

    def number(self, key: str, default=_MISSING, low: float | None = None, high: float | None = None) -> float:
        value, given = self._get(key, default)
        if not given:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
                low is not None and value < low) or (high is not None and value > high):
            raise self._fail(key, f"a finite number{_range(low, high)}")
        return float(value)

    def text(self, key: str, default=_MISSING, choices: tuple[str, ...] | None = None) -> str:
        value, given = self._get(key, default)
        if not given:
            return value
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._fail(key, f"one of {', '.join(choices)}" if choices else "a string")
        return value

    def flag(self, key: str, default=_MISSING) -> bool:
        value, given = self._get(key, default)
        if given and not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def integers(self, key: str, default=_MISSING, low: int | None = None, high: int | None = None,
                 non_empty: bool = True) -> tuple[int, ...]:
        value, given = self._get(key, default)
        if not given:
            return value
        ok = isinstance(value, (list, tuple)) and (value or not non_empty) and all(
            isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low) and (high is None or v <= high)
            for v in value)
        if not ok:
            raise self._fail(key, f"a {'non-empty ' if non_empty else ''}list of integers{_range(low, high)}")
        return tuple(value)

    def texts(self, key: str, default=_MISSING) -> tuple[str, ...]:
        value, given = self._get(key, default)
        if not given:
            return value
        if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
            raise self._fail(key, "a non-empty list of strings")
        return tuple(value)

    def table(self, key: str, default=_MISSING) -> Fields:
        value, given = self._get(key, default)
        if not given:
            return Fields({} if value is None else value, f"{self.where} [{key}]")
        if not isinstance(value, dict):
            raise self._fail(key, "an object of fields")
        return Fields(value, f"{self.where} [{key}]")

    def only(self, allowed) -> None:
        """Refuse fields this format does not have (a typo would otherwise be ignored)."""
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise DdimctlError(f"{self.where}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(allowed))}")


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    if low is not None:
        return f" >= {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""
