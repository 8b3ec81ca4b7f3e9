"""Resume: a run stopped after round 2 of 4 and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_federation import FakeGrid, error_reply, record, reply, task_identity, train_round  # noqa: F401 - fixture
from flwr.app import ConfigRecord

from fedlesion.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.config import dataset_spec, with_defaults
from fedlesion.common.model import resolved_model_args
from fedlesion.server.app import load_resume, prepare_run_folder, run_folder
from fedlesion.server.strategy import build_strategy
from fedlesion.simulations.launch import read_history, run_federation

BASE = {
    "strategy": "fedadam", "server-lr": 0.01, "model-args": "base_channels=4 depth=2", "synth-shape": "32,32,16",
    "synth-cases-per-site": 3, "samples-per-case": 4, "local-steps": 4, "batch-size": 4, "seed": 0, "lr-schedule": "constant",
    "evaluate-initial": False, "min-available-nodes": 2,
}


def _run(tmp_path: Path, name: str, **values: object) -> Path:
    config = {**BASE, "output-dir": str(tmp_path / "out"), "run-name": name, **values}
    return run_federation(config, num_sites=2, output=io.StringIO(), timeout_s=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    whole = _run(tmp, "whole", **{"num-server-rounds": 4})
    first = _run(tmp, "stopped", **{"num-server-rounds": 2})
    resumed = _run(tmp, "stopped", **{"num-server-rounds": 4, "resume-from": str(first / "last.pt")})
    return {"whole": whole, "resumed": resumed}


@pytest.mark.process
def test_resumed_run_continues_round_numbering(runs: dict[str, Path]) -> None:
    history = read_history(runs["resumed"])
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert load_checkpoint(runs["resumed"] / "final.pt").round == 4


@pytest.mark.process
def test_resumed_fedadam_ends_where_the_uninterrupted_run_ends(runs: dict[str, Path]) -> None:
    whole = load_checkpoint(runs["whole"] / "final.pt")
    resumed = load_checkpoint(runs["resumed"] / "final.pt")
    assert set(whole.extra["optimizer_state"]) == {"m_t", "v_t"}, "FedAdam's moments are checkpointed"
    for key, value in whole.state_dict.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed.state_dict[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.process
def test_checkpoints_load_without_unpickling_code(runs: dict[str, Path]) -> None:
    for name in ("final.pt", "last.pt", "best.pt"):  # load_checkpoint unpickles data only
        assert set(load_checkpoint(runs["resumed"] / name).extra) == {"run", "screening", "round_policy", "optimizer_state"}


def test_resumed_run_continues_in_the_checkpoints_folder(tmp_path: Path) -> None:
    folder = tmp_path / "first" / "run-a"
    folder.mkdir(parents=True)
    for name in ("last.pt", "final.pt", "metrics.jsonl"):
        (folder / name).touch()
    values = with_defaults({"resume-from": str(folder / "last.pt"), "output-dir": str(tmp_path / "elsewhere"),
                            "run-name": "run-b"})
    assert run_folder(values) == folder.resolve()
    assert (folder / "final.pt").exists(), "nothing changes before the resume is validated"


def _checkpoint(path: Path, server_round: int) -> Path:
    return save_checkpoint(Checkpoint(model="unet2d", model_args=resolved_model_args("unet2d"),
                                      spec=dataset_spec("brats2021"), state_dict={}, round=server_round), path)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_resume_changes_the_folder_only_once_validated(tmp_path: Path) -> None:
    """Reading the resume changes nothing; preparing the folder then cuts the metrics back to the checkpoint's
    round, removes the stale final.pt and keeps the previous run config."""
    folder = tmp_path / "run-a"
    folder.mkdir()
    _checkpoint(folder / "last.pt", 2)
    (folder / "final.pt").touch()
    (folder / "metrics.jsonl").write_text("".join(f'{{"round": {r}}}\n' for r in (1, 2, 3)))  # round 3: a crash
    (folder / "run_config.json").write_text('{"num-server-rounds": 2}')
    resume = load_resume(str(folder / "last.pt"), "unet2d", resolved_model_args("unet2d"))
    assert len(_lines(folder / "metrics.jsonl")) == 3 and (folder / "final.pt").exists()
    assert [r["round"] for r in resume.history] == [1, 2]
    values = with_defaults({"resume-from": str(folder / "last.pt"), "num-server-rounds": 4})
    prepare_run_folder(folder, values, resume)
    assert _lines(folder / "metrics.jsonl") == ['{"round": 1}', '{"round": 2}']
    assert not (folder / "final.pt").exists(), "a stale final.pt would count the resumed run as complete"
    assert (folder / "run_config.resume-2.json").read_text() == '{"num-server-rounds": 2}'
    assert '"num-server-rounds": 4' in (folder / "run_config.json").read_text()
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []


def test_a_metrics_line_cut_short_by_the_crash_does_not_block_the_resume(tmp_path: Path) -> None:
    """The history is appended before last.pt is saved: a crash mid-append leaves a torn last line (or a foreign
    one); the resume leaves it out and keeps every complete round up to the checkpoint's."""
    _checkpoint(tmp_path / "last.pt", 2)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n["not a round"]\n{"round": 2}\n\n{"round": 3, "tra')
    resume = load_resume(str(tmp_path / "last.pt"), "unet2d", resolved_model_args("unet2d"))
    assert resume.history == [{"round": 1}, {"round": 2}]


def test_resume_from_an_earlier_round_than_the_runs_latest_is_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "best.pt", 1)
    _checkpoint(tmp_path / "last.pt", 3)
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"round": {r}}}\n' for r in (1, 2, 3)))
    with pytest.raises(ValueError, match=r"best\.pt holds round 1, but the run went on to round 3; resume from .*last\.pt"):
        load_resume(str(tmp_path / "best.pt"), "unet2d", resolved_model_args("unet2d"))
    assert len(_lines(tmp_path / "metrics.jsonl")) == 3


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", ".", "/abs"])
def test_run_name_must_be_one_folder_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="must be a single folder name"):
        run_folder(with_defaults({"output-dir": str(tmp_path), "run-name": name}))


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "metrics.csv", "final.pt", "last.pt", "best.pt", "audit.jsonl",
                                      "run_config.json"])
