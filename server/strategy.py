"""FedLesion's server side: a stack of strategy wrappers around one of Flower's strategies.

Each wrapper does one thing and holds the next one as ``self.strategy``, in the style of
Flower's own differential-privacy wrappers. :func:`build_strategy` composes, outermost first:

1. :class:`RunRecorder`: numbers rounds absolutely (after a resume), sends the scheduled
   learning rate, records each round (``metrics.jsonl``, ``metrics.csv``, ``audit.jsonl``)
   and writes the checkpoints (``last.pt`` every round, ``best.pt``).
2. :class:`UpdateScreening`: attributes each reply to its site, turns float16 deltas into
   weights, and rejects error replies and bad updates before anything else sees them.
3. :class:`RoundPolicy`: waits (bounded) for sites, lets messages expire with the round, and
   keeps the model, or stops the run, when too few updates were accepted.
4. :class:`DifferentialPrivacy`, when ``dp`` is set: the clipped, equally weighted, noised mean.
5. :class:`Aggregation`: Flower's strategy (FedAvg, FedAdam, ...), with plain averages for
   normalisation statistics, the global model's dtypes kept, and its optimiser state.

The wrappers share one :class:`RunRecord`, the record of the round in progress.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, aggregate_metricrecords
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_adaptive_noise_params

from fedlesion.common.config import DATASET_SPEC_KEY, SCHEDULE_ROUNDS_KEY, dataset_spec, with_defaults
from fedlesion.common.files import private_folder, safe_label
from fedlesion.common.engine import learning_rate
from fedlesion.common.privacy import STATISTICS_SUFFIXES, TRANSPORT_DTYPES, numpy_arrays, private_mean, update_norm

SERVER_STATE = ("m_t", "v_t", "momentum_vector")  # what Flower's server optimisers carry between rounds
SERVER_OPTIMIZERS = (flwr_strategies.FedAdam, flwr_strategies.FedYogi, flwr_strategies.FedAdagrad, flwr_strategies.FedAvgM)
WEIGHT_KEY = "num-examples"  # what sites report and FedAvg weights by: cases
SUMMED_KEYS = (WEIGHT_KEY,)  # counts that add up over sites rather than average
SUMMED_SUFFIX = "-cases"
# Adaptive clipping (Andrew et al., 2019): the share of updates meant to exceed the norm, and the
# norm's geometric learning rate; the paper's recommended values, also Flower's defaults.
TARGET_CLIPPED_QUANTILE = 0.5
CLIP_NORM_LR = 0.2
# Largest size a normalisation statistic (BatchNorm running mean or variance) may have in an update:
# activations of a trained network stay orders of magnitude below it; a site sending more breaks the model.
STATISTIC_BOUND = 1e6


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


def decode_update(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A site's ``transport-dtype = "float16"`` upload as weights: its floating arrays are its change
    from the global model that was sent and are added to that model; counters are kept as they are.
    The run's setting decides whether an upload is decoded, never the arrays' dtype (see :class:`UpdateScreening`)."""
    return {key: np.asarray(sent[key] + value.astype(sent[key].dtype)) if value.dtype.kind == "f" else value
            for key, value in arrays.items()}


class RunStopped(RuntimeError):
    """The run cannot go on (too few sites connected, too many failed rounds); the recorder adds how to resume."""


