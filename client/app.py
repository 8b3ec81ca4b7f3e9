"""The FedLesion ClientApp: local training and validation on one site's own scans.

Only the model's arrays and scalar metrics leave the site: no case IDs, paths or voxels.
Two mods stand around the handlers, outermost first: :func:`send_as_configured` (the upload's
dtype) and :func:`clip_when_asked` (client-side DP clipping), so clipping sees float32 weights
and the upload carries the clipped update.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fedlesion.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.config import SCHEDULE_ROUNDS_KEY, model_from, train_config_from, with_defaults
from fedlesion.common.engine import evaluate as evaluate_cases
from fedlesion.common.engine import finetune_validated
from fedlesion.common.engine import train as train_cases
from fedlesion.common.engine import unlabelled_weight
from fedlesion.common.files import private_folder, safe_label
from fedlesion.common.metrics import flat_means
from fedlesion.common.model import batchnorm_keys, build_model, model_spatial_dims
from fedlesion.common.postprocess import PostProcessing
from fedlesion.common.privacy import TRANSPORT_DTYPES, clip_update, numpy_arrays

from . import site as sites

logger = logging.getLogger("flwr")

def encode_update(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What a site uploads: its model as float32 weights, or in float16 its change from the global model.

    float16 keeps 11 significant bits: rounding errs by up to 5e-4 of the value rounded. Rounded
    weights would err by 5e-4 of each weight, more than a late round's whole update; the update
    itself, the difference from the float32 global model the server keeps, loses 5e-4 of its own size
    while its entries stay above float16's smallest normal number (6.1e-5). Below it float16 keeps
    a fixed step of 6e-8, so tiny updates lose more: measured, 1.4% of the update (relative L2
    error) at an entry standard deviation of 1e-6, 14% at 1e-7. The server adds the update back
    (:func:`fedlesion.server.strategy.decode_update`). Integer counters are sent as they are.

    Args:
        trained: the site's model after training.
        sent: the global model the server sent this round.
        dtype: ``transport-dtype``, ``float32`` or ``float16``.

    Raises:
        ValueError: for another dtype.
    """
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport-dtype '{dtype}' is unknown; choose one of {list(TRANSPORT_DTYPES)}.")
    if dtype == "float32":
        return dict(trained)
    return {key: np.asarray(value - sent[key], np.float16) if value.dtype.kind == "f" else value
            for key, value in trained.items()}


def send_as_configured(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Encode a training reply's arrays as ``transport-dtype`` says, and report the bytes uploaded."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    dtype = with_defaults(context.run_config)["transport-dtype"]
    arrays = encode_update(numpy_arrays(reply.content["arrays"]), numpy_arrays(msg.content["arrays"]), dtype)
    reply.content["arrays"] = ArrayRecord({key: Array(value) for key, value in arrays.items()})
    reply.content["metrics"]["update-bytes"] = float(sum(len(array.data) for array in reply.content["arrays"].values()))
    return reply


def clip_when_asked(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client-side DP clipping (``dp = client-*``): when the round's config carries a clipping
    norm, the update's parameters are clipped to it (statistics are not: see
    :mod:`fedlesion.common.privacy`) and the reply says whether clipping was needed (``norm_bit``, from
    which the adaptive modes learn the norm)."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or KEY_CLIPPING_NORM not in msg.content["config"]:
        return reply
    clipping_norm = float(msg.content["config"][KEY_CLIPPING_NORM])
    clipped, norm = clip_update(numpy_arrays(reply.content["arrays"]), numpy_arrays(msg.content["arrays"]), clipping_norm)
    reply.content["arrays"] = ArrayRecord({key: Array(value) for key, value in clipped.items()})
    reply.content["metrics"][KEY_NORM_BIT] = int(norm > clipping_norm)
    return reply


class SiteError(RuntimeError):
    """A failure at the site, as the server may see it: its kind and phase, no details."""


def site_errors_stay_local(handler: Callable[..., Message]) -> Callable[..., Message]:
    """Log a failure in full at the site; send the server only its kind.

    Exception texts name files and cases (``CaseError`` does, on purpose, for the site's
    engineer), so they must not travel in the error reply Flower sends to the server.
    Wraps the handlers and the mods alike (a mod takes ``call_next`` as a third argument);
    a failure already reported this way passes through unchanged. The SuperNode keeps running either way.
    """

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context, *call_next: Callable[[Message, Context], Message]) -> Message:
        try:
            return handler(msg, context, *call_next)
        except SiteError:
            raise
        except Exception as exc:
            logger.exception("FedLesion %s failed at this site", msg.metadata.message_type)
            raise SiteError(f"{type(exc).__name__} at the site during {msg.metadata.message_type}; "
                            f"details are in that SuperNode's log") from None

    return guarded


