"""Bad updates are rejected before aggregation and logged with the sender's node ID."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_federation import FakeGrid, evaluate_reply, evaluate_round, record, reply, task_identity, train_round  # noqa: F401

from fedlesion.server.strategy import build_strategy

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
    stack = _stack(tmp_path, **{"transport-dtype": "float16"})
    start = {k: v + 1.0 for k, v in GLOBAL.items()}
    uploads = {n: {k: np.full(v.shape, 0.1 * n, np.float16) for k, v in GLOBAL.items()} for n in (1, 3)}
    arrays, _ = train_round(stack, FakeGrid([1, 3]), 1, record(start), lambda m: reply(m, uploads[m.metadata.dst_node_id]))
    assert arrays["w"].dtype == "float32"
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((4, 4), 1.2), rtol=1e-3)  # (1.1 + 1.3) / 2
    uploads[2] = {k: np.full(v.shape, np.inf, np.float16) for k, v in GLOBAL.items()}  # what 7e4 becomes in float16
    uploads[4] = {k: v + 0.3 for k, v in start.items()}  # float32 weights, though the run sends float16 deltas
    train_round(stack, FakeGrid([1, 2, 3, 4]), 2, record(start), lambda m: reply(m, uploads[m.metadata.dst_node_id]))
    assert {r["node-id"]: r["reason"] for r in _audit(tmp_path)[-1]["rejected"]} == {
        2: "array 'w' holds NaN or Inf", 4: "array 'w' is float32, expected float16 (transport-dtype float16)"}


def test_float16_arrays_are_refused_when_the_run_sends_float32(tmp_path: Path) -> None:
    """The run's transport-dtype decides what an upload is: a float16 array is not taken for a delta under float32."""
    stack = _stack(tmp_path)
    uploads = {1: _update(0.1), 2: _update(0.2), 3: {k: np.full(v.shape, 0.1, np.float16) for k, v in GLOBAL.items()}}
    train_round(stack, FakeGrid([1, 2, 3]), 1, record(GLOBAL), lambda m: reply(m, uploads[m.metadata.dst_node_id]))
    assert _audit(tmp_path)[-1]["rejected"] == [
        {"node-id": 3, "reason": "array 'w' is float16, expected float32 (transport-dtype float32)"}]


def test_reply_with_other_metric_names_is_rejected_not_a_crash(tmp_path: Path) -> None:
    """Flower aggregates only replies with the same metric names; a different one is rejected, the round goes on."""
    stack = _stack(tmp_path)
    extra = {3: {"surprise": 1.0}}
    arrays, _ = train_round(stack, FakeGrid([1, 2, 3]), 1, record(GLOBAL),
                            lambda m: reply(m, _update(0.1), **extra.get(m.metadata.dst_node_id, {})))
    assert arrays is not None
    [rejected] = _audit(tmp_path)[-1]["rejected"]
    assert rejected["node-id"] == 3 and "metric names" in rejected["reason"]


@pytest.mark.parametrize("deviant", [1, 2])
def test_a_tie_in_metric_names_is_not_broken_by_who_answers_first(tmp_path: Path, deviant: int) -> None:
    """Two sites, two sets of metric names, no earlier round: neither is taken (whichever answered first); once a
    majority has decided the names, that decides a later tie."""
    stack = _stack(tmp_path, **{"min-train-nodes": 1})  # one accepted update makes a round
    answer = (lambda m: reply(m, _update(0.1), **({"surprise": 1.0} if m.metadata.dst_node_id == deviant else {})))
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 1, record(GLOBAL), answer)
    assert arrays is None and sorted(r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]) == [1, 2]
    assert "tie" in _audit(tmp_path)[-1]["rejected"][0]["reason"]
    train_round(stack, FakeGrid([1, 2, 3]), 2, record(GLOBAL), answer)  # two of three agree: they decide
    assert [r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]] == [deviant]
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 3, record(GLOBAL), answer)
    assert arrays is not None and [r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]] == [deviant]
    resumed = _stack(tmp_path, **{"min-train-nodes": 1})  # the decided names survive a resume
    resumed.resume(stack.checkpoint_state())
    arrays, _ = train_round(resumed, FakeGrid([1, 2]), 4, record(GLOBAL), answer)
    assert arrays is not None and [r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]] == [deviant]
    with pytest.raises(ValueError, match="'screening' state is malformed"):
        resumed.resume({"screening": {"metric-names": {"train": "num-examples"}}})


