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


@pytest.mark.parametrize("real_data, chosen, expected", [
    (True, None, None),  # real scans: no case-cache folder unless the user names one
    (True, "mine", "mine"),
    (False, None, "out/cache"),  # synthetic sites: cached beside the run
])
def test_a_simulation_caches_real_scans_on_disk_only_where_told(tmp_path: Path, tiny_sites: Path,
                                                                monkeypatch: pytest.MonkeyPatch, real_data: bool,
                                                                chosen: str | None, expected: str | None) -> None:
    import contextlib

    import fedlesion.simulations.launch as launch

    class Started(Exception):
        pass

    seen = {}

    @contextlib.contextmanager
    def superlink(workdir, app_dir, extra_env):  # noqa: ANN001, ANN202 - stands in for the SuperLink
        seen.update(extra_env)
        raise Started
        yield

    monkeypatch.delenv("FEDLESION_CACHE_DIR", raising=False)
    monkeypatch.setattr(launch, "local_superlink", superlink)
    values = {"output-dir": str(tmp_path / "out"), "num-server-rounds": 1, "synth-shape": "32,32,16",
              **({"data-root": str(tiny_sites), "split": "folders"} if real_data else {})}
    with pytest.raises(Started):
        run_federation(values, num_sites=3, output=io.StringIO(), cache_dir=tmp_path / chosen if chosen else None)
    assert seen.get("FEDLESION_CACHE_DIR") == (str(tmp_path / expected) if expected else None)
