"""The one exception type the CLI shows as a one-line message instead of a traceback, and the rules
for values that more than one module checks.

Messages talk about values, not about how a caller spelled them: `param("steps")` marks a parameter
inside a message. The library shows it by its Python name ("steps must be ..."); the command line
shows it as its flag ("--steps must be ..."), so one message serves both.
"""

from __future__ import annotations

from typing import Callable

_MARK = "\0"  # cannot occur in a path or an argument, so a message's own text never looks like a mark


def param(name: str) -> str:
    """A reference to the caller's parameter `name` (a Python name such as batch_size) in a message."""
    return f"{_MARK}{name}{_MARK}"


def spell(message: str, name_of: Callable[[str], str] = lambda name: name) -> str:
    """The message with each param() mark written as name_of(name)."""
    parts = message.split(_MARK)
    return "".join(name_of(part) if i % 2 else part for i, part in enumerate(parts))


class DdimctlError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""

    def render(self, name_of: Callable[[str], str] = lambda name: name) -> str:
        return spell(str(self.args[0]) if self.args else "", name_of)

    def __str__(self) -> str:
        return self.render()


def at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise DdimctlError(f"{param(name)} must be at least {low}, got {value}")


def between(name: str, value: float, low: float, high: float, why: str = "") -> None:
    if not (isinstance(value, (int, float)) and low <= value <= high):  # also refuses NaN
        raise DdimctlError(f"{param(name)} must be between {low} and {high}{why}, got {value}")


def one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DdimctlError(f"{param(name)} must be one of {', '.join(choices)}, got {value!r}")
