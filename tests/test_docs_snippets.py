"""Execute the runnable code blocks of the docs.

Convention: a fenced ```python block whose first line is ``# runnable`` is executed, each in a
fresh namespace, by this test; other blocks (fragments with undefined names) are not.  Any
``docs/*.md`` page can add runnable snippets.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKER = "# runnable"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def runnable_snippets() -> list[tuple[str, str]]:
    """``(id, code)`` for every runnable block; ids are ``page.md:line``."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            code = match.group(1)
            if code.lstrip().splitlines()[:1] == [MARKER]:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.name}:{line}", code))
    return found


SNIPPETS = runnable_snippets()


def test_runnable_snippets_found() -> None:
    """The convention is in use (guards against a broken fence regex silently running nothing)."""
    assert any(name.startswith("plain_pytorch.md:") for name, _ in SNIPPETS)


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_doc_snippet_runs(name: str, code: str, monkeypatch, tmp_path) -> None:
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # files a snippet writes land in a temporary directory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared 2-core machine
    try:
        exec(compile(code, f"<{name}>", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)


def test_measures_page_table_is_the_registry() -> None:
    """docs/measures.md carries ``measure_table()`` verbatim between its markers."""
    from alignment_callback.functional import BUILTIN_MEASURES, measure_table

    text = (DOCS / "measures.md").read_text(encoding="utf-8")
    start, end = "<!-- measure-table:start -->\n", "<!-- measure-table:end -->"
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == measure_table(), "regenerate the table with measure_table()"
    assert all(f"| `{name}` |" in table for name in BUILTIN_MEASURES)


def test_docs_and_package_refer_to_nothing_outside_the_repository():
    """Users get the package and docs/, not the development notes they were written from."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    files = [root / "README.md", root / "pyproject.toml", root / "Makefile",
             *(root / "docs").rglob("*.md"), *(root / "alignment_callback").rglob("*.py"),
             *(root / "examples").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]
    offenders = [str(f.relative_to(root)) for f in files
                 if any(word in f.read_text(encoding="utf-8")
                        for word in ("METHOD.md", "FIELD_NOTES", "../shared"))]
    assert offenders == []


def test_cli_grouped_example_output_is_current(tmp_path, monkeypatch, capsys) -> None:
    """docs/cli.md §4 (grouped samples): its Python block makes the data, and the tables the
    two `compare` commands print are the ones the page shows (deterministic: seed 0)."""
    from alignment_callback.reporting import cli

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    section = text[text.index("## 4. Grouped samples"):text.index("## 5.")]
    code = FENCE.search(section).group(1)
    console = section[section.index("$ alignment-callback compare image.npy"):]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "cli.md §4", "exec"), {})
    commands = re.findall(r"^\$ alignment-callback (.+)$", console, re.MULTILINE)
    assert len(commands) == 2
    rows = re.compile(r"^(linear_cka|mutual_knn|cknna) .*$", re.MULTILINE)
    shown = [m.group(0) for m in rows.finditer(console)]
    assert len(shown) == 6
    printed = []
    for command in commands:
        assert cli.main(command.split()) == 0
        printed += [m.group(0) for m in rows.finditer(capsys.readouterr().out)]
    assert printed == shown
