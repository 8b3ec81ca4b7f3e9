"""Run the Flower app through ``flwr run`` on a private, short-lived local SuperLink.

``flwr run .`` on its own starts a shared SuperLink in the background that outlives the
run, and by default installs each run's dependencies into a fresh environment. For the
main job and the tests this module instead starts its own ``flower-superlink
--simulation`` on a free loopback port with runtime dependency installation disabled
(so it works offline with the packages already installed), submits the run with
``flwr run --stream``, and stops the SuperLink and everything it started afterwards.
"""

from __future__ import annotations

import json
import os
from collections import deque
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.error import URLError
from urllib.request import urlopen

from client.site import synthetic_root
from common.config import declared_run_config, parse_shape, with_defaults
from server.app import run_folder

from .synthetic import synthesize

APP_DIR = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """A scalar as a TOML literal (run-config values are str, int, float or bool)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_run_config(values: Mapping[str, Any], path: Path) -> Path:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


def flower_environment(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Flower starts further executables (flower-superexec, flwr-simulation) by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        # The project's packages must be importable in every process Flower starts.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH", "")])),
    })
    return env


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextmanager
def local_superlink(workdir: Path, app_dir: Path = APP_DIR) -> Iterator[tuple[str, dict[str, str]]]:
    """A simulation SuperLink for this process alone.

    Yields:
        ``(connection name, environment)`` to pass to ``flwr run``.

    Raises:
        RuntimeError: when the SuperLink does not come up, with the tail of its log.
    """
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedlesion"\n\n[superlink.fedlesion]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_environment(flwr_home)
    log_path = workdir / "superlink.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation", "--database", str(flwr_home / "state.db")],
            cwd=app_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}/health", log_path)
        yield "fedlesion", env
    finally:
        stop_process_group(process)
        stop_orphans(port)


def wait_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path, context: ssl.SSLContext | None = None) -> None:
    """Poll a SuperLink's health endpoint until it answers 200.

    Raises:
        RuntimeError: with the tail of its log, when it exits or does not answer in time.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}:\n{log_tail(log_path)}")
        try:
            with urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"flower-superlink did not start within {STARTUP_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}")
        time.sleep(0.5)


def stop_orphans(port: int) -> None:
    """Stop what a SuperLink on ``port`` started outside its process group, if it was cut short:
    the ``flwr-simulation`` process (found by its runtime address) and that process's Ray session."""
    found = subprocess.run(["pgrep", "-f", f"runtime-api-address 127.0.0.1:{port}"], capture_output=True, text=True)
    for pid in found.stdout.split():
        for pattern in (f"--runtime-api-address 127.0.0.1:{port}", f"session_[0-9_-]*_{pid}/"):
            subprocess.run(["pkill", "-KILL", "-f", pattern], capture_output=True)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_federation(
    run_config: Mapping[str, Any],
    num_sites: int,
    app_dir: Path = APP_DIR,
    workdir: Path | None = None,
    output: TextIO | None = None,
    timeout_s: float = 3600.0,
    num_cpus_per_site: int = 1,
    ray_cpus: int | None = None,
) -> Path:
    """Run the federation in simulation and return its run folder.

    Args:
        run_config: overrides of ``[tool.flwr.app.config]``; ``output-dir`` is made absolute
            and ``run-name`` is set when absent, so the run folder is known.
        num_sites: virtual SuperNodes (one per site; ``partition-id`` selects the site).
        app_dir: the Flower app (this repository).
        workdir: where the private SuperLink keeps its state and log (a temporary folder when None).
        output: where Flower's streamed log goes (standard output when None).
        timeout_s: the most the whole run may take.
        num_cpus_per_site: CPU cores Ray reserves per virtual SuperNode.
        ray_cpus: CPUs Ray believes it has (default: the machine's). ``num_sites`` here lets
            every site train at once, as separate hospitals would, however many cores there are.

    Returns:
        The run folder holding ``metrics.jsonl``, ``metrics.csv`` and the checkpoints.

    Raises:
        RuntimeError: when the run fails or ends without its final checkpoint.
    """
    values = dict(run_config)
    declared = declared_run_config(app_dir)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; the keys are those under [tool.flwr.app.config] "
                         f"in {app_dir / 'pyproject.toml'}.")
    values["output-dir"] = str(Path(str(values.get("output-dir", declared["output-dir"]))).resolve())
    values.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    # The ServerApp's own rule, checked before anything starts: a folder that already holds a run
    # is refused (its old final.pt must never pass for this run's), a resume continues in its checkpoint's folder.
    run_dir = run_folder(with_defaults(values))
    write_synthetic_sites(values, num_sites)
    output = output or sys.stdout
    with tempfile.TemporaryDirectory(prefix="fedlesion-") as tmp:
        work = Path(workdir or tmp)
        with local_superlink(work, app_dir) as (connection, env):
            command = [
                str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), connection, "--stream",
                "--run-config", str(write_run_config(values, work / "run-config.toml")),
                "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={num_cpus_per_site}"
                + (f" init-args-num-cpus={ray_cpus}" if ray_cpus else ""),
            ]
            process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert process.stdout is not None
            tail: deque[str] = deque(maxlen=40)
            try:
                deadline = time.monotonic() + timeout_s
                for line in process.stdout:
                    tail.append(line)
                    output.write(line)
                    output.flush()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the federated run exceeded {timeout_s:.0f} s and was stopped.")
                process.wait()
            finally:
                if process.poll() is None:
                    process.kill()
    if process.returncode != 0 or not (run_dir / "final.pt").exists():
        raise RuntimeError(
            f"the federated run failed (flwr run exit code {process.returncode}); "
            f"no final checkpoint in {run_dir}. Last lines of its log:\n{''.join(tail)}"
        )
    return run_dir


def write_synthetic_sites(run_config: Mapping[str, Any], num_sites: int) -> Path | None:
    """Write the synthetic sites a run with an empty ``data-root`` trains on, before it starts.

    The sites land where the ClientApp looks for them (:func:`client.site.synthetic_root`) and
    are reused by later runs with the same settings. Returns their folder, or ``None`` when the
    run names its own ``data-root``.
    """
    values = with_defaults(run_config)
    if values["data-root"]:
        return None
    root = synthetic_root(values, num_sites)
    synthesize(root, sites=num_sites, cases_per_site=values["synth-cases-per-site"],
               shape=parse_shape(values["synth-shape"]), seed=values["seed"])
    return root


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round records of a run, from its ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
