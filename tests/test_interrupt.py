"""Interrupting `fedlesion simulate` (Ctrl-C, SIGTERM) stops the simulation and every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fedlesion.common.checkpoint import load_checkpoint

FAST = ["--set", "model-args='base_channels=4 depth=2'", "--set", "local-steps=2", "--set", "batch-size=4",
        "--set", "samples-per-case=4", "--set", "synth-shape='32,32,16'", "--set", "synth-cases-per-site=3",
        "--set", "evaluate-initial=false", "--set", "run-name='interrupted'"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_simulation_leaves_no_process_and_a_loadable_checkpoint(tmp_path: Path, signum: int) -> None:
    command = [str(Path(sys.executable).parent / "fedlesion"), "simulate", "--rounds", "200", "--sites", "2",
               "--out", str(tmp_path), "--set", "min-available-nodes=2", *FAST]
    tag = f"interrupt-{uuid.uuid4().hex}"  # inherited by every process the command starts, however it detaches
    cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "FEDLESION_TEST_TAG": tag})
    last = tmp_path / "interrupted" / "last.pt"
    deadline = time.monotonic() + 240
    while not last.exists() and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert last.exists(), cli.stderr.read() if cli.poll() is not None else "no round completed in time"
    started = psutil.Process(cli.pid).children(recursive=True)  # SuperLink, SuperExec, flwr-simulation, Ray, flwr run
    assert any("flwr-simulation" in " ".join(p.cmdline()) for p in started if p.is_running())
    cli.send_signal(signum)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 128 + signum, stderr
    assert "interrupted" in stderr and str(last) in stderr
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], [" ".join(p.cmdline())[:120] for p in alive]
    tagged = []  # also those started after the signal, or that left the tree
    for process in psutil.process_iter():
        try:
            if process.environ().get("FEDLESION_TEST_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                tagged.append(" ".join(process.cmdline())[:120])
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    assert tagged == []
    assert load_checkpoint(last).round >= 1
