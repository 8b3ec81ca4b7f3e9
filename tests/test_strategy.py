from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_federation import FakeGrid, record, reply, task_identity, train_round  # noqa: F401 - fixture
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedlesion.common.engine import learning_rate
from fedlesion.server.strategy import SERVER_OPTIMIZERS, STRATEGIES, aggregate_metrics, build_strategy, format_table

START = {"conv.weight": np.zeros(6, np.float32), "bn.running_var": np.ones(3, np.float32),
         "bn.num_batches_tracked": np.array(4, np.int64)}


def _site(node: int) -> dict[str, np.ndarray]:
    return {"conv.weight": np.full(6, 0.1 * node, np.float32), "bn.running_var": np.full(3, 10.0 * node, np.float32),
            "bn.num_batches_tracked": np.array(9, np.int64)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_screens_and_averages_one_round(name: str, tmp_path: Path) -> None:
    """Every strategy, built from the run config, runs a round: the NaN update is rejected, the global model
    keeps its dtypes, and under a server optimiser BatchNorm statistics get their case-weighted average."""
    stack = build_strategy({"strategy": name, "min-available-nodes": 3, "min-train-nodes": 3},
                           save_checkpoint=lambda *a: None, out_dir=tmp_path)
    aggregator = list(stack.layers())[-1]
    assert type(aggregator) is STRATEGIES[name][0] and aggregator.min_available_nodes == 3
    cases = {1: 1, 2: 2, 3: 3}

    def answer(message):  # noqa: ANN001, ANN202
        node = message.metadata.dst_node_id
        if node == 4:
            return reply(message, {**_site(4), "conv.weight": np.full(6, np.nan, np.float32)})
        return reply(message, _site(node), cases=cases[node])

    arrays, _ = train_round(stack, FakeGrid([1, 2, 3, 4]), 1, record(START), answer)
    assert [r["node-id"] for r in stack.history[-1]["rejected"]] == [4]
    assert {k: a.numpy().dtype for k, a in arrays.items()} == {k: v.dtype for k, v in START.items()}
    assert np.isfinite(arrays["conv.weight"].numpy()).all()
    assert arrays["bn.num_batches_tracked"].numpy() == 9
    running_var = arrays["bn.running_var"].numpy()
    if isinstance(aggregator, SERVER_OPTIMIZERS):
        np.testing.assert_allclose(running_var, np.full(3, (10 * 1 + 20 * 2 + 30 * 3) / 6), rtol=1e-6)
    assert ((10.0 <= running_var) & (running_var <= 30.0)).all()


def test_unknown_strategy_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_strategy({"strategy": "fedfoo"}, save_checkpoint=lambda *a: None, out_dir=tmp_path)


def test_learning_rate_schedules() -> None:
    assert learning_rate(1e-3, "constant", 5, 10) == 1e-3
    assert learning_rate(1e-3, "cosine", 1, 10) == pytest.approx(1e-3)
    assert learning_rate(1e-3, "cosine", 10, 10) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="lr-schedule 'step'"):
        learning_rate(1e-3, "step", 1, 10)


def test_counts_are_summed_and_scores_weighted() -> None:
    records = [RecordDict({"metrics": MetricRecord({"num-examples": n, "dice-wt": d, "skipped-cases": s})})
               for n, d, s in ((1, 0.2, 1.0), (3, 0.6, 2.0))]
    out = aggregate_metrics(records, "num-examples")
    assert out["dice-wt"] == pytest.approx((0.2 * 1 + 0.6 * 3) / 4)
    assert out["skipped-cases"] == 3.0 and out["num-examples"] == 4.0


def test_format_table_lists_rounds() -> None:
    table = format_table([{"round": 0, "evaluate": {"dice-wt": 0.1}}, {"round": 1, "train": {"train-loss": 0.9}, "evaluate": {"dice-wt": 0.5}}])
    assert "dice-wt" in table.splitlines()[0] and "0.500" in table.splitlines()[2]


