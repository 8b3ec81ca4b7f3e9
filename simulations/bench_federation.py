"""``fedlesion bench`` sections beyond inference: training throughput, federation overhead, scale.

- ``training``: samples per second of the project's training loop (preprocessed cases kept
  in memory, MONAI dictionary transforms on arrays, Adam, DiceFocal) against MONAI's standard
  recipe with the same network, loss, optimiser, batch and slice/patch size: ``LoadImaged`` ...
  ``NormalizeIntensityd`` cached by a ``CacheDataset``, ``RandCropByPosNegLabeld`` + flips per
  step, a ``DataLoader`` with worker processes, float32.
- ``federation``: a simulation of the main job; per round, the time outside the slowest
  site's local training (orchestration, transfer, aggregation, checkpoints) as a share of the
  training phase; and the bytes each site uploads against the model's float32 size.
- ``scale``: simulations of 8, 16 and 33 sites of small synthetic cases whose sizes follow
  the FeTS 2022 ``partitioning_2`` proportions; peak resident memory of the whole process
  tree (SuperLink, Ray, workers) and seconds per round.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlesion.common.data import DatasetSpec, case_paths, load_case
from fedlesion.common.engine import TrainConfig, train
from fedlesion.common.losses import build_loss
from fedlesion.common.model import build_model, model_spatial_dims
from fedlesion.common.splits import partition_rows

from .bench import median_time



# --- training throughput -----------------------------------------------------------------

def bench_training(data: str | Path, cases: Sequence[str], model_name: str, device: torch.device, spec: DatasetSpec,
                   batch_size: int = 8, steps: int = 12, repeats: int = 3, workers: int = 2,
                   model_args: Mapping[str, Any] | None = None, patch_size: Sequence[int] = (96, 96, 96)) -> dict[str, Any]:
    """Median samples per second over ``repeats`` epochs of ``steps`` optimiser steps, after one warm-up epoch."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        ConvertToMultiChannelBasedOnBratsClassesd,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        SpatialPadd,
        SqueezeDimd,
    )

    dims = model_spatial_dims(model_name)
    prepared = [load_case(data, spec, c, crop_foreground=True) for c in cases]
    if dims == 2:
        window = tuple(max(p.image.shape[axis] for p in prepared) for axis in (1, 2)) + (1,)
    else:
        window = tuple(patch_size)
    samples = steps * batch_size

    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(model_name, len(spec.channels), len(spec.regions), **(model_args or {})).to(device)

    # The project: TrainConfig with samples_per_case so one epoch is `steps` steps.
    per_case = max(1, samples // len(prepared))
    config = TrainConfig(epochs=1, steps=0, batch_size=batch_size, samples_per_case=per_case, seed=0,
                         patch_size=tuple(patch_size))
    ours_model = network()

    def ours() -> int:
        return int(train(ours_model, prepared, dims, config, device)["train-samples"])

    # The reference recipe.
    names = list(spec.channels)
    files = [{**{n: str(p) for n, (p, _) in case_paths(data, spec, c).items() if n in names},
              "label": str(case_paths(data, spec, c)["label"][0])} for c in cases]
    label_step = (ConvertToMultiChannelBasedOnBratsClassesd(keys="label") if set(spec.regions) == {"WT", "TC", "ET"}
                  else _RegionsFromLabels(spec))
    deterministic = [LoadImaged(keys=[*names, "label"], image_only=True), EnsureChannelFirstd(keys=[*names, "label"]),
                     ConcatItemsd(keys=names, name="image"), Orientationd(keys=["image", "label"], axcodes="RAS"),
                     NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True), label_step,
                     CropForegroundd(keys=["image", "label"], source_key="image")]
    # One loader item is one case's `crops` crops, and `batch_size // crops` items make a batch of exactly
    # `batch_size` (the MONAI tutorials' pattern): the largest divisor of the batch that the samples per case allow.
    crops = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= per_case)
    random = [SpatialPadd(keys=["image", "label"], spatial_size=window),
              RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=window, pos=2, neg=1,
                                     num_samples=crops),
              RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
              RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1)]
    if dims == 2:
        random.append(SqueezeDimd(keys=["image", "label"], dim=-1))
    dataset = CacheDataset(files, transform=Compose(deterministic + random), num_workers=0, progress=False)
    items = batch_size // crops
    if len(files) < items:
        raise ValueError(f"the reference needs {items} cases for a batch of {batch_size}; {len(files)} given.")
    loader = DataLoader(dataset, batch_size=items, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    batches: set[int] = set()
    ref_model = network()
    loss_fn = build_loss()
    optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-3, weight_decay=1e-5)

    def reference() -> int:
        ref_model.train()
        seen = 0
        while seen < samples:
            for batch in loader:
                image, label = batch["image"].to(device).float(), batch["label"].to(device).float()
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(ref_model(image), label)
                loss.backward()
                optimizer.step()
                seen += image.shape[0]
                batches.add(int(image.shape[0]))
                if seen >= samples:
                    break
        return seen

    # Each call trains the same number of samples (the reference rounds up to whole batches, every call alike); the
    # warm-up call fills caches, starts the workers and the allocator.
    ours_s, ours_count = median_time(ours, repeats, device)
    ref_s, ref_count = median_time(reference, repeats, device)
    ours_rate, ref_rate = ours_count / ours_s, ref_count / ref_s
    return {"samples_per_s": ours_rate, "reference_samples_per_s": ref_rate, "throughput_ratio": ours_rate / ref_rate,
            "batch_size": batch_size, "reference_batch_sizes": sorted(batches), "window": list(window), "steps": steps,
            "reference_workers": workers, "cases": list(cases)}


