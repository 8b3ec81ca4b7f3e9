"""Turn a flat kebab-case run config (``[tool.flwr.app.config]``) into typed settings.

Kept free of Flower so the CLI, tests and benchmarks use the same mapping.
"""

from __future__ import annotations

import ast
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from .data import LAYOUTS, DatasetSpec, builtin_spec, load_manifest, shipped_manifests
from .model import resolved_model_args

APP_CONFIG = "[tool.flwr.app.config] in the app's pyproject.toml"  # where the run config is declared, for messages


@cache  # read once per process: every with_defaults() call asks for it
def app_pyproject_text() -> tuple[str, str]:
    """``(where, text)`` of the app's ``pyproject.toml``: the repository's in a checkout or a FAB (whose
    ``pyproject.toml`` ``flwr build`` writes from it), the copy an installed wheel carries
    (``fedlesion/app.toml``, read through ``importlib.resources``)."""
    from fedlesion import CHECKOUT

    if CHECKOUT is not None:
        path = CHECKOUT / "pyproject.toml"
        return str(path), _read(path)
    return "fedlesion/app.toml (installed)", files("fedlesion").joinpath("app.toml").read_text(encoding="utf-8")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); the app's pyproject.toml declares every run-config key "
                         "and its default.") from exc


@cache
def _declared(where: str, text: str) -> dict[str, Any]:
    try:
        return dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])
    except (KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{where}: cannot read the [tool.flwr.app.config] table ({exc}); the app's pyproject.toml "
                         "declares every run-config key and its default.") from exc


def declared_run_config(app_dir: Path | None = None) -> dict[str, Any]:
    """The run config's keys and defaults, as declared under ``[tool.flwr.app.config]`` in ``pyproject.toml``.

    Args:
        app_dir: a Flower app folder holding ``pyproject.toml``; ``None``: this app's own
            (:func:`app_pyproject_text`).

    Returns:
        A fresh ``{key: default}`` dict (kebab-case keys, TOML-typed values).

    Raises:
        ValueError: when the file or its table cannot be read.
    """
    if app_dir is None:
        return dict(_declared(*app_pyproject_text()))
    path = Path(app_dir) / "pyproject.toml"
    return dict(_declared(str(path), _read(path)))


# Allowed values of the run config's numeric keys, declared once beside the defaults' file: (lowest,
# highest, whether the lowest itself is allowed). Every float must also be finite. Checked by
# with_defaults, so the launcher, the ServerApp and every ClientApp refuse the same values.
INF = float("inf")
RANGES: dict[str, tuple[float, float, bool]] = {
    "num-server-rounds": (1, INF, True), "fraction-train": (0, 1, False), "fraction-evaluate": (0, 1, True),
    "min-available-nodes": (1, INF, True), "min-train-nodes": (1, INF, True), "min-evaluate-nodes": (0, INF, True),
    "round-timeout": (0, INF, False), "max-failed-rounds": (0, INF, True), "node-wait-timeout": (0, INF, False),
    "max-update-norm-ratio": (0, INF, True), "max-site-cases": (1, INF, True),
    "dp-noise-multiplier": (0, INF, True), "dp-clipping-norm": (0, INF, False), "dp-initial-clipping-norm": (0, INF, False),
    "proximal-mu": (0, INF, True), "server-lr": (0, INF, False), "server-beta-1": (0, 0.999999, True),
    "server-beta-2": (0, 0.999999, True), "server-tau": (0, INF, False), "server-momentum": (0, 0.999999, True),
    "trim-beta": (0, 0.499999, True), "num-malicious-nodes": (0, INF, True), "server-eval-every": (1, INF, True),
    # What a server may ask of a site's hardware is bounded (with the model's size, common/model.py).
    "local-epochs": (1, 10_000, True), "local-steps": (0, 1_000_000, True), "batch-size": (1, 4096, True),
    "finetune-epochs": (0, 10_000, True), "finetune-learning-rate": (0, INF, False), "finetune-proximal-mu": (0, INF, True),
    "label-fraction": (0, 1, True), "fixmatch-threshold": (0.5, 1, False), "fixmatch-weight": (0, INF, True),
    "fixmatch-rampup": (0, 1, True), "fixmatch-negative-share": (0, 1, True), "fixmatch-ema-decay": (0, 0.999999, True),
    "learning-rate": (0, INF, False), "samples-per-case": (1, 100_000, True), "pos-ratio": (0, 1, True),
    "lambda-dice": (0, INF, True), "lambda-focal": (0, INF, True), "focal-gamma": (0, INF, True),
    "focal-alpha": (0, 1, True), "val-fraction": (0, 0.999999, True), "seed": (0, INF, True),
    "postprocess-min-mm3": (0, INF, True), "postprocess-components": (0, INF, True),
    "split-alpha": (0, INF, False), "synth-cases-per-site": (1, INF, True),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "lr-schedule": ("constant", "cosine"),
    "transport-dtype": ("float32", "float16"),
    "dp": ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"),
    "fixmatch-teacher": ("student", "ema", "offline"), "fixmatch-loss": ("hard", "soft"),
}
MAX_SYNTH_SIDE = 512  # synthetic volumes are BraTS-like: 240 x 240 x 155 at most in practice


