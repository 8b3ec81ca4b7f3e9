"""The FedLesion ServerApp: runs the configured Flower strategy over the shared model.

Outputs land in ``<output-dir>/<run-name>/``: ``metrics.jsonl``, ``metrics.csv``,
``last.pt`` (every round), ``best.pt`` (best validation Dice), ``final.pt`` and
``run_config.json``.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.checkpoint import Checkpoint, save_checkpoint
from common.config import dataset_spec, model_from
from common.model import build_model

from .strategy import build_strategy, format_table

app = ServerApp()


def run_folder(run_config: dict[str, Any]) -> Path:
    """``<output-dir>/<run-name>``, the run name defaulting to a timestamp."""
    name = str(run_config.get("run-name", "")) or time.strftime("run-%Y%m%d-%H%M%S")
    return Path(str(run_config.get("output-dir", "outputs"))).resolve() / name


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the initial model, run the strategy, and write metrics and checkpoints."""
    run_config = dict(context.run_config)
    out_dir = run_folder(run_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
    spec = dataset_spec(str(run_config.get("dataset", "brats2021")))
    model_name, model_args = model_from(run_config)
    torch.manual_seed(int(run_config.get("seed", 0)))
    model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
    num_rounds = int(run_config["num-server-rounds"])
    log(INFO, "FedLesion: %s %s on '%s' (%d channels, regions %s), %d rounds; outputs in %s",
        run_config.get("strategy", "fedavg"), model_name, spec.name, len(spec.channels),
        "/".join(spec.regions), num_rounds, out_dir)

    def save(arrays: ArrayRecord, server_round: int, metrics: dict[str, Any], kind: str) -> None:
        save_checkpoint(Checkpoint(
            model=model_name, model_args=model_args, spec=spec, state_dict=arrays.to_torch_state_dict(),
            round=server_round, metrics=metrics, run_config=run_config,
        ), out_dir / f"{kind}.pt")

    strategy = build_strategy(
        run_config, save_checkpoint=save, out_dir=out_dir, num_rounds=num_rounds,
        base_lr=float(run_config.get("learning-rate", 1e-3)),
        lr_schedule=str(run_config.get("lr-schedule", "constant")),
        best_key=f"dice-{next(iter(spec.regions)).lower()}",
    )
    initial = ArrayRecord(model.state_dict())
    if bool(run_config.get("evaluate-initial", True)):
        # Round 0: the initial model scored by the sites, the baseline the rounds improve on.
        strategy.aggregate_evaluate(0, grid.send_and_receive(
            strategy.configure_evaluate(0, initial, ConfigRecord(), grid),
            timeout=float(run_config.get("round-timeout", 3600)),
        ))
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=num_rounds,
        timeout=float(run_config.get("round-timeout", 3600)),
    )
    save(result.arrays if result.arrays is not None else initial, num_rounds,
         strategy.history[-1] if strategy.history else {}, "final")
    log(INFO, "Per-round metrics (%s):\n%s", out_dir / "metrics.jsonl", format_table(strategy.history))