class _RegionsFromLabels:
    """Label map -> one channel per declared region (for non-BraTS manifests)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        label = item["label"]
        item["label"] = torch.cat([sum((label == v) for v in values).bool() for values in self.spec.regions.values()]).float()
        return item


# --- federation overhead --------------------------------------------------------------------

def model_fp32_bytes(run_config: Mapping[str, Any], spec: DatasetSpec) -> int:
    from fedlesion.common.config import model_from

    name, args = model_from(run_config)
    state = build_model(name, len(spec.channels), len(spec.regions), **args).state_dict()
    return sum(v.numel() * 4 for v in state.values())


def federation_overhead(history: Sequence[Mapping[str, Any]], fp32_bytes: int) -> dict[str, Any]:
    """From a run's ``metrics.jsonl`` records: overhead share per round and upload bytes ratio."""
    rows = []
    for record in history:
        replies = [r["metrics"] for r in record.get("replies", []) if "train-seconds" in r.get("metrics", {})]
        phase = record.get("train-phase-seconds")
        if not replies or not phase:
            continue
        slowest = max(r["train-seconds"] for r in replies)
        rows.append({"round": record["round"], "train_phase_s": phase, "slowest_local_training_s": slowest,
                     "overhead_fraction": max(0.0, (phase - slowest) / phase),
                     "bytes_per_client": statistics.mean(r["update-bytes"] for r in replies if "update-bytes" in r)})
    if not rows:
        raise ValueError("no round with training replies and a train-phase time in this run.")
    later = rows[1:] or rows  # round 1 also pays for first data loading and worker start
    return {"overhead_fraction": statistics.median(r["overhead_fraction"] for r in later),
            "bytes_ratio": statistics.median(r["bytes_per_client"] for r in rows) / fp32_bytes,
            "model_fp32_bytes": fp32_bytes, "rounds": rows}


