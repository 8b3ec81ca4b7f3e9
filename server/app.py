"""The FedLesion ServerApp: runs the configured Flower strategy over the shared model.

Outputs land in ``<output-dir>/<run-name>/``: ``metrics.jsonl``, ``metrics.csv``,
``last.pt`` (every round), ``best.pt`` (best validation Dice), ``final.pt`` and
``run_config.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.api import select_cases
from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.config import dataset_spec, model_from, train_config_from
from common.data import DatasetSpec, discover_cases, load_site, resolve_spec
from common.engine import evaluate, select_device
from common.metrics import flat_means
from common.model import build_model, model_spatial_dims, resolved_model_args

from .strategy import build_strategy, format_table, with_privacy

app = ServerApp()


def run_folder(run_config: dict[str, Any]) -> Path:
    """``<output-dir>/<run-name>``, the run name defaulting to a timestamp."""
    name = str(run_config.get("run-name", "")) or time.strftime("run-%Y%m%d-%H%M%S")
    return Path(str(run_config.get("output-dir", "outputs"))).resolve() / name


def server_evaluator(run_config: dict[str, Any], model_name: str, model_args: dict[str, Any],
                     spec: DatasetSpec) -> Callable[[int, ArrayRecord], dict[str, float]] | None:
    """Score the global model on ``server-eval-data`` each round, when that folder is set."""
    folder = str(run_config.get("server-eval-data", ""))
    if not folder:
        return None
    data_spec = resolve_spec(folder, str(run_config.get("server-eval-manifest", "")) or None)
    if list(data_spec.regions) != list(spec.regions):
        raise ValueError(f"server-eval-data {folder}: regions {list(data_spec.regions)} differ from the run's {list(spec.regions)}.")
    include = [p for p in str(run_config.get("server-eval-include", "")).split(",") if p]
    case_ids = select_cases(discover_cases(folder, data_spec), include=include)
    cases = load_site(folder, data_spec, case_ids=case_ids, crop_foreground=bool(run_config.get("crop-foreground", False))).cases
    device = select_device("auto")
    spatial_dims = model_spatial_dims(model_name)
    patch_size = train_config_from(run_config).patch_size
    log(INFO, "server-side evaluation on %d case(s) of %s each round", len(cases), folder)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
        model.load_state_dict(arrays.to_torch_state_dict())
        _, summary = evaluate(model.to(device), cases, list(spec.regions), spatial_dims, device, patch_size=patch_size)
        out = flat_means(summary, list(spec.regions))
        log(INFO, "round %d: server-side Dice %s", server_round,
            " ".join(f"{r} {block['dice_mean']:.3f}" for r, block in summary.items()))
        return out

    return evaluate_global


@dataclass
class Resume:
    """Where a resumed run picks up: the last completed round's weights, history and optimiser state."""

    arrays: ArrayRecord
    round: int
    history: list[dict[str, Any]]
    optimizer_state: dict[str, Any]


def load_resume(path: str, model_name: str, model_args: dict[str, Any], out_dir: Path) -> Resume:
    """Read ``resume-from`` and the run's metrics up to its round (later lines, from a crash, are dropped).

    Raises:
        ValueError: when the checkpoint is unreadable or was made with another model.
    """
    ckpt = load_checkpoint(path)
    # Arguments added to a model since the checkpoint was written take their defaults.
    if ckpt.model != model_name or resolved_model_args(ckpt.model, **ckpt.model_args) != model_args:
        raise ValueError(f"resume-from {path}: trained {ckpt.model} {ckpt.model_args}, but this run configures "
                         f"{model_name} {model_args}; resume with the run's own config.")
    metrics = out_dir / "metrics.jsonl"
    history = []
    if metrics.exists():
        history = [r for r in (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
                   if r["round"] <= ckpt.round]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
    return Resume(ArrayRecord(ckpt.state_dict), ckpt.round, history, ckpt.extra.get("optimizer_state", {}))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build (or resume) the global model, run the strategy, and write metrics and checkpoints."""
    run_config = dict(context.run_config)
    resume_from = str(run_config.get("resume-from", ""))
    if resume_from and not str(run_config.get("run-name", "")):
        run_config["run-name"] = Path(resume_from).resolve().parent.name  # continue in the same run folder
    out_dir = run_folder(run_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True))
    spec = dataset_spec(str(run_config.get("dataset", "brats2021")))
    model_name, model_args = model_from(run_config)
    torch.manual_seed(int(run_config.get("seed", 0)))
    model = build_model(model_name, len(spec.channels), len(spec.regions), **model_args)
    num_rounds = int(run_config["num-server-rounds"])
    resume = load_resume(resume_from, model_name, model_args, out_dir) if resume_from else None
    first_round = resume.round + 1 if resume else 1
    log(INFO, "FedLesion: %s %s on '%s' (%d channels, regions %s), rounds %d-%d; outputs in %s",
        run_config.get("strategy", "fedavg"), model_name, spec.name, len(spec.channels),
        "/".join(spec.regions), first_round, num_rounds, out_dir)

    def save(arrays: ArrayRecord, server_round: int, metrics: dict[str, Any], kind: str,
             optimizer_state: dict[str, Any]) -> None:
        save_checkpoint(Checkpoint(
            model=model_name, model_args=model_args, spec=spec, state_dict=arrays.to_torch_state_dict(),
            round=server_round, metrics=metrics, run_config=run_config,
            extra={"optimizer_state": optimizer_state},
        ), out_dir / f"{kind}.pt")

    strategy = build_strategy(
        run_config, save_checkpoint=save, out_dir=out_dir, num_rounds=num_rounds,
        server_evaluate=server_evaluator(run_config, model_name, model_args, spec),
        base_lr=float(run_config.get("learning-rate", 1e-3)),
        lr_schedule=str(run_config.get("lr-schedule", "constant")),
        best_key=f"dice-{next(iter(spec.regions)).lower()}",
        first_round=first_round, history=resume.history if resume else None,
    )
    timeout = float(run_config.get("round-timeout", 3600))
    if resume:
        initial = resume.arrays
        strategy.restore_optimizer_state(resume.optimizer_state)
        log(INFO, "resumed from %s at round %d (server optimiser state: %s)", resume_from, resume.round,
            sorted(resume.optimizer_state) or "none")
    else:
        initial = ArrayRecord(model.state_dict())
        if bool(run_config.get("evaluate-initial", True)):
            strategy.evaluate_initial(grid, initial, timeout=timeout)
    final = initial
    if num_rounds >= first_round:
        result = with_privacy(strategy, run_config).start(grid=grid, initial_arrays=initial, num_rounds=num_rounds - first_round + 1, timeout=timeout)
        final = result.arrays if result.arrays is not None else initial
    save(final, num_rounds, strategy.history[-1] if strategy.history else {}, "final", strategy.optimizer_state())
    log(INFO, "Per-round metrics (%s):\n%s", out_dir / "metrics.jsonl", format_table(strategy.history))
