"""Lazy package attributes (PEP 562): a package names what it exports and the module that
defines each, and imports that module on first use, so importing a light submodule does not
pay for Lightning or torchmetrics."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(namespace: dict[str, Any], table: dict[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module ``__getattr__`` and ``__dir__``: ``__getattr__`` imports
    ``table[name]`` and returns its ``name`` (other names raise ``AttributeError`` as for any
    module); ``__dir__`` lists the package's own names and the exports.  ``namespace`` is the
    package's ``globals()``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