def bench_federation(out: Path, run_config: Mapping[str, Any], num_sites: int = 3) -> dict[str, Any]:
    """Run the simulation (the main job's settings) and measure overhead and bytes, float32 and float16 transport.

    Ray is told there are ``num_sites`` CPUs so every site trains in the same round at once, as
    hospitals do; otherwise on a 2-core machine a third site would wait for a free worker and
    that wait would be counted as overhead.
    """
    from fedlesion.common.config import dataset_spec

    from .launch import read_history, run_federation

    spec = dataset_spec(str(run_config.get("dataset", "brats2021")))
    result: dict[str, Any] = {"settings": dict(run_config), "sites": num_sites}
    for dtype in ("float32", "float16"):
        run_dir = run_federation({**run_config, "transport-dtype": dtype, "output-dir": str(out / "federation"),
                                  "run-name": f"transport-{dtype}"}, num_sites=num_sites, output=io.StringIO(),
                                 ray_cpus=num_sites)
        history = read_history(run_dir)
        result[dtype] = federation_overhead(history, model_fp32_bytes(run_config, spec))
        last = history[-1].get("evaluate", {})
        result[dtype]["final_dice"] = {k: v for k, v in last.items() if k.startswith("dice-")}
    from fedlesion.client.site import synthetic_root

    data_root = synthetic_root({**run_config, "output-dir": str(out / "federation")}, num_sites)  # what the runs generated
    result["float16_cost"] = transport_cost(data_root, run_config, rounds=int(run_config.get("num-server-rounds", 4)))
    result["overhead_fraction"] = result["float32"]["overhead_fraction"]
    result["bytes_ratio"] = result["float32"]["bytes_ratio"]
    result["bytes_ratio_float16"] = result["float16"]["bytes_ratio"]
    return result


# --- scale ------------------------------------------------------------------------------------

def fets2_sizes(num_sites: int, total_cases: int) -> list[int]:
    """Site sizes for ``num_sites`` sites in the proportions of FeTS ``partitioning_2``'s largest sites, at least 1 each."""
    counts = Counter(row["Partition_ID"] for row in partition_rows("fets2"))
    largest = sorted(counts.values(), reverse=True)[:num_sites]
    if len(largest) < num_sites:
        raise ValueError(f"partitioning_2 has {len(largest)} sites, fewer than {num_sites}.")
    shares = np.array(largest, float) / sum(largest)
    sizes = np.maximum(1, np.floor(shares * total_cases)).astype(int)
    for i in np.argsort(-shares)[: max(0, total_cases - int(sizes.sum()))]:
        sizes[i] += 1
    return sizes.tolist()


