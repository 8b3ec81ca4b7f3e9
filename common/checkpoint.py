"""Self-describing checkpoints: weights plus everything needed to rebuild and use them.

A checkpoint holds the weights, the model name and arguments, the dataset spec (channels,
labels, regions), the round or epoch it was taken at, its metrics and the run config, so
``evaluate`` and ``predict`` need nothing but the file.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import TrainConfig, declared_run_config, parse_shape
from .data import DatasetSpec
from .files import replace_private
from .model import build_model, model_spatial_dims
from .postprocess import PostProcessing

FORMAT = "fedlesion-checkpoint/1"

# Run-config values that name local paths or select cases by ID: they stay in the run folder's
# run_config.json and never go into a checkpoint, which is what gets shared (the global model, a site's model).
LOCAL_RUN_CONFIG_KEYS = frozenset({
    "output-dir", "resume-from", "data-root", "manifest", "server-eval-data", "server-eval-manifest",
    "server-eval-include", "data", "train_cases", "val_cases",
})
PATH_VALUED_KEYS = ("dataset", "split")  # a layout or split kind by name is kept, a file path is not


def shareable_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` without local paths and case IDs (:data:`LOCAL_RUN_CONFIG_KEYS`; ``dataset`` and
    ``split`` when they name a file). Counts of cases (``train-case-count``) are kept."""
    def is_path(value: Any) -> bool:
        return isinstance(value, str) and ("/" in value or "\\" in value or value.endswith(".json"))

    return {key: value for key, value in run_config.items()
            if key not in LOCAL_RUN_CONFIG_KEYS and not (key in PATH_VALUED_KEYS and is_path(value))}


