"""Differential privacy: inside screening and the round policy, calibrated to the mechanism that runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_federation import FakeGrid, error_reply, record, reply, task_identity, train_round  # noqa: F401 - fixture
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedlesion.client import app as client_app
from fedlesion.common.privacy import clip_update, update_norm
from fedlesion.server.strategy import DifferentialPrivacy, build_strategy

SIZE = 20_000  # parameters: enough to measure the noise's standard deviation to about 1%
START = {"conv.weight": np.zeros(SIZE, np.float32), "bn.running_var": np.ones(8, np.float32),
         "bn.num_batches_tracked": np.array(10, np.int64)}


def _site_model(node: int) -> dict[str, np.ndarray]:
    """Node ``n`` moves the weights by an update of norm ``5n`` (far above the clipping norm) in its own direction."""
    direction = np.random.default_rng(node).normal(size=SIZE)
    return {"conv.weight": (5.0 * node * direction / np.linalg.norm(direction)).astype(np.float32),
            "bn.running_var": np.full(8, 10.0 * node, np.float32), "bn.num_batches_tracked": np.array(14, np.int64)}


def _stack(tmp_path: Path, **config: object):  # noqa: ANN202
    return build_strategy({"strategy": "fedavg", "dp": "server-fixed", "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5,
                           "min-available-nodes": 2, "min-train-nodes": 2, "max-update-norm-ratio": 0.0, **config},
                          save_checkpoint=lambda *a: None, out_dir=tmp_path)


def _audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_noise_is_calibrated_to_the_sampled_sites_with_equal_weights_on_parameters_only(tmp_path: Path) -> None:
    """Four sites sampled (min-available-nodes is 2): noise std z C / 4 around the equally weighted mean of
    the clipped updates, whatever each site's case count; BatchNorm statistics averaged without noise."""
    cases = {1: 1, 2: 9, 3: 1, 4: 9}
    arrays, _ = train_round(_stack(tmp_path), FakeGrid([1, 2, 3, 4]), 1, record(START),
                            lambda m: reply(m, _site_model(m.metadata.dst_node_id), cases=cases[m.metadata.dst_node_id]))
    assert sorted(_audit(tmp_path)[-1]["replied"]) == [1, 2, 3, 4]
    clipped = [clip_update(_site_model(n), START, 1.0)[0] for n in cases]
    assert all(update_norm(c, START) == pytest.approx(1.0, rel=1e-5) for c in clipped)
    noise_free = np.mean([c["conv.weight"] for c in clipped], axis=0)
    noise = arrays["conv.weight"].numpy() - noise_free
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(0.5 * 1.0 / 4, rel=0.05)
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), np.full(8, 25.0))  # (10 + 20 + 30 + 40) / 4, no noise
    assert arrays["bn.num_batches_tracked"].numpy() == 14 and arrays["bn.num_batches_tracked"].dtype == "int64"


def test_a_site_that_drops_out_shrinks_the_step_not_the_noise(tmp_path: Path) -> None:
    """The sum of the updates that arrived is divided by the number sampled, as the noise is."""
    stack = _stack(tmp_path, **{"dp-noise-multiplier": 0.0})
    arrays, _ = train_round(stack, FakeGrid([1, 2, 3, 4]), 1, record(START),
                            lambda m: None if m.metadata.dst_node_id == 4 else reply(m, _site_model(m.metadata.dst_node_id)))
    clipped = [clip_update(_site_model(n), START, 1.0)[0]["conv.weight"] for n in (1, 2, 3)]
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), sum(clipped) / 4, atol=1e-6)


def test_error_reply_is_a_failure_the_round_policy_counts(tmp_path: Path) -> None:
    """One error reply no longer drops the round; a round short of updates counts towards max-failed-rounds."""
    stack = _stack(tmp_path, **{"max-failed-rounds": 0})
    grid = FakeGrid([1, 2, 3])
    arrays, _ = train_round(stack, grid, 1, record(START),
                            lambda m: error_reply(m) if m.metadata.dst_node_id == 3 else reply(m, _site_model(m.metadata.dst_node_id)))
    assert arrays is not None, "two accepted updates meet min-train-nodes=2"
    with pytest.raises(RuntimeError, match="max-failed-rounds=0"):
        train_round(stack, grid, 2, record(START),
                    lambda m: reply(m, _site_model(1)) if m.metadata.dst_node_id == 1 else error_reply(m))


def test_wrong_shape_update_is_rejected_before_clipping(tmp_path: Path) -> None:
    def answer(message: Message) -> Message:
        node = message.metadata.dst_node_id
        return reply(message, {**_site_model(node), "conv.weight": np.zeros(SIZE + 1, np.float32)} if node == 3 else _site_model(node))

    arrays, _ = train_round(_stack(tmp_path), FakeGrid([1, 2, 3]), 1, record(START), answer)
    assert arrays is not None
    assert [r["node-id"] for r in _audit(tmp_path)[-1]["rejected"]] == [3]


def test_client_side_mode_sends_the_norm_and_the_server_still_bounds_each_update(tmp_path: Path) -> None:
    stack = _stack(tmp_path, **{"dp": "client-fixed", "dp-noise-multiplier": 0.0})
    grid = FakeGrid([1, 2])
    messages = grid.push(list(stack.configure_train(1, record(START), ConfigRecord(), grid)))
    assert all(m.content["config"][KEY_CLIPPING_NORM] == 1.0 for m in messages)
    arrays, _ = stack.aggregate_train(1, [reply(m, _site_model(1)) for m in messages])  # a site that did not clip
    assert update_norm({"conv.weight": arrays["conv.weight"].numpy()}, {"conv.weight": START["conv.weight"]}) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("start", [0.1, 1e6])