app = ClientApp(mods=[site_errors_stay_local(send_as_configured), site_errors_stay_local(clip_when_asked)])


SITE_RECORD = "site"  # evaluation replies: ConfigRecord({"name": <site-name>}), the only string a site sends
SITE_NAME_MAX = 64
FEDBN_STATE = "fedbn-layers"  # context.state key: this site's own BatchNorm layers under FedBN


def _model(context: Context, site: sites.Site, arrays: ArrayRecord):  # noqa: ANN202 - torch module
    """The received global model; under ``fedbn`` with this site's own BatchNorm layers in place
    of the global ones (from the second round this site trains on: :func:`_own_batchnorm`).

    Returns:
        ``(model, spatial_dims, own)``: ``own`` is True when the site's own BatchNorm layers were loaded.
    """
    name, args = model_from(context.run_config)
    model = build_model(name, len(site.spec.channels), len(site.spec.regions), **args)
    state = arrays.to_torch_state_dict()
    own = _own_batchnorm(context, site, model) if with_defaults(context.run_config)["fedbn"] else None
    if own is not None:
        state.update(own)
    model.load_state_dict(state)
    return model.to(site.device), model_spatial_dims(name), own is not None


FEDBN_SUFFIX = ".fedbn.pt"  # <personal-dir>/<site>-node<id>-run<run>.fedbn.pt: the site's model after its last FedBN round


def personal_path(context: Context, site: sites.Site, suffix: str = ".pt") -> Path | None:
    """A file of this site's own models in :func:`personal_folder` (``<site>-node<id>-run<run><suffix>``),
    or None when the node has no personal folder."""
    folder = personal_folder(context.node_config)
    if folder is None:
        return None
    return folder / f"{site_label(site.name)}-node{context.node_id}-run{context.run_id}{suffix}"


def site_label(name: str) -> str:
    """A site name as it starts the names of the site's own model files (letters, digits, ``._-``)."""
    return safe_label(name, SITE_NAME_MAX) or "site"


def _own_batchnorm(context: Context, site: sites.Site, model) -> dict | None:  # noqa: ANN001 - torch module
    """This site's own BatchNorm layers under ``fedbn``: from ``context.state`` (the SuperNode keeps it in
    memory for the run, across the ClientApp processes it starts), else from the site's disk
    (:data:`FEDBN_SUFFIX` in its personal folder: a SuperNode restarted mid-run), else None (its first round).

    Raises:
        ValueError: when the stored layers are not this model's (another model, or a damaged file).
    """
    keys = set(batchnorm_keys(model))
    if FEDBN_STATE in context.state:
        own = context.state[FEDBN_STATE].to_torch_state_dict()
        source = "in the SuperNode's memory"
    else:
        path = personal_path(context, site, FEDBN_SUFFIX)
        if path is None or not path.is_file():
            return None
        stored = load_checkpoint(path)  # data only: a file that holds anything else is refused
        if (stored.model, stored.model_args) != model_from(context.run_config):
            raise ValueError(f"fedbn: {path} holds the layers of {stored.model} {stored.model_args}, not of this run's "
                             f"model; move it away to start this site's BatchNorm layers from the global ones")
        own = {key: value for key, value in stored.state_dict.items() if key in keys}
        source = f"in {path}"
    if set(own) != keys:
        raise ValueError(f"fedbn: this site's stored BatchNorm layers ({source}) do not match the model's")
    return own


def _keep_batchnorm(context: Context, site: sites.Site, model, server_round: int) -> None:  # noqa: ANN001
    """Under ``fedbn``, store this site's trained BatchNorm layers for its next round: in ``context.state``,
    and with the whole trained model on the site's disk when it has a personal folder (it never travels)."""
    values = with_defaults(context.run_config)
    if not values["fedbn"]:
        return
    trained = model.state_dict()
    context.state[FEDBN_STATE] = ArrayRecord({key: trained[key].detach().cpu() for key in batchnorm_keys(model)})
    _keep_at_site(context, site, model, FEDBN_SUFFIX, server_round, {"fedbn": 1.0})


def _keep_at_site(context: Context, site: sites.Site, model, suffix: str, server_round: int,  # noqa: ANN001
                  metrics: Mapping[str, float]) -> Path | None:
    """Save one of the site's own models in its personal folder (:func:`personal_path`; it never travels);
    None, saving nothing, when the node has no personal folder."""
    path = personal_path(context, site, suffix)
    if path is not None:
        name, args = model_from(context.run_config)
        save_checkpoint(Checkpoint(model=name, model_args=args, spec=site.spec,
                                   state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                                   round=server_round, run_config=with_defaults(context.run_config),
                                   metrics=dict(metrics)), path)
    return path


