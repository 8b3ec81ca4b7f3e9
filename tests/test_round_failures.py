"""Rounds with too few updates, and too few connected sites: retried or stopped, never a silent hang."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.strategy import build_strategy


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _update(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 4), value, np.float32), "b": np.full(4, value, np.float32)}


def _reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 2, "train-loss": 0.5})})
    return Message(content=content, reply_to=request)


def _error_reply(node: int) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(error=Error(code=0, reason="RuntimeError at the site during train"), reply_to=request)


def _strategy(tmp_path: Path, **config):  # noqa: ANN202, ANN003
    strategy = build_strategy({"strategy": "fedavg", "min-available-nodes": 3, "min-train-nodes": 2, **config},
                              save_checkpoint=lambda *a: None, out_dir=tmp_path, num_rounds=5, base_lr=1e-3)
    strategy._arrays = ArrayRecord({k: Array(v) for k, v in _update(0.0).items()})
    return strategy


def _round(strategy, number: int, replies: list[Message]):  # noqa: ANN202
    strategy._current = {"round": number, "sampled": [1, 2, 3]}
    result = strategy.aggregate_train(number, replies)
    strategy.aggregate_evaluate(number, [])
    return result


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_round_short_of_updates_keeps_the_model_and_the_next_round_retries(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    # Node 1 answers, node 2 fails at its site, node 3 never answers (dead or hung past round-timeout).
    arrays, metrics = _round(strategy, 1, [_reply(1, _update(0.1)), _error_reply(2)])
    assert arrays is None and metrics is None, "one update must not be aggregated when min-train-nodes is 2"
    entry = _audit(tmp_path)[-1]
    assert entry["replied"] == [1]
    assert {f["node-id"]: f["reason"] for f in entry["failed"]} == {
        2: "RuntimeError at the site during train", 3: "no reply within round-timeout"}
    assert "1 accepted update(s), fewer than min-train-nodes=2" in entry["round-failed"]
    # Node 3 is back in round 2: the round aggregates as usual and the failure count resets.
    arrays, _ = _round(strategy, 2, [_reply(1, _update(0.1)), _reply(3, _update(0.3))])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 0.2), rtol=1e-5)
    assert strategy.failed_in_a_row == 0 and _audit(tmp_path)[-1]["round-failed"] is None


def test_too_many_failed_rounds_stop_the_run_with_a_message(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, **{"max-failed-rounds": 1})
    _round(strategy, 1, [_reply(1, _update(0.1))])
    with pytest.raises(RuntimeError, match=r"max-failed-rounds=1.*resume-from"):
        _round(strategy, 2, [_error_reply(1)])
    assert "stopped" in _audit(tmp_path)[-1]


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_round_gives_up_waiting_for_sites_with_a_message(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, **{"node-wait-timeout": 1.5})
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"only 1 SuperNode\(s\) connected .* min-available-nodes is 3"):
        strategy.configure_train(1, strategy._arrays, ConfigRecord(), _Grid([7]))
    assert 1.4 < time.monotonic() - start < 10
    assert "stopped" in _audit(tmp_path)[-1]


def test_enough_sites_are_sampled_without_waiting(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, strategy._arrays, ConfigRecord(), _Grid([4, 5, 6])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [4, 5, 6]


def test_superlink_generated_error_is_traced_to_the_silent_node(tmp_path: Path) -> None:
    """A SuperNode that stops sending heartbeats gets an error reply from the SuperLink's own ID (1)."""
    strategy = _strategy(tmp_path)
    messages = strategy.configure_train(1, strategy._arrays, ConfigRecord(), _Grid([4, 5, 6]))
    for index, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"m{index}"  # what Flower's Grid does when it pushes
    silent = next(m for m in messages if m.metadata.dst_node_id == 6)
    from_superlink = Message(error=Error(code=5, reason="Error: Node Unavailable"), reply_to=silent)
    from_superlink.metadata.__dict__["_src_node_id"] = 1
    replies = [_reply(4, _update(0.1)), _reply(5, _update(0.3)), from_superlink]
    sent = {m.metadata.dst_node_id: m.metadata.message_id for m in messages}
    for reply, node in zip(replies[:2], (4, 5)):
        reply.metadata.__dict__["_reply_to_message_id"] = sent[node]
    strategy.aggregate_train(1, replies)
    strategy.aggregate_evaluate(1, [])
    entry = _audit(tmp_path)[-1]
    assert entry["failed"] == [{"node-id": 6, "reason": "Error: Node Unavailable"}]