def test_adaptive_clipping_moves_the_norm_towards_the_updates(tmp_path: Path, start: float) -> None:
    """Andrew et al. 2019: a norm every update exceeds grows, one no update reaches shrinks, each round by
    exp(0.2 * (clipped share - 0.5)); over rounds it settles between the sites' update norms."""
    norms = sorted(update_norm(_site_model(n), START) for n in (1, 2))
    stack = _stack(tmp_path, **{"dp": "server-adaptive", "dp-initial-clipping-norm": start, "dp-noise-multiplier": 0.0})
    train_round(stack, FakeGrid([1, 2]), 1, record(START), lambda m: reply(m, _site_model(m.metadata.dst_node_id)))
    clipped = 1.0 if start < norms[0] else 0.0
    assert start < norms[0] or start > norms[1]
    assert stack.checkpoint_state()["privacy"]["clipping-norm"] == pytest.approx(start * np.exp(0.2 * (clipped - 0.5)))
    for server_round in range(2, 200):
        train_round(stack, FakeGrid([1, 2]), server_round, record(START), lambda m: reply(m, _site_model(m.metadata.dst_node_id)))
    assert norms[0] * np.exp(-0.1) <= stack.checkpoint_state()["privacy"]["clipping-norm"] <= norms[1] * np.exp(0.1)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "krum"}, "needs a strategy that averages the updates"),
        ({"dp": "local"}, r"'dp' = 'local' is not one of \['none', 'server-fixed'"),
        ({"dp-clipping-norm": 0.0}, r"'dp-clipping-norm' = 0.0 is out of range: it must be > 0"),
        ({"dp": "server-adaptive", "dp-noise-multiplier": 0.3}, "must be below 0.2"),
    ],
)
def test_invalid_privacy_settings_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _stack(tmp_path, **config)


def test_privacy_sits_inside_screening_and_the_round_policy(tmp_path: Path) -> None:
    names = [type(layer).__name__ for layer in _stack(tmp_path).layers()]
    assert names == ["RunRecorder", "UpdateScreening", "RoundPolicy", "DifferentialPrivacy", "Aggregation", "FedAvg"]
    assert isinstance(list(_stack(tmp_path).layers())[3], DifferentialPrivacy)


def test_site_clips_parameters_only_when_the_server_sends_a_norm() -> None:
    """FedLesion's client mod: the parameters' update is scaled to the norm; statistics and counters are not touched."""
    sent = {"conv.weight": np.zeros(4, np.float32), "bn.running_var": np.ones(2, np.float32),
            "bn.num_batches_tracked": np.array(3, np.int64)}
    trained = {"conv.weight": np.full(4, 3.0, np.float32), "bn.running_var": np.full(2, 9.0, np.float32),
               "bn.num_batches_tracked": np.array(5, np.int64)}
    msg = Message(content=RecordDict({"arrays": record(sent), "config": ConfigRecord({KEY_CLIPPING_NORM: 2.0})}),
                  dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                      run_config={"dp": "client-fixed", "dp-clipping-norm": 2.0})

    def trained_reply(message: Message, _: Context) -> Message:
        return Message(content=RecordDict({"arrays": record(trained), "metrics": MetricRecord({"num-examples": 2})}),
                       reply_to=message)

    out = client_app.clip_when_asked(msg, context, trained_reply)
    arrays = {k: a.numpy() for k, a in out.content["arrays"].items()}
    np.testing.assert_allclose(arrays["conv.weight"], np.full(4, 1.0))  # norm 6 scaled to 2
    np.testing.assert_array_equal(arrays["bn.running_var"], trained["bn.running_var"])
    assert arrays["bn.num_batches_tracked"] == 5
    assert out.content["metrics"][KEY_NORM_BIT] == 1


@pytest.mark.parametrize("third", [0.1, 100.0])
def test_one_site_does_not_decide_whether_another_is_admitted(tmp_path: Path, third: float) -> None:
    """The norm-ratio screen compares with the round's median, which every site moves: under DP it is off, so
    site 2 (norm 10) is admitted whether site 3's norm is 0.1 (median 1) or 100 (median 10)."""
    stack = _stack(tmp_path, **{"max-update-norm-ratio": 5.0, "dp-noise-multiplier": 0.0})
    norms = {1: 1.0, 2: 10.0, 3: third}
    direction = np.ones(SIZE, np.float32) / np.sqrt(SIZE)
    train_round(stack, FakeGrid([1, 2, 3]), 1, record(START), lambda m: reply(
        m, {**START, "conv.weight": (norms[m.metadata.dst_node_id] * direction).astype(np.float32)}))
    entry = _audit(tmp_path)[-1]
    assert sorted(entry["replied"]) == [1, 2, 3] and entry["rejected"] == []


def test_server_adaptive_ignores_the_norm_bit_a_site_sends(tmp_path: Path) -> None:
    """Only client-* modes clip at the sites; under server-adaptive a site claiming it clipped must not grow C."""
    stack = _stack(tmp_path, **{"dp": "server-adaptive", "dp-initial-clipping-norm": 100.0, "dp-noise-multiplier": 0.0})
    train_round(stack, FakeGrid([1, 2]), 1, record(START),
                lambda m: reply(m, _site_model(m.metadata.dst_node_id), **{KEY_NORM_BIT: 1}))
    # No update reaches norm 100, so none was clipped: C shrinks by exp(-0.2 * 0.5), whatever the sites claim.
    assert stack.checkpoint_state()["privacy"]["clipping-norm"] == pytest.approx(100.0 * np.exp(-0.1))
