"""The layout's dependency rules: simulations -> server/client -> common, never the other way.

- ``common`` never imports Flower (it is the part a notebook or another framework can reuse);
- ``client`` (the hospital side) and ``server`` never import ``simulations``;
- ``common`` imports none of ``client``, ``server`` and ``simulations``.

Each rule is checked twice: by importing every module of a package in a fresh interpreter and
listing what got loaded (catches imports hidden inside functions only when they run at import
time), and by reading every import statement in the source (catches imports inside functions).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> top-level names it must never import
FORBIDDEN = {
    "common": ("flwr", "client", "server", "simulations"),
    "client": ("simulations", "server"),
    "server": ("simulations", "client"),
}


def _modules(package: str) -> list[str]:
    return sorted(p.stem for p in (REPO / package).glob("*.py") if p.stem != "__init__")


def _imported_names(path: Path) -> set[str]:
    """Top-level package names of every import statement in a file (relative imports resolved)."""
    package = path.parent.name
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.add(package)
            elif node.level > 1:
                names.add("<outside the package>")
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_crosses_a_boundary(package: str) -> None:
    found = {}
    for path in sorted((REPO / package).glob("*.py")):
        bad = _imported_names(path) & {*FORBIDDEN[package], "<outside the package>"}
        if bad:
            found[path.name] = sorted(bad)
    assert not found, f"{package}/ imports what it must not: {found}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_package_loads_nothing_it_must_not(package: str) -> None:
    modules = _modules(package)
    assert modules, package
    forbidden = FORBIDDEN[package]
    code = ("import sys\n" + "".join(f"import {package}.{m}\n" for m in modules)
            + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
            + "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"importing {package} loads {result.stdout.strip()} {result.stderr[-2000:]}"


def test_the_source_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The scanner itself: an import inside a function, and a relative import from outside, are seen."""
    folder = tmp_path / "client"
    folder.mkdir()
    source = folder / "x.py"
    source.write_text("def f():\n    from simulations.synthetic import write_site\n    from ..common import data\n")
    assert {"simulations", "<outside the package>"} <= _imported_names(source)
