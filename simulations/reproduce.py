"""``fedlesion reproduce``: pooled vs federated strategies vs local-only, on one split.

Every configuration trains the same model for the same total number of local epochs
(``rounds x local-epochs``), then the final models are scored on the same held-out cases.
The federated runs go through ``flwr run`` on Flower's simulation engine; the centralized
and local-only runs use the same training loop directly. Configurations: ``central``,
``local`` (every site alone), each strategy of :data:`fedlesion.server.strategy.STRATEGIES` and ``fedbn``
(FedAvg with each site's BatchNorm layers kept local, on the same model with ``norm=batch``).

Outputs in ``--out``: ``results.json``, ``results.md``, ``curves.png``, ``overlay.png``,
``reproduce.json`` (versions, seeds, settings: what ran), ``split.json`` and the runs.
:func:`reproduce_repeated` runs it once per cross-validation fold or seed, each in its own
sub-folder, and writes the same files at the top with mean ± standard deviation over them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlesion.common.api import evaluate_checkpoint, select_cases, train_centralized, write_overlay
from fedlesion.common.checkpoint import load_checkpoint, save_checkpoint
from fedlesion.common.config import model_from, parse_model_args, train_config_from, with_defaults
from fedlesion.common.data import CACHE, CaseCache, discover_cases, divide_cases, load_site, resolve_spec
from fedlesion.common.engine import evaluate, predict_probabilities, predicted_regions, select_device
from fedlesion.common.metrics import METRICS, summarize
from fedlesion.common.model import batchnorm_keys, build_model, model_spatial_dims
from fedlesion.common.postprocess import PostProcessing
from fedlesion.common.splits import Split, make_split, tumour_volumes

from fedlesion.client.app import FEDBN_SUFFIX, site_label
from fedlesion.server.strategy import STRATEGIES

from .launch import read_history, run_federation

FEDERATED = (*STRATEGIES, "fedbn")
DEFAULT_CONFIGS = ("central", "fedavg", "fedprox", "fedadam", "local")
ALL_CONFIGS = ("central", *FEDERATED, "local")


def _make_split(split: str, data: str | Path, spec: Any, ids: Sequence[str], values: Mapping[str, Any],
                num_sites: int) -> Split:
    """A split JSON file as written, or a split of kind ``split`` made with the run's seed and alpha."""
    if split.endswith(".json"):
        return Split.load(split)
    return make_split(split, ids, num_sites=num_sites, alpha=values["split-alpha"], seed=values["seed"],
                      volumes=tumour_volumes(data, spec, ids) if split == "dirichlet-volume" else None)


def _fedbn_model_args(values: Mapping[str, Any]) -> str:
    """The run's model arguments with BatchNorm: FedBN needs BatchNorm layers to keep local."""
    args = {**parse_model_args(values["model-args"]), "norm": "batch"}
    build_model(values["model"], 1, 1, **args)  # refuses a model without a norm argument, before any run
    return " ".join(f"{key}={value}" for key, value in args.items())


