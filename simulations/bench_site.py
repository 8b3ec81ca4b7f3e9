"""What one ClientApp process costs at a site of N cases: peak memory, seconds per message, cases read.

A SuperNode starts a fresh ClientApp process for every message it receives. This runs the real
ClientApp handlers (:func:`fedlesion.client.app.train` and :func:`~fedlesion.client.app.evaluate`)
in a fresh interpreter per message, as that process would (node config ``data-path`` and
``cache-dir``, the run config's defaults), and reports what the process used: its peak resident
memory, its wall time, the NIfTI files it decoded and the cached cases whose arrays it opened.

Run as a module, it is that one process: ``python -m fedlesion.simulations.bench_site '<json>'``
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_SHAPE = (240, 240, 155)  # BraTS's grid
DISTINCT_CASES = 10  # distinct synthetic cases; a larger site repeats them under new case IDs


def write_scale_site(root: Path, cases: int, shape: tuple[int, int, int] = BENCH_SHAPE, seed: int = 0) -> Path:
    """A folder of ``cases`` synthetic BraTS-layout cases at ``root/site-<cases>``.

    :data:`DISTINCT_CASES` cases are generated (once, in ``root/distinct``); case ``i`` of the
    pool ``root/all`` holds hard links to distinct case ``i % DISTINCT_CASES`` under its own ID,
    so 500 cases cost 10 cases' disk and generation time but are, to FedLesion, 500 cases (own
    paths, own cache entries). ``site-<cases>`` holds links to the first ``cases`` pool folders,
    so sites of several sizes share the pool's preprocessed entries.
    """
    from fedlesion.simulations.synthetic import write_site

    distinct = root / "distinct"
    ids = write_site(distinct, 0, DISTINCT_CASES, shape, seed=seed)
    pool = root / "all"
    pool.mkdir(parents=True, exist_ok=True)
    site = root / f"site-{cases}"
    site.mkdir(exist_ok=True)
    for index in range(cases):
        case = f"Scale_{index:04d}"
        source = distinct / ids[index % len(ids)]
        folder = pool / case
        if not folder.is_dir():
            tmp = pool / f".{case}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for path in source.glob("*.nii.gz"):
                target = tmp / path.name.replace(source.name, case)
                try:
                    os.link(path, target)
                except OSError:  # another file system
                    shutil.copyfile(path, target)
            tmp.rename(folder)
        if not (site / case).exists():
            (site / case).symlink_to(folder.resolve(), target_is_directory=True)
    return site


def run_message(data: Path, cache_dir: Path, kind: str, run_config: Mapping[str, Any] | None = None,
                timeout_s: float = 3600.0) -> dict[str, Any]:
    """One ClientApp message (``kind`` ``train`` or ``evaluate``) in a fresh process; its measurements."""
    job = {"data": str(data), "cache_dir": str(cache_dir), "kind": kind, "run_config": dict(run_config or {})}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fedlesion.simulations.bench_site", json.dumps(job)],
                            capture_output=True, text=True, timeout=timeout_s)
    process_seconds = time.perf_counter() - start
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the ClientApp process for a {kind} message failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    # "seconds": the handler; "process_seconds": the whole process, the interpreter's start and imports included
    return {**json.loads(lines[-1]), "process_seconds": process_seconds}


def bench_site_sizes(out: Path, sizes: Sequence[int] = (10, 100, 500), shape: tuple[int, int, int] = BENCH_SHAPE,
                     train_messages: int = 2, run_config: Mapping[str, Any] | None = None,
                     progress: Any = print) -> dict[str, Any]:
    """Peak memory and seconds of a ClientApp process at sites of ``sizes`` cases (synthetic, ``shape``).

    Per size: ``train_messages`` train messages (the first also preprocesses the cases no smaller
    site had; the later ones are the steady state a round sees) and one evaluate message.
    Validation is 2% of the cases (at least one), so evaluation grows with the site by design;
    it is reported per case.
    """
    root = Path(out) / "site-scale"
    cache = root / "cache"
    config = {"val-fraction": 0.02, **(run_config or {})}
    result: dict[str, Any] = {}
    for size in sorted(sizes):
        progress(f"site scale: {size} cases of {'x'.join(map(str, shape))} ...")
        site = write_scale_site(root, size, shape)
        first = run_message(site, cache, "train", config)
        steady = [run_message(site, cache, "train", config) for _ in range(max(train_messages - 1, 1))]
        evaluation = run_message(site, cache, "evaluate", config)
        result[str(size)] = {
            "cases": size,
            "first_train_message_s": first["seconds"],
            "first_train_message_decoded_files": first["decoded_files"],
            "train_message_s": statistics.median(m["seconds"] for m in steady),
            "train_message_process_s": statistics.median(m["process_seconds"] for m in steady),
            "train_message_peak_rss_gib": max(m["peak_rss_bytes"] for m in steady) / 2**30,
            "train_message_cases_opened": max(m["cases_opened"] for m in steady),
            "train_message_decoded_files": max(m["decoded_files"] for m in steady),
            "train_samples": steady[0]["metrics"].get("train-samples"),
            "evaluate_message_s": evaluation["seconds"],
            "evaluate_message_process_s": evaluation["process_seconds"],
            "evaluate_message_peak_rss_gib": evaluation["peak_rss_bytes"] / 2**30,
            "evaluate_cases": evaluation["metrics"].get("num-examples"),
            "evaluate_s_per_case": evaluation["seconds"] / max(evaluation["metrics"].get("num-examples", 1), 1),
            "peak_rss_gib": max(first["peak_rss_bytes"], evaluation["peak_rss_bytes"],
                                *(m["peak_rss_bytes"] for m in steady)) / 2**30,
            "shape": list(shape),
        }
        progress(f"  train message {result[str(size)]['train_message_s']:.1f} s, "
                 f"peak {result[str(size)]['peak_rss_gib']:.2f} GiB, "
                 f"{result[str(size)]['train_message_cases_opened']} case(s) opened")
    return result


def _process(job: dict[str, Any]) -> dict[str, Any]:
    """Be one ClientApp process: handle one message, report what it took."""
    opened: set[str] = set()

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path.endswith("image.npy"):
                opened.add(path)

    sys.addaudithook(audit)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlesion.client import app as client_app
    from fedlesion.common.config import dataset_spec, model_from, with_defaults
    from fedlesion.common.data import DECODE_STATS
    from fedlesion.common.model import build_model

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a SuperNode stamps
    node_config = {"data-path": job["data"], "cache-dir": job["cache_dir"], "site-name": "bench"}
    values = with_defaults(job["run_config"])
    name, args = model_from(values)
    spec = dataset_spec(values["dataset"])  # the shared model's layout (the site itself is loaded by the handler, timed)
    model = build_model(name, len(spec.channels), len(spec.regions), **args)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    message = Message(content=content, dst_node_id=1, message_type=job["kind"])
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=job["run_config"])
    handler = {"train": client_app.train, "evaluate": client_app.evaluate}[job["kind"]]
    start = time.perf_counter()
    reply = handler(message, context)
    seconds = time.perf_counter() - start
    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error}")
    metrics = {k: v for record in reply.content.metric_records.values() for k, v in record.items()}
    return {"kind": job["kind"], "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cases_opened": len(opened), "decoded_files": DECODE_STATS.files, "metrics": metrics}


if __name__ == "__main__":
    print(json.dumps(_process(json.loads(sys.argv[1]))), flush=True)
