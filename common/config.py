"""Turn a flat kebab-case run config (``[tool.flwr.app.config]``) into typed settings.

Kept free of Flower so the CLI, tests and benchmarks use the same mapping.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import LAYOUTS, DatasetSpec, load_manifest
from .engine import TrainConfig
from .model import resolved_model_args

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def parse_model_args(text: str) -> dict[str, Any]:
    """Parse ``"base_channels=16 depth=4"`` into ``{"base_channels": 16, "depth": 4}``.

    Values are Python literals (numbers, booleans, tuples); anything else stays a string.

    Raises:
        ValueError: for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise ValueError(f"model-args item '{item}' is not name=value (e.g. 'base_channels=16 depth=4').")
        name, value = item.split("=", 1)
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``"64,64,40"`` into ``(64, 64, 40)``.

    Raises:
        ValueError: unless three positive integers are given.
    """
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape '{text}' must be three integers >= 8, e.g. '64,64,40'.")
    return shape  # type: ignore[return-value]


def dataset_spec(name_or_path: str) -> DatasetSpec:
    """A built-in layout by name, or a manifest file by path."""
    if name_or_path in LAYOUTS:
        return LAYOUTS[name_or_path]
    for candidate in (Path(name_or_path), PROJECT_ROOT / name_or_path):  # manifests shipped with the app
        if candidate.is_file():
            return load_manifest(candidate)
    raise ValueError(f"dataset '{name_or_path}' is neither a built-in layout {sorted(LAYOUTS)} nor a manifest file.")


def model_from(run_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model name, full model arguments)`` from the run config."""
    name = str(run_config.get("model", "unet2d"))
    return name, resolved_model_args(name, **parse_model_args(str(run_config.get("model-args", ""))))


def train_config_from(run_config: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` a site trains with, from the run config (and per-round overrides)."""
    values = {
        "epochs": int(run_config.get("local-epochs", 1)),
        "batch_size": int(run_config.get("batch-size", 16)),
        "learning_rate": float(run_config.get("learning-rate", 1e-3)),
        "samples_per_case": int(run_config.get("samples-per-case", 16)),
        "pos_ratio": float(run_config.get("pos-ratio", 0.67)),
        "lambda_dice": float(run_config.get("lambda-dice", 1.0)),
        "lambda_focal": float(run_config.get("lambda-focal", 1.0)),
        "focal_gamma": float(run_config.get("focal-gamma", 2.0)),
        "focal_alpha": float(run_config.get("focal-alpha", 0.75)),
        "proximal_mu": float(run_config.get("proximal-mu", 0.0)),
    }
    if "patch-size" in run_config:
        values["patch_size"] = parse_shape(str(run_config["patch-size"]))
    values.update(overrides)
    return TrainConfig(**values)
