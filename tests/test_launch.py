"""The simulation launcher refuses, before starting anything, a run folder that already holds a run."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedlesion.simulations.launch import run_federation


def test_a_folder_holding_a_finished_run_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """An old ``final.pt`` must never pass for a new run's success (``flwr run`` exits 0 when the ServerApp refuses)."""
    folder = tmp_path / "out" / "taken"
    folder.mkdir(parents=True)
    (folder / "final.pt").write_bytes(b"an earlier run's model")
    with pytest.raises(ValueError, match="already holds a run"):
        run_federation({"output-dir": str(tmp_path / "out"), "run-name": "taken"}, num_sites=2,
                       output=io.StringIO(), timeout_s=60)
    assert not (tmp_path / "out" / "synthetic").exists(), "refused before writing anything"
