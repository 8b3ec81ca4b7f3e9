"""The layout's dependency rules: cli -> simulations -> server/client -> common, never the other way.

- everything is imported as ``fedlesion.<package>``: nothing generic (``common``, ``server``...)
  is a top-level name, in site-packages or here;
- ``common`` never imports Flower (it is the part a notebook or another framework can reuse);
- ``client`` (the hospital side) and ``server`` never import ``simulations``, nor each other;
- ``common`` imports none of ``client``, ``server`` and ``simulations``;
- nothing imports the CLI, and importing the CLI loads none of ``client``, ``server`` and
  ``simulations`` (each command imports what it runs: ``fedlesion train`` at a hospital never
  loads the simulation harness).

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

PACKAGES = ("common", "client", "server", "simulations")
# package -> names it must never import (a FedLesion package, or a top-level distribution like flwr)
FORBIDDEN = {
    "common": ("flwr", "client", "server", "simulations", "cli"),
    "client": ("simulations", "server", "cli"),
    "server": ("simulations", "client", "cli"),
    "simulations": ("cli",),
}


def _modules(package: str) -> list[str]:
    return sorted(p.stem for p in (REPO / package).glob("*.py") if p.stem != "__init__")


def _name(module: str) -> str:
    """What an absolute import names: the FedLesion package (``fedlesion.client.site`` -> ``client``),
    ``fedlesion`` itself, or another distribution's top-level name; a bare ``common``, ``server``...
    is flagged."""
    parts = module.split(".")
    if parts[0] == "fedlesion":
        return parts[1] if len(parts) > 1 else "fedlesion"
    return f"<bare {parts[0]}>" if parts[0] in PACKAGES else parts[0]


def _imported_names(path: Path) -> set[str]:
    """What every import statement in a file names (see :func:`_name`; relative imports resolved)."""
    package = path.parent.name
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(_name(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(_name(node.module))
                if node.module == "fedlesion":  # from fedlesion import cli
                    names.update(alias.name for alias in node.names)
            elif node.level == 1:
                names.add(package)
            elif node.level > 1:
                names.add("<outside the package>")
    return names


def _sources() -> list[Path]:
    return [p for folder in (*PACKAGES, "fedlesion", "tests") for p in sorted((REPO / folder).glob("*.py"))]


def test_every_import_goes_through_the_fedlesion_namespace() -> None:
    bare = {str(p.relative_to(REPO)): sorted(n for n in _imported_names(p) if n.startswith("<bare"))
            for p in _sources()}
    assert not {k: v for k, v in bare.items() if v}, "import these as fedlesion.<package>"


def test_the_hospital_and_server_sides_never_name_the_simulations() -> None:
    """The issue's own check: no import of the simulation harness in client/ or server/."""
    result = subprocess.run(["git", "grep", "-nE", r"^\s*(from|import) (fedlesion\.)?simulations|^\s*from fedlesion import .*\bsimulations\b", "client", "server"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and not result.stdout, result.stdout


def test_importing_the_cli_loads_neither_side_nor_the_simulations() -> None:
    code = ("import sys, fedlesion.cli\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[:2][-1] in {PACKAGES[1:]!r} and m.startswith('fedlesion.'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"importing fedlesion.cli loads {result.stdout.strip()} {result.stderr[-2000:]}"


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
    code = ("import sys\n" + "".join(f"import fedlesion.{package}.{m}\n" for m in modules)
            + "names = {m: m.split('.')[1] if m.startswith('fedlesion.') else m.split('.')[0] for m in sys.modules}\n"
            + f"bad = sorted(m for m, name in names.items() if name in {forbidden!r} and m != 'fedlesion')\n"
            + "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"importing {package} loads {result.stdout.strip()} {result.stderr[-2000:]}"


def test_the_source_scan_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The scanner itself: an import inside a function, and a relative import from outside, are seen."""
    folder = tmp_path / "client"
    folder.mkdir()
    source = folder / "x.py"
    source.write_text("def f():\n    from fedlesion.simulations.synthetic import write_site\n    from ..common import data\n"
                      "    import server.app\n    from fedlesion import cli\n")
    assert {"simulations", "<outside the package>", "<bare server>", "cli"} <= _imported_names(source)


def test_the_fab_carries_every_file_the_app_reads(tmp_path: Path) -> None:
    """A simulated ClientApp and every deployed process run the FAB's code: the package data they read
    (FeTS partitions, shipped manifests, presets) must be in it, and a split from the FAB must work."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))) as fab:
        names = set(fab.namelist())
        fab.extractall(tmp_path / "fab")
    package_data = {str(p.relative_to(REPO)) for folder in ("common/partitions", "common/manifests", "simulations/presets")
                    for p in (REPO / folder).iterdir() if p.suffix in (".json", ".toml")}
    assert package_data and package_data <= names, sorted(package_data - names)
    assert {"fedlesion/__init__.py", "client/app.py", "server/app.py"} <= names
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fedlesion.common.splits as s; "
            "assert s.__file__.startswith(sys.argv[1]), s.__file__; "
            "print(sorted(s.make_split('fets1', ['BraTS2021_01341', 'BraTS2021_00000'], 0, 0.5, 0).sites))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fab")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and "site-01" in result.stdout, result.stderr[-2000:]
