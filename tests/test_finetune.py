"""Local fine-tuning after the last round: each site's personal model stays at the site; only scores travel."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fake_federation import FakeGrid, task_identity  # noqa: F401 - fixture
from tests.conftest import weight_distance
from fedlesion.client import app as client_app
from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.config import with_defaults
from fedlesion.common.model import build_model
from fedlesion.server.app import finetune_sites
from fedlesion.server.strategy import build_strategy

RUN_CONFIG = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
              "val-fraction": 0.34, "samples-per-case": 4, "batch-size": 4, "local-steps": 3,
              "finetune-epochs": 2, "finetune-learning-rate": 1e-3, "min-available-nodes": 2}


class SiteGrid(FakeGrid):
    """Delivers each message to the real ClientApp with its node's context, as a SuperNode does."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(list(contexts))
        self.contexts = contexts
        self.replies: list[Message] = []

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        self.push(list(messages))
        self.replies = [client_app.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        return self.replies


def _run(tmp_path: Path, tiny_sites: Path, personal: bool) -> tuple[list[dict], SiteGrid, ArrayRecord]:
    values = with_defaults(RUN_CONFIG)
    contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=RUN_CONFIG, node_config={
        "data-path": str(tiny_sites / f"site-{node}"), "site-name": f"hospital-{node}",
        **({"personal-dir": str(tmp_path / f"personal-{node}")} if personal else {})}) for node in (1, 2)}
    grid = SiteGrid(contexts)
    strategy = build_strategy(values, out_dir=tmp_path / "run", save_checkpoint=lambda *a: None)
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict())
    return finetune_sites(grid, strategy, arrays, values, tmp_path / "run", timeout=60.0), grid, arrays


def test_each_site_keeps_its_fine_tuned_model_and_sends_only_scores(tmp_path: Path, tiny_sites: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client_app.PERSONAL_DIR_ENV, raising=False)
    sites, grid, global_arrays = _run(tmp_path, tiny_sites, personal=True)
    assert [s["site"] for s in sites] == ["hospital-1", "hospital-2"]
    for reply in grid.replies:
        assert not reply.has_error() and not reply.content.array_records, "the personal model never leaves the site"
    for node, s in zip((1, 2), sites):
        m = s["metrics"]
        assert m["personal-kept"] == 1.0 and m["finetune-epochs"] == 2.0 and m["num-examples"] >= 1
        assert {"dice-wt", "global-dice-wt", "hd95-et", "global-hd95-et"} <= set(m)
        [kept] = (tmp_path / f"personal-{node}").glob("*.pt")
        assert kept.name == f"hospital-{node}-node{node}-run1.pt" and stat.S_IMODE(kept.stat().st_mode) == 0o600
        state = load_checkpoint(kept).state_dict
        sent = global_arrays.to_torch_state_dict()
        assert any(not torch.equal(state[k], sent[k]) for k in sent), "fine-tuned: not the global model"
        assert str(tmp_path) not in repr(load_checkpoint(kept).run_config), "no local path in the kept checkpoint"
    recorded = (tmp_path / "run" / "finetune.json").read_text()
    assert "hospital-1" in recorded and "Synth_" not in recorded, "scores and site names, no case IDs"


def test_without_a_personal_folder_the_model_is_scored_not_kept(tmp_path: Path, tiny_sites: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client_app.PERSONAL_DIR_ENV, raising=False)
    sites, _, _ = _run(tmp_path, tiny_sites, personal=False)
    assert all(s["metrics"]["personal-kept"] == 0.0 and np.isfinite(s["metrics"]["dice-wt"]) for s in sites)
    assert not list(tmp_path.rglob("*.pt")), "nothing written anywhere"


def test_a_site_without_validation_cases_fine_tunes_and_the_run_goes_on(tmp_path: Path, tiny_sites: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RUN_CONFIG, "val-fraction", 0.0)  # as reproduce runs: every case trains
    sites, grid, _ = _run(tmp_path, tiny_sites, personal=True)
    assert [s["metrics"]["num-examples"] for s in sites] == [0, 0]
    assert all("dice-wt" not in s["metrics"] and s["metrics"]["personal-kept"] == 1.0 for s in sites)


def test_replies_to_nothing_asked_and_second_replies_are_ignored(tmp_path: Path, tiny_sites: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = SiteGrid.send_and_receive

    def noisy(self, messages, timeout=None):  # noqa: ANN001, ANN202
        replies = real(self, messages, timeout)
        forged = Message(content=RecordDict(), reply_to=messages[0])
        forged.metadata.__dict__["_reply_to_message_id"] = "never-sent"
        return [*replies, replies[0], forged]

    monkeypatch.setattr(SiteGrid, "send_and_receive", noisy)
    sites, _, _ = _run(tmp_path, tiny_sites, personal=False)
    assert sorted(s["node-id"] for s in sites) == [1, 2]


def test_a_proximal_term_keeps_each_sites_personal_model_near_the_global_one(tmp_path: Path, tiny_sites: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``finetune-proximal-mu`` (Ditto's personal objective): the same fine-tuning moves the weights far less
    from the global model it started from."""
    monkeypatch.delenv(client_app.PERSONAL_DIR_ENV, raising=False)
    monkeypatch.setitem(RUN_CONFIG, "finetune-learning-rate", 1e-2)
    moved = {}
    for mu in (0.0, 1e4):
        monkeypatch.setitem(RUN_CONFIG, "finetune-proximal-mu", mu)
        (tmp_path / f"mu-{mu:g}").mkdir()
        _, _, arrays = _run(tmp_path / f"mu-{mu:g}", tiny_sites, personal=True)
        assert json.loads((tmp_path / f"mu-{mu:g}" / "run" / "finetune.json").read_text())["proximal-mu"] == mu
        sent = arrays.to_torch_state_dict()
        for node in (1, 2):
            [kept] = (tmp_path / f"mu-{mu:g}" / f"personal-{node}").glob("*.pt")
            state = load_checkpoint(kept).state_dict
            moved[mu, node] = weight_distance(state, sent)
    for node in (1, 2):
        assert 0 < moved[1e4, node] < 0.5 * moved[0.0, node], moved
