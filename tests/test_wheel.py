"""The wheel works on its own: built from the repository's files, installed in a fresh virtual
environment in a temporary folder, and run from outside the repository.

The fresh environment gets the wheel and nothing of the checkout. Its third-party dependencies
(torch, Flower, MONAI ...) are this environment's, reached through a ``.pth`` line: a ``.pth``
line adds a folder to ``sys.path`` without running that folder's own ``.pth`` files, so the
editable install of the checkout living there stays switched off. Flower's executables are made
for the fresh interpreter, as pip makes any console script, so every process Flower starts runs
the installed package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, write_case

pytestmark = pytest.mark.process

GENERIC = ("common", "server", "client", "simulations")


def _copy_sources(target: Path) -> None:
    """The repository's files as a fresh clone would have them (tracked and new, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, dest = REPO / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, dest)


def _console_scripts(venv: Path, distribution: str) -> None:
    """Console scripts of an installed distribution, written for the fresh interpreter (as pip writes them)."""
    python = venv / "bin" / "python"
    for entry in importlib.metadata.distribution(distribution).entry_points:
        if entry.group != "console_scripts":
            continue
        module, _, attr = entry.value.partition(":")
        script = venv / "bin" / entry.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {attr.split('.')[0]} as _main\n"
                          f"sys.exit(_main{'.' + attr.split('.', 1)[1] if '.' in attr else ''}())\n")
        script.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh venv, the environment to run it with, a working folder outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    _copy_sources(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(root / "dist"), str(root / "src")], check=True, capture_output=True)
    [wheel] = (root / "dist").glob("fedlesion-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, capture_output=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _console_scripts(venv, "flwr")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    work = root / "work"
    work.mkdir()
    return venv, env, work


def _run(installed: tuple[Path, dict[str, str], Path], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    venv, env, work = installed
    result = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=work, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_installs_one_package_and_nothing_generic(installed: tuple[Path, dict[str, str], Path]) -> None:
    venv = installed[0]
    code = ("import fedlesion, importlib.util, json; "
            "print(json.dumps({'file': fedlesion.__file__, 'checkout': str(fedlesion.CHECKOUT), "
            f"'generic': [n for n in {GENERIC!r} if importlib.util.find_spec(n)]}}))")
    found = json.loads(_run(installed, "python", "-c", code).stdout)
    assert found["file"].startswith(str(venv)) and found["checkout"] == "None", found
    assert found["generic"] == [], "nothing generic lands in site-packages"
    site_packages = Path(found["file"]).parent.parent
    assert not any((site_packages / name).exists() for name in GENERIC)
    assert (site_packages / "fedlesion" / "common" / "partitions" / "partitioning_1.json").is_file()
    assert (site_packages / "fedlesion" / "app.toml").read_text() == (REPO / "pyproject.toml").read_text()


def test_simulate_runs_from_the_wheel(installed: tuple[Path, dict[str, str], Path]) -> None:
    result = _run(installed, "fedlesion", "simulate", "--sites", "2", "--rounds", "1", "--run-config", "smoke",
                  "--out", "outputs")
    runs = list((installed[2] / "outputs").glob("run-*/final.pt"))
    assert len(runs) == 1, result.stdout[-2000:]


def test_split_fets1_runs_from_the_wheel(installed: tuple[Path, dict[str, str], Path]) -> None:
    data = installed[2] / "brats2021"
    for case in ("BraTS2021_01341", "BraTS2021_01333", "BraTS2021_00000"):  # two in FeTS partition 1's site 1
        write_case(data, case)
    _run(installed, "fedlesion", "split", "--data", str(data), "--kind", "fets1", "--out", "split.json")
    sites = json.loads((installed[2] / "split.json").read_text())["sites"]
    assert sorted(c for cases in sites.values() for c in cases) == ["BraTS2021_00000", "BraTS2021_01333", "BraTS2021_01341"]


def test_bench_scale_runs_from_the_wheel(installed: tuple[Path, dict[str, str], Path]) -> None:
    _run(installed, "fedlesion", "bench", "--sections", "scale", "--scale-sites", "2", "--site-sizes", "2,3",
         "--site-shape", "32,32,16", "--out", "bench")
    result = json.loads((installed[2] / "bench" / "bench.json").read_text())
    assert set(result["scale"]) == {"2"} and set(result["site_scale"]) == {"2", "3"}
    assert all(row["train_message_decoded_files"] == 0 for row in result["site_scale"].values())
