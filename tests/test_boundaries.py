"""The layout's dependency rule: ``common`` never imports Flower."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_common_never_imports_flower() -> None:
    modules = sorted(p.stem for p in (REPO / "common").glob("*.py") if p.stem != "__init__")
    code = "import sys\n" + "".join(f"import common.{m}\n" for m in modules) + \
        "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')]\nprint(bad)\nsys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"common imports flwr: {result.stdout} {result.stderr[-2000:]}"
    assert len(modules) >= 6