class RunRecord:
    """The run's record: the round in progress, the rounds so far, and the files they are written to.

    Args:
        out_dir: the run folder; ``metrics.jsonl``, ``metrics.csv`` and ``audit.jsonl`` are written there.
        history: the records of the rounds before a resume.
    """

    def __init__(self, out_dir: Path, history: list[dict[str, Any]] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, Any]] = list(history or [])
        self.current: dict[str, Any] = {}  # what the wrappers note about the round in progress

    def append(self, record: dict[str, Any]) -> None:
        """Append one round to the history, ``metrics.jsonl`` and ``metrics.csv``, and log it."""
        self.history.append(record)
        private_folder(self.out_dir)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        write_csv(self.history, self.out_dir / "metrics.csv")
        evaluate = record.get("evaluate", {})
        dice = "  ".join(f"{k[5:].upper()} {v:.3f}" for k, v in evaluate.items() if k.startswith("dice-"))
        log(INFO, "round %d: train loss %s | validation Dice %s | %.1f s", record["round"],
            f"{record['train']['train-loss']:.4f}" if "train-loss" in record.get("train", {}) else "-",
            dice or "-", record.get("seconds", 0.0))

    def audit(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to ``audit.jsonl``, time-stamped. Node IDs and reasons only: no case, path or metric."""
        private_folder(self.out_dir)
        with open(self.out_dir / "audit.jsonl", "a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n")


class StrategyWrapper(Strategy):
    """A strategy that does one thing and hands everything else to ``strategy``.

    A wrapper whose state must survive a resume names it with ``state_key`` and defines
    ``state() -> dict`` and ``restore_state(state)``. States hold only tensors, lists, dicts,
    numbers and strings, so checkpoints load with ``torch.load(weights_only=True)``.
    """

    state_key: str | None = None

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> %s", type(self).__name__)
        self.strategy.summary()

    def layers(self) -> Iterator[Strategy]:
        """This wrapper, the ones inside it, and Flower's strategy last."""
        layer: Strategy = self
        while isinstance(layer, StrategyWrapper):
            yield layer
            layer = layer.strategy
        yield layer


def _to_tensors(value: Any) -> Any:
    """numpy arrays and scalars (in lists and dicts) as tensors, so checkpoints hold no pickled numpy objects."""
    if isinstance(value, (np.ndarray, np.generic)):
        return torch.from_numpy(np.array(value))
    if isinstance(value, list):
        return [_to_tensors(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def _to_numpy(value: Any) -> Any:
    """What :func:`_to_tensors` made (or a checkpoint written before it, holding numpy), as numpy."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return np.asarray(value)
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


class Aggregation(StrategyWrapper):
    """Flower's aggregating strategy, with what FedLesion needs around it.

    - Normalisation statistics (BatchNorm running mean/var, counters) get the plain weighted
      average of the updates under a server optimiser (FedAdam, FedYogi, FedAdagrad, FedAvgM):
      they are measurements, not parameters, and a bounded server step per round would leave
      them far from the data's statistics and break the model in evaluation mode.
    - The global model keeps the dtypes it was sent in: FedAdam and FedYogi compute in float64
      under NumPy 2, which would double the downlink and the checkpoints.
    - The server optimiser's state (moments, momentum) is checkpointed, so a resumed run
      continues the same optimiser.
    """

    state_key = "optimizer_state"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._dtypes = {key: array.numpy().dtype for key, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        values = numpy_arrays(arrays)
        statistics = [key for key in values if key.endswith(STATISTICS_SUFFIXES)]
        if statistics and isinstance(self.strategy, SERVER_OPTIMIZERS):
            averaged = aggregate_arrayrecords([m.content for m in replies], self.strategy.weighted_by_key)
            values.update({key: averaged[key].numpy() for key in statistics})
        return ArrayRecord({key: Array(_as_dtype(values[key], dtype)) for key, dtype in self._dtypes.items()}), metrics

    def state(self) -> dict[str, Any]:
        return {name: _to_tensors(getattr(self.strategy, name)) for name in SERVER_STATE
                if getattr(self.strategy, name, None) is not None}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            if name not in SERVER_STATE or not hasattr(self.strategy, name):
                raise ValueError(f"checkpoint holds server state '{name}' that {type(self.strategy).__name__} "
                                 "does not use; resume with the run's own strategy.")
            setattr(self.strategy, name, _to_numpy(value))


def _as_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype``; averaged integer counters are rounded, not truncated."""
    return np.asarray(np.rint(values) if dtype.kind in "iu" else values, dtype)


DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
PRIVATE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")  # they can take the private mean as their average


class DifferentialPrivacy(StrategyWrapper):
    """Central differential privacy on the updates that reach aggregation (user-level DP-FedAvg).

    Each update's parameters are clipped to the clipping norm ``C``; the clipped updates are
    averaged with equal weights over ``m``, the number of sites sampled this round; Gaussian
    noise of standard deviation ``z C / m`` is added to the parameters (see
    :func:`fedlesion.common.privacy.private_mean`). The wrapped strategy receives that one private mean as
    its only update: FedAvg and FedProx keep it, FedAdam, FedYogi and FedAvgM step on it. What
    they do with it is post-processing, so the guarantee holds for all of them. Normalisation
    statistics are averaged plainly, without clipping or noise, and are not covered; nor are
    the metrics sites report.

    Modes: ``server-*`` clip at the server. ``client-*`` send the norm with the round's config
    and the sites clip before they upload (FedLesion's ClientApp does, parameters only); the
    server clips again, which changes nothing for a site that did. ``*-fixed`` keep ``C``;
    ``*-adaptive`` learn it (Andrew et al., 2019): after each round ``C`` moves geometrically
    towards the norm that :data:`TARGET_CLIPPED_QUANTILE` of updates exceed, from a noised
    count of the updates that were clipped (at the server, or in ``client-adaptive`` at the site,
    which reports ``norm_bit``; ``server-adaptive`` ignores a site's ``norm_bit``), with the noise
    split between that count and the updates as Flower splits it.

    Args:
        strategy: the next layer.
        mode: one of ``DP_MODES`` other than ``none``.
        noise_multiplier: ``z``, the noise's standard deviation in units of ``C / m``.
        clipping_norm: ``C`` (the starting value in the adaptive modes).
        min_sampled: the fewest sites a round samples (``min-train-nodes``).

    Raises:
        ValueError: for an unknown mode, a negative ``z``, a non-positive ``C``, or (adaptive)
            a ``z`` too large for the clipped-count noise at ``min_sampled`` sites.
    """

    state_key = "privacy"

    def __init__(self, strategy: Strategy, mode: str, noise_multiplier: float, clipping_norm: float, min_sampled: int) -> None:
        super().__init__(strategy)
        if mode not in DP_MODES[1:]:
            raise ValueError(f"dp '{mode}' is unknown; choose one of {list(DP_MODES)}.")
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError(f"dp needs dp-noise-multiplier >= 0 (got {noise_multiplier}) and a clipping norm > 0 "
                             f"(got {clipping_norm}).")
        self.mode = mode
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        if self.adaptive:
            try:
                compute_adaptive_noise_params(noise_multiplier, min_sampled, None)
            except ValueError as exc:
                raise ValueError(f"dp '{mode}': dp-noise-multiplier {noise_multiplier} is too large for rounds of "
                                 f"{min_sampled} site(s) (min-train-nodes); it must be below {min_sampled / 10:g}. "
                                 f"Sample more sites per round or lower the noise. ({exc})") from exc
        self.rng = np.random.default_rng()  # from the OS: noise the sites could predict would protect nothing

    @property
    def adaptive(self) -> bool:
        return self.mode.endswith("adaptive")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = numpy_arrays(arrays)
        if self.mode.startswith("client"):
            config[KEY_CLIPPING_NORM] = self.clipping_norm
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = [numpy_arrays(next(iter(m.content.array_records.values()))) for m in replies]
        count_std, noise_multiplier = (compute_adaptive_noise_params(self.noise_multiplier, self._sampled, None)
                                       if self.adaptive else (0.0, self.noise_multiplier))
        mean = private_mean(updates, self._sent, self.clipping_norm, noise_multiplier, self._sampled, self.rng)
        log(INFO, "round %d: private mean of %d update(s) from %d sampled site(s), clipped at %.4g, noise std %.4g",
            server_round, len(updates), self._sampled, self.clipping_norm, noise_multiplier * self.clipping_norm / self._sampled)
        if self.adaptive:
            # Only client-* modes ask the sites to clip; under server-* a site's norm bit is not read, so a
            # site cannot steer the norm by claiming it clipped.
            clipped = sum(1 for update, message in zip(updates, replies)
                          if update_norm(update, self._sent) > self.clipping_norm
                          or (self.mode.startswith("client")
                              and any(r.get(KEY_NORM_BIT) for r in message.content.metric_records.values())))
            fraction = (clipped + self.rng.normal(0.0, count_std)) / len(replies)
            # Andrew et al. 2019 (eq. 2, with b = 1 - clipped): C grows while more than the target share of
            # updates are clipped and shrinks while fewer are. (Flower 1.42's own adaptive wrappers move it the
            # other way: they count clipped updates in a formula written for unclipped ones.)
            self.clipping_norm *= math.exp(CLIP_NORM_LR * (fraction - TARGET_CLIPPED_QUANTILE))
        content = RecordDict({"arrays": ArrayRecord({key: Array(value) for key, value in mean.items()}),
                              "metrics": aggregate_metrics([m.content for m in replies], WEIGHT_KEY)})
        return super().aggregate_train(server_round, [Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)])

    def state(self) -> dict[str, Any]:
        return {"clipping-norm": self.clipping_norm}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.clipping_norm = float(state["clipping-norm"])


class RoundPolicy(StrategyWrapper):
    """When a round may start and when it counts: bounded waits, expiring messages, failed rounds.

    Args:
        strategy: the next layer.
        record: the run record; a failed round is noted as ``failed``.
        min_available_nodes: SuperNodes that must be connected before sites are sampled.
        min_train_nodes: fewest accepted updates a round aggregates; with fewer the global
            model is kept and the next round tries again.
        evaluates: whether rounds evaluate (``fraction-evaluate > 0``), so evaluation waits too.
        max_failed_rounds: consecutive failed rounds tolerated; one more stops the run.
        node_wait_timeout: seconds training and evaluation (round 0 included) wait for
            ``min_available_nodes`` SuperNodes before the run stops (Flower alone waits forever).
        round_timeout: the messages' time to live, in seconds. A SuperNode that comes back late
            or restarts never receives a round that is already over.

    Raises:
        ValueError: for a negative ``max_failed_rounds`` or a non-positive timeout.
    """

    state_key = "round_policy"

    def __init__(self, strategy: Strategy, record: RunRecord, *, min_available_nodes: int, min_train_nodes: int,
                 evaluates: bool, max_failed_rounds: int, node_wait_timeout: float, round_timeout: float) -> None:
        super().__init__(strategy)
        if max_failed_rounds < 0 or node_wait_timeout <= 0 or round_timeout <= 0:
            raise ValueError(f"max-failed-rounds must be >= 0 (got {max_failed_rounds}), node-wait-timeout "
                             f"(got {node_wait_timeout}) and round-timeout (got {round_timeout}) > 0.")
        self.record = record
        self.min_available_nodes = min_available_nodes
        self.min_train_nodes = max(min_train_nodes, 1)
        self.evaluates = evaluates
        self.max_failed_rounds = max_failed_rounds
        self.node_wait_timeout = node_wait_timeout
        self.round_timeout = round_timeout
        self.failed_in_a_row = 0

    def wait_for_nodes(self, grid: Grid, server_round: int) -> None:
        """Wait up to ``node_wait_timeout`` s for ``min_available_nodes`` SuperNodes, logging every 30 s.

        Raises:
            RunStopped: when too few are connected by then.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        next_log = 0.0
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            now = time.monotonic()
            if now >= deadline:
                raise RunStopped(f"round {server_round}: only {connected} SuperNode(s) connected after waiting "
                                 f"{self.node_wait_timeout:.0f} s (node-wait-timeout); min-available-nodes is "
                                 f"{self.min_available_nodes}. Restart the missing SuperNodes.")
            if now >= next_log:
                log(WARNING, "round %d: waiting for SuperNodes: %d connected, %d needed (giving up in %.0f s)",
                    server_round, connected, self.min_available_nodes, deadline - now)
                next_log = now + 30.0
            time.sleep(1.0)

    def _expiring(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            message.metadata.ttl = float(self.round_timeout)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.wait_for_nodes(grid, server_round)
        return self._expiring(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.evaluates:
            self.wait_for_nodes(grid, server_round)
        return self._expiring(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # the accepted updates
        if len(replies) >= self.min_train_nodes:
            self.failed_in_a_row = 0
            return super().aggregate_train(server_round, replies)
        self.failed_in_a_row += 1
        current = self.record.current
        reason = (f"{len(replies)} accepted update(s), fewer than min-train-nodes={self.min_train_nodes} "
                  f"(no reply: {len(current.get('no-reply', []))}, errors: "
                  f"{sum(1 for r in current.get('replies', []) if 'error' in r)}, rejected: {len(current.get('rejected', []))})")
        current["failed"] = reason
        if self.failed_in_a_row > self.max_failed_rounds:
            raise RunStopped(f"round {server_round}: {reason}; {self.failed_in_a_row} failed rounds in a row exceed "
                             f"max-failed-rounds={self.max_failed_rounds}.")
        log(WARNING, "round %d: %s; the global model is kept and the next round tries again "
            "(%d of %d failed rounds allowed in a row)", server_round, reason, self.failed_in_a_row, self.max_failed_rounds)
        return None, None

    def state(self) -> dict[str, Any]:
        return {"failed-in-a-row": self.failed_in_a_row}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.failed_in_a_row = int(state["failed-in-a-row"])


class UpdateScreening(StrategyWrapper):
    """Screens the replies, training and evaluation, before anything else sees them, and notes who answered what.

    Each reply is attributed to its site: errors the SuperLink itself generates (a node that
    stopped sending heartbeats) come from the SuperLink's own ID and are traced back to the node
    the instruction went to. Only accepted replies are passed on. Error replies are noted as
    failures; other replies are rejected, logged and audited with the reason when:

    - they do not hold exactly one MetricRecord (and, in training, one ArrayRecord);
    - their metric names differ from the round's (the set most replies share; a tie keeps the
      set the previous round accepted), or a metric is not finite;
    - ``num-examples`` is not a whole number in ``[1, max_site_cases]`` (evaluation: ``[0, ...]``,
      a site without validation cases);
    - evaluation: a ``dice-*`` or ``iou-*`` outside ``[0, 1]``, or a negative ``hd95-*``;
    - training: array names, shapes or dtypes other than the global model's in ``transport-dtype``
      (float16 arrays are deltas from the global model, see :func:`decode_update`); NaN or Inf;
      a normalisation statistic above :data:`STATISTIC_BOUND` in size, a negative running
      variance or counter; an update norm (parameters, see :func:`fedlesion.common.privacy.update_norm`)
      above ``max_norm_ratio`` times the round's median.

    Args:
        strategy: the next layer.
        record: the run record; this layer notes ``sampled``, ``replies`` (errors, or the site's
            ``metrics`` and the update norm), ``rejected`` and ``no-reply`` (sampled, but no answer
            within the round), and for evaluation ``evaluate-failed`` and ``evaluate-rejected``.
        max_norm_ratio: the norm bound as a multiple of the median (0 disables; needs three or more
            updates). Under differential privacy pass 0: the median depends on every site.
        max_site_cases: the most cases one site may report (it weights the average).
        transport_dtype: ``transport-dtype``, one of ``TRANSPORT_DTYPES``.

    Raises:
        ValueError: for a negative ``max_norm_ratio``, ``max_site_cases`` below 1 or an unknown ``transport_dtype``.
    """

    def __init__(self, strategy: Strategy, record: RunRecord, *, max_norm_ratio: float, max_site_cases: int,
                 transport_dtype: str) -> None:
        super().__init__(strategy)
        if max_norm_ratio < 0 or max_site_cases < 1:
            raise ValueError(f"max-update-norm-ratio must be >= 0 (got {max_norm_ratio}) and max-site-cases >= 1 "
                             f"(got {max_site_cases}).")
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport-dtype '{transport_dtype}' is unknown; choose one of {list(TRANSPORT_DTYPES)}.")
        self.record = record
        self.max_norm_ratio = max_norm_ratio
        self.max_site_cases = max_site_cases
        self.transport_dtype = transport_dtype
        self.metric_names: dict[str, list[str]] = {}  # per phase, the metric names the last round accepted

    state_key = "screening"  # the accepted metric names decide a later tie, after a resume too

    def state(self) -> dict[str, Any]:
        return {"metric-names": {phase: list(names) for phase, names in self.metric_names.items()}}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        names = state.get("metric-names") if isinstance(state, Mapping) else None
        if not isinstance(names, Mapping) or not all(
                phase in ("train", "evaluate") and isinstance(n, list) and all(isinstance(x, str) for x in n)
                for phase, n in names.items()):
            raise ValueError("the checkpoint's 'screening' state is malformed (metric-names: per phase, a list of names).")
        self.metric_names = {phase: list(n) for phase, n in names.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = numpy_arrays(arrays)
        self._sent = list(super().configure_train(server_round, arrays, config, grid))
        self.record.current["sampled"] = [m.metadata.dst_node_id for m in self._sent]
        return self._sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent_evaluate = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent_evaluate

    def metrics_problem(self, message: Message, evaluation: bool) -> str | None:
        """Why a reply's metrics are rejected, or None."""
        content = message.content
        arrays = ("no", 0) if evaluation else ("one", 1)
        if len(content.array_records) != arrays[1] or len(content.metric_records) != 1:
            return (f"expected {arrays[0]} ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
                    f"{len(content.metric_records)}")
        extra = {key: dict(value) for key, value in content.config_records.items()}
        if extra and (not evaluation or set(extra) != {"site"} or set(extra["site"]) != {"name"}
                      or not isinstance(extra["site"]["name"], str) or len(extra["site"]["name"]) > 256):
            return "only an evaluation reply may carry a config record, and only 'site' with one short 'name'"
        metrics = next(iter(content.metric_records.values()))
        cases = metrics.get(WEIGHT_KEY)
        lowest = 0 if evaluation else 1
        if (isinstance(cases, bool) or not isinstance(cases, (int, float)) or not math.isfinite(cases)
                or cases != int(cases) or not lowest <= cases <= self.max_site_cases):
            return (f"{WEIGHT_KEY} {cases!r} is not a whole number of cases in [{lowest}, {self.max_site_cases}] "
                    "(max-site-cases)")
        for key, value in metrics.items():
            if isinstance(value, (list, tuple)):
                return f"metric '{key}' is not a single number"
            values = np.asarray(value, np.float64)
            if not np.isfinite(values).all():
                return f"metric '{key}' is not finite"
            if evaluation and key.startswith(("dice-", "iou-", "global-dice-", "global-iou-")) and not (
                    (values >= 0) & (values <= 1)).all():
                return f"metric '{key}' is outside [0, 1]"
            if evaluation and key.startswith(("hd95-", "global-hd95-")) and not (values >= 0).all():
                return f"metric '{key}' is negative"
        return None

    def update_problem(self, message: Message) -> tuple[str | None, dict[str, np.ndarray]]:
        """``(why the update is rejected, or None; its arrays as decoded weights)``."""
        arrays = numpy_arrays(next(iter(message.content.array_records.values())))
        if list(arrays) != list(self._global):
            return "array names differ from the global model's", {}
        for key, values in arrays.items():
            reference = self._global[key]
            expected = np.dtype(self.transport_dtype) if reference.dtype.kind == "f" else reference.dtype
            if values.shape != reference.shape:
                return f"array '{key}' has shape {values.shape}, expected {reference.shape}", {}
            if values.dtype != expected:
                return f"array '{key}' is {values.dtype}, expected {expected} (transport-dtype {self.transport_dtype})", {}
        if self.transport_dtype == "float16":
            arrays = decode_update(arrays, self._global)
        for key, values in arrays.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"array '{key}' holds NaN or Inf", {}
            if key.endswith(STATISTICS_SUFFIXES):
                if np.abs(values).max(initial=0) > STATISTIC_BOUND:
                    return f"statistic '{key}' exceeds {STATISTIC_BOUND:g} in size", {}
                if (key.endswith(("running_var", "num_batches_tracked"))) and (values < 0).any():
                    return f"statistic '{key}' is negative", {}
        return None, arrays

    def _screen(self, server_round: int, replies: Iterable[Message], sent: list[Message],
                phase: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[Message, int]]]:
        """``(error replies, rejected replies, [(message, node)] whose metrics pass)``, each attributed to its node."""
        # Message IDs exist once the Grid has pushed the messages, so the map is built here.
        destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
        errors, rejected, passed = [], [], []
        for message in replies:
            node = destinations.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
            if message.has_error():
                errors.append({"node-id": node, "error": site_error(message)})
            elif (reason := self.metrics_problem(message, phase == "evaluate")) is not None:
                rejected.append({"node-id": node, "reason": reason})
            else:
                passed.append((message, node))
        # Flower aggregates only replies with the same metric names; the round's are those most share (honest
        # sites of one run send the same names). A tie is broken by the names the last round accepted, never by
        # the order replies arrived: with no such names, every tied set is rejected, so that one site cannot
        # get another's reply rejected by answering first with other names.
        names = [sorted(next(iter(m.content.metric_records.values()))) for m, _ in passed]
        counts = {tuple(n): names.count(n) for n in names}
        if counts:
            previous = tuple(self.metric_names.get(phase, ()))
            top = [n for n in counts if counts[n] == max(counts.values())]
            expected = top[0] if len(top) == 1 else previous if previous in top else None
            if expected is not None:
                self.metric_names[phase] = list(expected)
            why = (f"differ from the round's {list(expected)}" if expected is not None
                   else f"tie: {len(top)} sets of names have the most replies, and no earlier round decides between them")
            rejected += [{"node-id": node, "reason": f"metric names {n} {why}"}
                         for (_, node), n in zip(passed, names) if tuple(n) != expected]
            passed = [(m, node) for (m, node), n in zip(passed, names) if tuple(n) == expected]
        return errors, rejected, passed

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        errors, rejected, passed = self._screen(server_round, replies, self._sent, "train")
        candidates = []
        for message, node in passed:
            reason, arrays = self.update_problem(message)
            if reason is None:
                candidates.append((message, node, arrays, update_norm(arrays, self._global)))
            else:
                rejected.append({"node-id": node, "reason": reason})
        median = float(np.median([norm for *_, norm in candidates])) if len(candidates) >= 3 else 0.0
        accepted, records = [], list(errors)
        for message, node, arrays, norm in candidates:
            if self.max_norm_ratio > 0 and median > 0 and norm > self.max_norm_ratio * median:
                rejected.append({"node-id": node, "reason": f"update norm {norm:.3g} > {self.max_norm_ratio:g} x median {median:.3g}"})
                continue
            name = next(iter(message.content.array_records))
            message.content[name] = ArrayRecord({key: Array(value) for key, value in arrays.items()})
            accepted.append(message)
            # Site metrics are nested: a site cannot write the server's fields (node-id, error, update-norm).
            records.append({"node-id": node, "metrics": dict(next(iter(message.content.metric_records.values()))),
                            "update-norm": norm})
        for entry in rejected:
            log(WARNING, "round %d: rejected the update of node %d: %s", server_round, entry["node-id"], entry["reason"])
        answered = {r["node-id"] for r in records} | {r["node-id"] for r in rejected}
        self.record.current.update({"replies": records, "rejected": rejected,
                                    "no-reply": [n for n in self.record.current.get("sampled", []) if n not in answered]})
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        errors, rejected, passed = self._screen(server_round, replies, self._sent_evaluate, "evaluate")
        for entry in rejected:
            log(WARNING, "round %d: rejected the evaluation of node %d: %s", server_round, entry["node-id"], entry["reason"])
        sites = [{"node-id": node, "site": site_name(message, node),
                  "metrics": dict(next(iter(message.content.metric_records.values())))}
                 for message, node in sorted(passed, key=lambda item: item[1])]
        self.record.current.update({"evaluate-failed": [{"node-id": e["node-id"], "reason": e["error"]} for e in errors],
                                    "evaluate-rejected": rejected, "evaluate-sites": sites})
        return super().aggregate_evaluate(server_round, [message for message, _ in passed])