def _check_value(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"run-config '{key}' = {value!r} must be a finite number.")
    if key in RANGES:
        low, high, low_allowed = RANGES[key]
        if value < low or (value == low and not low_allowed) or value > high:
            allowed = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if high < INF else "")
            raise ValueError(f"run-config '{key}' = {value!r} is out of range: it must be {allowed}.")
    if key in CHOICES and value not in CHOICES[key]:
        raise ValueError(f"run-config '{key}' = {value!r} is not one of {list(CHOICES[key])}.")


def with_defaults(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The declared defaults overlaid with ``run_config``, each value of its declared type and range.

    An integer is accepted (and turned into a float) where a float is declared; every other
    mismatch, a boolean for a number included, is an error. Numbers must lie in :data:`RANGES`
    and be finite, choices in :data:`CHOICES`; ``model`` and ``model-args`` must name a
    registered model and its arguments; ``patch-size`` and ``synth-shape`` must be shapes.
    Nothing here reads a file (a site must not read one a run config names).

    Args:
        run_config: a flat kebab-case run config, e.g. Flower's ``context.run_config`` or a preset.

    Returns:
        Every declared key with its value.

    Raises:
        ValueError: for a key that is not declared, or a value of the wrong type or out of range.
    """
    values = declared_run_config()
    for key, value in run_config.items():
        if key not in values:
            raise ValueError(f"unknown run-config key '{key}'; the keys are those under [tool.flwr.app.config] "
                             f"in {APP_CONFIG}.")
        expected = type(values[key])
        if expected is float and type(value) is int:
            value = float(value)
        elif type(value) is not expected:
            raise ValueError(f"run-config '{key}' = {value!r} has type {type(value).__name__}; it must be "
                             f"{expected.__name__}, as its declared default {values[key]!r} in {APP_CONFIG}.")
        _check_value(key, value)
        values[key] = value
    if run_config:  # the declared defaults themselves are valid
        resolved_model_args(values["model"], **parse_model_args(values["model-args"]))
        parse_shape(values["patch-size"])
        if max(parse_shape(values["synth-shape"])) > MAX_SYNTH_SIDE:
            raise ValueError(f"run-config 'synth-shape' = {values['synth-shape']!r}: each side must be <= {MAX_SYNTH_SIDE}.")
    return values


def parse_model_args(text: str) -> dict[str, Any]:
    """Parse ``"base_channels=16 depth=4"`` into ``{"base_channels": 16, "depth": 4}``.

    Values are Python literals (numbers, booleans, tuples); anything else stays a string.

    Raises:
        ValueError: for an item without ``=`` or a name given twice.
    """
    out: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise ValueError(f"model-args item '{item}' is not name=value (e.g. 'base_channels=16 depth=4').")
        if item.split("=", 1)[0] in out:
            raise ValueError(f"model-args names '{item.split('=', 1)[0]}' twice.")
        name, value = item.split("=", 1)
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


MAX_SHAPE_SIDE = 1024  # voxels: above any scan's side; a larger patch from a received checkpoint is refused


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``"64,64,40"`` into ``(64, 64, 40)``.

    Raises:
        ValueError: unless three integers from 8 to ``MAX_SHAPE_SIDE`` are given.
    """
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8 or max(shape) > MAX_SHAPE_SIDE:
        raise ValueError(f"shape '{text}' must be three integers from 8 to {MAX_SHAPE_SIDE}, e.g. '64,64,40'.")
    return shape  # type: ignore[return-value]


DATASET_SPEC_KEY = "dataset-spec"  # round-config key: the shared model's DatasetSpec as JSON, sent by the server
SCHEDULE_ROUNDS_KEY = "schedule-rounds"  # round-config key: the rounds the schedules (learning rate, FixMatch ramp-up) run over


def dataset_spec(name_or_path: str) -> DatasetSpec:
    """A built-in layout by name, or a manifest file by path."""
    spec = builtin_spec(name_or_path)
    if spec is not None:
        return spec
    if Path(name_or_path).is_file():
        return load_manifest(name_or_path)
    raise ValueError(f"dataset '{name_or_path}' is neither a built-in layout {sorted(LAYOUTS)}, a shipped manifest "
                     f"{shipped_manifests()} nor a manifest file.")


def model_from(run_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(model name, full model arguments)`` from the run config."""
    values = with_defaults(run_config)
    return values["model"], resolved_model_args(values["model"], **parse_model_args(values["model-args"]))


def _from_run_config(key: str, parse: Callable[[Any], Any] | None = None) -> Any:
    """A :class:`TrainConfig` field set by run-config ``key``, whose default is the declared one."""
    default = declared_run_config()[key]
    return field(default=parse(default) if parse else default, metadata={"run_config": key, "parse": parse})


@dataclass
class TrainConfig:
    """Local training settings. A field set by a run-config key defaults to that key's declared value."""

    epochs: int = _from_run_config("local-epochs")  # passes over the site's cases per call (per federated round)
    steps: int = _from_run_config("local-steps")  # > 0: an epoch is this many optimiser steps instead of one pass
    batch_size: int = _from_run_config("batch-size")  # slices (2D) or patches (3D) per optimiser step
    learning_rate: float = _from_run_config("learning-rate")  # Adam; the server may send a per-round value
    weight_decay: float = 1e-5
    samples_per_case: int = _from_run_config("samples-per-case")  # slices/patches drawn from each case per epoch
    pos_ratio: float = _from_run_config("pos-ratio")  # fraction of samples centred on lesion (lesion-aware sampling)
    patch_size: tuple[int, int, int] = _from_run_config("patch-size", parse_shape)  # 3D models only
    augment: bool = True
    lambda_dice: float = _from_run_config("lambda-dice")
    lambda_focal: float = _from_run_config("lambda-focal")
    focal_gamma: float = _from_run_config("focal-gamma")
    focal_alpha: float = _from_run_config("focal-alpha")
    fixmatch_threshold: float = _from_run_config("fixmatch-threshold")  # tau: confident voxels only
    # and this share of each region's predicted-negative brain voxels, the least likely ones
    fixmatch_negative_share: float = _from_run_config("fixmatch-negative-share")
    fixmatch_teacher: str = _from_run_config("fixmatch-teacher")  # student | ema (mean teacher) | offline (self-training)
    fixmatch_ema_decay: float = _from_run_config("fixmatch-ema-decay")
    fixmatch_loss: str = _from_run_config("fixmatch-loss")  # hard (FixMatch) | soft (consistency)
    # lambda_u: weight of the unlabelled (FixMatch) loss, the ramped value of this round (see unlabelled_weight)
    unlabelled_weight: float = _from_run_config("fixmatch-weight")
    # Weight of ||w - w_start||^2 / 2 (w_start: the weights training starts from). FedProx's server sends it each
    # round; a site's fine-tuning takes finetune-proximal-mu, `train --init-from` --proximal-mu. 0 disables it, so
    # pooled and local-only baselines built from the run config get no proximal term.
    proximal_mu: float = 0.0
    num_workers: int = 0  # DataLoader workers; 0 keeps simulation clients to one process
    seed: int | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainConfig: {item.name} must be a finite number, got {value}.")
        for name in ("epochs", "batch_size", "samples_per_case"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}.")
        if self.steps < 0:
            raise ValueError(f"TrainConfig: steps must be >= 0 (0: an epoch is one pass), got {self.steps}.")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig: learning_rate must be > 0, got {self.learning_rate}.")
        if self.proximal_mu < 0:
            raise ValueError(f"TrainConfig: proximal_mu must be >= 0, got {self.proximal_mu}.")
        if not 0.5 < self.fixmatch_threshold <= 1.0:
            raise ValueError(f"TrainConfig: fixmatch_threshold must be in (0.5, 1], got {self.fixmatch_threshold}.")
        if not 0.0 <= self.fixmatch_negative_share <= 1.0:
            raise ValueError(f"TrainConfig: fixmatch_negative_share must be in [0, 1], got {self.fixmatch_negative_share}.")
        for name, key in (("fixmatch_teacher", "fixmatch-teacher"), ("fixmatch_loss", "fixmatch-loss")):
            if getattr(self, name) not in CHOICES[key]:
                raise ValueError(f"TrainConfig: {name} must be one of {list(CHOICES[key])}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.fixmatch_ema_decay < 1.0:
            raise ValueError(f"TrainConfig: fixmatch_ema_decay must be in [0, 1), got {self.fixmatch_ema_decay}.")
        if self.fixmatch_loss == "hard" and self.fixmatch_threshold == 1.0 and self.fixmatch_negative_share == 0.0:
            raise ValueError("TrainConfig: fixmatch_threshold 1.0 with fixmatch_negative_share 0 leaves no voxel "
                             "confident, so FixMatch would learn nothing; lower the threshold or raise the share.")
        if self.unlabelled_weight < 0:
            raise ValueError(f"TrainConfig: unlabelled_weight must be >= 0, got {self.unlabelled_weight}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_config_from(run_config: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` a site trains with, from the run config (and per-round overrides).

    ``proximal-mu`` is not read here: the FedProx server sends it each round and the client
    passes it as an override.

    Args:
        run_config: a flat kebab-case run config; missing keys take their declared defaults.
        **overrides: :class:`TrainConfig` fields that win over the run config.

    Raises:
        ValueError: for an unknown key or a value of the wrong type (see :func:`with_defaults`).
    """
    values = with_defaults(run_config)
    settings = {}
    for item in fields(TrainConfig):
        key = item.metadata.get("run_config")
        if key is not None:
            parse = item.metadata["parse"]
            settings[item.name] = parse(values[key]) if parse else values[key]
    return TrainConfig(**{**settings, **overrides})