GOOD_SCORES = {"dice-wt": 0.8, "iou-wt": 0.7, "hd95-wt": 3.0}


@pytest.mark.parametrize(
    "cases, scores, reason",
    [
        (1e9, GOOD_SCORES, "not a whole number of cases in [0, 100000]"),
        (2, {**GOOD_SCORES, "dice-wt": 50.0}, "'dice-wt' is outside [0, 1]"),
        (2, {**GOOD_SCORES, "iou-wt": -0.1}, "'iou-wt' is outside [0, 1]"),
        (2, {**GOOD_SCORES, "hd95-wt": -1.0}, "'hd95-wt' is negative"),
        (2, {**GOOD_SCORES, "dice-wt": float("nan")}, "'dice-wt' is not finite"),
        (2, {**GOOD_SCORES, "dice-tc": 0.5}, "metric names"),
        (2, {"dice-wt": 0.8}, "metric names"),
        (2, {**GOOD_SCORES, "dice-wt": [0.1, 0.9]}, "'dice-wt' is not a single number"),
    ],
)
def test_bad_evaluation_is_rejected_and_audited(tmp_path: Path, cases: float, scores: dict, reason: str) -> None:
    """A site claiming a billion cases with Dice 50 once made the aggregate Dice 50 and chose best.pt."""
    stack = _stack(tmp_path)
    grid = FakeGrid([1, 2, 3, 4])
    metrics = evaluate_round(stack, grid, 1, record(GLOBAL), lambda m: (
        evaluate_reply(m, cases, **scores) if m.metadata.dst_node_id == 4 else evaluate_reply(m, 2, **GOOD_SCORES)))
    assert metrics["dice-wt"] == pytest.approx(0.8) and metrics["num-examples"] == 6
    [rejected] = _audit(tmp_path)[-1]["evaluate-rejected"]
    assert rejected["node-id"] == 4 and reason in rejected["reason"]


def test_site_metrics_cannot_overwrite_the_servers_fields(tmp_path: Path) -> None:
    """Site metrics are nested under "metrics": one named node-id or error forges no sender and no failure."""
    stack = _stack(tmp_path, **{"max-failed-rounds": 0})
    forged = {"node-id": 42.0, "error": 1.0, "update-norm": 0.0}
    arrays, _ = train_round(stack, FakeGrid([1, 2]), 1, record(GLOBAL), lambda m: reply(m, _update(0.1), **forged))
    assert arrays is not None
    entry = _audit(tmp_path)[-1]
    assert sorted(entry["replied"]) == [1, 2] and entry["failed"] == [] and entry["round-failed"] is None
    replies = stack.history[-1]["replies"]
    assert sorted(r["node-id"] for r in replies) == [1, 2] and all(r["metrics"]["node-id"] == 42.0 for r in replies)
    assert all(r["update-norm"] == pytest.approx(0.1 * np.sqrt(20)) for r in replies)


@pytest.mark.parametrize(
    "running_var, reason",
    [
        (np.full(4, 1e30, np.float32), "exceeds 1e+06 in size"),
        (np.full(4, -1.0, np.float32), "'bn.running_var' is negative"),
    ],
)
def test_bad_normalisation_statistics_are_rejected(tmp_path: Path, running_var: np.ndarray, reason: str) -> None:
    stack = _stack(tmp_path)
    start = {**GLOBAL, "bn.running_var": np.ones(4, np.float32)}
    arrays, _ = train_round(stack, FakeGrid([1, 2, 3]), 1, record(start), lambda m: reply(
        m, {**_update(0.1), "bn.running_var": running_var if m.metadata.dst_node_id == 3 else np.full(4, 2.0, np.float32)}))
    [rejected] = _audit(tmp_path)[-1]["rejected"]
    assert rejected["node-id"] == 3 and reason in rejected["reason"]
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), np.full(4, 2.0))


