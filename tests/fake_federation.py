"""In-process stand-ins for a federation: a Grid with connected node IDs, and sites' replies.

The strategy stack runs exactly as under Flower's ``start``: ``configure_train``, the Grid
pushes (giving each message its ID), replies, ``aggregate_train``, then evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages are stamped with the running task's identity; outside a ServerApp the test provides one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    """Flower's Grid as the strategies see it: the connected SuperNodes, and message IDs on push."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)
        self.pushed = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push(self, messages: list[Message]) -> list[Message]:
        for message in messages:
            self.pushed += 1
            message.metadata.__dict__["_message_id"] = f"m{self.pushed}"
        return messages

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        self.push(list(messages))
        return []


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def reply(request: Message, arrays: dict[str, np.ndarray], cases: float = 2, **metrics: float) -> Message:
    """A site's training reply to ``request``: its arrays and metrics (``num-examples`` = ``cases``)."""
    content = RecordDict({"arrays": record(arrays),
                          "metrics": MetricRecord({"num-examples": cases, "train-loss": 0.5, **metrics})})
    return Message(content=content, reply_to=request)


def error_reply(request: Message, reason: str = "RuntimeError at the site during train") -> Message:
    return Message(error=Error(code=0, reason=reason), reply_to=request)


Answer = Callable[[Message], "Message | None"]  # a site's reply to its instruction, None for no reply


def train_round(stack, grid: FakeGrid, server_round: int, arrays: ArrayRecord,  # noqa: ANN001 - any strategy
                answer: Answer) -> tuple[ArrayRecord | None, list[Message]]:
    """One round as Flower's ``start`` runs it; returns the new global model (None: kept) and the messages sent."""
    messages = grid.push(list(stack.configure_train(server_round, arrays, ConfigRecord(), grid)))
    replies = [r for r in (answer(m) for m in messages) if r is not None]
    new, _ = stack.aggregate_train(server_round, replies)
    stack.configure_evaluate(server_round, new if new is not None else arrays, ConfigRecord(), grid)
    stack.aggregate_evaluate(server_round, [])
    return new, messages


def evaluate_reply(request: Message, cases: float = 2, **metrics: float) -> Message:
    """A site's evaluation reply to ``request``: metrics only (``num-examples`` = ``cases``)."""
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": cases, **metrics})}), reply_to=request)


def evaluate_round(stack, grid: FakeGrid, server_round: int, arrays: ArrayRecord,  # noqa: ANN001 - any strategy
                   answer: Answer) -> MetricRecord | None:
    """Evaluation as Flower's ``start`` runs it; returns the aggregated metrics."""
    messages = grid.push(list(stack.configure_evaluate(server_round, arrays, ConfigRecord(), grid)))
    return stack.aggregate_evaluate(server_round, [r for r in (answer(m) for m in messages) if r is not None])
