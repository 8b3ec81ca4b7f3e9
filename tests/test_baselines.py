"""The pooled baseline trains as one run: one optimiser, one schedule, no proximal term."""

from __future__ import annotations

import json

from pathlib import Path

import torch

from fedlesion.common.api import cases_file, train_centralized
from fedlesion.common.config import train_config_from
from fedlesion.common.data import load_site
from fedlesion.common.engine import TrainConfig, train
from fedlesion.common.model import build_model

TINY = {"base_channels": 4, "depth": 2}


def test_pooled_training_keeps_one_optimiser_for_the_whole_run(tiny_sites: Path, tmp_path: Path) -> None:
    """Three epochs of ``train_centralized`` equal one three-epoch call of the training loop.

    A baseline that re-created Adam (and its moments) every epoch ends elsewhere.
    """
    config = TrainConfig(epochs=3, batch_size=4, samples_per_case=4, learning_rate=3e-3, seed=5)
    pooled = train_centralized(tiny_sites / "site-1", tmp_path / "pooled.pt", model_args=TINY, config=config,
                               crop_foreground=False, report=lambda _: None)
    torch.manual_seed(5)
    model = build_model("unet2d", 4, 3, **TINY)
    cases = load_site(tiny_sites / "site-1").cases
    trained = json.loads(cases_file(tmp_path / "pooled.pt").read_text())["train"]
    train(model, [c for c in cases if c.case in trained], 2, config, torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, pooled.state_dict[key]), key


def test_learning_rate_factor_is_stepped_once_per_epoch(tiny_sites: Path) -> None:
    """With the rate at zero from the second epoch on, the second epoch changes no weight."""
    cases = load_site(tiny_sites / "site-1").cases
    model = build_model("unet2d", 4, 3, **TINY)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    after: list[dict[str, torch.Tensor]] = []

    def snapshot(epoch: int, loss: float) -> None:
        after.append({k: v.detach().clone() for k, v in model.named_parameters()})

    config = TrainConfig(epochs=2, batch_size=4, samples_per_case=4, seed=0)
    train(model, cases, 2, config, torch.device("cpu"), progress=snapshot, lr_factor=lambda e: 1.0 if e == 0 else 0.0)
    assert any(not torch.equal(after[0][k], initial[k]) for k in initial)  # the first epoch trained
    for key in after[0]:
        assert torch.equal(after[0][key], after[1][key]), key


def test_baselines_built_from_the_run_config_have_no_proximal_term() -> None:
    """``proximal-mu`` is FedProx's, sent per round; pooled and local-only runs never get it."""
    assert train_config_from({"proximal-mu": 0.5, "strategy": "fedprox"}).proximal_mu == 0.0


def test_fixed_step_rounds_take_as_many_steps_at_a_small_and_a_large_site(tiny_sites: Path) -> None:
    """With ``local-steps`` a 2-case and a 4-case site do the same number of optimiser steps per round;
    with one pass per epoch (the default) the larger site does more."""
    sizes = {}
    for steps in (0, 7):
        for site in ("site-0", "site-2"):
            cases = load_site(tiny_sites / site).cases
            config = train_config_from({"local-steps": steps, "samples-per-case": 4, "batch-size": 4}, seed=0)
            stats = train(build_model("unet2d", 4, 3, **TINY), cases, 2, config, torch.device("cpu"))
            sizes[(steps, site)] = (len(cases), stats["train-samples"] / config.batch_size)
    assert sizes[(0, "site-0")][0] < sizes[(0, "site-2")][0]
    assert sizes[(0, "site-0")][1] < sizes[(0, "site-2")][1]  # one pass: steps grow with the site
    assert sizes[(7, "site-0")][1] == sizes[(7, "site-2")][1] == 7
