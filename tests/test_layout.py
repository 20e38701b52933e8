"""The package's layers import downward only: functional ← metrics ← hooks ← engine ←
callback ← reporting (the CLI).  A module may import its own layer and any layer below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "alignment_callback"
LAYERS = ["functional", "metrics", "hooks", "engine", "callback", "reporting"]


def imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "alignment_callback" and len(parts) > 1 and parts[1] in LAYERS:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_downward(layer):
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    files = sorted((PACKAGE / layer).rglob("*.py"))  # subpackages (functional/moments/) too
    assert files, f"no modules in {layer}/"
    wrong = {str(f.relative_to(PACKAGE)): sorted(imported_layers(f) - allowed) for f in files}
    assert not {k: v for k, v in wrong.items() if v}, f"{layer}/ imports a layer above it: {wrong}"


def test_no_relative_imports_hide_the_direction():
    relative = [str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level > 0
                       for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))))]
    assert not relative, f"relative imports (write them absolute): {relative}"


def test_every_module_compiles_with_warnings_as_errors():
    """No invalid escape sequence or other compile-time warning: ``python -W error`` (and
    tools that import the package that way) must be able to import every module."""
    import warnings

    for path in sorted(PACKAGE.rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_light_modules_do_not_import_lightning_or_torchmetrics():
    """The packages export their heavy classes lazily: the functional API, the engine, the
    hooks, the CLI, the plots and the null sharing of ``callback.distributed`` (the processes of
    a distributed null) start without Lightning and torchmetrics (several seconds each)."""
    import subprocess
    import sys

    light = ["alignment_callback", "alignment_callback.functional", "alignment_callback.engine",
             "alignment_callback.hooks", "alignment_callback.reporting.cli",
             "alignment_callback.metrics.plotting", "alignment_callback.callback.distributed"]
    code = (f"import importlib, sys\nfor m in {light!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'torchmetrics') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_exports_are_listed_and_resolved():
    """``dir()`` of a lazily exporting package lists its exports; each resolves to the object
    its module defines; an unknown name is an ``AttributeError`` naming the package."""
    import importlib

    for package in ("alignment_callback", "alignment_callback.metrics",
                    "alignment_callback.callback"):
        module = importlib.import_module(package)
        for name in module._LAZY:
            assert name in dir(module), (package, name)
            source = importlib.import_module(module._LAZY[name])
            assert getattr(module, name) is getattr(source, name)
        with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
            module.nope  # noqa: B018
