"""The numba kernel modules (``_gram_null_numba``, ``_knn_null_numba``, ``_ranks_numba``),
imported on first use.

numba is a dependency, but a broken install (numba built against another numpy, a kernel that
fails to compile) must not break the library: every caller has a plain-torch path that gives
the same numbers, and takes it when :func:`available` says no.  An import failure is
remembered, so it costs one attempt per process.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: dict[str, ModuleType | Exception] = {}


def load(name: str) -> ModuleType:
    """The module ``alignment_callback.functional.<name>``, imported on first use.

    Raises ``ImportError`` naming the cause when numba is missing or broken.
    """
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"alignment_callback.functional.{name}")
        except Exception as err:  # numba missing or broken (e.g. an incompatible numpy)
            _loaded[name] = err
    module = _loaded[name]
    if isinstance(module, Exception):
        raise ImportError(f"{name} needs numba (pip install numba): {module}") from module
    return module


def available(name: str) -> bool:
    """Whether :func:`load` of ``name`` works (imports it on first call)."""
    try:
        load(name)
    except ImportError:
        return False
    return True


def disable(name: str, error: Exception) -> None:
    """Record that ``name``'s kernels failed at run time: from now on the torch path serves."""
    _loaded[name] = error
