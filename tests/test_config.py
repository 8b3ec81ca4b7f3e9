"""One source of truth for defaults: the ``[tool.flwr.app.config]`` table of pyproject.toml."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from fedlesion.common.api import train_centralized
from fedlesion.common.config import TrainConfig, declared_run_config, parse_shape, train_config_from, with_defaults
from fedlesion.cli import _train_config, build_parser, main
from fedlesion.common.checkpoint import load_checkpoint

DECLARED = declared_run_config()
CLI_TRAIN = build_parser().parse_args(["train", "--data", "d", "--out", "o"])


@pytest.mark.parametrize(
    "key, field",
    [
        ("local-epochs", "epochs"),
        ("batch-size", "batch_size"),
        ("learning-rate", "learning_rate"),
        ("samples-per-case", "samples_per_case"),
        ("pos-ratio", "pos_ratio"),
        ("patch-size", "patch_size"),
        ("lambda-dice", "lambda_dice"),
        ("lambda-focal", "lambda_focal"),
        ("focal-gamma", "focal_gamma"),
        ("focal-alpha", "focal_alpha"),
        ("fixmatch-threshold", "fixmatch_threshold"),
        ("fixmatch-negative-share", "fixmatch_negative_share"),
        ("fixmatch-weight", "unlabelled_weight"),
        ("fixmatch-teacher", "fixmatch_teacher"),
        ("fixmatch-ema-decay", "fixmatch_ema_decay"),
        ("fixmatch-loss", "fixmatch_loss"),
    ],
)
def test_training_defaults_are_the_declared_ones(key: str, field: str) -> None:
    declared = parse_shape(DECLARED[key]) if key == "patch-size" else DECLARED[key]
    assert getattr(TrainConfig(), field) == declared
    assert getattr(train_config_from({}), field) == declared
    if field != "epochs":  # `fedlesion train --epochs` counts all epochs, not one round's
        assert getattr(_train_config(CLI_TRAIN), field) == declared


@pytest.mark.parametrize(
    "key, argument",
    [("batch-size", "batch_size"), ("samples-per-case", "samples_per_case"), ("pos-ratio", "pos_ratio"),
     ("val-fraction", "val_fraction"), ("seed", "seed")],
)
def test_cli_train_defaults_are_the_declared_ones(key: str, argument: str) -> None:
    # learning rate and patch: through _train_config above (left unset, they resolve there, or from --init-from)
    assert getattr(CLI_TRAIN, argument) == DECLARED[key]


def test_cli_train_fixmatch_settings_reach_the_training_config() -> None:
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--fixmatch-threshold", "0.97",
                                      "--fixmatch-negative-share", "0.25", "--fixmatch-weight", "2.5"])
    config = _train_config(args)
    assert (config.fixmatch_threshold, config.fixmatch_negative_share, config.unlabelled_weight) == (0.97, 0.25, 2.5)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--fixmatch-teacher", "ema",
                                      "--fixmatch-ema-decay", "0.9", "--fixmatch-loss", "soft"])
    config = _train_config(args)
    assert (config.fixmatch_teacher, config.fixmatch_ema_decay, config.fixmatch_loss) == ("ema", 0.9, "soft")
    offline = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--fixmatch-teacher", "offline"])
    assert _train_config(offline).fixmatch_teacher == "offline"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--fixmatch-teacher", "oracle"])


def test_pooled_training_models_and_crops_as_the_federation_does(tiny_sites: Path, tmp_path: Path) -> None:
    """``train`` with no --model and no --crop-foreground (None: 'not given') takes the declared values."""
    out = tmp_path / "model.pt"
    assert main(["train", "--data", str(tiny_sites / "site-1"), "--out", str(out), "--epochs", "1",
                 "--model-args", "base_channels=4 depth=2", "--samples-per-case", "2", "--val-fraction", "0"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.model == DECLARED["model"] and ckpt.run_config["crop_foreground"] == DECLARED["crop-foreground"]


def test_the_proximal_term_is_never_read_from_the_run_config() -> None:
    """Only the FedProx server sends mu, each round; baselines built from the run config get none."""
    assert train_config_from({}).proximal_mu == 0.0
    assert train_config_from({"proximal-mu": 0.5}).proximal_mu == 0.0
    assert train_config_from({"proximal-mu": 0.5}, proximal_mu=0.01).proximal_mu == 0.01


def test_with_defaults_overlays_the_declared_table() -> None:
    values = with_defaults({"batch-size": 2, "learning-rate": 1})
    assert set(values) == set(DECLARED)
    assert values["batch-size"] == 2 and values["samples-per-case"] == DECLARED["samples-per-case"]
    assert values["learning-rate"] == 1.0 and isinstance(values["learning-rate"], float)


@pytest.mark.parametrize(
    "run_config, match",
    [
        ({"batch-size": "8"}, r"run-config 'batch-size' = '8' has type str; it must be int"),
        ({"batch-size": 8.0}, r"run-config 'batch-size' = 8.0 has type float; it must be int"),
        ({"batch-size": True}, r"run-config 'batch-size' = True has type bool; it must be int"),
        ({"learning-rate": "0.1"}, r"run-config 'learning-rate' = '0.1' has type str; it must be float"),
        ({"crop-foreground": 1}, r"run-config 'crop-foreground' = 1 has type int; it must be bool"),
        ({"patch-size": [64, 64, 64]}, r"run-config 'patch-size' = \[64, 64, 64\] has type list; it must be str"),
        ({"batch_size": 8}, r"unknown run-config key 'batch_size'"),
        # a server may not ask a site for unbounded work or memory
        ({"batch-size": 100_000}, r"'batch-size' = 100000 is out of range: it must be >= 1 and <= 4096"),
        ({"samples-per-case": 10**9}, r"'samples-per-case' = 1000000000 is out of range"),
        ({"local-epochs": 10**6}, r"'local-epochs' = 1000000 is out of range"),
        ({"model-args": "base_channels=100000"}, r"base_channels=100000 must be from 1 to 256"),
        ({"fixmatch-teacher": "oracle"}, r"run-config 'fixmatch-teacher' = 'oracle' is not one of"),
        ({"fixmatch-loss": "kl"}, r"run-config 'fixmatch-loss' = 'kl' is not one of"),
        ({"fixmatch-ema-decay": 1.0}, r"'fixmatch-ema-decay' = 1.0 is out of range"),
        ({"fixmatch-ema-decay": True}, r"'fixmatch-ema-decay' = True has type bool"),
    ],
)
def test_with_defaults_refuses_wrong_types_and_unknown_keys(run_config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        with_defaults(run_config)
    with pytest.raises(ValueError, match=match):
        train_config_from(run_config)
