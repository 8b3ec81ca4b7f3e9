"""Fault injection with real processes on 127.0.0.1.

One secure federation of four hospital SuperNodes serves the process-level scenarios:
a SuperNode killed (``kill -9``) mid-round and restarted, one hung (``SIGSTOP``) past the
round timeout, one whose data holds only broken scans, one with some broken scans, and
the ServerApp killed mid-run and resumed. ``kill -9`` during checkpoint writing has its own
writer process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.model import build_model
from fedlesion.simulations.deploy import Federation, secure_superlink
from fedlesion.simulations.launch import read_history, stop_process_group
from fedlesion.simulations.synthetic import write_site

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
SHAPE = (32, 32, 16)
BASE = {"model-args": "base_channels=4 depth=2", "samples-per-case": 4, "local-steps": 4, "batch-size": 4, "min-available-nodes": 4,
        "min-train-nodes": 2, "fraction-evaluate": 0.0, "evaluate-initial": False, "round-timeout": 45}


def _break(case_dir: Path, kind: str) -> None:
    flair = case_dir / f"{case_dir.name}_flair.nii.gz"
    if kind == "truncated":
        flair.write_bytes(flair.read_bytes()[:200])
    elif kind == "not-nifti":
        flair.write_bytes(b"PDF-1.4 a scanned report, not an image" * 10)
    elif kind == "missing":
        flair.unlink()


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the SuperNode and the ClientApp process it started)."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


def _signal_tree(process: subprocess.Popen, sig: signal.Signals) -> None:
    for pid in _tree(process.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _records(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait_for_round(run_dir: Path, number: int, run: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["round"] >= number for r in _records(run_dir, "metrics.jsonl")):
        assert run.poll() is None, f"flwr run ended (code {run.returncode}) before round {number}"
        assert time.monotonic() < deadline, f"round {number} not reached in {timeout} s"
        time.sleep(0.3)


def _restart_until_admitted(fed: Federation, hospital: str, data_path: Path, timeout: float = 180) -> None:
    """Restart a killed SuperNode. The SuperLink admits the same key again once it has marked the
    old process offline (two missed heartbeats, up to a minute); until then activation is refused
    and the SuperNode exits, so it is started again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process = fed.start_supernode(hospital, data_path)
        started = time.monotonic()
        while process.poll() is None:
            if time.monotonic() - started > 15 and fed.online_nodes() == len(HOSPITALS):
                return
            time.sleep(1)
        stop_process_group(process)  # and the SuperExec it had started
    raise AssertionError(f"{hospital} was not admitted again within {timeout} s")


def _received_counts(fed: Federation) -> dict[str, int]:
    return {h: (fed.workdir / f"supernode-{h}.log").read_text(errors="replace").count("Received successfully")
            for h in HOSPITALS}


