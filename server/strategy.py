"""Flower's strategies with FedLesion's server-side behaviour mixed in.

:class:`RoundKeeper` adds, to any strategy from ``flwr.serverapp.strategy``: the per-round
learning-rate schedule, the per-round metrics files, and atomic checkpoints (last and
best). The aggregation itself is always Flower's own.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore import log

from common.engine import learning_rate

SERVER_STATE = ("m_t", "v_t", "momentum_vector")  # what Flower's server optimisers carry between rounds
SERVER_OPTIMIZERS = (flwr_strategies.FedAdam, flwr_strategies.FedYogi, flwr_strategies.FedAdagrad, flwr_strategies.FedAvgM)
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # normalisation statistics, averaged
SUMMED_KEYS = ("num-examples",)  # counts that add up over sites rather than average
SUMMED_SUFFIX = "-cases"


def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower's weighted average, except that counts (``num-examples``, ``*-cases``) are summed.

    When no site reports a positive weight (no validation case anywhere) only the counts
    are returned, instead of dividing by zero.
    """
    values = [m for r in records for m in r.metric_records.values()]
    total = sum(float(m.get(weighting_key, 0.0)) for m in values)
    out = aggregate_metricrecords(records, weighting_key) if total > 0 else MetricRecord()
    keys = {k for m in values for k in m if k in SUMMED_KEYS or k.endswith(SUMMED_SUFFIX)}
    for key in keys:
        out[key] = sum(float(m[key]) for m in values if key in m)
    return out