LEARN_CONFIG = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
                "val-fraction": 0.0, "samples-per-case": 4, "batch-size": 4, "local-steps": 20, "learning-rate": 0.01,
                "min-available-nodes": 3, "min-train-nodes": 3, "num-server-rounds": 4, "lr-schedule": "constant"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_learns_at_its_defaults(name: str, tiny_sites: Path, tmp_path: Path) -> None:
    """Four rounds of real local training at three tiny synthetic sites, each strategy's own parameters at
    their declared defaults: the global model's Dice on held-out synthetic cases rises."""
    import torch
    from flwr.app import Context

    from fedlesion.client import app as client_app
    from fedlesion.common.data import load_site, resolve_spec
    from fedlesion.common.engine import evaluate
    from fedlesion.common.model import build_model
    from fedlesion.simulations.synthetic import synthesize

    held_out = tmp_path / "held-out"
    synthesize(held_out, sites=1, cases_per_site=2, shape=(32, 32, 16), seed=7)
    spec = resolve_spec(held_out / "site-0")
    cases = load_site(held_out / "site-0", spec).cases
    config = {**LEARN_CONFIG, "strategy": name}
    contexts = {node: Context(run_id=1, node_id=node, node_config={"data-path": str(tiny_sites / f"site-{node - 1}")},
                              state=RecordDict(), run_config=config) for node in (1, 2, 3)}

    def dice(arrays) -> float:  # noqa: ANN001
        model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
        model.load_state_dict(arrays.to_torch_state_dict())
        _, summary = evaluate(model, cases, spec, 2, torch.device("cpu"))
        return float(np.mean([block["dice_mean"] for block in summary.values()]))

    def answer(message):  # noqa: ANN001, ANN202
        return client_app.train(message, contexts[message.metadata.dst_node_id])

    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict())
    before = dice(arrays)
    stack = build_strategy(config, save_checkpoint=lambda *a: None, out_dir=tmp_path)
    grid = FakeGrid([1, 2, 3])
    for server_round in (1, 2, 3, 4):
        new, _ = train_round(stack, grid, server_round, arrays, answer)
        assert new is not None, f"round {server_round} kept the model: {stack.history[-1].get('rejected')}"
        arrays = new
    after = dice(arrays)
    print(f"{name}: mean Dice {before:.3f} -> {after:.3f}")
    assert after > before + 0.05, f"{name} did not learn: mean Dice {before:.3f} -> {after:.3f}"


def test_every_instruction_states_the_dataset_spec(tmp_path: Path) -> None:
    """Sites learn the model's channels and regions from the message, never by reading a path the run config names."""
    import json

    from fedlesion.common.data import LAYOUTS
    from fake_federation import evaluate_round

    manifest = tmp_path / "lesions.json"
    manifest.write_text(json.dumps({"name": "lesions", "channels": {"flair": "{case}_flair.nii.gz"},
                                    "label": "{case}_seg.nii.gz", "labels": [0, 1], "regions": {"lesion": [1]}}))
    for dataset in ("brats2021", str(manifest)):
        stack = build_strategy({"dataset": dataset, "min-available-nodes": 2}, save_checkpoint=lambda *a: None,
                               out_dir=tmp_path / Path(dataset).stem)
        _, sent = train_round(stack, FakeGrid([1, 2]), 1, record(START), lambda m: reply(m, _site(1)))
        evaluated: list = []
        evaluate_round(stack, FakeGrid([1, 2]), 1, record(START), lambda m: evaluated.append(m))
        for message in [*sent, *evaluated]:
            spec = json.loads(message.content["config"]["dataset-spec"])
            if dataset == "brats2021":
                assert spec == LAYOUTS["brats2021"].to_json()
            else:
                assert list(spec["channels"]) == ["flair"] and list(spec["regions"]) == ["lesion"]
        assert len(sent) == 2 and len(evaluated) == 2