def _wait_until_received(fed: Federation, before: dict[str, int], hospitals: tuple[str, ...], timeout: float = 60) -> None:
    """Wait until each of ``hospitals`` has received one more message than in ``before``."""
    deadline = time.monotonic() + timeout
    while any(_received_counts(fed)[h] <= before[h] for h in hospitals):
        assert time.monotonic() < deadline, "the sites did not receive the next round"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One scripted run of five rounds over four hospital SuperNodes, with faults injected:

    - round 1: hospital-d's data holds only broken scans; hospital-b's half of them;
    - round 2: hospital-c is killed (``kill -9``, SuperNode and ClientApp) and hospital-b hangs
      (``SIGSTOP``) until the round times out; then hospital-b resumes and hospital-c restarts;
    - after round 4: the ServerApp is killed (``kill -9``); the run is resumed from ``last.pt``.
    """
    root = tmp_path_factory.mktemp("faults")
    data = {h: root / "data" / h for h in HOSPITALS}
    for index, hospital in enumerate(HOSPITALS[:3]):
        write_site(data[hospital], index, 3 if hospital != "hospital-b" else 6, SHAPE, seed=0)
    for case_dir, kind in zip(sorted(p for p in data["hospital-b"].iterdir() if p.is_dir())[3:],
                              ("truncated", "not-nifti", "missing")):
        _break(case_dir, kind)
    write_site(data["hospital-d"], 3, 2, SHAPE, seed=0)
    for case_dir, kind in zip(sorted(p for p in data["hospital-d"].iterdir() if p.is_dir()), ("truncated", "not-nifti")):
        _break(case_dir, kind)
    out = root / "runs"
    config = {**BASE, "num-server-rounds": 5, "output-dir": str(out), "run-name": "faults"}
    run_dir = out / "faults"
    with secure_superlink(root / "federation") as fed:
        for hospital in HOSPITALS:
            fed.register(hospital)
            fed.start_supernode(hospital, data[hospital])
        with open(root / "flwr-run.log", "w") as log:
            run = fed.start_run(config, stdout=log)
            try:
                _wait_for_round(run_dir, 1, run)
                _signal_tree(fed.processes["supernode-hospital-c"], signal.SIGKILL)
                _signal_tree(fed.processes["supernode-hospital-b"], signal.SIGSTOP)
                _wait_for_round(run_dir, 2, run)
                _signal_tree(fed.processes["supernode-hospital-b"], signal.SIGCONT)
                _restart_until_admitted(fed, "hospital-c", data["hospital-c"])
                _wait_for_round(run_dir, 4, run)
                # Kill the ServerApp while the sites train round 5. (Killed while it pushes a round,
                # Flower's SuperNodes wait for that round's objects up to its pull limit; see README.)
                _wait_until_received(fed, _received_counts(fed), ("hospital-a", "hospital-b", "hospital-c"))
                servers = fed.serverapp_pids()
                for pid in servers:
                    os.kill(pid, signal.SIGKILL)
            finally:
                run.kill()
                run.wait()
        killed_at = load_checkpoint(run_dir / "last.pt")
        final_before_resume = (run_dir / "final.pt").exists()
        with open(root / "resume.log", "w") as log:
            code = fed.run({**config, "resume-from": str(run_dir / "last.pt")}, output=log)
        alive = {name: process.poll() is None for name, process in fed.processes.items()}
    yield {"run_dir": run_dir, "data": data, "servers_killed": servers, "killed_at": killed_at,
           "final_before_resume": final_before_resume, "resume_code": code, "resume_log": (root / "resume.log").read_text(),
           "alive": alive, "audit": {e["round"]: e for e in _records(run_dir, "audit.jsonl") if "sampled" in e}}


def test_dead_and_hung_sites_do_not_stop_the_federation(scenario: dict) -> None:
    audit = scenario["audit"]
    assert sorted(audit) == [1, 2, 3, 4, 5], "every round completed and was audited"
    assert len(audit[1]["replied"]) == 3
    broken_site = audit[1]["failed"][0]["node-id"]
    # Round 2: only hospital-a answered; one update is under min-train-nodes=2, so the model
    # was kept, the round logged as failed, and the next round tried again.
    assert len(audit[2]["replied"]) == 1 and "fewer than min-train-nodes=2" in audit[2]["round-failed"]
    assert len({f["node-id"] for f in audit[2]["failed"]} - {broken_site}) == 2, audit[2]
    # The restarted (killed) and the resumed (hung) SuperNode are back: three updates again.
    assert len(audit[5]["replied"]) == 3 and audit[5]["round-failed"] is None
    final = load_checkpoint(scenario["run_dir"] / "final.pt")
    assert all(torch.isfinite(v).all() for v in final.state_dict.values() if v.is_floating_point())
    torch.manual_seed(0)
    initial = build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in final.state_dict.items() if v.is_floating_point())


def test_broken_scans_are_skipped_and_counted_and_no_valid_case_is_an_error_reply(scenario: dict) -> None:
    audit = scenario["audit"]
    failed = audit[1]["failed"]
    assert len(failed) == 1 and "ValueError at the site" in failed[0]["reason"]
    assert all(failed[0]["node-id"] in {f["node-id"] for f in audit[r]["failed"]} for r in audit)
    # hospital-b trained on its three good cases and reported the three broken ones as skipped.
    first = read_history(scenario["run_dir"])[0]
    assert sorted(reply["metrics"].get("skipped-cases", 0) for reply in first["replies"] if "error" not in reply) == [0, 0, 3]
    # The SuperNode with only broken scans answered every round with an error and is still running.
    assert scenario["alive"]["supernode-hospital-d"]


def test_server_killed_mid_run_resumes_from_the_last_completed_round(scenario: dict) -> None:
    assert scenario["servers_killed"], "no flwr-serverapp process was found under the SuperLink"
    assert scenario["killed_at"].round >= 4 and not scenario["final_before_resume"]
    assert scenario["resume_code"] == 0, scenario["resume_log"][-3000:]
    assert f"at round {scenario['killed_at'].round}" in scenario["resume_log"]
    assert [r["round"] for r in read_history(scenario["run_dir"])] == [1, 2, 3, 4, 5]
    assert load_checkpoint(scenario["run_dir"] / "final.pt").round == 5


def test_audit_log_holds_no_patient_data(scenario: dict) -> None:
    text = (scenario["run_dir"] / "audit.jsonl").read_text()
    assert "Synth_" not in text and str(scenario["data"]["hospital-a"]) not in text
    assert set(scenario["audit"][1]) == {"time", "round", "sampled", "replied", "failed", "rejected", "round-failed",
                                         "evaluate-failed", "evaluate-rejected", "checkpoint"}


WRITER = """
import sys, torch
from fedlesion.common.checkpoint import Checkpoint, save_checkpoint
from fedlesion.common.data import LAYOUTS
target = sys.argv[1]
for n in range(1, 10_000):
    state = {f"layer{i}.weight": torch.full((256, 256), float(n)) for i in range(24)}  # ~6 MB a write
    save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=LAYOUTS["brats2021"], state_dict=state, round=n), target)
    print(n, flush=True)
"""


def test_kill_9_during_checkpoint_writing_leaves_the_last_one_loadable(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    seen = 0
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
        assert writer.stdout is not None
        writer.stdout.readline()  # one complete checkpoint exists
        time.sleep(float(rng.uniform(0.05, 0.6)))  # the writer spends most of its time inside torch.save
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        checkpoint = load_checkpoint(target)
        rounds = {float(v[0, 0]) for v in checkpoint.state_dict.values()}
        assert rounds == {float(checkpoint.round)}, "every tensor belongs to the same completed write"
        seen += 1
    assert seen == 4
    assert len(list(tmp_path.glob(".last.pt.*.tmp"))) <= 1, "a new write clears what a killed one left"
