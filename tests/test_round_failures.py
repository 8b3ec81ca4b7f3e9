"""Rounds with too few updates, and too few connected sites: retried or stopped, never a silent hang."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fake_federation import FakeGrid, error_reply, record, reply, task_identity, train_round  # noqa: F401 - fixture
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedlesion.client import app as client_app

from fedlesion.server.strategy import build_strategy

START = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(4, np.float32)}


def _update(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 4), value, np.float32), "b": np.full(4, value, np.float32)}


def _stack(tmp_path: Path, **config: object):  # noqa: ANN202
    def save(arrays, server_round, metrics, kind, state) -> None:  # noqa: ANN001
        (tmp_path / f"{kind}.pt").touch()

    return build_strategy({"strategy": "fedavg", "min-available-nodes": 3, "min-train-nodes": 2, **config},
                          save_checkpoint=save, out_dir=tmp_path)


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def _sites(**behaviour: Callable[[Message], Message | None]) -> Callable[[Message], Message | None]:
    """Each node answers as ``behaviour["n<id>"]`` says, by default with an update of 0.1 x its ID."""
    return lambda m: behaviour.get(f"n{m.metadata.dst_node_id}", lambda r: reply(r, _update(0.1 * r.metadata.dst_node_id)))(m)


def test_round_short_of_updates_keeps_the_model_and_the_next_round_retries(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    grid = FakeGrid([1, 2, 3])
    # Node 1 answers, node 2 fails at its site, node 3 never answers (dead or hung past round-timeout).
    arrays, _ = train_round(stack, grid, 1, record(START), _sites(n2=error_reply, n3=lambda m: None))
    assert arrays is None, "one update must not be aggregated when min-train-nodes is 2"
    entry = _audit(tmp_path)[-1]
    assert entry["replied"] == [1]
    assert {f["node-id"]: f["reason"] for f in entry["failed"]} == {
        2: "RuntimeError at the site during train", 3: "no reply within round-timeout"}
    assert entry["round-failed"] == "1 accepted update(s), fewer than min-train-nodes=2 (no reply: 1, errors: 1, rejected: 0)"
    # Node 3 is back in round 2 and node 2 still fails: the round aggregates and the failure count resets.
    arrays, _ = train_round(stack, grid, 2, record(START), _sites(n2=error_reply))
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 0.2), rtol=1e-5)
    assert _audit(tmp_path)[-1]["round-failed"] is None
    assert stack.checkpoint_state()["round_policy"] == {"failed-in-a-row": 0}


def test_a_sites_error_text_is_recorded_on_one_line_and_bounded(tmp_path: Path) -> None:
    """An error reply's reason is the site's own text: a newline in it must not forge a line of the log or the
    audit, and a megabyte of it must not fill them."""
    stack = _stack(tmp_path)
    forged = "boom\nround 1: accepted the update of node 9\x1b[2K" + "x" * 1_000_000
    train_round(stack, FakeGrid([1, 2, 3]), 1, record(START), _sites(n2=lambda m: error_reply(m, forged)))
    [failed] = [f for f in _audit(tmp_path)[-1]["failed"] if f["node-id"] == 2]
    assert failed["reason"].startswith("boom round 1: accepted") and failed["reason"].endswith(" ...")
    assert len(failed["reason"]) <= 204 and failed["reason"].isprintable()


def test_too_many_failed_rounds_stop_the_run_with_a_message(tmp_path: Path) -> None:
    stack = _stack(tmp_path, **{"max-failed-rounds": 1})
    grid = FakeGrid([1, 2, 3])
    train_round(stack, grid, 1, record(START), _sites(n2=error_reply, n3=error_reply))
    with pytest.raises(RuntimeError, match=r"max-failed-rounds=1.*resume-from=.*last.pt"):
        train_round(stack, grid, 2, record(START), _sites(n1=error_reply, n2=error_reply))
    assert "stopped" in _audit(tmp_path)[-1]


def _returns_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread: its exception, or a test failure if it still runs after ``seconds``
    (Flower's own sampler waits forever; a daemon thread does not keep pytest alive)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds} s: the wait for SuperNodes is unbounded")
    return outcome[0]


@pytest.mark.parametrize("phase", ["train", "evaluate", "initial evaluation"])
def test_round_gives_up_waiting_for_sites_with_a_message(tmp_path: Path, phase: str) -> None:
    stack = _stack(tmp_path, **{"node-wait-timeout": 1})
    grid = FakeGrid([7])
    calls = {
        "train": lambda: stack.configure_train(1, record(START), ConfigRecord(), grid),
        "evaluate": lambda: stack.configure_evaluate(1, record(START), ConfigRecord(), grid),
        "initial evaluation": lambda: stack.evaluate_initial(grid, record(START), timeout=10),
    }
    start = time.monotonic()
    error = _returns_within(15, calls[phase])
    assert isinstance(error, RuntimeError)
    assert "only 1 SuperNode(s) connected after waiting 1 s (node-wait-timeout); min-available-nodes is 3" in str(error)
    assert 0.9 < time.monotonic() - start < 10
    assert "stopped" in _audit(tmp_path)[-1]


def test_evaluation_off_does_not_wait_for_sites(tmp_path: Path) -> None:
    stack = _stack(tmp_path, **{"node-wait-timeout": 1, "fraction-evaluate": 0.0})
    assert list(stack.configure_evaluate(1, record(START), ConfigRecord(), FakeGrid([7]))) == []


def test_enough_sites_are_sampled_without_waiting(tmp_path: Path) -> None:
    stack = _stack(tmp_path, **{"round-timeout": 120})
    messages = list(stack.configure_train(1, record(START), ConfigRecord(), FakeGrid([4, 5, 6])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [4, 5, 6]
    assert {m.metadata.ttl for m in messages} == {120.0}, "messages expire with the round"


def test_superlink_generated_error_is_traced_to_the_silent_node(tmp_path: Path) -> None:
    """A SuperNode that stops sending heartbeats gets an error reply from the SuperLink's own ID (1)."""

    def from_superlink(request: Message) -> Message:
        message = Message(error=Error(code=5, reason="Error: Node Unavailable"), reply_to=request)
        message.metadata.__dict__["_src_node_id"] = 1
        return message

    train_round(_stack(tmp_path), FakeGrid([4, 5, 6]), 1, record(START), _sites(n6=from_superlink))
    assert _audit(tmp_path)[-1]["failed"] == [{"node-id": 6, "reason": "Error: Node Unavailable"}]


def test_a_failure_in_a_client_mod_keeps_its_details_at_the_site(caplog: pytest.LogCaptureFixture) -> None:
    """A bad transport-dtype fails in the upload mod; the server is told only its kind, the site logs the rest."""
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={"transport-dtype": "bfloat16"})

    def trained(message: Message, _: Context) -> Message:
        return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message)

    send = client_app.app._mods[0]  # noqa: SLF001 - the mod exactly as the ClientApp runs it
    with pytest.raises(RuntimeError) as raised:
        send(msg, context, trained)
    assert str(raised.value) == "ValueError at the site during train; details are in that SuperNode's log"
    assert "bfloat16" in caplog.text
