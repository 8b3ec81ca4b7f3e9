"""Resume: a run stopped after round 2 of 4 and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from simulations.launch import read_history, run_federation

BASE = {
    "strategy": "fedadam", "server-lr": 0.01, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
    "synth-cases-per-site": 3, "samples-per-case": 4, "batch-size": 4, "seed": 0, "lr-schedule": "constant",
    "evaluate-initial": False, "min-available-nodes": 2,
}


def _run(tmp_path: Path, name: str, **values: object) -> Path:
    config = {**BASE, "output-dir": str(tmp_path / "out"), "run-name": name, **values}
    return run_federation(config, num_sites=2, output=io.StringIO(), timeout_s=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    whole = _run(tmp, "whole", **{"num-server-rounds": 4})
    first = _run(tmp, "stopped", **{"num-server-rounds": 2})
    resumed = _run(tmp, "stopped", **{"num-server-rounds": 4, "resume-from": str(first / "last.pt")})
    return {"whole": whole, "resumed": resumed}


def test_resumed_run_continues_round_numbering(runs: dict[str, Path]) -> None:
    history = read_history(runs["resumed"])
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert load_checkpoint(runs["resumed"] / "final.pt").round == 4


def test_resumed_fedadam_ends_where_the_uninterrupted_run_ends(runs: dict[str, Path]) -> None:
    whole = load_checkpoint(runs["whole"] / "final.pt")
    resumed = load_checkpoint(runs["resumed"] / "final.pt")
    assert set(whole.extra["optimizer_state"]) == {"m_t", "v_t"}, "FedAdam's moments are checkpointed"
    for key, value in whole.state_dict.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed.state_dict[key], value, rtol=1e-4, atol=1e-5, msg=key)