class TreeMemory:
    """Samples the resident memory of this process and all its descendants; keeps the peak."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.interval)


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and every process descending from it (psutil)."""
    import psutil

    try:
        processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def bench_scale(out: Path, site_counts: Sequence[int] = (8, 16, 33), cases_per_site: int = 3, rounds: int = 3,
                shape: tuple[int, int, int] = (48, 48, 24), run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Simulate ``site_counts`` sites of small synthetic cases (FeTS partitioning_2 proportions)."""
    from .launch import read_history, run_federation
    from .synthetic import write_site

    result: dict[str, Any] = {}
    for sites in site_counts:
        sizes = fets2_sizes(sites, cases_per_site * sites)
        root = Path(tempfile.mkdtemp(prefix=f"fedlesion-scale-{sites}-"))
        for index, size in enumerate(sizes):
            write_site(root / f"site-{index:02d}", index, max(size, 1), shape, seed=0)
        values = {"num-server-rounds": rounds, "data-root": str(root), "split": "folders", "min-available-nodes": sites,
                  "model-args": "base_channels=8 depth=3", "samples-per-case": 8, "batch-size": 8, "val-fraction": 0.0,
                  "fraction-evaluate": 0.0, "evaluate-initial": False, "output-dir": str(out / "scale"),
                  "run-name": f"sites-{sites}", **(run_config or {})}
        start = time.perf_counter()
        with TreeMemory() as memory:
            run_dir = run_federation(values, num_sites=sites, output=io.StringIO())
        wall = time.perf_counter() - start
        history = read_history(run_dir)
        # Round 1 also pays for Ray's workers starting and every site's first decoding: steady state is after it.
        per_round = [r["seconds"] for r in history if r["round"] > 1] or [r["seconds"] for r in history if r["round"] > 0]
        result[str(sites)] = {"sites": sites, "total_cases": int(sum(sizes)), "site_sizes": sizes,
                              "peak_rss_gib": memory.peak / 2**30, "seconds_per_round": statistics.median(per_round),
                              "seconds_per_round_per_case": statistics.median(per_round) / sum(sizes),
                              "rounds": rounds, "wall_s": wall}
    return result


# --- what float16 transport costs -----------------------------------------------------------------

def transport_cost(data_root: Path, run_config: Mapping[str, Any], rounds: int = 4) -> dict[str, Any]:
    """Paired measurement of float16 transport: each round the same site updates are averaged
    twice, as sent in float32 and as sent in float16, with Flower's own aggregation; both global
    models are scored on the sites' validation cases. The run continues from the float32 one.

    Two separate simulations differ by more than this from run to run (float sums in another
    order diverge over rounds), so only a paired comparison can resolve a 0.005 Dice bar.
    """
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedlesion.client.app import encode_update
    from fedlesion.common.config import model_from, train_config_from, with_defaults
    from fedlesion.common.data import load_site, resolve_spec, split_train_val
    from fedlesion.common.engine import evaluate
    from fedlesion.server.strategy import decode_update

    values = with_defaults(run_config)
    name, args = model_from(values)
    dims = model_spatial_dims(name)
    device = torch.device("cpu")
    sites, validation = [], []
    for folder in sorted(p for p in Path(data_root).iterdir() if p.is_dir()):
        spec = resolve_spec(folder)
        cases = {c.case: c for c in load_site(folder, spec, crop_foreground=values["crop-foreground"]).cases}
        train_ids, val_ids = split_train_val(list(cases), values["val-fraction"], values["seed"])
        sites.append([cases[c] for c in train_ids])
        validation += [cases[c] for c in val_ids]
    regions = list(spec.regions)
    torch.manual_seed(values["seed"])
    global_model = build_model(name, len(spec.channels), len(regions), **args)
    rows = []
    for server_round in range(1, rounds + 1):
        sent: dict[str, list[RecordDict]] = {"float32": [], "float16": []}
        for index, cases in enumerate(sites):
            local = build_model(name, len(spec.channels), len(regions), **args)
            local.load_state_dict(global_model.state_dict())
            config = train_config_from(values, seed=server_round * 1009 + index)
            train(local, cases, dims, config, device)
            trained = {k: v.numpy() for k, v in local.state_dict().items()}
            global_state = {k: v.numpy() for k, v in global_model.state_dict().items()}
            for dtype in sent:  # what the server holds after decoding the upload (float16: the global model + the delta)
                state = decode_update(encode_update(trained, global_state, dtype), global_state)
                sent[dtype].append(RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in state.items()}),
                                               "metrics": MetricRecord({"num-examples": len(cases)})}))
        scores = {}
        for dtype, replies in sent.items():
            model = build_model(name, len(spec.channels), len(regions), **args)
            model.load_state_dict(aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict())
            _, summary = evaluate(model, validation, spec, dims, device, patch_size=config.patch_size)
            scores[dtype] = {r: summary[r]["dice_mean"] for r in regions}
            if dtype == "float32":
                global_model = model
        rows.append({"round": server_round, **{f"{dtype}_dice": s for dtype, s in scores.items()},
                     "abs_difference": {r: abs(scores["float32"][r] - scores["float16"][r]) for r in regions}})
    worst = {r: max(row["abs_difference"][r] for row in rows) for r in regions}
    return {"rounds": rows, "max_abs_dice_difference": worst, "max_abs_dice_difference_any_region": max(worst.values()),
            "validation_cases": len(validation)}
