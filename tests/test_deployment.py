"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication, SuperNode processes, flwr run."""

from __future__ import annotations

import io
import ssl
import stat
import subprocess
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
import torch

from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.simulations.deploy import secure_superlink
from fedlesion.simulations.launch import read_history
from fedlesion.simulations.synthetic import synthesize


def test_secure_federation_with_real_processes(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", sites=2, cases_per_site=3, shape=(32, 32, 16), seed=0)
    workdir = tmp_path / "federation"
    out = tmp_path / "runs"
    with secure_superlink(workdir) as federation:
        # The Fleet address (the one hospitals reach) refuses the Control and Runtime APIs: no one who can reach
        # it can register a key, list nodes, submit an app or pull ServerApp tasks.
        refused = federation.register("intruder", "via-fleet")
        assert refused.returncode != 0 and "404" in refused.stdout + refused.stderr, refused.stdout
        submit = federation.flwr("run", ".", "via-fleet", "--run-config", "num-server-rounds=1")
        assert submit.returncode != 0 and "404" in submit.stdout + submit.stderr, submit.stdout
        listing = federation.flwr("supernode", "list", "via-fleet")
        assert listing.returncode != 0
        context = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
        for path in ("/v1/control/list-runs", "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/docs"):
            with pytest.raises(HTTPError) as error:
                urlopen(Request(f"https://127.0.0.1:{federation.superlink_port}{path}", data=b"{}",
                                headers={"content-type": "application/json"}), context=context, timeout=10)
            assert error.value.code == 404, path
        for index, hospital in enumerate(("hospital-a", "hospital-b")):
            federation.register(hospital)
            federation.start_supernode(hospital, tmp_path / "data" / f"site-{index}")
        # A SuperNode whose key was never registered is refused.
        intruder = federation.start_supernode("intruder", tmp_path / "data" / "site-0")
        deadline = time.monotonic() + 90
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert intruder.returncode not in (None, 0), "the unregistered SuperNode was not refused"
        assert "Failed to activate SuperNode" in (workdir / "supernode-intruder.log").read_text()

        log = io.StringIO()
        code = federation.run({"num-server-rounds": 2, "min-available-nodes": 2, "model-args": "base_channels=4 depth=2",
                               "samples-per-case": 4, "local-steps": 4, "batch-size": 4, "output-dir": str(out), "run-name": "secure"},
                              output=log)
        assert code == 0, log.getvalue()[-3000:]
        processes = dict(federation.processes)

    # Each hospital made its own key pair: the coordinator's folder holds no hospital key.
    assert sorted(p.name for p in (workdir / "certs").iterdir()) == ["ca.crt", "ca.key", "superlink.crt", "superlink.key"]
    assert stat.S_IMODE((workdir / "hospital-keys" / "hospital-a" / "hospital-a").stat().st_mode) == 0o600
    run_dir = out / "secure"
    history = read_history(run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert all(len(r["replies"]) == 2 for r in history[1:])
    assert (run_dir / "metrics.csv").exists() and (run_dir / "last.pt").exists()
    final = load_checkpoint(run_dir / "final.pt")
    torch.manual_seed(0)
    from fedlesion.common.model import build_model

    initial = build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in final.state_dict.items() if v.is_floating_point())
    # Every process is stopped.
    assert all(p.poll() is not None for p in processes.values())
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
