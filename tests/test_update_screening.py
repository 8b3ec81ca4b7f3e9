"""Bad updates are rejected before aggregation and logged with the sender's node ID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from server.strategy import build_strategy


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


GLOBAL = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(4, np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray], n: int = 2) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content=content, reply_to=request)


def _strategy(tmp_path: Path):  # noqa: ANN202
    strategy = build_strategy({"strategy": "fedavg", "max-update-norm-ratio": 5.0}, save_checkpoint=lambda *a: None,
                              out_dir=tmp_path, num_rounds=1, base_lr=1e-3)
    strategy._arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})  # what configure_train would have sent
    strategy._current = {"round": 1}
    return strategy


def _update(scale: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 4), scale, np.float32), "b": np.full(4, scale, np.float32)}


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"w": np.full((4, 4), np.nan, np.float32), "b": np.zeros(4, np.float32)}, "NaN or Inf"),
        ({"w": np.full((4, 4), np.inf, np.float32), "b": np.zeros(4, np.float32)}, "NaN or Inf"),
        ({"w": np.zeros((5, 4), np.float32), "b": np.zeros(4, np.float32)}, "has shape"),
        ({"w": np.zeros((4, 4), np.float32)}, "array names differ"),
        (_update(100.0), "update norm"),
    ],
)
def test_bad_update_is_rejected_and_logged(tmp_path: Path, bad: dict, reason: str) -> None:
    strategy = _strategy(tmp_path)
    replies = [_reply(11, _update(0.1)), _reply(12, _update(0.2)), _reply(13, _update(0.15)), _reply(99, bad)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    rejected = strategy._current["rejected"]
    assert [r["node-id"] for r in rejected] == [99] and reason in rejected[0]["reason"]
    aggregated = [a.numpy() for a in arrays.values()]
    assert all(np.isfinite(a).all() for a in aggregated)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 0.15), rtol=1e-5)
    strategy.aggregate_evaluate(1, [])
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["rejected"][0]["node-id"] == 99 and audit[-1]["replied"] == [11, 12, 13]


def test_honest_updates_pass(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _update(0.1)), _reply(2, _update(0.3))])
    assert strategy._current["rejected"] == []
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(4, 0.2), rtol=1e-5)


def test_server_optimiser_leaves_normalisation_statistics_to_averaging(tmp_path: Path) -> None:
    """FedAdam steps the weights, but BatchNorm running statistics get their weighted average."""
    strategy = build_strategy({"strategy": "fedadam", "server-lr": 0.01}, save_checkpoint=lambda *a: None,
                              out_dir=tmp_path, num_rounds=1, base_lr=1e-3)
    start = {"conv.weight": np.zeros(3, np.float32), "bn.running_var": np.ones(3, np.float32)}
    sent = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy._arrays = sent
    strategy._current = {"round": 1}
    strategy.current_arrays = {k: v.copy() for k, v in start.items()}  # what FedAdam.configure_train records
    replies = [_reply(1, {"conv.weight": np.full(3, 1.0, np.float32), "bn.running_var": np.full(3, 40.0, np.float32)}, n=1),
               _reply(2, {"conv.weight": np.full(3, 1.0, np.float32), "bn.running_var": np.full(3, 80.0, np.float32)}, n=3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), np.full(3, 70.0))  # (40*1 + 80*3) / 4
    assert float(arrays["conv.weight"].numpy()[0]) < 0.5, "weights still take FedAdam's bounded server step"


def test_float16_updates_are_aggregated_in_float32(tmp_path: Path) -> None:
    """``transport-dtype = "float16"``: sites upload half the bytes, the server averages in float32."""
    strategy = _strategy(tmp_path)
    half = {k: v.astype(np.float16) for k, v in _update(0.1).items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, half), _reply(2, _update(0.3))])
    assert arrays["w"].dtype == "float32"
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 0.2), rtol=1e-3)
    overflow = {k: np.full(v.shape, np.inf, np.float16) for k, v in GLOBAL.items()}  # what 7e4 becomes in float16
    strategy.aggregate_train(1, [_reply(1, _update(0.1)), _reply(2, _update(0.3)), _reply(3, overflow)])
    assert [r["node-id"] for r in strategy._current["rejected"]] == [3]
