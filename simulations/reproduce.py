"""``fedlesion reproduce``: centralized vs FedAvg vs FedProx vs FedAdam vs local-only, on one split.

Every configuration trains the same model for the same total number of local epochs
(``rounds x local-epochs``), then the final models are scored on the same held-out cases.
The federated runs go through ``flwr run`` on Flower's simulation engine; the centralized
and local-only runs use the same training loop directly.

Outputs in ``--out``: ``results.json``, ``results.md``, ``curves.png``, ``overlay.png``,
``reproduce.json`` (versions, seeds, settings: what ran), ``split.json`` and the runs.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.api import evaluate_checkpoint, select_cases, train_centralized, write_overlay
from common.checkpoint import load_checkpoint
from common.config import model_from, train_config_from, with_defaults
from common.data import discover_cases, load_site, resolve_spec
from common.engine import evaluate, predict_probabilities, predicted_regions, select_device
from common.model import model_spatial_dims
from common.postprocess import PostProcessing
from common.splits import Split, make_split, tumour_volumes

from .launch import read_history, run_federation

FEDERATED = ("fedavg", "fedprox", "fedadam")
DEFAULT_CONFIGS = ("central", *FEDERATED, "local")


def _versions() -> dict[str, str]:
    import flwr
    import monai
    import nibabel

    return {"python": sys.version.split()[0], "torch": torch.__version__, "flwr": flwr.__version__,
            "monai": monai.__version__, "nibabel": nibabel.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpu_threads": str(torch.get_num_threads()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def reproduce(
    data: str | Path,
    split: str,
    test_data: str | Path,
    out: str | Path,
    run_config: Mapping[str, Any] | None = None,
    manifest: str | None = None,
    test_include: Sequence[str] = (),
    configs: Sequence[str] = DEFAULT_CONFIGS,
    num_sites: int = 3,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every configuration and write the comparison.

    Args:
        data: the training data folder.
        split: a split kind (``institution``, ``fets1``, ``iid``, ...) or a split JSON file.
        test_data: the folder holding the held-out cases.
        out: the output folder.
        run_config: overrides of ``[tool.flwr.app.config]`` (model, rounds, local epochs, ...).
        manifest: the layout of ``data`` and ``test_data`` (found when ``None``).
        test_include: case-ID globs selecting the held-out cases in ``test_data``.
        configs: which of ``central``, ``fedavg``, ``fedprox``, ``fedadam``, ``local`` to run.
        num_sites: sites for the iid and Dirichlet split kinds.
        report: where progress lines go.

    Returns:
        The ``results.json`` content.

    Raises:
        ValueError: when a held-out case is also a training case, no test case is found, or ``out``
            already holds a reproduce run.
    """
    out = Path(out).resolve()
    if (out / "results.json").exists() or (out / "runs").exists():
        raise ValueError(f"{out} already holds a reproduce run (results.json or runs/); choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    values = with_defaults(dict(run_config or {}))
    seed = values["seed"]
    spec = resolve_spec(data, manifest)
    ids = discover_cases(data, spec)
    the_split = Split.load(split) if split.endswith(".json") else make_split(
        split, ids, num_sites=num_sites, alpha=values["split-alpha"], seed=seed,
        volumes=tumour_volumes(data, spec, ids) if split == "dirichlet-volume" else None)
    test_spec = resolve_spec(test_data, manifest)
    test_ids = select_cases(discover_cases(test_data, test_spec), include=test_include)
    if not test_ids:
        raise ValueError(f"no held-out case found in {test_data} (include {list(test_include)}).")
    if Path(test_data).resolve() == Path(data).resolve():
        # The held-out cases must not train anything: drop them from every site.
        the_split = Split(the_split.kind, {s: [c for c in cases if c not in test_ids] for s, cases in the_split.sites.items()},
                          the_split.notes + [f"held-out cases removed from training: {test_ids}"])
        the_split.sites = {s: c for s, c in the_split.sites.items() if c}
    split_path = the_split.save(out / "split.json")
    rounds, local_epochs = values["num-server-rounds"], values["local-epochs"]
    report(f"split '{the_split.kind}': {the_split.sizes()}; held-out: {len(test_ids)} case(s); "
           f"{rounds} rounds x {local_epochs} local epoch(s)")

    crop = values["crop-foreground"]
    test_cases = load_site(test_data, test_spec, case_ids=test_ids, crop_foreground=crop).cases
    model_name, model_args = model_from(values)
    train_config = train_config_from(values, epochs=rounds * local_epochs, seed=seed)
    device = select_device("auto")
    first_region = next(iter(spec.regions))
    results: dict[str, Any] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    checkpoints: dict[str, Path] = {}
    timings: dict[str, float] = {}

    def test_dice(model: torch.nn.Module) -> float:
        _, summary = evaluate(model, test_cases, spec, model_spatial_dims(model_name), device,
                              patch_size=train_config.patch_size, postprocessing=PostProcessing.from_run_config(values))
        return summary[first_region]["dice_mean"]

    pooled_runs = [("central", [c for cases in the_split.sites.values() for c in cases])] if "central" in configs else []
    if "local" in configs:
        pooled_runs += [(f"local-{site}", cases) for site, cases in the_split.sites.items()]
    for name, cases in pooled_runs:
        # The same budget as the federation: with fixed local steps, the pooled run takes as many optimiser
        # steps per round as all sites together, a site alone as many as it takes in the federation.
        steps = train_config.steps * (len(the_split.sites) if name == "central" else 1)
        config = dataclasses.replace(train_config, steps=steps)
        report(f"--- {name}: {len(cases)} case(s), {config.epochs} epoch(s)"
               + (f" of {steps} steps" if steps else ""))
        curve: list[tuple[int, float]] = []

        def on_epoch(epoch: int, model: torch.nn.Module, curve: list = curve) -> dict[str, float]:
            if epoch % local_epochs == 0 or epoch == 1:
                curve.append((epoch // local_epochs, test_dice(model)))
            return {}

        start = time.perf_counter()
        train_centralized(data, out / "runs" / f"{name}.pt", model=model_name, model_args=model_args, manifest=manifest,
                          config=config, case_ids=cases, crop_foreground=crop, report=report, on_epoch=on_epoch,
                          lr_schedule=values["lr-schedule"], epochs_per_round=local_epochs)
        timings[name] = time.perf_counter() - start
        curves[name], checkpoints[name] = curve, out / "runs" / f"{name}.pt"

    for strategy in (c for c in FEDERATED if c in configs):
        report(f"--- {strategy}: {len(the_split.sites)} sites through flwr run")
        federated_config = {
            # Every site trains on all its cases, as the pooled and local-only runs do; the held-out
            # cases are scored at the server each round instead of a per-site validation share.
            **values, "val-fraction": 0.0, "fraction-evaluate": 0.0, "evaluate-initial": False, "strategy": strategy,
            "data-root": str(Path(data).resolve()), "split": str(split_path),
            "manifest": manifest or "", "dataset": manifest or spec.name, "server-eval-data": str(Path(test_data).resolve()),
            "server-eval-manifest": manifest or "", "server-eval-include": ",".join(test_ids),
            "output-dir": str(out / "runs"), "run-name": strategy, "min-available-nodes": len(the_split.sites),
        }
        start = time.perf_counter()
        run_dir = run_federation(federated_config, num_sites=len(the_split.sites), output=_Prefixed(report, strategy))
        timings[strategy] = time.perf_counter() - start
        history = read_history(run_dir)
        key = f"dice-{first_region.lower()}"
        curves[strategy] = [(r["round"], r["server"][key]) for r in history if key in r.get("server", {})]
        checkpoints[strategy] = run_dir / "final.pt"
        sent = [reply["metrics"]["update-bytes"] for r in history for reply in r.get("replies", []) if "update-bytes" in reply.get("metrics", {})]
        trained = [r["train"]["num-examples"] for r in history if "num-examples" in r.get("train", {})]
        results[strategy] = {"bytes_sent_per_client_per_round": float(np.mean(sent)) if sent else None,
                             "train_cases": int(max(trained)) if trained else 0}

    for name, path in checkpoints.items():
        evaluation = evaluate_checkpoint(path, test_data, manifest=manifest, include=test_ids, report=lambda _: None, postprocess=values)
        if name not in FEDERATED:  # what the pooled or local-only run really trained on
            results[name] = {"train_cases": len(load_checkpoint(path).run_config["train_cases"])}
        results[name] = {
            **results.get(name, {}),
            "summary": evaluation["summary"],
            "seconds_per_case": evaluation["seconds_per_case"],
            "rounds": rounds,
            "local_epochs": local_epochs,
            "total_local_epochs": rounds * local_epochs,
            "wall_seconds": timings[name],
            "curve": curves[name],
        }
        results[name].setdefault("bytes_sent_per_client_per_round", None)
        report(f"{name}: test {first_region} Dice {evaluation['summary'][first_region]['dice_mean']:.3f}")
    order = ["central", *FEDERATED]
    results = dict(sorted(results.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results, list(spec.regions), the_split, test_ids))
    plot_curves(curves, first_region, out / "curves.png")
    if checkpoints:
        _overlay(checkpoints.get("fedavg") or next(iter(checkpoints.values())), test_cases[:3], spec, out / "overlay.png", device)
    (out / "reproduce.json").write_text(json.dumps({
        "command": sys.argv, "data": str(data), "split": the_split.kind, "split_file": str(split_path),
        "test_data": str(test_data), "test_cases": test_ids, "manifest": manifest, "configs": list(configs),
        "run_config": values, "seed": seed, "versions": _versions(), "timings_s": timings,
    }, indent=2, default=str))
    return results


class _Prefixed:
    """A text stream that forwards Flower's streamed log to ``report``, keeping only round lines."""

    def __init__(self, report: Callable[[str], None], name: str) -> None:
        self.report, self.name = report, name

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if "round " in line and ("Dice" in line or "loss" in line):
                self.report(f"  [{self.name}] {line.split(':', 1)[-1].strip()}")

    def flush(self) -> None:
        pass


def results_markdown(results: Mapping[str, Any], regions: Sequence[str], split: Split, test_ids: Sequence[str]) -> str:
    """The comparison table: Dice and IoU mean ± std per region, HD95, speed, rounds and bytes."""
    head = ["configuration", "train cases"]
    for r in regions:
        head += [f"{r} Dice", f"{r} IoU", f"{r} HD95 (mm)"]
    head += ["s / case", "rounds x epochs", "MB sent / client / round"]
    lines = [f"Split `{split.kind}`: {split.sizes()}; held-out cases: {len(test_ids)} ({', '.join(test_ids)}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [name, str(row.get("train_cases", ""))]
        for r in regions:
            s = row["summary"][r]
            cells += [f"{s['dice_mean']:.3f} ± {s['dice_std']:.3f}", f"{s['iou_mean']:.3f} ± {s['iou_std']:.3f}",
                      f"{s['hd95_mean']:.1f}"]
        sent = row.get("bytes_sent_per_client_per_round")
        cells += [f"{row['seconds_per_case']:.2f}", f"{row['rounds']} x {row['local_epochs']}",
                  f"{sent / 1e6:.2f}" if sent else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    local = [row["summary"][regions[0]]["dice_mean"] for name, row in results.items() if name.startswith("local-")]
    if local:
        lines += ["", f"Mean of local-only {regions[0]} Dice: {np.mean(local):.3f}."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: Mapping[str, list[tuple[int, float]]], region: str, path: Path) -> None:
    """Held-out Dice against round (epochs / local-epochs for pooled runs), one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=name, linestyle="--" if name.startswith("local-") else "-")
    ax.set_xlabel("round (pooled runs: epochs / local epochs)")
    ax.set_ylabel(f"{region} Dice on held-out cases")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Held-out Dice per round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overlay(checkpoint: Path, cases: Sequence[Any], spec: Any, path: Path, device: torch.device) -> None:
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build().to(device)
    items = [(case, predicted_regions(predict_probabilities(model, case.image, ckpt.spatial_dims, device,
                                                            patch_size=ckpt.patch_size), spec, case.spacing, ckpt.postprocessing()).astype(bool))
             for case in cases]
    write_overlay(items, spec, path, title=f"{checkpoint.parent.name if checkpoint.name == 'final.pt' else checkpoint.stem}: "
                                          "scan | prediction | ground truth")