@app.train()
@site_errors_stay_local
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for ``local-epochs`` on this site's training cases."""
    values = with_defaults(context.run_config)
    round_config = msg.content["config"]
    site = sites.load(context.node_config, values, sites.expected_spec(round_config, context.node_config, values))
    model, spatial_dims, own = _model(context, site, msg.content["arrays"])
    server_round = int(round_config.get("server-round", 0))
    schedule_rounds = round_config.get(SCHEDULE_ROUNDS_KEY, values["num-server-rounds"])  # the server's (kept across a resume)
    if type(schedule_rounds) is not int or schedule_rounds < 1:
        raise ValueError(f"the server sent schedule-rounds {schedule_rounds!r}: not a whole number >= 1")
    # Only the FedProx server sends a proximal term; without one TrainConfig's default (none) applies.
    proximal = {"proximal_mu": float(round_config["proximal-mu"])} if "proximal-mu" in round_config else {}
    config = train_config_from(
        values,
        learning_rate=float(round_config.get("learning-rate", values["learning-rate"])),
        # Seeded by site and round (not node ID), so a resumed run retrains exactly as the original would.
        seed=values["seed"] * 100_003 + server_round * 1_009 + zlib.crc32(site.name.encode()) % 997,
        # FixMatch's lambda_u, ramped up over the rounds (used only where unlabelled cases train)
        unlabelled_weight=unlabelled_weight(values["fixmatch-weight"], server_round, schedule_rounds,
                                            values["fixmatch-rampup"]),
        **proximal,
    )
    if values["fedbn"] and not own and server_round > 1:
        logger.warning("fedbn: no BatchNorm layers of this site are stored (SuperNode restarted without a personal-dir, "
                       "or run resumed); round %d starts from the global model's averaged ones", server_round)
    unlabelled = site.unlabelled if values["semi-supervised"] else []
    stats = train_cases(model, site.train, spatial_dims, config, site.device, unlabelled=unlabelled,
                        postprocessing=PostProcessing.from_run_config(values))  # an offline teacher cleans as predict does
    _keep_batchnorm(context, site, model, server_round)
    fixmatch = "unlabelled-loss" in stats  # it ran: unlabelled cases and lambda_u > 0
    metrics = MetricRecord({
        "train-loss": stats["train-loss"],
        "train-seconds": stats["train-seconds"],
        # FedAvg weights updates by this: cases, not batches or slices (unlabelled ones too when they trained).
        "num-examples": len(site.train) + (len(unlabelled) if fixmatch else 0),
        # Under semi-supervised every site sends the same metric names (the server rejects a reply whose names
        # differ from the round's), 0 where it had no unlabelled case to train on.
        **({key: float(stats.get(key, 0.0)) for key in UNLABELLED_METRICS} if values["semi-supervised"] else {}),
        **({"fedbn-own-layers": float(own)} if values["fedbn"] else {}),  # 1: trained with its own BatchNorm layers
        **site.counts(),
    })
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


UNLABELLED_METRICS = ("unlabelled-loss", "unlabelled-confident", "unlabelled-weight")  # FixMatch, per round
FINETUNE = "train.finetune"  # message type: fine-tune the final model at the site, keep it there, send scores only
PERSONAL_DIR_ENV = "FEDLESION_PERSONAL_DIR"


def personal_folder(node_config: Mapping[str, Any]) -> Path | None:
    """Where this site keeps its fine-tuned models: node config ``personal-dir``, else ``$FEDLESION_PERSONAL_DIR``
    (a 0700 folder this user owns); None when neither is set (the model is scored, not kept)."""
    folder = str(node_config.get("personal-dir", "")) or os.environ.get(PERSONAL_DIR_ENV, "")
    if not folder:
        return None
    return private_folder(Path(folder))


