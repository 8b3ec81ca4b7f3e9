"""A real federation on localhost: one TLS SuperLink with SuperNode authentication (``fedlesion
superlink``: hospitals reach only its Fleet address, ``flwr`` uses the loopback control address),
one SuperNode process per hospital with a key pair it made itself, and ``flwr run`` against it:
the deployment path of README's "Run a federation across hospitals", scripted for a demo and for tests.

Every process is started in its own process group and stopped at the end.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, TextIO

from fedlesion.common.config import declared_run_config
from fedlesion.client.keys import make_hospital_key
from fedlesion.server.certs import make_certificates

from .launch import app_folder, flower_environment, free_port, stop_process_group, wait_healthy, write_run_config

BIN = Path(sys.executable).parent


@dataclass
class Federation:
    """Handles on a running localhost federation."""

    workdir: Path
    connection: str  # the flwr connection to the control address
    env: dict[str, str]
    certs: Path  # the coordinator's CA and SuperLink pair
    superlink_port: int  # the Fleet port hospitals connect to
    control_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @cached_property
    def app(self) -> Path:
        """The Flower app this federation's runs are built from (:func:`~fedlesion.simulations.launch.app_folder`)."""
        return app_folder(self.workdir)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this federation's SuperLink."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.app, capture_output=True,
                              text=True, timeout=timeout)

    def hospital_key(self, hospital: str) -> Path:
        """The hospital's private key; made on first use, as the hospital would (``fedlesion keygen``)."""
        folder = self.workdir / "hospital-keys" / hospital
        if not (folder / hospital).exists():
            make_hospital_key(folder, hospital)
        return folder / hospital

    def register(self, hospital: str, connection: str | None = None) -> subprocess.CompletedProcess[str]:
        """``flwr supernode register`` the hospital's public key (the SuperLink then admits it)."""
        public = self.hospital_key(hospital).with_name(f"{hospital}.pub")
        result = self.flwr("supernode", "register", str(public), connection or self.connection)
        if connection is not None:
            return result
        if result.returncode != 0:
            raise RuntimeError(f"registering {hospital} failed:\n{result.stdout}{result.stderr}")
        return result

    def start_supernode(self, hospital: str, data_path: Path) -> subprocess.Popen[bytes]:
        """Start a hospital's ``flower-supernode`` with TLS, its private key and its data folder."""
        log = open(self.workdir / f"supernode-{hospital}.log", "ab")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.superlink_port}",
             "--root-certificates", str(self.certs / "ca.crt"),
             "--auth-supernode-private-key", str(self.hospital_key(hospital)),
             "--node-config", f'data-path="{data_path}" site-name="{hospital}"',
             "--port", str(free_port()), "--max-retries", "0"],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes[f"supernode-{hospital}"] = process
        return process

    def online_nodes(self) -> int:
        result = self.flwr("supernode", "list", self.connection, "--format", "json")
        try:
            nodes = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def start_run(self, run_config: Mapping[str, Any], stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """Start ``flwr run . <connection> --stream`` with these run-config overrides; return the process.

        Raises:
            ValueError: for a key ``[tool.flwr.app.config]`` does not declare.
        """
        unknown = sorted(set(run_config) - set(declared_run_config()))
        if unknown:
            raise ValueError(f"unknown run-config key(s) {unknown}.")
        config_file = write_run_config(run_config, self.workdir / "run-config.toml")
        return subprocess.Popen([str(BIN / "flwr"), "run", str(self.app), self.connection, "--stream",
                                 "--run-config", str(config_file)], cwd=self.app, env=self.env,
                                stdout=stdout, stderr=subprocess.STDOUT, text=True)

    def serverapp_pids(self) -> list[int]:
        """Process IDs of the ``flwr-serverapp`` processes the SuperLink has started (one per active run)."""
        import psutil

        try:
            below = psutil.Process(self.processes["superlink"].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for process in below:
            try:
                if any("flwr-serverapp" in part for part in process.cmdline()):
                    found.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def run(self, run_config: Mapping[str, Any], output: TextIO | None = None, timeout_s: float = 1800.0) -> int:
        """``flwr run . <connection> --stream`` with these run-config overrides; returns its exit code,
        or 1 when the streamed log shows the ServerApp failed (``flwr run`` itself exits 0 then)."""
        process = self.start_run(run_config)
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        failed = False
        try:
            for line in process.stdout:
                (output or sys.stdout).write(line)
                failed = failed or "ServerApp raised an exception" in line
                if time.monotonic() > deadline:
                    raise RuntimeError(f"flwr run exceeded {timeout_s:.0f} s")
            code = process.wait()
            return code if code != 0 or not failed else 1
        finally:
            if process.poll() is None:
                process.kill()


@contextmanager
def secure_superlink(workdir: Path) -> Iterator[Federation]:
    """A CA and a ``fedlesion superlink`` with TLS and ``--enable-supernode-auth``.

    ``flwr`` gets two connections: ``hospitals`` (the control address, as the coordinator uses it)
    and ``via-fleet`` (the Fleet address, which refuses everything but the Fleet API).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    make_certificates(certs)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    port, control = free_port(), free_port()
    ca = certs / "ca.crt"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:{control}"\n'
        f'root-certificates = "{ca}"\n\n[superlink.via-fleet]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    env = flower_environment(flwr_home)
    federation = Federation(workdir, "hospitals", env, certs, port, control)
    with open(workdir / "superlink.log", "wb") as log:
        superlink = subprocess.Popen(
            [str(BIN / "fedlesion"), "superlink", "--fleet-address", f"127.0.0.1:{port}",
             "--control-address", f"127.0.0.1:{control}", "--",
             "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(certs / "superlink.crt"),
             "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth",
             "--disable-runtime-dependency-installation", "--database", str(workdir / "superlink.db")],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    federation.processes["superlink"] = superlink
    try:
        wait_healthy(superlink, f"https://127.0.0.1:{port}/health", workdir / "superlink.log",
                     ssl.create_default_context(cafile=str(ca)))
        yield federation
    finally:
        for process in reversed(list(federation.processes.values())):
            stop_process_group(process)


def demo(out: Path, sites: int = 3, rounds: int = 3, run_config: Mapping[str, Any] | None = None,
         output: TextIO | None = None) -> Path:
    """Synthetic hospitals, a secure SuperLink, one SuperNode each, ``rounds`` rounds; returns the run folder."""
    from .synthetic import synthesize

    out = Path(out).resolve()
    hospitals = [f"hospital-{chr(ord('a') + i)}" for i in range(sites)]
    synthesize(out / "data", sites, int((run_config or {}).get("synth-cases-per-site", 4)),
                      (48, 48, 24), seed=0)
    values = {"num-server-rounds": rounds, "min-available-nodes": sites, "output-dir": str(out / "runs"),
              "run-name": "demo", "model-args": "base_channels=8 depth=3", "samples-per-case": 8,
              **{k: v for k, v in (run_config or {}).items() if k != "synth-cases-per-site"}}
    with ExitStack() as stack:
        federation = stack.enter_context(secure_superlink(out / "federation"))
        for index, hospital in enumerate(hospitals):
            federation.register(hospital)
            federation.start_supernode(hospital, out / "data" / f"site-{index}")
        code = federation.run(values, output=output)
    run_dir = Path(values["output-dir"]) / str(values["run-name"])
    if code != 0 or not (run_dir / "final.pt").exists():
        raise RuntimeError(f"the federated run failed (flwr run exit code {code}); logs in {out / 'federation'}.")
    return run_dir
