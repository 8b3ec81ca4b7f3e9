"""Differential privacy for model updates: clipping and the Gaussian mechanism, on parameters only.

Kept free of Flower: the ClientApp clips with it (``dp = client-*``), the server's privacy
wrapper clips, averages and adds noise with it. It also holds what client and server share
about an update's arrays: :func:`numpy_arrays` and the ``transport-dtype`` choices.

What the guarantee covers is the model's *parameters* (the floating arrays training moves).
Normalisation statistics (BatchNorm running mean and variance, batch counters) are neither
clipped nor noised: noise would make a running variance negative, and they are averaged
plainly. They are computed from the sites' data, so the guarantee does not extend to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # normalisation statistics, averaged
TRANSPORT_DTYPES = ("float32", "float16")  # transport-dtype: float32 weights, or float16 deltas from the global model


def numpy_arrays(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flower ``ArrayRecord`` (any mapping of objects with ``.numpy()``) as ``{name: numpy array}``."""
    return {key: array.numpy() for key, array in record.items()}


def is_parameter(key: str, array: np.ndarray) -> bool:
    """Whether ``key`` names a parameter (a floating array that is not a normalisation statistic)."""
    return array.dtype.kind == "f" and not key.endswith(STATISTICS_SUFFIXES)


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``arrays - reference`` over the parameters (statistics excluded), in float64.

    Args:
        arrays: a site's model, ``{name: array}``.
        reference: the global model the site started from, with the same names and shapes.
    """
    squared = 0.0
    for key, value in arrays.items():
        if is_parameter(key, reference[key]):
            squared += float(np.sum((np.asarray(value, np.float64) - reference[key]) ** 2))
    return math.sqrt(squared)


def clip_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a site's update into the clipping norm: ``reference + (arrays - reference) * min(1, C / norm)``.

    Only the parameters are scaled; statistics are returned unchanged. Dtypes are kept.

    Args:
        arrays: a site's model, ``{name: array}``.
        reference: the global model the site started from.
        clipping_norm: ``C``, the L2 bound on the parameters' update.

    Returns:
        ``(clipped arrays, the update's norm before clipping)``.

    Raises:
        ValueError: when ``clipping_norm`` is not positive.
    """
    if not clipping_norm > 0:
        raise ValueError(f"clipping norm must be > 0, got {clipping_norm}; set dp-clipping-norm (or dp-initial-clipping-norm).")
    norm = update_norm(arrays, reference)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    clipped = {key: np.asarray(reference[key] + (value - reference[key]) * scale, value.dtype)
               if is_parameter(key, reference[key]) else value for key, value in arrays.items()}
    return clipped, norm


def private_mean(updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], clipping_norm: float,
                 noise_multiplier: float, num_sampled: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The Gaussian mechanism on the mean of clipped updates (DP-FedAvg with equal weights).

    Parameters: ``reference + sum(clipped updates) / num_sampled + N(0, (z C / num_sampled)^2)``.
    One site changes that sum by at most ``C``, so the noise makes each round
    ``(z, C)``-Gaussian for any one site's contribution. Dividing by the number *sampled*
    (fixed before any site answers), not by the number that answered, keeps that bound when
    sites drop out; their absence shrinks the round's step instead. Statistics: the plain
    mean of the updates that arrived, without noise.

    Args:
        updates: the sites' models, each ``{name: array}``; clipped here.
        reference: the global model the sites started from.
        clipping_norm: ``C``.
        noise_multiplier: ``z``.
        num_sampled: the sites sampled this round (``>= len(updates)``).
        rng: the noise source; never seed it from the run config, or sites could subtract the noise.

    Returns:
        The new global model's arrays; parameters in the reference's dtypes.

    Raises:
        ValueError: when there is no update or more updates than sites sampled.
    """
    if not 1 <= len(updates) <= num_sampled:
        raise ValueError(f"private mean of {len(updates)} update(s) from {num_sampled} sampled site(s): "
                         "needs at least one update and no more than were sampled.")
    clipped = [clip_update(update, reference, clipping_norm)[0] for update in updates]
    std = noise_multiplier * clipping_norm / num_sampled
    out: dict[str, np.ndarray] = {}
    for key, base in reference.items():
        if is_parameter(key, base):
            total = sum(np.asarray(update[key], np.float64) - base for update in clipped)
            out[key] = np.asarray(base + total / num_sampled + rng.normal(0.0, std, base.shape), base.dtype)
        else:
            out[key] = np.asarray(np.mean([np.asarray(update[key], np.float64) for update in clipped], axis=0))
    return out
