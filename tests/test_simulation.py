"""A real 2-round federation through ``flwr run`` on Flower's simulation engine."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import torch

from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.data import split_train_val
from fedlesion.common.model import build_model
from fedlesion.simulations.launch import read_history, run_federation
from fedlesion.simulations.synthetic import site_case_counts


def test_two_round_federation_on_tiny_synthetic_sites(tmp_path: Path) -> None:
    run_config = {
        "num-server-rounds": 2, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
        "synth-cases-per-site": 3, "samples-per-case": 4, "local-steps": 4, "batch-size": 4, "seed": 0,
        "output-dir": str(tmp_path / "out"), "run-name": "tiny", "min-available-nodes": 3,
    }
    log = io.StringIO()
    workdir = tmp_path / "work"
    run_dir = run_federation(run_config, num_sites=3, workdir=workdir, output=log, timeout_s=600)

    history = read_history(run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4
    # Each site's own scores, under its name, and the worst site (per-site evaluation).
    last = history[-1]
    assert sorted(s["site"] for s in last["evaluate-sites"]) == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert last["evaluate-worst"]["dice-wt"] == min(s["metrics"]["dice-wt"] for s in last["evaluate-sites"])
    # FedAvg weighted each site's update by its number of training cases.
    expected = sorted(len(split_train_val([str(i) for i in range(n)], 0.25, 0)[0]) for n in site_case_counts(3, 3))
    for record in history[1:]:
        assert sorted(int(r["metrics"]["num-examples"]) for r in record["replies"]) == expected == [1, 2, 3]
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
    """Client-side clipping at each site, float16 upload, server-side noise, through ``flwr run``: every site's
    update arrives clipped, the round aggregates, and the global model moves by about the noise (the noise
    itself is measured in tests/test_privacy.py)."""
    run_config = {
        "num-server-rounds": 1, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
        "synth-cases-per-site": 2, "samples-per-case": 2, "local-steps": 4, "batch-size": 4, "output-dir": str(tmp_path / "out"),
        "run-name": "dp", "dp": "client-fixed", "dp-noise-multiplier": 0.1, "dp-clipping-norm": 0.05,
        "transport-dtype": "float16", "evaluate-initial": False, "fraction-evaluate": 0.0,
    }
    run_dir = run_federation(run_config, num_sites=2, output=io.StringIO(), timeout_s=600)
    record = read_history(run_dir)[-1]
    assert record["round"] == 1 and "failed" not in record
    assert len(record["replies"]) == 2 and all("error" not in r for r in record["replies"]), record["replies"]
    assert all(r["metrics"]["norm_bit"] == 1 and r["update-norm"] <= 0.05 * 1.002 for r in record["replies"]), record["replies"]
    torch.manual_seed(0)  # the ServerApp's initial model
    initial = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    final = load_checkpoint(run_dir / "final.pt").state_dict
    params = [k for k, _ in initial.named_parameters()]
    moved = torch.cat([(final[k] - initial.state_dict()[k]).flatten() for k in params])
    # The mean of two updates of norm 0.05 moves the parameters by at most 0.05; noise of std
    # 0.1 * 0.05 / 2 on each of them moves them by about 0.0025 * sqrt(count).
    assert abs(moved.std().item() - 0.1 * 0.05 / 2) < 0.2 * 0.1 * 0.05 / 2, moved.std().item()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_fedavg_global_model_is_the_case_weighted_mean_of_site_updates(tmp_path: Path) -> None:
    """One round through ``flwr run``; the sites' updates are recomputed in-process with the same
    ClientApp, and the global model must be their case-weighted mean (weights 1, 2, 3), not the plain mean."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlesion.client import app as client_app
    from fedlesion.common.config import declared_run_config

    overrides = {
        "num-server-rounds": 1, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
        "synth-cases-per-site": 3, "samples-per-case": 4, "local-steps": 4, "batch-size": 4, "seed": 0, "min-available-nodes": 3,
        "output-dir": str(tmp_path / "out"), "run-name": "weights", "evaluate-initial": False, "fraction-evaluate": 0.0,
    }
    run_dir = run_federation(overrides, num_sites=3, output=io.StringIO(), timeout_s=600)
    record = read_history(run_dir)[-1]
    final = load_checkpoint(run_dir / "final.pt").state_dict

    torch.manual_seed(0)  # the ServerApp's initial model
    initial = build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()
    run_config = {**declared_run_config(), **overrides}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    updates, weights = [], []
    for pid in range(3):
        content = RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord(
            {"server-round": 1, "learning-rate": record["learning-rate"]})})
        msg = Message(content=content, dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3},
                          state=RecordDict(), run_config=run_config)
        reply = client_app.train(msg, context)
        updates.append(reply.content["arrays"].to_torch_state_dict())
        weights.append(float(reply.content["metrics"]["num-examples"]))
    assert sorted(weights) == [1.0, 2.0, 3.0]
    keys = [k for k, v in final.items() if v.is_floating_point()]

    def mean(w: list[float]) -> dict[str, torch.Tensor]:
        return {k: sum(wi * u[k].double() for wi, u in zip(w, updates)) / sum(w) for k in keys}

    def distance(a: dict[str, torch.Tensor]) -> float:
        return sum(float((final[k].double() - a[k]).pow(2).sum()) for k in keys) ** 0.5

    weighted, plain = mean(weights), mean([1.0, 1.0, 1.0])
    gap = sum(float((weighted[k] - plain[k]).pow(2).sum()) for k in keys) ** 0.5
    assert gap > 0, (record, weights)
    assert distance(weighted) < 0.05 * gap, (distance(weighted), gap)
    assert distance(plain) > 0.5 * gap


def test_a_run_in_which_no_round_aggregated_is_a_failure(tmp_path: Path) -> None:
    """Every site fails every round (no readable scan): the run ends with an error naming why, and no final.pt."""
    import pytest

    from tests.conftest import write_case

    data = tmp_path / "data"
    for site in range(2):
        case = write_case(data / f"site-{site}", f"Case_{site}", shape=(24, 24, 12))
        (case / f"Case_{site}_flair.nii.gz").write_bytes(b"not a scan")
    log = io.StringIO()
    run_config = {"num-server-rounds": 2, "max-failed-rounds": 5, "data-root": str(data), "split": "folders",
                  "model-args": "base_channels=4 depth=2", "output-dir": str(tmp_path / "out"), "run-name": "none"}
    with pytest.raises(RuntimeError, match="no final checkpoint"):
        run_federation(run_config, num_sites=2, workdir=tmp_path / "work", output=log, timeout_s=600)
    assert "no round aggregated an update" in log.getvalue()
    assert not (tmp_path / "out" / "none" / "final.pt").exists()
    audit = (tmp_path / "out" / "none" / "audit.jsonl").read_text()
    assert "no round aggregated an update" in audit