class RoundKeeper:
    """Mixin for a Flower strategy: schedule, metrics files and checkpoints.

    Rounds are numbered absolutely: after a resume from round ``k`` the strategy's own
    rounds 1, 2, ... are passed to Flower's aggregation (and to the sites) as ``k+1, k+2, ...``,
    so round-dependent maths (FedAdam's bias correction) match an uninterrupted run.

    Args:
        save_checkpoint: called as ``save_checkpoint(arrays, round, metrics, kind, state)`` with
            ``kind`` ``"last"`` or ``"best"`` and ``state`` the server optimiser's state;
            writes a self-describing checkpoint.
        out_dir: the run folder; ``metrics.jsonl`` and ``metrics.csv`` are written there.
        num_rounds: total rounds of the run (for the schedule).
        base_lr: the configured learning rate.
        lr_schedule: ``constant`` or ``cosine``.
        best_key: the evaluate metric that selects the best model.
        first_round: the round number this run starts at (after a resume).
        server_evaluate: optional ``(round, arrays) -> metrics`` scoring the global model on
            a held-out data folder at the server, recorded under ``"server"`` each round.
        history: the records of the rounds before a resume.
        max_norm_ratio: reject an update whose distance from the global model exceeds this
            multiple of the round's median (0 disables; needs three or more updates).
        max_failed_rounds: consecutive rounds with fewer accepted updates than ``min_train_nodes``
            that are tolerated (each keeps the global model and the next round tries again);
            one more stops the run with a message saying how to resume.
        node_wait_timeout: seconds a round waits for ``min_available_nodes`` SuperNodes to be
            connected before the run stops with a message (Flower alone would wait forever).
        round_timeout: the messages' time to live, in seconds. A SuperNode that comes back
            late or restarts never receives a round that is already over, so it does not
            spend the next round answering the last one.
    """

    def __init__(
        self,
        *args: Any,
        save_checkpoint: Callable[[ArrayRecord, int, dict[str, Any], str, dict[str, Any]], None],
        out_dir: Path,
        num_rounds: int,
        base_lr: float,
        lr_schedule: str = "constant",
        best_key: str = "dice-wt",
        first_round: int = 1,
        server_evaluate: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
        history: list[dict[str, Any]] | None = None,
        max_norm_ratio: float = 10.0,
        max_failed_rounds: int = 3,
        node_wait_timeout: float = 600.0,
        round_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if max_failed_rounds < 0 or node_wait_timeout <= 0:
            raise ValueError("max-failed-rounds must be >= 0 and node-wait-timeout > 0.")
        learning_rate(base_lr, lr_schedule, 1, num_rounds)  # validate now, not at round 1
        self._save_checkpoint = save_checkpoint
        self.out_dir = Path(out_dir)
        self.num_rounds = num_rounds
        self.base_lr = base_lr
        self.lr_schedule = lr_schedule
        self.best_key = best_key
        self.round_offset = first_round - 1
        self.server_evaluate = server_evaluate
        self.max_norm_ratio = max_norm_ratio
        self.max_failed_rounds = max_failed_rounds
        self.node_wait_timeout = node_wait_timeout
        self.failed_in_a_row = 0
        self.round_timeout = round_timeout
        self._norms: dict[int, float] = {}
        self._sent: list[Message] = []
        self._destinations: dict[str, int] = {}
        self.best_value = -math.inf
        self.history: list[dict[str, Any]] = list(history or [])
        for past in self.history:
            value = past.get("evaluate", {}).get(best_key)
            if value is not None:
                self.best_value = max(self.best_value, float(value))
        self._current: dict[str, Any] = {}
        self._arrays: ArrayRecord | None = None
        self._started = time.perf_counter()

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0: the sites (and the server, if set) score the initial model, the baseline rounds improve on."""
        self._arrays = arrays
        replies = grid.send_and_receive(self.configure_evaluate(-self.round_offset, arrays, ConfigRecord(), grid),
                                        timeout=timeout)
        self.aggregate_evaluate(-self.round_offset, replies)

    def absolute_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def optimizer_state(self) -> dict[str, Any]:
        """The server optimiser's state (FedAdam/FedYogi moments, FedAvgM momentum), for checkpoints."""
        return {name: getattr(self, name) for name in SERVER_STATE if getattr(self, name, None) is not None}

    def restore_optimizer_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`optimizer_state` saved, so a resumed run continues the same optimiser."""
        for name, value in state.items():
            if name not in SERVER_STATE or not hasattr(self, name):
                raise ValueError(f"checkpoint holds server state '{name}' that {type(self).__name__} does not use.")
            setattr(self, name, value)

    def wait_for_nodes(self, grid: Grid, server_round: int) -> None:
        """Wait up to ``node_wait_timeout`` s for ``min_available_nodes`` SuperNodes, logging who is missing.

        Raises:
            RuntimeError: when too few are connected by then; the last checkpoint stays the resume point.
        """
        needed = int(getattr(self, "min_available_nodes", 1))
        deadline = time.monotonic() + self.node_wait_timeout
        next_log = 0.0
        while (connected := len(list(grid.get_node_ids()))) < needed:
            now = time.monotonic()
            if now >= deadline:
                message = (f"round {server_round}: only {connected} SuperNode(s) connected after waiting "
                           f"{self.node_wait_timeout:.0f} s (node-wait-timeout); min-available-nodes is {needed}. "
                           f"Stopping; restart the missing SuperNodes and resume with resume-from={self.out_dir / 'last.pt'}")
                self._append_audit({"round": server_round, "stopped": message})
                raise RuntimeError(message)
            if now >= next_log:
                log(WARNING, "round %d: waiting for SuperNodes: %d connected, %d needed (giving up in %.0f s)",
                    server_round, connected, needed, deadline - now)
                next_log = now + 30.0
            time.sleep(1.0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        absolute = self.absolute_round(server_round)
        self.wait_for_nodes(grid, absolute)
        config["learning-rate"] = learning_rate(self.base_lr, self.lr_schedule, absolute, self.num_rounds)
        self._started = time.perf_counter()
        self._current = {"round": absolute, "learning-rate": config["learning-rate"]}
        self._arrays = arrays
        messages = self.expiring(super().configure_train(absolute, arrays, config, grid))  # type: ignore[misc]
        self._current["sampled"] = [m.metadata.dst_node_id for m in messages]
        self._sent = messages  # Flower's Grid gives each its message ID when it pushes it
        return messages

    def sender(self, reply: Message) -> int:
        """The site a reply concerns. Errors the SuperLink itself generates (a node that stopped
        sending heartbeats) come from the SuperLink's own ID; they are traced back to the node
        the instruction went to."""
        return self._destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def screen(self, replies: list[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
        """Reject updates that must not reach aggregation: non-finite values, wrong array names
        or shapes, or an update norm above ``max_norm_ratio`` times the median of the round's.

        Returns:
            ``(kept replies, [{"node-id", "reason"}] for each rejected one)``.
        """
        reference = self._arrays
        kept, rejected, norms = [], [], {}
        for message in replies:
            if message.has_error():
                kept.append(message)  # Flower logs and skips error replies itself
                continue
            node = self.sender(message)
            records = list(message.content.array_records.values())
            reason = None
            if len(records) != 1:
                reason = f"expected one ArrayRecord, got {len(records)}"
            elif reference is not None and list(records[0]) != list(reference):
                reason = "array names differ from the global model's"
            else:
                squared = 0.0
                for key, array in records[0].items():
                    values = array.numpy()
                    if reference is not None and values.shape != reference[key].numpy().shape:
                        reason = f"array '{key}' has shape {values.shape}, expected {reference[key].numpy().shape}"
                        break
                    if values.dtype.kind == "f" and not np.isfinite(values).all():
                        reason = f"array '{key}' holds NaN or Inf"
                        break
                    if reference is not None and values.dtype.kind == "f":
                        squared += float(np.sum((values.astype(np.float64) - reference[key].numpy()) ** 2))
                norms[id(message)] = math.sqrt(squared)
            if reason is None:
                kept.append(message)
            else:
                rejected.append({"node-id": node, "reason": reason})
        self._norms = {self.sender(m): norms[id(m)] for m in kept if id(m) in norms}
        valid = [m for m in kept if id(m) in norms]
        if self.max_norm_ratio > 0 and len(valid) >= 3:
            median = float(np.median([norms[id(m)] for m in valid]))
            for message in valid:
                if median > 0 and norms[id(message)] > self.max_norm_ratio * median:
                    kept.remove(message)
                    rejected.append({"node-id": self.sender(message),
                                     "reason": f"update norm {norms[id(message)]:.3g} > {self.max_norm_ratio:g} x median {median:.3g}"})
        for entry in rejected:
            log(WARNING, "round %d: rejected the update of node %d: %s", self._current.get("round", 0),
                entry["node-id"], entry["reason"])
        return kept, rejected

    def _average_statistics(self, arrays: ArrayRecord | None, replies: list[Message]) -> ArrayRecord | None:
        """Give normalisation statistics (BatchNorm running mean/var, counters) their plain weighted average.

        They are measurements, not parameters: a server optimiser (FedAdam, FedYogi, FedAvgM)
        moving them by a bounded step per round leaves them far from the data's statistics
        and breaks the model in evaluation mode. Averaging strategies are left as they are.
        """
        valid = [m.content for m in replies if not m.has_error()]
        if arrays is None or not valid or not isinstance(self, SERVER_OPTIMIZERS):
            return arrays
        statistics = [key for key in arrays if key.endswith(STATISTICS_SUFFIXES)]
        if not statistics:
            return arrays
        averaged = aggregate_arrayrecords(valid, self.weighted_by_key)  # type: ignore[attr-defined]
        for key in statistics:
            arrays[key] = averaged[key]
        return arrays

    @staticmethod
    def upcast(replies: list[Message]) -> None:
        """Turn float16 updates (``transport-dtype = "float16"``) into float32 before screening and aggregation."""
        for message in replies:
            if message.has_error():
                continue
            for name, record in list(message.content.array_records.items()):
                if any(array.dtype == "float16" for array in record.values()):
                    message.content[name] = ArrayRecord({
                        key: Array(array.numpy().astype(np.float32)) if array.dtype == "float16" else array
                        for key, array in record.items()})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._current["train-phase-seconds"] = time.perf_counter() - self._started
        # Message IDs exist once the Grid has pushed the messages, so the map is built here.
        self._destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        replies = list(replies)
        self.upcast(replies)
        replies, rejected = self.screen(replies)
        self._current["rejected"] = rejected
        self._current["replies"] = [self._reply_record(m) for m in replies]
        answered = {self.sender(m) for m in replies} | {r["node-id"] for r in rejected}
        self._current["no-reply"] = [n for n in self._current.get("sampled", []) if n not in answered]
        accepted = sum(1 for m in replies if not m.has_error())
        needed = max(int(getattr(self, "min_train_nodes", 1)), 1)
        if accepted < needed:
            return self._fail_round(accepted, needed)
        self.failed_in_a_row = 0
        arrays, metrics = super().aggregate_train(self.absolute_round(server_round), replies)  # type: ignore[misc]
        arrays = self._average_statistics(arrays, replies)
        if arrays is not None:
            self._arrays = arrays
        self._current["train"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _reply_record(self, message: Message) -> dict[str, Any]:
        """What the metrics file keeps of one reply: the node, and its error or its metrics and update norm."""
        node = self.sender(message)
        if message.has_error():
            return {"node-id": node, "error": message.error.reason}
        record = {"node-id": node, **{k: v for r in message.content.metric_records.values() for k, v in r.items()}}
        if node in self._norms:
            record["update-norm"] = self._norms[node]
        return record

    def _fail_round(self, accepted: int, needed: int) -> tuple[None, None]:
        """Too few accepted updates: keep the global model (the next round retries), or stop the run."""
        self.failed_in_a_row += 1
        absolute = self._current.get("round", 0)
        reason = (f"{accepted} accepted update(s), fewer than min-train-nodes={needed} "
                  f"(no reply: {len(self._current.get('no-reply', []))}, errors: "
                  f"{sum(1 for r in self._current.get('replies', []) if 'error' in r)}, "
                  f"rejected: {len(self._current.get('rejected', []))})")
        self._current["failed"] = reason
        self._current["train"] = {}
        if self.failed_in_a_row > self.max_failed_rounds:
            message = (f"round {absolute}: {reason}; {self.failed_in_a_row} failed rounds in a row exceed "
                       f"max-failed-rounds={self.max_failed_rounds}. Stopping; the last completed round is in "
                       f"{self.out_dir / 'last.pt'} (resume with resume-from=that file).")
            self._append_audit({"round": absolute, "stopped": message})
            raise RuntimeError(message)
        log(WARNING, "round %d: %s; the global model is kept and the next round tries again (%d of %d failed rounds allowed in a row)",
            absolute, reason, self.failed_in_a_row, self.max_failed_rounds)
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # The global model as it stands after this round (a DP wrapper may have added noise after aggregation).
        self._arrays = arrays
        return self.expiring(super().configure_evaluate(self.absolute_round(server_round), arrays, config, grid))  # type: ignore[misc]

    def expiring(self, messages: Iterable[Message]) -> list[Message]:
        """Give each message the round timeout as its time to live (Flower's default is 12 h)."""
        messages = list(messages)
        if self.round_timeout:
            for message in messages:
                message.metadata.ttl = float(self.round_timeout)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(self.absolute_round(server_round), list(replies))  # type: ignore[misc]
        record = {**self._current, "round": self.absolute_round(server_round),
                  "evaluate": dict(metrics) if metrics is not None else {}}
        if self.server_evaluate is not None and self._arrays is not None:
            record["server"] = self.server_evaluate(record["round"], self._arrays)
        record["seconds"] = time.perf_counter() - self._started
        self.record(record)
        if self._arrays is not None:
            state = self.optimizer_state()
            self._save_checkpoint(self._arrays, record["round"], record, "last", state)
            written = "last.pt"
            value = record["evaluate"].get(self.best_key)
            if value is not None and value > self.best_value:
                self.best_value = float(value)
                self._save_checkpoint(self._arrays, record["round"], record, "best", state)
                written += ", best.pt"
            self.audit(record, written)
        return metrics

    def audit(self, record: dict[str, Any], checkpoint: str | None) -> None:
        """Append the round to ``audit.jsonl``: node IDs sampled, replied, failed or rejected (and why), checkpoint.

        Only node IDs and reasons: no case, path or metric of a patient.
        """
        replies = record.get("replies", [])
        entry = {
            "round": record["round"],
            "sampled": record.get("sampled", []),
            "replied": [r["node-id"] for r in replies if "error" not in r],
            "failed": [{"node-id": r["node-id"], "reason": r["error"]} for r in replies if "error" in r]
            + [{"node-id": n, "reason": "no reply within round-timeout"} for n in record.get("no-reply", [])],
            "rejected": record.get("rejected", []),
            "round-failed": record.get("failed"),
            "checkpoint": checkpoint,
        }
        self._append_audit(entry)

    def _append_audit(self, entry: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "audit.jsonl", "a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n")

    def record(self, record: dict[str, Any]) -> None:
        """Append one round to the history, ``metrics.jsonl`` and ``metrics.csv``, and log it."""
        self.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        write_csv(self.history, self.out_dir / "metrics.csv")
        evaluate = record.get("evaluate", {})
        dice = "  ".join(f"{k[5:].upper()} {v:.3f}" for k, v in evaluate.items() if k.startswith("dice-"))
        log(INFO, "round %d: train loss %s | validation Dice %s | %.1f s", record["round"],
            f"{record['train']['train-loss']:.4f}" if "train-loss" in record.get("train", {}) else "-",
            dice or "-", record.get("seconds", 0.0))


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: round facts plus ``train/...`` and ``evaluate/...`` columns."""
    row = {"round": record["round"], "learning-rate": record.get("learning-rate", ""), "seconds": record.get("seconds", "")}
    for group in ("train", "evaluate", "server"):
        for key, value in record.get(group, {}).items():
            row[f"{group}/{key}"] = value
    return row


def write_csv(history: list[dict[str, Any]], path: Path) -> None:
    rows = [flatten(r) for r in history]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def format_table(history: list[dict[str, Any]]) -> str:
    """A plain-text table of train loss and validation metrics per round."""
    keys = list(dict.fromkeys(k for r in history for k in r.get("evaluate", {})
                              if k.split("-")[0] in ("dice", "iou", "hd95")))
    header = ["round", "train-loss", *keys]
    lines = ["  ".join(f"{h:>10}" for h in header)]
    for r in history:
        loss = r.get("train", {}).get("train-loss")
        cells = [f"{r['round']:>10}", f"{loss:>10.4f}" if loss is not None else f"{'-':>10}"]
        cells += [f"{r['evaluate'][k]:>10.3f}" if k in r.get("evaluate", {}) else f"{'-':>10}" for k in keys]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# name -> (Flower class, {run-config key: (constructor argument, type, default)})
STRATEGIES: dict[str, tuple[type, dict[str, tuple[str, type, Any]]]] = {
    "fedavg": (flwr_strategies.FedAvg, {}),
    "fedprox": (flwr_strategies.FedProx, {"proximal-mu": ("proximal_mu", float, 0.01)}),
    "fedadam": (flwr_strategies.FedAdam, {
        "server-lr": ("eta", float, 0.01), "server-beta-1": ("beta_1", float, 0.9),
        "server-beta-2": ("beta_2", float, 0.99), "server-tau": ("tau", float, 1e-3)}),
    "fedyogi": (flwr_strategies.FedYogi, {
        "server-lr": ("eta", float, 0.01), "server-beta-1": ("beta_1", float, 0.9),
        "server-beta-2": ("beta_2", float, 0.99), "server-tau": ("tau", float, 1e-3)}),
    "fedavgm": (flwr_strategies.FedAvgM, {
        "server-momentum": ("server_momentum", float, 0.9)}),
    "fedmedian": (flwr_strategies.FedMedian, {}),
    "fedtrimmedavg": (flwr_strategies.FedTrimmedAvg, {"trim-beta": ("beta", float, 0.2)}),
    "krum": (flwr_strategies.Krum, {"num-malicious-nodes": ("num_malicious_nodes", int, 0)}),
}


DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


def with_privacy(strategy: RoundKeeper, run_config: Mapping[str, Any]) -> Any:
    """Wrap ``strategy`` in one of Flower's differential-privacy wrappers, as ``dp`` says.

    ``server-*`` clip each update at the server and add Gaussian noise to the aggregate;
    ``client-*`` have the sites clip their own updates (FedLesion's ClientApp applies Flower's
    clipping mods when asked) and the server adds the noise. ``*-fixed`` clips at
    ``dp-clipping-norm``; ``*-adaptive`` learns the norm from ``dp-initial-clipping-norm``.

    Raises:
        ValueError: for an unknown ``dp`` mode.
    """
    mode = str(run_config.get("dp", "none"))
    if mode not in DP_MODES:
        raise ValueError(f"dp '{mode}' is unknown; choose one of {list(DP_MODES)}.")
    if mode == "none":
        return strategy
    noise = float(run_config.get("dp-noise-multiplier", 0.1))
    sampled = int(run_config.get("min-available-nodes", 2))
    if mode.endswith("fixed"):
        cls = (flwr_strategies.DifferentialPrivacyServerSideFixedClipping if mode.startswith("server")
               else flwr_strategies.DifferentialPrivacyClientSideFixedClipping)
        return cls(strategy, noise_multiplier=noise, clipping_norm=float(run_config.get("dp-clipping-norm", 1.0)),
                   num_sampled_clients=sampled)
    cls = (flwr_strategies.DifferentialPrivacyServerSideAdaptiveClipping if mode.startswith("server")
           else flwr_strategies.DifferentialPrivacyClientSideAdaptiveClipping)
    return cls(strategy, noise_multiplier=noise, num_sampled_clients=sampled,
               initial_clipping_norm=float(run_config.get("dp-initial-clipping-norm", 0.1)))


def build_strategy(run_config: Mapping[str, Any], **keeper_args: Any) -> RoundKeeper:
    """The strategy named by ``strategy`` in the run config, with :class:`RoundKeeper` mixed in.

    Sampling settings (``fraction-train``, ``fraction-evaluate``, ``min-available-nodes``)
    and the strategy's own parameters come from the run config.

    Raises:
        ValueError: for an unknown strategy name.
    """
    name = str(run_config.get("strategy", "fedavg")).lower()
    if name not in STRATEGIES:
        raise ValueError(f"strategy '{name}' is unknown; choose one of {sorted(STRATEGIES)}.")
    base, params = STRATEGIES[name]
    min_nodes = int(run_config.get("min-available-nodes", 2))
    keeper_args.setdefault("max_norm_ratio", float(run_config.get("max-update-norm-ratio", 10.0)))
    keeper_args.setdefault("max_failed_rounds", int(run_config.get("max-failed-rounds", 3)))
    keeper_args.setdefault("node_wait_timeout", float(run_config.get("node-wait-timeout", 600.0)))
    keeper_args.setdefault("round_timeout", float(run_config.get("round-timeout", 3600.0)))
    kwargs: dict[str, Any] = {
        "fraction_train": float(run_config.get("fraction-train", 1.0)),
        "fraction_evaluate": float(run_config.get("fraction-evaluate", 1.0)),
        "min_available_nodes": min_nodes,
        "min_train_nodes": min(min_nodes, int(run_config.get("min-train-nodes", min_nodes))),
        "min_evaluate_nodes": min(min_nodes, int(run_config.get("min-evaluate-nodes", min_nodes))),
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    for key, (argument, kind, default) in params.items():
        kwargs[argument] = kind(run_config.get(key, default))
    cls = type(f"Keeping{base.__name__}", (RoundKeeper, base), {})
    return cls(**kwargs, **keeper_args)
