"""Modules the commands import at their first use, so that `ddimctl --help` and every Tab of shell
completion start without importing torch (about 2 s)."""

from __future__ import annotations

import importlib


class Deferred:
    """Stands for the module `name`, importing it when an attribute is first asked for; setting or
    deleting an attribute (a test's monkeypatch) reaches the module itself."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(importlib.import_module(self._name), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"



def library(name: str) -> Deferred:
    """ddimctl's own module `name` (sampling, images, ...), imported at its first use."""
    return Deferred(f"ddimctl.{name}")
