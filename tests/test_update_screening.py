"""Bad updates are rejected before aggregation and logged with the sender's node ID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_federation import FakeGrid, record, reply, task_identity, train_round  # noqa: F401 - fixture

from server.strategy import build_strategy

GLOBAL = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(4, np.float32)}


def _update(scale: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 4), scale, np.float32), "b": np.full(4, scale, np.float32)}


def _stack(tmp_path: Path, **config: object):  # noqa: ANN202
    return build_strategy({"strategy": "fedavg", "max-update-norm-ratio": 5.0, "min-available-nodes": 2,
                           "min-train-nodes": 2, **config}, save_checkpoint=lambda *a: None, out_dir=tmp_path)


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "bad, cases, reason",
    [
        ({"w": np.full((4, 4), np.nan, np.float32), "b": np.zeros(4, np.float32)}, 2, "NaN or Inf"),
        ({"w": np.full((4, 4), np.inf, np.float32), "b": np.zeros(4, np.float32)}, 2, "NaN or Inf"),
        ({"w": np.zeros((5, 4), np.float32), "b": np.zeros(4, np.float32)}, 2, "has shape"),
        ({"w": np.zeros((4, 4), np.float32)}, 2, "array names differ"),
        (_update(100.0), 2, "update norm"),
        # num-examples weights the average: a site claiming a million cases would outvote everyone.
        (_update(0.1), 1_000_000, "not a whole number of cases in [1, 100000]"),
        (_update(0.1), 0, "not a whole number of cases"),
        (_update(0.1), -3, "not a whole number of cases"),
        (_update(0.1), 2.5, "not a whole number of cases"),
        (_update(0.1), float("nan"), "not a whole number of cases"),
        (_update(0.1), float("inf"), "not a whole number of cases"),
    ],
)
def test_bad_update_is_rejected_and_logged(tmp_path: Path, bad: dict, cases: float, reason: str) -> None:
    stack = _stack(tmp_path)
    good = {11: _update(0.1), 12: _update(0.2), 13: _update(0.15)}
    arrays, _ = train_round(stack, FakeGrid([11, 12, 13, 99]), 1, record(GLOBAL), lambda m: (
        reply(m, good[m.metadata.dst_node_id]) if m.metadata.dst_node_id in good else reply(m, bad, cases=cases)))
    entry = _audit(tmp_path)[-1]
    assert [r["node-id"] for r in entry["rejected"]] == [99] and reason in entry["rejected"][0]["reason"]
    assert sorted(entry["replied"]) == [11, 12, 13]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 0.15), rtol=1e-5)


def test_reply_without_one_metric_record_is_rejected(tmp_path: Path) -> None:
    stack = _stack(tmp_path)

    def answer(message):  # noqa: ANN001, ANN202
        out = reply(message, _update(0.1))
        if message.metadata.dst_node_id == 3:
            out.content["extra"] = out.content["metrics"]
        return out

    train_round(stack, FakeGrid([1, 2, 3]), 1, record(GLOBAL), answer)
    assert _audit(tmp_path)[-1]["rejected"] == [
        {"node-id": 3, "reason": "expected one ArrayRecord and one MetricRecord, got 1 and 2"}]


def test_honest_updates_pass(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    updates = {1: _update(0.1), 2: _update(0.3)}
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 1, record(GLOBAL), lambda m: reply(m, updates[m.metadata.dst_node_id]))
    assert _audit(tmp_path)[-1]["rejected"] == []
    np.testing.assert_allclose(arrays["b"].numpy(), np.full(4, 0.2), rtol=1e-5)
    norms = {r["node-id"]: r["update-norm"] for r in stack.history[-1]["replies"]}
    assert norms == pytest.approx({1: 0.1 * np.sqrt(20), 2: 0.3 * np.sqrt(20)}, rel=1e-5)


def test_server_optimiser_leaves_normalisation_statistics_to_averaging(tmp_path: Path) -> None:
    """FedAdam steps the weights, but BatchNorm running statistics get their weighted average."""
    stack = _stack(tmp_path, strategy="fedadam", **{"server-lr": 0.01})
    start = {"conv.weight": np.zeros(3, np.float32), "bn.running_var": np.ones(3, np.float32)}
    sent = {1: ({"conv.weight": np.full(3, 1.0, np.float32), "bn.running_var": np.full(3, 40.0, np.float32)}, 1),
            2: ({"conv.weight": np.full(3, 1.0, np.float32), "bn.running_var": np.full(3, 80.0, np.float32)}, 3)}
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 1, record(start),
                            lambda m: reply(m, sent[m.metadata.dst_node_id][0], cases=sent[m.metadata.dst_node_id][1]))
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), np.full(3, 70.0))  # (40*1 + 80*3) / 4
    assert float(arrays["conv.weight"].numpy()[0]) < 0.5, "weights still take FedAdam's bounded server step"
    assert {a.numpy().dtype for a in arrays.values()} == {np.dtype(np.float32)}, "FedAdam's float64 is cast back"


def test_float16_updates_are_deltas_added_to_the_float32_model(tmp_path: Path) -> None:
    """``transport-dtype = "float16"``: sites upload their change in float16; the server adds it to what it sent."""
    stack = _stack(tmp_path)
    start = {k: v + 1.0 for k, v in GLOBAL.items()}
    uploads = {1: {k: np.full(v.shape, 0.1, np.float16) for k, v in GLOBAL.items()}, 2: {k: v + 0.3 for k, v in start.items()}}
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 1, record(start), lambda m: reply(m, uploads[m.metadata.dst_node_id]))
    assert arrays["w"].dtype == "float32"
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 1.2), rtol=1e-4)  # (1.1 + 1.3) / 2
    overflow = {k: np.full(v.shape, np.inf, np.float16) for k, v in GLOBAL.items()}  # what 7e4 becomes in float16
    uploads[3] = overflow
    train_round(stack, FakeGrid([1, 2, 3]), 2, record(start), lambda m: reply(m, uploads[m.metadata.dst_node_id]))
    assert [r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]] == [3]
