"""A real 2-round federation through ``flwr run`` on Flower's simulation engine."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint
from common.data import split_train_val
from common.model import build_model
from simulations.launch import read_history, run_federation
from simulations.synthetic import site_case_counts


def test_two_round_federation_on_tiny_synthetic_sites(tmp_path: Path) -> None:
    run_config = {
        "num-server-rounds": 2, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
        "synth-cases-per-site": 3, "samples-per-case": 4, "batch-size": 4, "seed": 0,
        "output-dir": str(tmp_path / "out"), "run-name": "tiny", "min-available-nodes": 3,
    }
    log = io.StringIO()
    workdir = tmp_path / "work"
    run_dir = run_federation(run_config, num_sites=3, workdir=workdir, output=log, timeout_s=600)

    history = read_history(run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4
    # FedAvg weighted each site's update by its number of training cases.
    expected = sorted(len(split_train_val([str(i) for i in range(n)], 0.25, 0)[0]) for n in site_case_counts(3, 3))
    for record in history[1:]:
        assert sorted(int(r["num-examples"]) for r in record["replies"]) == expected == [1, 2, 3]
        assert record["train"]["num-examples"] == sum(expected)
        assert "dice-wt" in record["evaluate"]

    final = load_checkpoint(run_dir / "final.pt")
    assert final.round == 2 and final.model == "unet2d" and list(final.spec.regions) == ["WT", "TC", "ET"]
    assert final.run_config["num-server-rounds"] == 2
    torch.manual_seed(0)
    initial = build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()
    changed = [k for k, v in final.state_dict.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert len(changed) > len(initial) // 2, "the global model's weights changed"
    assert all(torch.isfinite(v).all() for v in final.state_dict.values() if v.is_floating_point())
    assert "round 2:" in log.getvalue()

    # Nothing this run started is left running.
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"stray processes: {leftover.stdout}"


def test_differential_privacy_wraps_the_strategy(tmp_path: Path) -> None:
    """Client-side clipping (Flower's mod at each site) with server-side noise: the run completes, weights stay finite."""
    run_config = {
        "num-server-rounds": 1, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
        "synth-cases-per-site": 2, "samples-per-case": 2, "batch-size": 4, "output-dir": str(tmp_path / "out"),
        "run-name": "dp", "dp": "client-fixed", "dp-noise-multiplier": 0.5, "dp-clipping-norm": 0.5,
        "evaluate-initial": False, "fraction-evaluate": 0.0,
    }
    run_dir = run_federation(run_config, num_sites=2, output=io.StringIO(), timeout_s=600)
    final = load_checkpoint(run_dir / "final.pt")
    assert all(torch.isfinite(v).all() for v in final.state_dict.values() if v.is_floating_point())
    assert read_history(run_dir)[-1]["round"] == 1
