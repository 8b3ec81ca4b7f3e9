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
import re
from collections import deque
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.error import URLError
from urllib.request import urlopen

import tomli_w

from fedlesion import CHECKOUT
from fedlesion.client.site import synthetic_root
from fedlesion.common.config import APP_CONFIG, app_pyproject_text, declared_run_config, parse_shape, with_defaults
from fedlesion.common.splits import KINDS as SPLIT_KINDS
from fedlesion.server.app import check_run

from .synthetic import synthesize



def app_folder(workdir: Path) -> Path:
    """The Flower app folder ``flwr run`` builds its FAB from. In a checkout, the repository: the FAB
    carries its code, and every process Flower starts runs that code. Installed from a wheel, a
    folder in ``workdir`` holding only the app's ``pyproject.toml``: its components
    (``fedlesion.server.app:app``, ``fedlesion.client.app:app``) are the installed package's."""
    if CHECKOUT is not None:
        return CHECKOUT
    folder = workdir / "app"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject_text()[1], encoding="utf-8")
    return folder
STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_run_config(values: Mapping[str, Any], path: Path) -> Path:
    """Run-config values as the TOML file ``flwr run --run-config`` reads (``tomli_w``, as Flower writes its own)."""
    path.write_text(tomli_w.dumps(dict(values)))
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
        "PYTHONPATH": os.pathsep.join(filter(None, [str(CHECKOUT or ""), env.get("PYTHONPATH", "")])),
    })
    return env