@app.train("finetune")
@site_errors_stay_local
def finetune(msg: Message, context: Context) -> Message:
    """After the last round: score the final global model on this site's validation cases, fine-tune it
    for ``finetune-epochs`` on the site's training cases, score that personal model, and keep it at the
    site (:func:`personal_folder`). The reply holds the two sets of scores and counts: never the model."""
    values = with_defaults(context.run_config)
    round_config = msg.content["config"]
    site = sites.load(context.node_config, values, sites.expected_spec(round_config, context.node_config, values))
    epochs = int(round_config.get("finetune-epochs", values["finetune-epochs"]))
    if not 1 <= epochs <= 10_000:
        raise ValueError(f"finetune-epochs {epochs} is not in [1, 10000]")
    model, spatial_dims, _ = _model(context, site, msg.content["arrays"])
    config = train_config_from(values, epochs=epochs,
                               learning_rate=float(round_config.get("learning-rate", values["finetune-learning-rate"])),
                               proximal_mu=values["finetune-proximal-mu"],  # anchored at the global model it starts from
                               seed=values["seed"] * 100_003 + 999_983 + zlib.crc32(site.name.encode()) % 997)
    if values["finetune-select"]:
        regions = list(site.spec.regions)
        summaries: list[dict] = []  # with validation cases: the global model's, then the fine-tuned one's

        def case_scores(candidate, cases) -> list[float]:  # noqa: ANN001 - torch module
            per_case, summary = _evaluation(candidate, site, cases, spatial_dims, values)
            summaries.append(summary)
            return [float(np.mean([case[r]["dice"] for r in regions])) for case in per_case]

        stats = finetune_validated(model, site.train, site.val, case_scores, spatial_dims, config, site.device)
        kept = bool(stats["finetune-kept"])
        logger.info("site %s: fine-tuned model %s (mean Dice %.3f against the global model's %.3f on %d case(s) it "
                    "did not train on%s)", site.name, "kept" if kept else "not better: the global model kept instead",
                    stats["finetune-select-personal"], stats["finetune-select-global"],
                    int(stats["finetune-select-cases"]), "; a fine-tuning diverged" if stats["finetune-diverged"] else "")
        # The validation cases chose the model: their scores are reused, and read in its favour.
        before = flat_means(summaries[0], regions) if site.val and summaries else None
        after = flat_means(summaries[1], regions) if before is not None and kept else before
    else:
        before = _scores(model, site, spatial_dims, values) if site.val else None
        stats = train_cases(model, site.train, spatial_dims, config, site.device)
        after = _scores(model, site, spatial_dims, values) if site.val else None
    kept = bool(stats.get("finetune-kept", 1.0))
    path = _keep_at_site(context, site, model, ".pt", int(round_config.get("server-round", 0)),
                         {"finetune-epochs": epochs, "finetune-kept": float(kept),
                          **({"train-loss": stats["train-loss"]} if "train-loss" in stats else {})})
    if path is not None:
        logger.info("site %s: personal model (%s) kept at %s", site.name,
                    f"fine-tuned {epochs} epoch(s)" if kept else "the global model", path)
    else:
        logger.warning("site %s: no personal-dir (node config) or $%s: the fine-tuned model is scored, not kept",
                       site.name, PERSONAL_DIR_ENV)
    metrics = {"num-examples": len(site.val), "finetune-epochs": float(epochs),
               "personal-kept": float(path is not None), **site.counts(),
               **{k: v for k, v in stats.items() if k.startswith("finetune-") or k == "train-loss"}}
    if after is not None:
        metrics.update(after)  # the personal model: the keys an evaluation reply has
        metrics.update({f"global-{k}": v for k, v in before.items()})
        # 1: these scores also chose the model (finetune-select on validation cases), so they read in its favour
        metrics["finetune-scores-chose"] = float(bool(values["finetune-select"]) and stats.get("finetune-select-cases", 0) > 0)
    return _scores_reply(msg, context, site, metrics)


def _evaluation(model, site: sites.Site, cases, spatial_dims: int, run_config: Mapping[str, Any]):  # noqa: ANN001, ANN202
    """``(per_case, summary)`` of the model on some of the site's cases, post-processed as the run says."""
    return evaluate_cases(model, cases, site.spec, spatial_dims, site.device,
                          patch_size=train_config_from(run_config).patch_size,
                          postprocessing=PostProcessing.from_run_config(run_config))


def _scores(model, site: sites.Site, spatial_dims: int, run_config: Mapping[str, Any]) -> dict[str, float]:  # noqa: ANN001
    """The model's per-region means on the site's validation cases, post-processed as the run says."""
    return flat_means(_evaluation(model, site, site.val, spatial_dims, run_config)[1], list(site.spec.regions))


def _scores_reply(msg: Message, context: Context, site: sites.Site, metrics: Mapping[str, float]) -> Message:
    """A reply of scalar metrics, with the site's name for per-site scores: only a name the hospital chose
    (node config ``site-name``; in simulation the site's own label), never one derived from its data folder's path."""
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if "site-name" in context.node_config or "partition-id" in context.node_config:
        content[SITE_RECORD] = ConfigRecord({"name": site.name[:SITE_NAME_MAX]})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@site_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this site's validation cases, per region, post-processed as the run says."""
    site = sites.load(context.node_config, context.run_config,
                      sites.expected_spec(msg.content["config"] if "config" in msg.content else {},
                                          context.node_config, context.run_config))
    model, spatial_dims, _ = _model(context, site, msg.content["arrays"])
    metrics = {"num-examples": len(site.val), **site.counts(), **_scores(model, site, spatial_dims, context.run_config)}
    return _scores_reply(msg, context, site, metrics)
