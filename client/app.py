"""The FedLesion ClientApp: local training and validation on one site's own scans.

Only the model's arrays and scalar metrics leave the site: no case IDs, paths or voxels.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from common.config import model_from, train_config_from
from common.engine import evaluate as evaluate_cases
from common.engine import train as train_cases
from common.metrics import flat_means
from common.model import build_model, model_spatial_dims

from . import site as sites

logger = logging.getLogger("flwr")


def clip_when_asked(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's client-side DP clipping mods, applied to training when the run's ``dp`` is ``client-*``."""
    mode = str(context.run_config.get("dp", "none"))
    if msg.metadata.message_type == MessageType.TRAIN and mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    if msg.metadata.message_type == MessageType.TRAIN and mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[clip_when_asked])


def site_errors_stay_local(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Log a failure in full at the site; send the server only its kind.

    Exception texts name files and cases (``CaseError`` does, on purpose, for the site's
    engineer), so they must not travel in the error reply Flower sends to the server.
    The SuperNode keeps running either way.
    """

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            logger.exception("FedLesion %s failed at this site", msg.metadata.message_type)
            raise RuntimeError(f"{type(exc).__name__} at the site during {msg.metadata.message_type}; "
                               f"details are in that SuperNode's log") from None

    return guarded


def _model(context: Context, site: sites.Site, arrays: ArrayRecord):  # noqa: ANN202 - torch module
    name, args = model_from(context.run_config)
    model = build_model(name, len(site.spec.channels), len(site.spec.regions), **args)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.to(site.device), model_spatial_dims(name)


TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def transport_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The state dict as sent: floating tensors cast to ``transport-dtype`` (``float16`` halves the
    upload; the server aggregates in float32), integer counters unchanged.

    Raises:
        ValueError: for a dtype other than ``float32`` or ``float16``.
    """
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport-dtype '{dtype}' is unknown; choose one of {sorted(TRANSPORT_DTYPES)}.")
    target = TRANSPORT_DTYPES[dtype]
    return {k: v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}


@app.train()
@site_errors_stay_local
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for ``local-epochs`` on this site's training cases."""
    site = sites.load(context.node_config, context.run_config)
    model, spatial_dims = _model(context, site, msg.content["arrays"])
    round_config = msg.content["config"]
    server_round = int(round_config.get("server-round", 0))
    config = train_config_from(
        context.run_config,
        learning_rate=float(round_config.get("learning-rate", context.run_config.get("learning-rate", 1e-3))),
        proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        # Seeded by site and round (not node ID), so a resumed run retrains exactly as the original would.
        seed=int(context.run_config.get("seed", 0)) * 100_003 + server_round * 1_009 + zlib.crc32(site.name.encode()) % 997,
    )
    stats = train_cases(model, site.train, spatial_dims, config, site.device)
    arrays = ArrayRecord(transport_state(model.state_dict(), str(context.run_config.get("transport-dtype", "float32"))))
    metrics = MetricRecord({
        "train-loss": stats["train-loss"],
        "train-seconds": stats["train-seconds"],
        # FedAvg weights updates by this: cases, not batches or slices.
        "num-examples": len(site.train),
        # What this site uploads this round: the arrays' serialized bytes.
        "update-bytes": float(sum(len(array.data) for array in arrays.values())),
        **site.counts(),
    })
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@site_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this site's validation cases, per region."""
    site = sites.load(context.node_config, context.run_config)
    model, spatial_dims = _model(context, site, msg.content["arrays"])
    regions = list(site.spec.regions)
    patch_size = train_config_from(context.run_config).patch_size
    _, summary = evaluate_cases(model, site.val, regions, spatial_dims, site.device, patch_size=patch_size)
    values = {"num-examples": len(site.val), **site.counts(), **flat_means(summary, regions)}
    return Message(content=RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
