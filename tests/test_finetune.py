"""Local fine-tuning after the last round: each site's personal model stays at the site; only scores travel."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fake_federation import FakeGrid, task_identity  # noqa: F401 - fixture
from tests.conftest import weight_distance
from fedlesion.client import app as client_app
from fedlesion.common import engine
from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.config import with_defaults
from fedlesion.common.model import build_model
from fedlesion.server.app import finetune_sites
from fedlesion.server.strategy import build_strategy

RUN_CONFIG = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
              "val-fraction": 0.34, "samples-per-case": 4, "batch-size": 4, "local-steps": 3,
              "finetune-epochs": 2, "finetune-learning-rate": 1e-3, "min-available-nodes": 2,
              "finetune-select": False}  # the fine-tuned model always kept; selecting is tested below


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
        assert m["finetune-scores-chose"] == 0.0, "always kept: these scores chose nothing"
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


def _spy_training(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the engine's training by one that moves every weight by 1 and records the cases it trained on."""
    trained: list[list[str]] = []

    def fake_train(model, cases, *args, **kwargs):  # noqa: ANN001, ANN202
        trained.append([c.case for c in cases])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"train-loss": 0.5}

    monkeypatch.setattr(engine, "train", fake_train)
    return trained


def _cases(*names: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(case=n) for n in names]


@pytest.mark.parametrize("personal_better", [True, False])
def test_fine_tuning_is_kept_only_where_it_beats_the_global_model_on_validation_cases(
        monkeypatch: pytest.MonkeyPatch, personal_better: bool) -> None:
    trained = _spy_training(monkeypatch)
    model = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scored: list[list[str]] = []

    def score(m, cases):  # noqa: ANN001, ANN202 - higher for the moved weights when personal_better
        scored.append([c.case for c in cases])
        moved = not torch.equal(m.weight, start["weight"])
        return [float(moved == personal_better)] * len(cases)

    stats = engine.finetune_validated(model, _cases("a", "b", "c"), _cases("v1", "v2"), score, 2, None, "cpu")
    assert trained == [["a", "b", "c"]] and scored == [["v1", "v2"], ["v1", "v2"]], "validation cases only, once each"
    assert stats["finetune-kept"] == float(personal_better) and stats["finetune-select-cases"] == 2
    assert (stats["finetune-select-personal"], stats["finetune-select-global"]) == ((1.0, 0.0) if personal_better else (0.0, 1.0))
    kept = model.state_dict()
    assert all(torch.equal(kept[k], start[k] + 1 if personal_better else start[k]) for k in start), \
        "the fine-tuned weights, or exactly the global ones back"


def test_without_validation_cases_the_fine_tuning_is_cross_validated_on_cases_it_did_not_train_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _spy_training(monkeypatch)
    model = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scored: list[list[str]] = []

    def score(m, cases):  # noqa: ANN001, ANN202 - the fine-tuned model is better
        scored.append([c.case for c in cases])
        return [float(not torch.equal(m.weight, start["weight"]))] * len(cases)

    cases = _cases("a", "b", "c", "d", "e")
    stats = engine.finetune_validated(model, cases, [], score, 2, None, "cpu")
    folds = trained[:3]
    held = scored[0::2]  # each fold: the global model, then the fine-tuned one, on the same part
    assert len(trained) == 4 and scored[1::2] == held
    for trained_on, part in zip(folds, held):
        assert not set(trained_on) & set(part) and set(trained_on) | set(part) == set("abcde")
    assert sorted(c for part in held for c in part) == list("abcde"), "every case scored once, by a model that never saw it"
    assert trained[3] == list("abcde") and stats["finetune-kept"] == 1.0 and stats["finetune-select-cases"] == 5
    assert torch.equal(model.weight, start["weight"] + 1), "the kept model: one fine-tuning on every case"


def test_a_fine_tuning_that_diverges_leaves_the_global_model(monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _spy_training(monkeypatch)
    spy = engine.train

    def diverging(model, cases, *args, **kwargs):  # noqa: ANN001, ANN202 - the second fold's loss becomes NaN
        spy(model, cases)
        if len(trained) == 2:
            raise engine.TrainingDiverged("loss nan")
        return {"train-loss": 0.5}

    monkeypatch.setattr(engine, "train", diverging)
    model = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stats = engine.finetune_validated(model, _cases("a", "b", "c"), [], lambda m, c: [float(not torch.equal(
        m.weight, start["weight"]))] * len(c), 2, None, "cpu")
    assert len(trained) == 2 and stats["finetune-kept"] == 0.0 and stats["finetune-diverged"] == 1.0
    assert "train-loss" not in stats and all(torch.equal(model.state_dict()[k], start[k]) for k in start)


def test_a_single_case_without_validation_keeps_the_global_model(monkeypatch: pytest.MonkeyPatch) -> None:
    trained = _spy_training(monkeypatch)
    model = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stats = engine.finetune_validated(model, _cases("a"), [], lambda m, c: [1.0] * len(c), 2, None, "cpu")
    assert trained == [] and stats["finetune-kept"] == 0.0 and stats["finetune-select-global"] == -1.0
    assert "train-loss" not in stats, "nothing trained: no loss to report"
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)


@pytest.mark.parametrize("val_fraction", [0.0, 0.34])  # cross-validated at the site, or chosen on its validation cases
def test_sites_report_their_choice_and_keep_what_they_chose(tmp_path: Path, tiny_sites: Path,
                                                             monkeypatch: pytest.MonkeyPatch, val_fraction: float) -> None:
    monkeypatch.setitem(RUN_CONFIG, "finetune-select", True)
    monkeypatch.setitem(RUN_CONFIG, "val-fraction", val_fraction)
    sites, grid, global_arrays = _run(tmp_path, tiny_sites, personal=True)
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["select"] is True
    sent = global_arrays.to_torch_state_dict()
    for node, s in zip((1, 2), sites):
        m = s["metrics"]
        assert m["finetune-kept"] in (0.0, 1.0) and m["finetune-select-cases"] >= (1 if val_fraction else 2)
        assert 0 <= m["finetune-select-global"] <= 1 and 0 <= m["finetune-select-personal"] <= 1
        [kept] = (tmp_path / f"personal-{node}").glob("*.pt")
        state = load_checkpoint(kept).state_dict
        assert all(torch.equal(state[k], sent[k]) for k in sent) == (m["finetune-kept"] == 0.0)
        assert load_checkpoint(kept).metrics["finetune-kept"] == m["finetune-kept"]
        if val_fraction:  # chosen on the validation cases, whose scores are the ones reported
            assert m["finetune-select-cases"] == m["num-examples"] >= 1
            chosen = ("dice-wt", "dice-tc", "dice-et")
            assert (np.mean([m[k] for k in chosen]) > np.mean([m[f"global-{k}"] for k in chosen])) == bool(m["finetune-kept"])
            assert m["finetune-kept"] or all(m[k] == m[f"global-{k}"] for k in chosen)
            assert m["finetune-scores-chose"] == 1.0, "flagged: these scores chose, and favour, the kept model"
        else:
            assert "finetune-scores-chose" not in m and "dice-wt" not in m, "cross-validated: nothing reported"
    assert not any(r.content.array_records for r in grid.replies)
