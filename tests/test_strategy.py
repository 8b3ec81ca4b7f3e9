from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import MetricRecord, RecordDict

from common.engine import learning_rate
from server.strategy import STRATEGIES, aggregate_metrics, build_strategy, format_table


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_from_run_config(name: str, tmp_path: Path) -> None:
    strategy = build_strategy({"strategy": name, "min-available-nodes": 3}, save_checkpoint=lambda *a: None,
                              out_dir=tmp_path, num_rounds=2, base_lr=1e-3)
    assert isinstance(strategy, STRATEGIES[name][0])
    assert strategy.min_available_nodes == 3


def test_unknown_strategy_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_strategy({"strategy": "fedfoo"}, save_checkpoint=lambda *a: None, out_dir=tmp_path, num_rounds=1, base_lr=1e-3)


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