def become_subreaper() -> None:
    """On Linux, make this process the reaper of its orphaned descendants: a process whose parent
    exits is re-parented here instead of to init, so :func:`stop_descendants` still finds it. A
    no-op elsewhere. For a command's own process (``fedlesion simulate``), never a library's caller."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def stop_tree(pid: int, grace_s: float = 10.0) -> list[int]:
    """Stop ``pid`` and every process below it: SIGTERM to all, SIGKILL to what is left after ``grace_s``.

    The tree is read before anything is signalled (psutil), so children whose parent exits first
    are stopped too. Processes are found by ancestry, never by a name pattern. Give it only the PID
    of a process that is still running and not yet reaped (else the PID may be someone else's).

    Returns:
        The process IDs that were signalled.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [process.pid for process in processes]


def stop_descendants() -> list[int]:
    """Stop every process below this one (a subreaper's adopted orphans included). Only for a
    command's own process, whose every child belongs to the run it is stopping."""
    import psutil

    stopped = []
    for child in psutil.Process().children():
        stopped += stop_tree(child.pid, grace_s=5.0)
    return stopped


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (in the main thread), so a second one cannot cut it short."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
def local_superlink(workdir: Path, app_dir: Path,
                    extra_env: Mapping[str, str] | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """A simulation SuperLink for this process alone.

    Args:
        workdir: where its state and log go.
        app_dir: the Flower app.
        extra_env: environment variables for the SuperLink and everything it starts.

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
    env = {**flower_environment(flwr_home), **(extra_env or {})}
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
        # The ServerApp runs under flower-superexec and flwr-simulation (with Ray's processes), all below
        # the SuperLink but in their own process groups: stop the whole tree, found by ancestry.
        with signals_deferred():
            if process.poll() is None:  # a SuperLink that exited (and was reaped) has no tree, and its PID may be reused
                stop_tree(process.pid)
            process.wait(timeout=10)


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


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_federation(
    run_config: Mapping[str, Any],
    num_sites: int,
    app_dir: Path | None = None,
    workdir: Path | None = None,
    output: TextIO | None = None,
    timeout_s: float = 3600.0,
    num_cpus_per_site: int = 1,
    ray_cpus: int | None = None,
    cache_dir: Path | None = None,
    on_start: Callable[[], None] | None = None,
) -> Path:
    """Run the federation in simulation and return its run folder.

    Args:
        run_config: overrides of ``[tool.flwr.app.config]``; ``output-dir`` is made absolute
            and ``run-name`` is set when absent, so the run folder is known.
        num_sites: virtual SuperNodes (one per site; ``partition-id`` selects the site).
        app_dir: the Flower app (default: :func:`app_folder`).
        workdir: where the private SuperLink keeps its state and log (a temporary folder when None).
        output: where Flower's streamed log goes (standard output when None).
        timeout_s: the most the whole run may take.
        num_cpus_per_site: CPU cores Ray reserves per virtual SuperNode.
        ray_cpus: CPUs Ray believes it has (default: the machine's). ``num_sites`` here lets
            every site train at once, as separate hospitals would, however many cores there are.
        cache_dir: the sites' case-cache folder (default ``$FEDLESION_CACHE_DIR``; else, for synthetic
            sites only, ``<output-dir>/cache``: real data is cached on disk only where the user says, and
            otherwise held in each simulation worker's memory).
        on_start: called once every check has passed, just before the SuperLink starts.

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
                         f"in {APP_CONFIG if app_dir is None else app_dir / 'pyproject.toml'}.")
    values["output-dir"] = str(Path(str(values.get("output-dir", declared["output-dir"]))).resolve())
    values.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    # The ServerApp's own checks, before anything starts: settings, model, strategy, resume, and a folder
    # that already holds a run is refused (its old final.pt must never pass for this run's).
    checked, _, _, run_dir = check_run(values)
    if num_sites < 1 or num_sites < checked["min-available-nodes"]:
        raise ValueError(f"{num_sites} site(s) can never reach min-available-nodes = {checked['min-available-nodes']}: "
                         f"every round would wait for sites that do not exist. Use more sites or "
                         f"--set min-available-nodes={max(num_sites, 1)} (and min-train-nodes, min-evaluate-nodes).")
    split = str(checked["split"])
    if checked["data-root"]:
        if not Path(checked["data-root"]).is_dir():
            raise ValueError(f"data-root {checked['data-root']} is not a folder.")
        if split != "folders" and split not in SPLIT_KINDS and not (split.endswith(".json") and Path(split).is_file()):
            raise ValueError(f"split '{split}' is neither 'folders', a split kind {list(SPLIT_KINDS)} nor a split JSON file.")
    if checked["server-eval-data"] and not Path(checked["server-eval-data"]).is_dir():
        raise ValueError(f"server-eval-data {checked['server-eval-data']} is not a folder.")
    write_synthetic_sites(values, num_sites)
    output = output or sys.stdout
    if on_start is not None:
        on_start()
    with tempfile.TemporaryDirectory(prefix="fedlesion-") as tmp:
        work = Path(workdir or tmp)
        # A case-cache folder holds patient-derived arrays: for real data only where the user chose one
        # (cache_dir, $FEDLESION_CACHE_DIR); synthetic sites are cached beside the run's outputs.
        folder = cache_dir or os.environ.get("FEDLESION_CACHE_DIR") or (
            None if checked["data-root"] else Path(values["output-dir"]) / "cache")
        cache = {"FEDLESION_CACHE_DIR": str(folder)} if folder else {}
        # What each site keeps of its own (fine-tuned models, FedBN layers) stays "at the sites": the run folder's personal/.
        cache["FEDLESION_PERSONAL_DIR"] = str(run_dir / "personal")
        app_dir = app_dir or app_folder(work)
        with local_superlink(work, app_dir, cache) as (connection, env):
            command = [
                str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), connection, "--stream",
                "--run-config", str(write_run_config(values, work / "run-config.toml")),
                "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={num_cpus_per_site}"
                + (f" init-args-num-cpus={ray_cpus}" if ray_cpus else ""),
            ]
            process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert process.stdout is not None
            tail: deque[str] = deque(maxlen=40)
            run_id = None
            # The deadline holds even while Flower prints nothing: the timer ends `flwr run`, which ends the loop.
            timer = threading.Timer(timeout_s, process.kill)
            timer.daemon = True
            timer.start()
            try:
                for line in process.stdout:
                    tail.append(line)
                    output.write(line)
                    output.flush()
                    run_id = run_id or next(iter(re.findall(r"Successfully started run (\d+)", line)), None)
                process.wait()
                if timer.finished.is_set() and not timer.is_alive() and process.returncode != 0:
                    raise RuntimeError(f"the federated run exceeded {timeout_s:.0f} s and was stopped (a longer run needs a "
                                       "larger --timeout); its last round's checkpoint is last.pt in its run folder, "
                                       "to continue from with resume-from.")
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM, the timeout): ask Flower to stop the run, then the
                # SuperLink's whole process tree is stopped on the way out.
                if run_id is not None:
                    try:
                        subprocess.run([str(Path(sys.executable).parent / "flwr"), "stop", run_id, connection],
                                       cwd=app_dir, env=env, capture_output=True, timeout=30)
                    except (OSError, subprocess.SubprocessError):
                        pass  # the process tree is stopped next either way
                raise
            finally:
                timer.cancel()
                if process.poll() is None:
                    process.kill()
                    process.wait()
    if process.returncode != 0 or not (run_dir / "final.pt").exists():
        raise RuntimeError(
            f"the federated run failed (flwr run exit code {process.returncode}); "
            f"no final checkpoint in {run_dir}. Last lines of its log:\n{''.join(tail)}"
        )
    return run_dir


def write_synthetic_sites(run_config: Mapping[str, Any], num_sites: int) -> Path | None:
    """Write the synthetic sites a run with an empty ``data-root`` trains on, before it starts.

    The sites land where the ClientApp looks for them (:func:`fedlesion.client.site.synthetic_root`) and
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
