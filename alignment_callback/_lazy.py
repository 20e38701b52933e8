"""Lazy package attributes (PEP 562): a package names what it exports and the module that
defines each, and imports that module on first use, so importing a light submodule does not
pay for Lightning or torchmetrics."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``table[name]`` and returns its
    ``name``; other names raise ``AttributeError`` as for any module."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