def test_with_held_out_cases_the_server_not_the_sites_picks_best(tmp_path: Path) -> None:
    """Sites may report any Dice in [0, 1] for as many cases as max-site-cases allows; with server-eval-data the
    server's own held-out score chooses best.pt."""
    saved: list[tuple[int, str]] = []
    server_scores = {1: 0.7, 2: 0.6}
    stack = build_strategy({"strategy": "fedavg", "min-available-nodes": 2, "min-train-nodes": 2},
                           save_checkpoint=lambda arrays, rnd, rec, kind, state: saved.append((rnd, kind)),
                           out_dir=tmp_path, server_evaluate=lambda rnd, arrays: {"dice-wt": server_scores[rnd]})
    grid = FakeGrid([1, 2])
    for rnd, site_dice in ((1, 0.5), (2, 1.0)):  # round 2: a site claims perfect Dice on 100000 cases
        train_round(stack, grid, rnd, record(GLOBAL), lambda m: reply(m, _update(0.01)))
        evaluate_round(stack, grid, rnd, record(GLOBAL), lambda m, d=site_dice: evaluate_reply(
            m, 100000 if m.metadata.dst_node_id == 2 else 2, **{**GOOD_SCORES, "dice-wt": d}))
    assert "best" not in [kind for rnd, kind in saved if rnd == 2], "round 2's sites claimed more, the server measured less"
    assert (1, "best") in saved


def test_each_sites_scores_and_the_worst_site_are_recorded(tmp_path: Path) -> None:
    """Per-site evaluation: every accepted reply's scores under its site's name, the worst site, CSV columns;
    a rejected reply is not listed and a name is reduced to safe characters."""
    import csv

    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedlesion.server.strategy import format_table

    stack = build_strategy({"strategy": "fedavg", "min-available-nodes": 2, "min-train-nodes": 2},
                           save_checkpoint=lambda *a: None, out_dir=tmp_path)
    names = {1: "hospital-a", 2: "../../etc/passwd <b>", 3: None, 4: "hospital-d"}
    scores = {1: 0.9, 2: 0.6, 3: 0.8, 4: 50.0}  # node 4's Dice is impossible: rejected, not the best nor listed

    def answer(m):  # noqa: ANN001, ANN202
        node = m.metadata.dst_node_id
        content = RecordDict({"metrics": MetricRecord({"num-examples": node, **{**GOOD_SCORES, "dice-wt": scores[node]}})})
        if names[node] is not None:
            content["site"] = ConfigRecord({"name": names[node]})
        return Message(content=content, reply_to=m)

    evaluate_round(stack, FakeGrid([1, 2, 3, 4]), 1, record(GLOBAL), answer)
    [entry] = stack.history
    assert [(s["node-id"], s["site"], s["metrics"]["dice-wt"]) for s in entry["evaluate-sites"]] == [
        (1, "hospital-a", 0.9), (2, ".._.._etc_passwd__b_", 0.6), (3, "node-3", 0.8)]
    assert entry["evaluate-worst"] == {"site": ".._.._etc_passwd__b_", "node-id": 2, "dice-wt": 0.6, "num-examples": 2}
    row = next(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert float(row["site/hospital-a@1/dice-wt"]) == 0.9 and float(row["site/node-3@3/num-examples"]) == 3
    assert row["evaluate-worst/site"] == ".._.._etc_passwd__b_"
    assert "0.600" in format_table(stack.history)


@pytest.mark.parametrize("site_record, reason", [
    ({"name": "x" * 100000}, "only 'site' with one short 'name'"),
    ({"name": "a", "path": "/data/brats"}, "only 'site' with one short 'name'"),
    ({"name": 3}, "only 'site' with one short 'name'"),
])
def test_an_evaluation_reply_carries_no_other_strings(tmp_path: Path, site_record: dict, reason: str) -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    stack = _stack(tmp_path)

    def answer(m):  # noqa: ANN001, ANN202
        content = RecordDict({"metrics": MetricRecord({"num-examples": 2, **GOOD_SCORES})})
        if m.metadata.dst_node_id == 4:
            content["site"] = ConfigRecord(site_record)
        return Message(content=content, reply_to=m)

    evaluate_round(stack, FakeGrid([1, 2, 3, 4]), 1, record(GLOBAL), answer)
    [rejected] = _audit(tmp_path)[-1]["evaluate-rejected"]
    assert rejected["node-id"] == 4 and reason in rejected["reason"]