SITE_NAME_LENGTH = 64


def site_name(message: Message, node: int) -> str:
    """The name an evaluation reply gives its site (``ConfigRecord`` ``site``/``name``), reduced to
    letters, digits, ``.``, ``_`` and ``-`` and 64 characters; ``node-<id>`` when it gives none.
    A name is the site's own claim: two replies may give the same one, so the node ID stays beside it."""
    record = message.content.config_records.get("site")
    name = record.get("name") if record is not None else None
    if not isinstance(name, str):
        return f"node-{node}"
    return safe_label(name, SITE_NAME_LENGTH) or f"node-{node}"


SITE_ERROR_LENGTH = 200


def site_error(message: Message) -> str:
    """A failed reply's reason as the server records it (log, audit.jsonl, metrics.jsonl): the site's own text, so
    printable characters only (a newline could forge a log line) and at most :data:`SITE_ERROR_LENGTH` of them."""
    reason = str(message.error.reason)
    text = "".join(c if c.isprintable() else " " for c in reason[:SITE_ERROR_LENGTH])
    return text + (" ..." if len(reason) > SITE_ERROR_LENGTH else "")


def worst_site(sites: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The site with the lowest ``key`` (e.g. ``dice-wt``) among those that scored cases, or None."""
    scored = [s for s in sites if key in s["metrics"] and s["metrics"].get(WEIGHT_KEY, 0) > 0]
    if not scored:
        return None
    worst = min(scored, key=lambda s: s["metrics"][key])
    return {"site": worst["site"], "node-id": worst["node-id"], key: worst["metrics"][key],
            WEIGHT_KEY: worst["metrics"][WEIGHT_KEY]}


def _random_state() -> list[Any]:
    """Python's ``random`` state (Flower samples sites with it) as plain lists."""
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


class RunRecorder(StrategyWrapper):
    """The run: absolute round numbers, the learning-rate schedule, the record and the checkpoints.

    Rounds are numbered absolutely: after a resume from round ``k`` the rounds 1, 2, ... that
    Flower's ``start`` counts reach the layers inside (and the sites) as ``k+1, k+2, ...``, so
    round-dependent maths (FedAdam's bias correction) match an uninterrupted run.

    The schedule runs over ``lr_horizon`` rounds: the run's ``num-server-rounds``, or after a
    resume the original run's (from the checkpoint), so a run resumed with more rounds keeps its
    learning rate continuous; rounds past the horizon keep the schedule's last value.

    When a layer stops the run (:class:`RunStopped`) the recorder audits why and raises
    ``RuntimeError`` naming the checkpoint to resume from.

    Args:
        strategy: the next layer.
        record: the run record, written after each round's evaluation.
        save_checkpoint: called as ``save_checkpoint(arrays, round, record, kind, state)`` with
            ``kind`` ``"last"`` or ``"best"`` and ``state`` :meth:`checkpoint_state`.
        num_rounds: the run's ``num-server-rounds``.
        base_lr: ``learning-rate``.
        lr_schedule: ``lr-schedule``.
        best_key: the metric that selects the best model: the server's own score on held-out cases
            when ``server_evaluate`` is given (sites' reports are not trusted to pick it), else the
            sites' aggregated evaluation.
        first_round: the round this run starts at (after a resume).
        server_evaluate: optional ``(round, arrays) -> metrics`` scoring the global model at the
            server each round, recorded under ``"server"``.
        round_config: values sent to the sites with every training and evaluation instruction
            (the dataset spec, see :func:`fedlesion.client.site.expected_spec`).

    Raises:
        ValueError: for an unknown schedule.
    """

    state_key = "run"

    def __init__(self, strategy: Strategy, record: RunRecord, *,
                 save_checkpoint: Callable[[ArrayRecord, int, dict[str, Any], str, dict[str, Any]], None],
                 num_rounds: int, base_lr: float, lr_schedule: str, best_key: str, first_round: int = 1,
                 server_evaluate: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
                 round_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(strategy)
        learning_rate(base_lr, lr_schedule, 1, num_rounds)  # validate now, not at round 1
        self.round_config = dict(round_config or {})
        self.record = record
        self._save_checkpoint = save_checkpoint
        self.base_lr = base_lr
        self.lr_schedule = lr_schedule
        self.lr_horizon = num_rounds
        self.best_key = best_key
        self.round_offset = first_round - 1
        self.server_evaluate = server_evaluate
        # With held-out cases at the server, its own score picks best.pt: a site's reported Dice cannot.
        self.best_source = "server" if server_evaluate is not None else "evaluate"
        values = [float(r[self.best_source][best_key]) for r in record.history if best_key in r.get(self.best_source, {})]
        self.best_value = max(values, default=-math.inf)
        self._arrays: ArrayRecord | None = None
        self._started = time.perf_counter()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record.history

    def learning_rate(self, absolute_round: int) -> float:
        return learning_rate(self.base_lr, self.lr_schedule, min(absolute_round, self.lr_horizon), self.lr_horizon)

    @contextmanager
    def _stops(self, absolute_round: int) -> Iterator[None]:
        try:
            yield
        except RunStopped as stop:
            last = self.record.out_dir / "last.pt"
            hint = (f"Stopping; the last completed round is in {last} (resume with resume-from={last})."
                    if last.exists() else "Stopping before any round completed; start the run again.")
            message = f"{stop} {hint}"
            self.record.audit({"round": absolute_round, "stopped": message})
            raise RuntimeError(message) from None

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0: the sites (and the server, if set) score the initial model, the baseline rounds improve on."""
        replies = grid.send_and_receive(self.configure_evaluate(-self.round_offset, arrays, ConfigRecord(), grid),
                                        timeout=timeout)
        self.aggregate_evaluate(-self.round_offset, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        config.update(self.round_config)
        config["learning-rate"] = self.learning_rate(absolute)
        # The rounds the schedules run over (kept across a resume): FixMatch's ramp-up follows the learning rate's.
        config[SCHEDULE_ROUNDS_KEY] = self.lr_horizon
        self._started = time.perf_counter()
        self.record.current = {"round": absolute, "learning-rate": config["learning-rate"]}
        with self._stops(absolute):
            return list(super().configure_train(absolute, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        absolute = server_round + self.round_offset
        self.record.current["train-phase-seconds"] = time.perf_counter() - self._started
        with self._stops(absolute):
            arrays, metrics = super().aggregate_train(absolute, replies)
        self.record.current["train"] = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        absolute = server_round + self.round_offset
        config.update(self.round_config)
        self._arrays = arrays  # the global model as it stands after this round
        with self._stops(absolute):
            return list(super().configure_evaluate(absolute, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        absolute = server_round + self.round_offset
        metrics = super().aggregate_evaluate(absolute, list(replies))
        record = {**self.record.current, "round": absolute, "evaluate": dict(metrics) if metrics is not None else {}}
        worst = worst_site(record.get("evaluate-sites", []), self.best_key)
        if worst is not None:
            record["evaluate-worst"] = worst
            log(INFO, "round %d: worst site %s (node %d): %s %.3f on %d case(s)", absolute, worst["site"],
                worst["node-id"], self.best_key, worst[self.best_key], worst[WEIGHT_KEY])
        if self.server_evaluate is not None and self._arrays is not None:
            record["server"] = self.server_evaluate(absolute, self._arrays)
        record["seconds"] = time.perf_counter() - self._started
        self.record.append(record)
        written = None
        if self._arrays is not None:
            state = self.checkpoint_state()
            self._save_checkpoint(self._arrays, absolute, record, "last", state)
            written = "last.pt"
            value = record.get(self.best_source, {}).get(self.best_key)
            if value is not None and value > self.best_value:
                self.best_value = float(value)
                self._save_checkpoint(self._arrays, absolute, record, "best", state)
                written += ", best.pt"
        replies = record.get("replies", [])
        self.record.audit({
            "round": absolute,
            "sampled": record.get("sampled", []),
            "replied": [r["node-id"] for r in replies if "error" not in r],
            "failed": [{"node-id": r["node-id"], "reason": r["error"]} for r in replies if "error" in r]
            + [{"node-id": n, "reason": "no reply within round-timeout"} for n in record.get("no-reply", [])],
            "rejected": record.get("rejected", []),
            "evaluate-failed": record.get("evaluate-failed", []),
            "evaluate-rejected": record.get("evaluate-rejected", []),
            "round-failed": record.get("failed"),
            "checkpoint": written,
        })
        return metrics

    def state(self) -> dict[str, Any]:
        return {"lr-horizon": self.lr_horizon, "python-random": _random_state()}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.lr_horizon = int(state["lr-horizon"])
        version, internal, gauss_next = state["python-random"]
        random.setstate((version, tuple(internal), gauss_next))

    def _stateful(self) -> dict[str, Any]:
        return {layer.state_key: layer for layer in self.layers() if isinstance(layer, StrategyWrapper) and layer.state_key}

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps so a resumed run continues as an uninterrupted one would:
        ``{state_key: state}`` of every layer that has state (schedule horizon and Python's
        ``random``, failed rounds in a row, the DP clipping norm, the server optimiser)."""
        return {key: layer.state() for key, layer in self._stateful().items()}

    def resume(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`checkpoint_state` saved. A layer whose key is missing (a
        checkpoint written before it kept state) starts fresh.

        Raises:
            ValueError: for state of a layer this run does not have (e.g. ``dp`` switched off).
        """
        layers = self._stateful()
        for key, value in state.items():
            if key not in layers:
                raise ValueError(f"the checkpoint holds '{key}' state, which this run's strategy stack "
                                 f"({', '.join(type(layer).__name__ for layer in self.layers())}) does not keep; "
                                 "resume with the run's own config.")
            layers[key].restore_state(value)


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row: round facts plus ``train/...`` and ``evaluate/...`` columns."""
    row = {"round": record["round"], "learning-rate": record.get("learning-rate", ""), "seconds": record.get("seconds", "")}
    for group in ("train", "evaluate", "server", "evaluate-worst"):
        for key, value in record.get(group, {}).items():
            row[f"{group}/{key}"] = value
    for site in record.get("evaluate-sites", []):  # per site: "site/<name>@<node-id>/<metric>", stable over rounds
        for key, value in site["metrics"].items():
            row[f"site/{site['site']}@{site['node-id']}/{key}"] = value
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
    worst_key = next((k for r in history for k in r.get("evaluate-worst", {}) if k.startswith("dice-")), None)
    header = ["round", "train-loss", *keys, *([f"worst {worst_key}", "worst site"] if worst_key else [])]
    rows = []
    for r in history:
        loss = r.get("train", {}).get("train-loss")
        cells = [str(r["round"]), f"{loss:.4f}" if loss is not None else "-"]
        cells += [f"{r['evaluate'][k]:.3f}" if k in r.get("evaluate", {}) else "-" for k in keys]
        if worst_key:
            worst = r.get("evaluate-worst", {})
            cells += [f"{worst[worst_key]:.3f}" if worst_key in worst else "-", str(worst.get("site", "-"))]
        rows.append(cells)
    widths = [max(10, len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)) for line in [header, *rows])


# name -> (Flower class, {run-config key: constructor argument}); values and defaults come from the run config
STRATEGIES: dict[str, tuple[type, dict[str, str]]] = {
    "fedavg": (flwr_strategies.FedAvg, {}),
    "fedprox": (flwr_strategies.FedProx, {"proximal-mu": "proximal_mu"}),
    "fedadam": (flwr_strategies.FedAdam, {
        "server-lr": "eta", "server-beta-1": "beta_1", "server-beta-2": "beta_2", "server-tau": "tau"}),
    "fedyogi": (flwr_strategies.FedYogi, {
        "server-lr": "eta", "server-beta-1": "beta_1", "server-beta-2": "beta_2", "server-tau": "tau"}),
    "fedavgm": (flwr_strategies.FedAvgM, {"server-momentum": "server_momentum"}),
    "fedmedian": (flwr_strategies.FedMedian, {}),
    "fedtrimmedavg": (flwr_strategies.FedTrimmedAvg, {"trim-beta": "beta"}),
    "krum": (flwr_strategies.Krum, {"num-malicious-nodes": "num_malicious_nodes"}),
}


def build_strategy(run_config: Mapping[str, Any], *, out_dir: Path,
                   save_checkpoint: Callable[[ArrayRecord, int, dict[str, Any], str, dict[str, Any]], None],
                   server_evaluate: Callable[[int, ArrayRecord], dict[str, float]] | None = None,
                   first_round: int = 1, history: list[dict[str, Any]] | None = None) -> RunRecorder:
    """The run's strategy stack (see the module docstring), from the run config.

    Args:
        run_config: the run config; missing keys take their declared defaults.
        out_dir: the run folder.
        save_checkpoint: see :class:`RunRecorder`.
        server_evaluate: see :class:`RunRecorder`.
        first_round: the round this run starts at (after a resume).
        history: the records of the rounds before a resume.

    Raises:
        ValueError: for an unknown strategy or ``dp`` mode, ``dp`` with a strategy that does not
            average (fedmedian, fedtrimmedavg, krum), or an invalid setting.
    """
    values = with_defaults(run_config)
    name = values["strategy"].lower()
    if name not in STRATEGIES:
        raise ValueError(f"strategy '{name}' is unknown; choose one of {sorted(STRATEGIES)}.")
    if values["dp"] not in DP_MODES:
        raise ValueError(f"dp '{values['dp']}' is unknown; choose one of {list(DP_MODES)}.")
    if values["dp"] != "none" and name not in PRIVATE_STRATEGIES:
        raise ValueError(f"dp '{values['dp']}' needs a strategy that averages the updates, one of "
                         f"{list(PRIVATE_STRATEGIES)}; '{name}' selects among them instead.")
    base, params = STRATEGIES[name]
    min_nodes = values["min-available-nodes"]
    min_train_nodes = min(min_nodes, values["min-train-nodes"])
    stack: Strategy = Aggregation(base(
        fraction_train=float(values["fraction-train"]),
        fraction_evaluate=float(values["fraction-evaluate"]),
        min_available_nodes=min_nodes,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=min(min_nodes, values["min-evaluate-nodes"]),
        weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
        **{argument: values[key] for key, argument in params.items()},
    ))
    if values["dp"] != "none":
        norm_key = "dp-clipping-norm" if values["dp"].endswith("fixed") else "dp-initial-clipping-norm"
        stack = DifferentialPrivacy(stack, values["dp"], float(values["dp-noise-multiplier"]), float(values[norm_key]),
                                    min_sampled=min_train_nodes)
    record = RunRecord(out_dir, history)
    stack = RoundPolicy(stack, record, min_available_nodes=min_nodes, min_train_nodes=min_train_nodes,
                        evaluates=values["fraction-evaluate"] > 0, max_failed_rounds=values["max-failed-rounds"],
                        node_wait_timeout=float(values["node-wait-timeout"]), round_timeout=float(values["round-timeout"]))
    max_norm_ratio = float(values["max-update-norm-ratio"])
    if values["dp"] != "none" and max_norm_ratio > 0:
        # The round's median depends on every site, so one site would decide whether the others' clipped
        # updates are admitted, which the privacy guarantee does not allow; clipping bounds each site instead.
        log(INFO, "dp '%s': max-update-norm-ratio %g is not applied; clipping bounds each site's update",
            values["dp"], max_norm_ratio)
        max_norm_ratio = 0.0
    stack = UpdateScreening(stack, record, max_norm_ratio=max_norm_ratio, max_site_cases=values["max-site-cases"],
                            transport_dtype=values["transport-dtype"])
    spec = dataset_spec(values["dataset"])
    best_key = f"dice-{next(iter(spec.regions)).lower()}"
    return RunRecorder(stack, record, save_checkpoint=save_checkpoint, num_rounds=values["num-server-rounds"],
                       base_lr=float(values["learning-rate"]), lr_schedule=values["lr-schedule"], best_key=best_key,
                       first_round=first_round, server_evaluate=server_evaluate,
                       round_config={DATASET_SPEC_KEY: json.dumps(spec.to_json())})