@dataclass
class Checkpoint:
    """What a checkpoint file holds."""

    model: str
    model_args: dict[str, Any]
    spec: DatasetSpec
    state_dict: dict[str, torch.Tensor]
    round: int = 0  # federated round (0 for centralized training)
    epoch: int = 0  # epochs of centralized training
    metrics: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the server optimiser's state
    source: str = ""  # the file it was loaded from, for error messages (not saved)

    @property
    def spatial_dims(self) -> int:
        return model_spatial_dims(self.model)

    @property
    def crop_foreground(self) -> bool:
        """Whether the model was trained on volumes cropped to their nonzero box (predict the same way)."""
        default = declared_run_config()["crop-foreground"]
        value = self.run_config.get("crop_foreground", self.run_config.get("crop-foreground", default))
        if not isinstance(value, (bool, np.bool_)):  # bool("false") is True: a wrong type is refused, not guessed
            raise ValueError(f"{self.source or 'checkpoint'}: its recorded crop-foreground {value!r} is not true or false")
        return bool(value)

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The 3D training patch, which is also the sliding-window size.

        Raises:
            ValueError: naming the file, when the recorded patch is not three integers >= 8.
        """
        value = self.run_config.get("patch_size", self.run_config.get("patch-size", TrainConfig.patch_size))
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            value = ",".join(map(str, value))
        try:
            if not isinstance(value, str):
                raise ValueError(f"shape {value!r} must be three integers >= 8")
            return parse_shape(value)
        except ValueError as exc:
            raise ValueError(f"{self.source or 'checkpoint'}: its recorded patch size is unusable: {exc}") from None

    def postprocessing(self, overrides: Mapping[str, Any] | None = None) -> PostProcessing:
        """The post-processing the model was trained with (the declared defaults for checkpoints that predate it).

        Args:
            overrides: run-config values (``postprocess``, ``postprocess-min-mm3``, ``postprocess-components``)
                that win over the checkpoint's, e.g. ``fedlesion evaluate --no-postprocess``.

        Raises:
            ValueError: for a value of the wrong type.
        """
        return PostProcessing.from_run_config({**self.run_config, **(overrides or {})})

    def build(self) -> nn.Module:
        """The model with these weights loaded.

        Raises:
            ValueError: when the weights do not fit the model the checkpoint names.
        """
        model = build_model(self.model, len(self.spec.channels), len(self.spec.regions), **self.model_args)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            raise ValueError(f"checkpoint {self.source or ''} of {self.model} {self.model_args}: its weights do not fit that model "
                             f"({lines[0][:200]}; {len(lines) - 1} more line(s)).") from None
        return model


def state_dict_from_arrays(model: nn.Module, arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    """Pair a flat list of arrays (Flower's order) with the model's state-dict keys.

    Raises:
        ValueError: when the count or a shape does not match the model.
    """
    keys = list(model.state_dict())
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays for this model, got {len(arrays)}.")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, array, ref in zip(keys, arrays, model.state_dict().values()):
        if tuple(array.shape) != tuple(ref.shape):
            raise ValueError(f"array for '{key}' has shape {tuple(array.shape)}, the model expects {tuple(ref.shape)}.")
        out[key] = torch.as_tensor(np.asarray(array)).to(ref.dtype)
    return out


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename.

    A crash mid-write leaves the previous file at ``path`` intact; the temporary file a
    killed writer left behind is removed by the next save (one writer per path). The file has
    mode 0600 (the weights are a function of patients' scans). Its run config is
    :func:`shareable_run_config`: no local paths, no case IDs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    payload = {
        "format": FORMAT,
        "model": checkpoint.model,
        "model_args": checkpoint.model_args,
        "spec": checkpoint.spec.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()},
        "round": checkpoint.round,
        "epoch": checkpoint.epoch,
        "metrics": checkpoint.metrics,
        "run_config": shareable_run_config(checkpoint.run_config),
        "extra": checkpoint.extra,
    }
    return replace_private(path, lambda handle: torch.save(payload, handle))


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file holds."""
    return next((line.strip() for line in str(exc).splitlines() if line.startswith(("Trying to load", "Unsupported", "Can only build"))), "UnpicklingError")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: when the file is missing, unreadable, or not a FedLesion checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: file not found.")
    # Only data is unpickled: tensors, lists, dicts, numbers, strings and NumPy scalars (metrics
    # computed with NumPy). Anything else could run code while loading, so it is refused.
    numpy_scalars = [np._core.multiarray.scalar, np.dtype, *(type(np.dtype(code)) for code in "?bhilqBHILQefdg")]
    try:
        with torch.serialization.safe_globals(numpy_scalars):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint {path}: refused, it is either corrupt or holds objects other than tensors, "
                         "numbers, strings, lists and dicts (which could run code when loaded); nothing in it was run. "
                         f"Load only checkpoints FedLesion wrote ({_unpickler_reason(exc)}).") from None
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not a FedLesion checkpoint (expected format '{FORMAT}').")
    missing = sorted({"model", "model_args", "spec", "state_dict"} - set(payload))
    if missing:
        raise ValueError(f"checkpoint {path}: incomplete, it lacks {missing}.")
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"checkpoint {path}: its state_dict is not a mapping of tensors.")
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"checkpoint {path}: {len(broken)} tensor(s) hold NaN or Inf (e.g. '{broken[0]}'); the "
                         "model diverged when it was trained and cannot be used.")
    if not isinstance(payload["spec"], dict):
        raise ValueError(f"checkpoint {path}: its dataset spec is not an object.")
    kinds = {"model": str, "model_args": dict, "round": (int, np.integer), "epoch": (int, np.integer), "metrics": dict,
             "run_config": dict, "extra": dict}
    wrong = [key for key, kind in kinds.items()
             if key in payload and (not isinstance(payload[key], kind) or isinstance(payload[key], bool))]
    if wrong:
        raise ValueError(f"checkpoint {path}: {', '.join(wrong)} of the wrong type (a FedLesion checkpoint has a "
                         "model name, objects for its arguments, run config, metrics and extra, whole numbers for "
                         "round and epoch).")
    return Checkpoint(
        model=payload["model"],
        model_args=payload["model_args"],
        spec=DatasetSpec.from_json(payload["spec"], source=str(path)),
        state_dict=state_dict,
        round=int(payload.get("round", 0)),
        epoch=int(payload.get("epoch", 0)),
        metrics=payload.get("metrics", {}),
        run_config=payload.get("run_config", {}),
        extra=payload.get("extra", {}),
        source=str(path),
    )