def test_a_folder_holding_a_run_is_refused_unless_resuming(tmp_path: Path, leftover: str) -> None:
    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / leftover).touch()
    with pytest.raises(ValueError, match=r"already holds a run .*resume-from="):
        run_folder(with_defaults({"output-dir": str(tmp_path), "run-name": "run-a"}))
    assert run_folder(with_defaults({"output-dir": str(tmp_path), "run-name": "run-b"})) == (tmp_path / "run-b").resolve()


START = {"w": np.zeros(8, np.float32)}


def _stack(tmp_path: Path, first_round: int = 1, **config: object):  # noqa: ANN202
    return build_strategy({"min-available-nodes": 2, "min-train-nodes": 2, "lr-schedule": "cosine", **config},
                          save_checkpoint=lambda *a: None, out_dir=tmp_path, first_round=first_round)


def _learning_rate(stack, server_round: int, horizon: int = 4) -> float:  # noqa: ANN001
    config = ConfigRecord()
    stack.configure_train(server_round, record(START), config, FakeGrid([1, 2]))
    assert config["schedule-rounds"] == horizon  # the sites' FixMatch ramp-up runs over the same rounds
    return float(config["learning-rate"])


def test_learning_rate_stays_continuous_when_resumed_with_more_rounds(tmp_path: Path) -> None:
    original = _stack(tmp_path, **{"num-server-rounds": 4})
    last = _learning_rate(original, 4)
    resumed = _stack(tmp_path, first_round=5, **{"num-server-rounds": 8})
    resumed.resume(original.checkpoint_state())
    rates = [_learning_rate(resumed, r) for r in (1, 2, 3, 4)]  # rounds 5-8
    assert rates == pytest.approx([last] * 4), "the original schedule's last rate, not a jump back up"


def test_resume_restores_sampling_clipping_norm_and_failed_rounds(tmp_path: Path) -> None:
    """fraction-train 0.5 of six sites, adaptive DP, a failed round: a resumed run samples the same sites,
    clips at the learned norm and remembers the failure, through a checkpoint file loaded without pickles."""
    config = {"strategy": "fedadam", "fraction-train": 0.5, "dp": "server-adaptive", "dp-noise-multiplier": 0.0,
              "max-update-norm-ratio": 0.0, "num-server-rounds": 4}
    grid = FakeGrid([1, 2, 3, 4, 5, 6])
    original = _stack(tmp_path / "a", **config)
    train_round(original, grid, 1, record(START), lambda m: reply(m, {"w": np.full(8, 1.0, np.float32)}))
    train_round(original, grid, 2, record(START), lambda m: error_reply(m))
    path = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                      extra=original.checkpoint_state()), tmp_path / "last.pt")
    state = load_checkpoint(path).extra
    sampled = [m.metadata.dst_node_id for m in original.configure_train(3, record(START), ConfigRecord(), grid)]

    resumed = _stack(tmp_path / "b", first_round=3, **config)
    resumed.resume(state)
    assert [m.metadata.dst_node_id for m in resumed.configure_train(1, record(START), ConfigRecord(), grid)] == sampled
    assert resumed.checkpoint_state()["privacy"] == original.checkpoint_state()["privacy"] != {"clipping-norm": 0.1}
    assert resumed.checkpoint_state()["round_policy"] == {"failed-in-a-row": 1}
    assert set(resumed.checkpoint_state()["optimizer_state"]) == {"m_t", "v_t"}


def test_state_of_a_layer_the_run_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'privacy' state.*resume with the run's own config"):
        _stack(tmp_path).resume({"privacy": {"clipping-norm": 1.0}})


def test_a_new_run_folder_is_private(tmp_path: Path) -> None:
    """run_config.json names local paths; metrics and checkpoints derive from patients: mode 0700, whatever the umask."""
    previous = os.umask(0o022)
    try:
        folder = run_folder(with_defaults({"output-dir": str(tmp_path / "outputs"), "run-name": "r"}))
        prepare_run_folder(folder, with_defaults({"output-dir": str(tmp_path / "outputs"), "run-name": "r"}), None)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and (folder / "run_config.json").exists()