def _versions() -> dict[str, str]:
    import flwr
    import monai
    import nibabel

    return {"python": sys.version.split()[0], "torch": torch.__version__, "flwr": flwr.__version__,
            "monai": monai.__version__, "nibabel": nibabel.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "cpu_threads": str(torch.get_num_threads()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


# The most one federated run of reproduce may take before it is stopped (a hang guard, not a budget): its runs are
# the long ones (FixMatch at 16 rounds x 40 steps on brats18-multimodal took over an hour on 2 cores).
FEDERATED_TIMEOUT_S = 86_400.0


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
    cache_dir: str | Path | None = None,
    timeout_s: float = FEDERATED_TIMEOUT_S,
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
        configs: which of :data:`ALL_CONFIGS` to run.
        num_sites: sites for the iid and Dirichlet split kinds.
        report: where progress lines go.
        cache_dir: the federated runs' case-cache folder (opt-in: it holds patient-derived arrays; default none,
            each simulation worker decodes the cases once and holds them in memory).
        timeout_s: the most each federated run may take (:data:`FEDERATED_TIMEOUT_S`).

    Returns:
        The ``results.json`` content.

    Raises:
        ValueError: when a held-out case is also a training case, no test case is found, ``out`` already
            holds a finished reproduce run (or one that another call is running), or it holds a stopped one that
            cannot be continued with these settings (:func:`_earlier_run`).
    """
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        raise ValueError(f"unknown reproduce configuration(s) {unknown}; choose from {list(ALL_CONFIGS)}.")
    out = Path(out).resolve()
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds a reproduce run (results.json); choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".reproduce.lock", "w") as lock:  # one call at a time in a folder: a second would continue the first's runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another reproduce call is running in {out}; wait for it, or choose another --out.") from None
        return _reproduce(data, split, test_data, out, run_config, manifest, test_include, configs, num_sites, report,
                          cache_dir, timeout_s)


def _reproduce(data: str | Path, split: str, test_data: str | Path, out: Path, run_config: Mapping[str, Any] | None,
               manifest: str | None, test_include: Sequence[str], configs: Sequence[str], num_sites: int,
               report: Callable[[str], None], cache_dir: str | Path | None, timeout_s: float) -> dict[str, Any]:
    # A call stopped mid-way (interrupted, or past --timeout) is continued in the same folder with the same
    # settings: a finished federated run is read, one stopped after a round resumes from its last.pt; pooled
    # and site-alone runs train again.
    continuing = (out / "runs").exists()
    values = with_defaults(dict(run_config or {}))
    if values["fraction-train"] < 1.0:  # the pooled run takes every site's steps each round
        raise ValueError(f"fraction-train {values['fraction-train']:g}: reproduce compares pooled, federated and "
                         "site-alone runs at equal optimiser steps, which needs every site to train each round "
                         "(fraction-train 1); run such a federation with `fedlesion simulate`.")
    fedbn_args = _fedbn_model_args(values) if "fedbn" in configs else None
    seed = values["seed"]
    spec = resolve_spec(data, manifest)
    ids = discover_cases(data, spec)
    the_split = _make_split(split, data, spec, ids, values, num_sites)
    test_spec = resolve_spec(test_data, manifest)
    test_ids = select_cases(discover_cases(test_data, test_spec), include=test_include)
    if not test_ids:
        raise ValueError(f"no held-out case found in {test_data} (include {list(test_include)}).")
    # Each held-out case's site, when the held-out cases are cases of the split's sites (folds, or held out
    # from --data): per-site scores then say what each configuration gives each site's own scans.
    test_sites = {s: [c for c in cases if c in test_ids] for s, cases in the_split.sites.items()}
    test_sites = {s: c for s, c in test_sites.items() if c} if Path(test_data).resolve() == Path(data).resolve() else {}
    if Path(test_data).resolve() == Path(data).resolve():
        # The held-out cases must not train anything: drop them from every site.
        the_split = Split(the_split.kind, {s: [c for c in cases if c not in test_ids] for s, cases in the_split.sites.items()},
                          the_split.notes + [f"held-out cases removed from training: {test_ids}"])
        the_split.sites = {s: c for s, c in the_split.sites.items() if c}
    if continuing:
        earlier = Split.load(out / "split.json") if (out / "split.json").exists() else None
        if earlier is None or earlier.sites != the_split.sites:
            raise ValueError(f"{out} holds runs of another split or held-out cases (split.json differs or is "
                             "missing); choose another --out.")
    split_path = the_split.save(out / "split.json")
    rounds, local_epochs, eval_every = values["num-server-rounds"], values["local-epochs"], values["server-eval-every"]
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
    personal: dict[str, tuple[str, dict[str, Path]]] = {}  # row -> (its federated run, site -> the site's own model)
    timings: dict[str, float] = {}

    def test_dice(model: torch.nn.Module) -> float:
        _, summary = evaluate(model, test_cases, spec, model_spatial_dims(model_name), device,
                              patch_size=train_config.patch_size, postprocessing=PostProcessing.from_run_config(values))
        return summary[first_region]["dice_mean"]

    pooled_runs = [("central", [c for cases in the_split.sites.values() for c in cases])] if "central" in configs else []
    if "local" in configs:
        pooled_runs += [(f"local-{site}", cases) for site, cases in the_split.sites.items()]
    # label-fraction: the labels each site keeps in the federation are the labels the pooled and local-only runs
    # keep; the others are hidden (FixMatch's unlabelled cases when on). Drawn as the site draws them, from the
    # same usable cases (divide_cases; val-fraction is 0 in the federation here).
    hidden: dict[str, list[str]] = {}
    if values["label-fraction"] < 1.0:
        site_cache = CaseCache(CACHE.max_bytes, disk_dir=cache_dir) if cache_dir else CACHE
        for site, cases in the_split.sites.items():
            usable = load_site(data, spec, case_ids=list(cases), crop_foreground=crop, cache=site_cache, unlabelled=True)
            _, _, unlabelled = divide_cases(usable.cases, 0.0, values["label-fraction"], seed, site)
            hidden[site] = sorted(c.case for c in unlabelled if c.labelled)
    federated_configs = {strategy: {
        # Every site trains on all its cases, as the pooled and local-only runs do; the held-out
        # cases are scored at the server each round instead of a per-site validation share.
        **values, "val-fraction": 0.0, "fraction-evaluate": 0.0, "evaluate-initial": False, "strategy": strategy,
        "fedbn": strategy == "fedbn",  # never inherited: a preset's fedbn must not turn other rows into FedBN
        **({"strategy": "fedavg", "model-args": fedbn_args} if strategy == "fedbn" else {}),
        "data-root": str(Path(data).resolve()), "split": str(split_path),
        "manifest": manifest or "", "dataset": manifest or spec.name, "server-eval-data": str(Path(test_data).resolve()),
        "server-eval-manifest": manifest or "", "server-eval-include": ",".join(test_ids),
        "output-dir": str(out / "runs"), "run-name": strategy, "min-available-nodes": len(the_split.sites),
    } for strategy in FEDERATED if strategy in configs}
    # Checked before anything trains: a continued call must not find other settings hours later.
    earlier_runs = {strategy: _earlier_run(out / "runs" / strategy, config) if continuing else None
                    for strategy, config in federated_configs.items()}
    for name, cases in pooled_runs:
        # The same budget as the federation: with fixed local steps, the pooled run takes as many optimiser
        # steps per round as all sites together, a site alone as many as it takes in the federation.
        steps = train_config.steps * (len(the_split.sites) if name == "central" else 1)
        config = dataclasses.replace(train_config, steps=steps)
        report(f"--- {name}: {len(cases)} case(s), {config.epochs} epoch(s)"
               + (f" of {steps} steps" if steps else ""))
        curve: list[tuple[int, float]] = []

        def on_epoch(epoch: int, model: torch.nn.Module, curve: list = curve, name: str = name) -> dict[str, float]:
            # Scored where the federated runs are scored, after every server-eval-every-th round; the last
            # round's point comes from the final evaluation below, and a site alone has only that point
            # (scoring the held-out volumes costs more than a site's round).
            done = epoch // local_epochs
            if name == "central" and epoch % local_epochs == 0 and done % eval_every == 0 and done < rounds:
                curve.append((done, test_dice(model)))
            return {}

        start = time.perf_counter()
        train_centralized(data, out / "runs" / f"{name}.pt", force=continuing, model=model_name, model_args=model_args, manifest=manifest,
                          config=config, case_ids=cases, crop_foreground=crop, report=report, on_epoch=on_epoch,
                          lr_schedule=values["lr-schedule"], epochs_per_round=local_epochs,
                          semi_supervised=values["semi-supervised"], fixmatch_rampup=values["fixmatch-rampup"],
                          hidden_labels=[c for site_cases in hidden.values() for c in site_cases if c in cases],
                          postprocess=values)  # its post-processing keys, as the held-out cases are scored
        timings[name] = time.perf_counter() - start
        curves[name], checkpoints[name] = curve, out / "runs" / f"{name}.pt"

    for strategy, federated_config in federated_configs.items():
        report(f"--- {strategy}: {len(the_split.sites)} sites through flwr run")
        start = time.perf_counter()
        earlier_run = earlier_runs[strategy]
        if earlier_run is not None and earlier_run.name == "final.pt":
            report(f"  [{strategy}] finished by an earlier call: read from {earlier_run.parent}")
            run_dir = earlier_run.parent
        else:
            if earlier_run is not None:
                report(f"  [{strategy}] stopped by an earlier call: resumed from {earlier_run}")
                federated_config["resume-from"] = str(earlier_run)
            run_dir = run_federation(federated_config, num_sites=len(the_split.sites), output=_Prefixed(report, strategy),
                                     cache_dir=Path(cache_dir) if cache_dir else None, timeout_s=timeout_s)
        # The server scored the held-out cases each round, so its best.pt was chosen on them: a model no one may
        # report as held-out. Scores here are final.pt's; best.pt goes, so that it cannot be used by mistake.
        (run_dir / "best.pt").unlink(missing_ok=True)
        history = read_history(run_dir)
        # A continued run's wall time is its rounds' (every call's), without the calls' start-up.
        timings[strategy] = (time.perf_counter() - start if earlier_run is None
                             else float(sum(r.get("seconds", 0.0) for r in history)))
        key = f"dice-{first_region.lower()}"
        curves[strategy] = [(r["round"], r["server"][key]) for r in history if key in r.get("server", {})]
        checkpoints[strategy] = run_dir / "final.pt"
        sent = [reply["metrics"]["update-bytes"] for r in history for reply in r.get("replies", []) if "update-bytes" in reply.get("metrics", {})]
        # Labelled training cases of all sites (num-examples counts unlabelled ones too when they train).
        trained = [r["train"].get("labelled-cases", r["train"].get("num-examples")) for r in history
                   if "num-examples" in r.get("train", {})]
        unlabelled = [r["train"].get("unlabelled-cases", 0) for r in history if "num-examples" in r.get("train", {})]
        results[strategy] = {**({"continued": True} if earlier_run is not None else {}),  # wall_seconds: its rounds'
                             "bytes_sent_per_client_per_round": float(np.mean(sent)) if sent else None,
                             "train_cases": int(max(trained)) if trained else 0,
                             "unlabelled_cases": int(max(unlabelled)) if unlabelled and values["semi-supervised"] else 0}
        if test_sites:  # each site's own model, scored on the site's own held-out cases below
            if strategy == "fedbn":
                personal[f"{strategy}-personal"] = (strategy, _fedbn_models(run_dir, test_sites, out / "runs" / f"{strategy}-personal"))
            if values["finetune-epochs"]:
                personal[f"{strategy}-finetuned"] = (strategy, _personal_files(run_dir / "personal", test_sites, ".pt"))

    for name, path in checkpoints.items():
        evaluation = evaluate_checkpoint(path, test_data, manifest=manifest, include=test_ids, report=lambda _: None,
                                         postprocess=values, sites=test_sites or None)
        if name not in FEDERATED:  # what the pooled or local-only run really trained on
            trained_config = load_checkpoint(path).run_config  # checkpoints before 2026-11-27 listed the cases
            results[name] = {"train_cases": int(trained_config.get("train-case-count", len(trained_config.get("train_cases", [])))),
                             "unlabelled_cases": int(trained_config.get("unlabelled-case-count", 0))}
            curves[name].append((rounds, evaluation["summary"][first_region]["dice_mean"]))
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
        if test_sites:  # per site: case count and summary only (no case IDs); a site none of whose cases scored is left out
            results[name]["sites"] = {site: {"num_cases": block["num_cases"], "summary": block["summary"]}
                                      for site, block in evaluation["sites"].items() if block["num_cases"]}
            results[name]["worst_site"] = evaluation["worst_site"]
        results[name].setdefault("bytes_sent_per_client_per_round", None)
        report(f"{name}: test {first_region} Dice {evaluation['summary'][first_region]['dice_mean']:.3f}")
    for name, (strategy, models) in personal.items():
        results[name] = {**_score_personal(models, test_sites, test_data, manifest, values, regions=list(spec.regions)),
                         "train_cases": results[strategy]["train_cases"], "rounds": rounds, "local_epochs": local_epochs,
                         "total_local_epochs": rounds * local_epochs, "wall_seconds": timings[strategy], "curve": [],
                         "bytes_sent_per_client_per_round": results[strategy]["bytes_sent_per_client_per_round"]}
        report(f"{name}: test {first_region} Dice {results[name]['summary'][first_region]['dice_mean']:.3f} "
               f"(each site's own model on its own held-out cases)")
    order = ["central", *FEDERATED]

    def rank(name: str) -> tuple[int, str]:  # a run's personal rows right after it
        base = name.removesuffix("-personal").removesuffix("-finetuned")
        return (order.index(base) if base in order else len(order), name)

    results = dict(sorted(results.items(), key=lambda kv: rank(kv[0])))
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


def _earlier_run(folder: Path, federated_config: Mapping[str, Any]) -> Path | None:
    """What an earlier, interrupted reproduce call left of one federated run: its ``final.pt`` (finished), its
    ``last.pt`` (stopped after a round: resume from it), or None (never started).

    Raises:
        ValueError: when the run was started with other settings, or stopped before any round completed.
    """
    if not folder.exists():
        return None
    for name in ("final.pt", "last.pt"):
        if (folder / name).is_file():
            break
    else:
        raise ValueError(f"{folder} was started by an earlier call but completed no round; remove that folder to "
                         "run it again.")
    try:
        earlier = with_defaults(json.loads((folder / "run_config.json").read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{folder}: its run_config.json is missing or unreadable ({exc}); choose another --out.") from None
    now = with_defaults(dict(federated_config))
    differ = sorted(k for k in now if k != "resume-from" and earlier.get(k) != now[k])
    if differ:
        raise ValueError(f"{folder} was started with other settings ({', '.join(differ)}); continue it with the same "
                         "command and settings, or choose another --out.")
    if name == "last.pt" and now["fedbn"]:  # each site's BatchNorm file is named by the run ID, new in every run
        raise ValueError(f"{folder}: a FedBN run cannot be continued (the sites' own BatchNorm layers are kept per "
                         "run and would be lost); remove that folder to run it again.")
    if name == "final.pt" and now["finetune-epochs"] and not (folder / "finetune.json").is_file():
        raise ValueError(f"{folder}: the run stopped while its sites fine-tuned; remove that folder to run it again.")
    return folder / name


def _personal_files(folder: Path, sites: Mapping[str, Sequence[str]], suffix: str) -> dict[str, Path]:
    """site -> the one model file the site kept in ``folder`` (``<site>-node<id>-run<run><suffix>``, see
    :func:`fedlesion.client.app.personal_path`). A site that kept none is left out.

    Raises:
        ValueError: when a site kept several (``folder`` holds more than one run).
    """
    found: dict[str, Path] = {}
    for site in sites:
        pattern = re.compile(rf"{re.escape(site_label(site))}-node\d+-run\d+{re.escape(suffix)}")
        files = sorted(p for p in folder.glob("*") if pattern.fullmatch(p.name)) if folder.is_dir() else []
        if len(files) > 1:
            raise ValueError(f"{folder}: site {site} kept {len(files)} models ({[p.name for p in files]}); one run expected.")
        if files:
            found[site] = files[0]
    return found


def _fedbn_models(run_dir: Path, sites: Mapping[str, Sequence[str]], out: Path) -> dict[str, Path]:
    """Under FedBN, each site's own model: the final global model with the site's own BatchNorm layers, as the
    site itself runs it (the layers it kept after its last round, :data:`fedlesion.client.app.FEDBN_SUFFIX`);
    written to ``out/<site>.pt``."""
    final = load_checkpoint(run_dir / "final.pt")
    keys = batchnorm_keys(final.build())
    models = {}
    for site, path in _personal_files(run_dir / "personal", sites, FEDBN_SUFFIX).items():
        kept = load_checkpoint(path)
        if (kept.model, kept.model_args) != (final.model, final.model_args):
            raise ValueError(f"{path}: a {kept.model} {kept.model_args}, not the run's {final.model} {final.model_args}.")
        own = kept.state_dict
        missing = [k for k in keys if k not in own]
        if missing:
            raise ValueError(f"{path}: not the BatchNorm layers of {run_dir / 'final.pt'} (lacks {missing[0]}).")
        models[site] = save_checkpoint(dataclasses.replace(final, state_dict={**final.state_dict, **{k: own[k] for k in keys}}),
                                       out / f"{site_label(site)}.pt")
    return models


def _score_personal(models: Mapping[str, Path], sites: Mapping[str, Sequence[str]], test_data: str | Path,
                    manifest: str | None, values: Mapping[str, Any], regions: Sequence[str]) -> dict[str, Any]:
    """Each site's own model on the site's own held-out cases: ``summary`` over all of them, ``sites`` and
    ``worst_site`` as for one shared model; a site without a model of its own is reported and left out.

    Raises:
        ValueError: when no site kept a model.
    """
    if not models:
        raise ValueError(f"no site kept a model of its own (sites {sorted(sites)}).")
    cases, blocks = [], {}
    for site, path in models.items():  # each site's block from its own model's evaluation only
        evaluation = evaluate_checkpoint(path, test_data, manifest=manifest, include=sites[site], report=lambda _: None,
                                         postprocess=values, sites={site: sites[site]})
        cases += evaluation["cases"]
        blocks[site] = {"num_cases": evaluation["sites"][site]["num_cases"], "summary": evaluation["sites"][site]["summary"]}
    worst = min(blocks, key=lambda s: blocks[s]["summary"][regions[0]]["dice_mean"])
    return {"summary": summarize([{r: c[r] for r in regions} for c in cases], regions),
            "seconds_per_case": float(np.mean([c["seconds"] for c in cases])), "sites": blocks,
            "worst_site": {"site": worst, "region": regions[0], "dice_mean": blocks[worst]["summary"][regions[0]]["dice_mean"]},
            "sites_without_own_model": sorted(set(sites) - set(models))}


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


def mean_dice(summary: Mapping[str, Mapping[str, float]]) -> float:
    """The mean over regions of the per-region mean Dice (one number per configuration)."""
    return float(np.mean([block["dice_mean"] for block in summary.values()]))


def results_markdown(results: Mapping[str, Any], regions: Sequence[str], split: Split | None = None,
                     test_ids: Sequence[str] = (), caption: str | None = None) -> str:
    """The comparison table: Dice and IoU mean ± std per region, HD95, the mean Dice over regions,
    speed, rounds and bytes. Single runs: std over held-out cases; repeated runs: over folds or seeds."""
    head = ["configuration", "train cases"]
    for r in regions:
        head += [f"{r} Dice", f"{r} IoU", f"{r} HD95 (mm)"]
    if len(regions) > 1:
        head += ["mean Dice"]
    head += ["s / case", "rounds x epochs", "MB sent / client / round"]
    if caption is None:
        caption = f"Split `{split.kind}`: {split.sizes()}; held-out cases: {len(test_ids)} ({', '.join(test_ids)})."
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cases = row.get("train_cases", "")
        cells = [name, "/".join(map(str, cases)) if isinstance(cases, list) else str(cases)]
        for r in regions:
            s = row["summary"][r]
            cells += [f"{s['dice_mean']:.3f} ± {s['dice_std']:.3f}", f"{s['iou_mean']:.3f} ± {s['iou_std']:.3f}",
                      f"{s['hd95_mean']:.1f} ± {s['hd95_std']:.1f}"]
        if len(regions) > 1:
            spread = row.get("mean_dice_std")
            cells += [f"{mean_dice(row['summary']):.3f}" + (f" ± {spread:.3f}" if spread is not None else "")]
        sent = row.get("bytes_sent_per_client_per_round")
        cells += [f"{row['seconds_per_case']:.2f}", f"{row['rounds']} x {row['local_epochs']}",
                  f"{sent / 1e6:.2f}" if sent else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if "fedbn" in results:
        lines += ["", "fedbn: the global model, with the sites' BatchNorm layers averaged (what a new site starts from), "
                      "on the held-out cases" + ("; fedbn-personal: each held-out case scored by its own site's model, the "
                      "global model with that site's own BatchNorm layers" if "fedbn-personal" in results else "")
                  + ". FedBN uses the declared model with norm=batch."]
    finetuned = [name for name in results if name.endswith("-finetuned")]
    if finetuned:
        lines += ["", f"{', '.join(finetuned)}: each site fine-tunes the final model on its own training cases "
                      "(finetune-epochs, after the last round); each held-out case scored by its own site's model."]
    local = [row["summary"][regions[0]]["dice_mean"] for name, row in results.items() if name.startswith("local-")]
    if local:
        lines += ["", f"Mean of local-only {regions[0]} Dice: {np.mean(local):.3f}."]
    lines += per_site_markdown(results, regions)
    return "\n".join(lines) + "\n"


def per_site_table(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """site -> configuration -> that configuration's scores on the site's held-out cases (``summary``,
    ``num_cases``). A site alone (``local-<site>``) is scored on its own site only, as ``local``."""
    table: dict[str, dict[str, Any]] = {}
    for name, row in results.items():
        for site, block in (row.get("sites") or {}).items():
            if name.startswith("local-"):
                if name != f"local-{site}":
                    continue
                name_here = "local"
            else:
                name_here = name
            table.setdefault(site, {})[name_here] = block
    return table


def _dice_cell(block: Mapping[str, Any] | None, regions: Sequence[str]) -> str:
    """``WT / TC / ET`` Dice as ``mean ± std`` of one scored block (``-`` for none). A block aggregated over
    folds or seeds of which only one scored it has no spread: its means alone, marked ``(1 repeat)``."""
    if not block:
        return "-"
    if block.get("repeats") == 1:
        return " / ".join(f"{block['summary'][r]['dice_mean']:.3f}" for r in regions) + " (1 repeat)"
    return " / ".join(f"{block['summary'][r]['dice_mean']:.3f} ± {block['summary'][r]['dice_std']:.3f}" for r in regions)


def per_site_markdown(results: Mapping[str, Any], regions: Sequence[str]) -> list[str]:
    """Per site: each configuration's Dice per region on that site's held-out cases (mean ± std over
    its cases, or over folds or seeds; a site only one fold or seed scored: its means, ``(1 repeat)``), the
    site's own model as ``local``; then the worst site."""
    table = per_site_table(results)
    if not table:
        return []
    configs = [c for c in [*[n for n in results if not n.startswith("local-")], "local"]
               if any(c in by_config for by_config in table.values())]
    head = ["site", "held-out cases", *configs]
    lines = ["", f"Per site, {'/'.join(regions)} Dice on the site's own held-out cases (`local`: the site alone; "
             "`-personal`, `-finetuned`: the site's own version of a federated model; the others: the one model every "
             "site gets):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site in sorted(table):
        cells = [site, str(next(iter(table[site].values()))["num_cases"])]
        for config in configs:
            cells.append(_dice_cell(table[site].get(config), regions))
        lines.append("| " + " | ".join(cells) + " |")
    worst = {name: row["worst_site"] for name, row in results.items()
             if row.get("worst_site") and not name.startswith("local-")}
    if worst:
        lines += ["", "Worst site (lowest " + regions[0] + " Dice): " + "; ".join(
            f"{name} {w['site']} {w['dice_mean']:.3f}" for name, w in worst.items()) + "."]
    return lines


def left_out_markdown(left_out: Mapping[str, Any] | None, regions: Sequence[str]) -> list[str]:
    """Per site left out: each configuration's Dice per region on that site's cases (mean ± std over them),
    trained without the site: what a hospital that joins later would get."""
    if not left_out:
        return []
    configs = list(dict.fromkeys(c for row in left_out.values() for c in row))
    if not configs:
        return []
    head = ["site left out", "its cases", *configs]
    lines = ["", f"Each site left out in turn: {'/'.join(regions)} Dice on all its cases, every configuration trained "
             "on the other sites only:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in left_out.items():
        if not row:
            continue
        first = next(iter(row.values()))
        cells = [name, str(first["num_cases"])]
        for config in configs:
            cells.append(_dice_cell(row.get(config), regions))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fold_test_cases(split: Split, folds: int, seed: int) -> list[list[str]]:
    """Held-out cases of each of ``folds`` cross-validation folds, stratified by site: each site's
    cases are shuffled (``seed``) and dealt to the folds in turn, so every case is held out once
    and every fold holds out cases of every site that has at least ``folds`` cases.

    Raises:
        ValueError: for fewer than 2 folds, or a site with fewer than 2 cases (it would train nothing in some fold).
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}.")
    small = {site: len(cases) for site, cases in split.sites.items() if len(cases) < 2}
    if small:
        raise ValueError(f"site(s) {small} have fewer than 2 cases: in some fold they would train on nothing.")
    rng = np.random.default_rng(seed)
    held: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for site in sorted(split.sites):
        cases = sorted(split.sites[site])
        for i, case in enumerate(rng.permutation(cases)):
            held[(offset + i) % folds].append(str(case))
        offset += len(cases)  # the next site starts where this one stopped: folds stay balanced in size
    return [sorted(h) for h in held]


def aggregate_repeats(per_repeat: Sequence[Mapping[str, Any]], regions: Sequence[str],
                      cases_add_up: bool = True) -> dict[str, Any]:
    """Mean ± sample standard deviation over folds or seeds of each configuration's mean metrics
    (``summary`` keeps the single-run keys: ``dice_mean`` is the mean over repeats, ``dice_std``
    the spread over repeats). Configurations missing from a repeat are left out."""
    names = [name for name in per_repeat[0] if all(name in r for r in per_repeat)]

    def spread(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    results: dict[str, Any] = {}
    for name in names:
        rows = [r[name] for r in per_repeat]
        summary = {region: {key: value for metric in METRICS for key, value in (
            (f"{metric}_mean", float(np.mean([row["summary"][region][f"{metric}_mean"] for row in rows]))),
            (f"{metric}_std", spread([row["summary"][region][f"{metric}_mean"] for row in rows])))}
            for region in regions}
        curve_by_x: dict[float, list[float]] = {}
        for row in rows:
            for x, y in row["curve"]:
                curve_by_x.setdefault(x, []).append(y)
        sent = [row["bytes_sent_per_client_per_round"] for row in rows if row.get("bytes_sent_per_client_per_round")]
        results[name] = {
            "summary": summary,
            "mean_dice": float(np.mean([mean_dice(row["summary"]) for row in rows])),
            "mean_dice_std": spread([mean_dice(row["summary"]) for row in rows]),
            "repeats": len(rows),
            "per_repeat": [{"summary": row["summary"], "train_cases": row["train_cases"]} for row in rows],
            "train_cases": [row["train_cases"] for row in rows],
            "seconds_per_case": float(np.mean([row["seconds_per_case"] for row in rows])),
            "rounds": rows[0]["rounds"], "local_epochs": rows[0]["local_epochs"],
            "total_local_epochs": rows[0]["total_local_epochs"],
            "wall_seconds": float(sum(row["wall_seconds"] for row in rows)),
            "curve": [(x, float(np.mean(ys))) for x, ys in sorted(curve_by_x.items()) if len(ys) == len(rows)],
            "bytes_sent_per_client_per_round": float(np.mean(sent)) if sent else None,
        }
        sites = sorted({s for row in rows for s in (row.get("sites") or {})})
        if sites:  # each site's mean over its held-out cases, then mean ± std of that over the repeats that scored it
            blocks = {site: [row["sites"][site] for row in rows if site in (row.get("sites") or {})] for site in sites}
            results[name]["sites"] = {site: {
                # folds hold out other cases each time (they add up); seeds hold out the same ones
                "num_cases": int(sum(b["num_cases"] for b in these) if cases_add_up else max(b["num_cases"] for b in these)),
                "repeats": len(these),
                "summary": {region: {key: value for metric in METRICS for key, value in (
                    (f"{metric}_mean", float(np.mean([b["summary"][region][f"{metric}_mean"] for b in these]))),
                    (f"{metric}_std", spread([b["summary"][region][f"{metric}_mean"] for b in these])))}
                    for region in regions}} for site, these in blocks.items()}
            scored = results[name]["sites"]
            worst = min(scored, key=lambda s: scored[s]["summary"][regions[0]]["dice_mean"])
            results[name]["worst_site"] = {"site": worst, "region": regions[0],
                                           "dice_mean": scored[worst]["summary"][regions[0]]["dice_mean"]}
    return results


def reproduce_repeated(
    data: str | Path,
    split: str,
    out: str | Path,
    *,
    folds: int = 0,
    seeds: Sequence[int] = (),
    test_data: str | Path | None = None,
    test_include: Sequence[str] = (),
    run_config: Mapping[str, Any] | None = None,
    manifest: str | None = None,
    configs: Sequence[str] = DEFAULT_CONFIGS,
    num_sites: int = 3,
    report: Callable[[str], None] = print,
    cache_dir: str | Path | None = None,
    leave_one_out: bool = False,
    timeout_s: float = FEDERATED_TIMEOUT_S,
) -> dict[str, Any]:
    """:func:`reproduce` once per cross-validation fold (``folds``: held-out cases from ``data``
    itself, stratified by site, see :func:`fold_test_cases`) or once per seed (``seeds``: the same
    held-out cases, ``test_data`` and ``test_include``, another ``seed``), each in ``out/fold-K``
    or ``out/seed-S``, or once per site with ``leave_one_out`` (``out/out-<site>``: the site's cases are
    held out, all of them, and every configuration trains on the other sites: how the models do at a
    hospital that did not take part); then ``results.json`` / ``results.md`` / ``curves.png`` at the top with mean
    ± standard deviation over the repeats. A repeat whose ``results.json`` exists (an interrupted
    call) is read, not rerun; one cut short mid-way is continued by :func:`reproduce` (its federated runs resume).

    Raises:
        ValueError: when neither or both of ``folds`` and ``seeds`` are given, or ``out`` already holds a run.
    """
    if sum(map(bool, (folds, seeds, leave_one_out))) != 1:
        raise ValueError("give one of folds (cross-validation), seeds (repeated runs) or leave_one_out (each site "
                         "held out in turn).")
    if leave_one_out and "local" in configs:
        raise ValueError("--leave-one-out scores models on a site that trained none of them: 'local' (each site "
                         "alone) has no model for the site left out; choose other configurations.")
    out = Path(out).resolve()
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds a reproduce run (results.json); choose another --out.")
    values = with_defaults(dict(run_config or {}))
    spec = resolve_spec(data, manifest)
    repeats: list[tuple[str, dict[str, Any], str | Path, list[str], str]] = []
    if folds:
        ids = discover_cases(data, spec)
        the_split = _make_split(split, data, spec, ids, values, num_sites)
        for k, held in enumerate(fold_test_cases(the_split, folds, values["seed"])):
            repeats.append((f"fold-{k}", dict(run_config or {}), data, held, split))
    elif leave_one_out:
        the_split = _make_split(split, data, spec, discover_cases(data, spec), values, num_sites)
        unsafe = [s for s in the_split.sites if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", s)]
        if unsafe:  # each name becomes a folder name below --out
            raise ValueError(f"site name(s) {unsafe} of split '{split}' cannot name a folder: use letters, digits, "
                             "'.', '_' and '-' only.")
        if len(the_split.sites) < 3:
            raise ValueError(f"leaving one site out needs at least 3 sites (2 left to federate); split '{split}' has "
                             f"{len(the_split.sites)}.")
        out.mkdir(parents=True, exist_ok=True)
        for site, cases in sorted(the_split.sites.items()):
            rest = Split(the_split.kind, {s: c for s, c in the_split.sites.items() if s != site},
                         [*the_split.notes, f"site {site} left out: its {len(cases)} case(s) are the held-out ones"])
            rest_path = rest.save(out / f"out-{site}.split.json")
            repeats.append((f"out-{site}", dict(run_config or {}), data, sorted(cases), str(rest_path)))
    else:
        if test_data is None:
            raise ValueError("repeated seeds need --test-data (and --test-include when it is --data).")
        for seed in seeds:
            repeats.append((f"seed-{seed}", {**(run_config or {}), "seed": int(seed)}, test_data, list(test_include), split))
    per_repeat = []
    for name, config, test_folder, include, repeat_split in repeats:
        done = out / name / "results.json"
        if done.exists():  # a repeat finished by an earlier, interrupted call: kept, not rerun
            report(f"=== {name}: already done, reading {done}")
            per_repeat.append(json.loads(done.read_text()))
            continue
        report(f"=== {name} ({len(repeats)} in all): held-out {len(include)} case(s)" if folds or leave_one_out
               else f"=== {name}")
        per_repeat.append(reproduce(data, repeat_split, test_folder, out / name, run_config=config, manifest=manifest,
                                    test_include=include, configs=configs, num_sites=num_sites, report=report,
                                    cache_dir=cache_dir, timeout_s=timeout_s))
    regions = list(spec.regions)
    results = aggregate_repeats(per_repeat, regions, cases_add_up=not seeds)
    kind = (f"{folds}-fold cross-validation (held-out cases stratified by site)" if folds
            else "each site left out in turn (all its cases held out, the others train)" if leave_one_out
            else f"seeds {list(seeds)}")
    caption = (f"Split `{split}`, {kind}: mean ± sample standard deviation over the {len(repeats)} repeats of each "
               f"configuration's mean over held-out cases; per-repeat tables in {', '.join(n for n, *_ in repeats)}.")
    left_out = None
    if leave_one_out:  # per site left out (left_out.json beside results.json, whose keys stay configurations)
        left_out = {name.removeprefix("out-"): {config: {"num_cases": len(include), "summary": row[config]["summary"]}
                                                for config in row if config in results}
                    for (name, _, _, include, _), row in zip(repeats, per_repeat)}
        (out / "left_out.json").write_text(json.dumps(left_out, indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results, regions, caption=caption)
                                    + "".join(line + "\n" for line in left_out_markdown(left_out, regions)))
    plot_curves({name: row["curve"] for name, row in results.items()}, regions[0], out / "curves.png")
    (out / "reproduce.json").write_text(json.dumps({
        "command": sys.argv, "data": str(data), "split": split, "repeats": [n for n, *_ in repeats],
        "test_cases": {n: include for n, _, _, include, _ in repeats}, "configs": list(configs), "run_config": values,
        "versions": _versions()}, indent=2, default=str))
    return results


# The semi-supervised study (``fedlesion reproduce --semi-supervised-study``): each configuration three times.
SEMI_VARIANTS: dict[str, dict[str, Any]] = {
    "labelled": {"semi-supervised": False},  # the labels label-fraction keeps, nothing else
    "fixmatch": {"semi-supervised": True},  # the same labels, and every other case unlabelled through FixMatch
    "full": {"semi-supervised": False, "label-fraction": 1.0},  # every label: the ceiling
}


def semi_supervised_study(run: Callable[[dict[str, Any], Path], Mapping[str, Any]], out: str | Path,
                          run_config: Mapping[str, Any] | None, regions: Sequence[str],
                          report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every configuration on labelled cases only, with FixMatch on the others, and on all labels
    (:data:`SEMI_VARIANTS`), each variant through ``run(run_config, folder)`` (a :func:`reproduce` or
    :func:`reproduce_repeated` call) in ``out/<variant>``; then ``results.json`` (rows ``<configuration>-<variant>``),
    ``results.md`` and ``semi_supervised.json`` at the top: per configuration, the share of the Dice gap between
    labelled-only and all labels that FixMatch recovers (mean Dice over regions) and its per-region change.

    Raises:
        ValueError: when ``label-fraction`` is 1 (no label is hidden: the three variants would be one).
    """
    out = Path(out).resolve()
    values = with_defaults(dict(run_config or {}))
    if values["label-fraction"] >= 1.0:
        raise ValueError("--semi-supervised-study compares training with few labels: set label-fraction below 1 "
                         "(e.g. --set label-fraction=0.3, or the reproduce-fixmatch preset).")
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds a reproduce run (results.json); choose another --out.")
    merged: dict[str, Any] = {}
    for variant, overrides in SEMI_VARIANTS.items():
        folder = out / variant
        if (folder / "results.json").exists():  # a variant finished by an earlier, interrupted call: kept, not rerun
            report(f"##### {variant}: already done, reading {folder / 'results.json'}")
            result = json.loads((folder / "results.json").read_text())
        else:
            report(f"##### {variant}: {overrides}")
            result = run({**(run_config or {}), **overrides}, folder)
        merged.update({f"{name}-{variant}": row for name, row in result.items()})
    study = semi_supervised_gains(merged, regions)
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    (out / "semi_supervised.json").write_text(json.dumps(study, indent=2))
    caption = (f"label-fraction {values['label-fraction']}: `-labelled` trains on the labels each site keeps, `-fixmatch` "
               "on those and every other training case unlabelled (FixMatch), `-full` on every label; the variants' "
               f"own tables are in {', '.join(SEMI_VARIANTS)}.")
    lines = [f"| {name} | {'-' if row['recovered'] is None else format(row['recovered'], '.0%')} | " + " | ".join(f"{row['change'][r]:+.3f}" for r in regions)
             + f" | {row['labelled']:.3f} / {row['fixmatch']:.3f} / {row['full']:.3f} |" for name, row in study.items()]
    table = (["", "FixMatch against labelled-only: the share of the gap to all labels it recovers (mean Dice over regions), "
              "and its Dice change per region:", "",
              "| configuration | gap recovered | " + " | ".join(f"{r} change" for r in regions)
              + " | mean Dice labelled / fixmatch / full |", "|" + "---|" * (3 + len(regions))] + lines) if lines else []
    (out / "results.md").write_text(results_markdown(merged, regions, caption=caption) + "".join(f"{line}\n" for line in table))
    return merged


def semi_supervised_gains(results: Mapping[str, Any], regions: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per configuration with all three variants: mean Dice over regions of each (``labelled``, ``fixmatch``,
    ``full``), ``recovered`` = (fixmatch - labelled) / (full - labelled) (None when all labels gain nothing),
    and ``change``: FixMatch's Dice minus labelled-only's, per region."""
    out = {}
    for name in (n.removesuffix("-labelled") for n in results if n.endswith("-labelled")):
        rows = {v: results.get(f"{name}-{v}") for v in SEMI_VARIANTS}
        if any(row is None for row in rows.values()):
            continue
        means = {v: mean_dice(row["summary"]) for v, row in rows.items()}
        gap = means["full"] - means["labelled"]
        out[name] = {**means, "recovered": (means["fixmatch"] - means["labelled"]) / gap if gap > 0 else None,
                     "change": {r: rows["fixmatch"]["summary"][r]["dice_mean"] - rows["labelled"]["summary"][r]["dice_mean"]
                                for r in regions}}
    return out


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
