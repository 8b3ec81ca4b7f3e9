"""``fedlesion bench``: inference end to end per case, ours beside a plain MONAI pipeline.

Each measurement runs the project and the reference with the same network and weights in
the same process, after a warm-up, several times, and reports the median.

- Project: decode the channels (threads) -> validate -> reorient, z-score, crop to the brain
  -> predict (2D: slice batches; 3D: Gaussian sliding windows) -> labels, post-processed as
  ``evaluate`` does (the checkpoint's settings; the declared ones for untrained models) ->
  restore the file grid -> write NIfTI.
- Reference: ``LoadImaged`` -> ``EnsureChannelFirstd`` -> ``Orientationd(RAS)`` ->
  ``CropForegroundd`` -> ``NormalizeIntensityd(nonzero, channel_wise)`` ->
  ``sliding_window_inference`` (overlap 0.5; 2D networks slide a one-slice window) -> the crop
  inverted -> ``SaveImage`` (no post-processing: MONAI's pipeline has none). The same reference
  without the crop is timed too, so the ratio measures the pipelines, not only whether one of
  them crops.

Outputs ``bench.json`` (keys ``inference.<model>.<device>.end_to_end_ratio`` (against the cropping
reference), ``end_to_end_ratio_uncropped_reference``, ``model_only_s``, ...) and ``bench.md``, with
the machine, versions and settings.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    SaveImage,
)

from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.data import DatasetSpec, case_paths, discover_cases, load_case, regions_from_labels, resolve_spec
from fedlesion.common.engine import autocast, predict_probabilities, probabilities_to_labels
from fedlesion.common.metrics import region_metrics
from fedlesion.common.model import build_model, model_spatial_dims
from fedlesion.common.postprocess import PostProcessing


class SliceNet(torch.nn.Module):
    """Lets a 2D network take the reference's one-slice 3D windows ``(B, C, X, Y, 1)``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., 0])[..., None]


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, and the last call's result; on CUDA each
    call is timed until ``device`` has finished its work (the warm-up's included, before the first timed call)."""
    def finish() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    finish()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_inference(
    data: str | Path, cases: Sequence[str], model_name: str, device: torch.device, spec: DatasetSpec,
    checkpoint: str | None = None, repeats: int = 3, patch_size: Sequence[int] = (96, 96, 96), model_args: dict | None = None,
) -> dict[str, Any]:
    """Median seconds per case: project end to end, reference end to end, and the network alone."""
    postprocessing = None  # the declared settings, for an untrained model
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        model, postprocessing = ckpt.build(), ckpt.postprocessing()
    else:
        torch.manual_seed(0)
        model = build_model(model_name, len(spec.channels), len(spec.regions), **(model_args or {}))
    model = model.to(device).eval()
    dims = model_spatial_dims(model_name)
    names = list(spec.channels)
    reference_net = SliceNet(model) if dims == 2 else model
    read = [LoadImaged(keys=names, image_only=True), EnsureChannelFirstd(keys=names),
            ConcatItemsd(keys=names, name="image"), Orientationd(keys="image", axcodes="RAS")]
    normalize = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)
    # Raw MR intensities are >= 0 and the background is 0: MONAI's default foreground test (> 0) finds the head.
    crop = CropForegroundd(keys="image", source_key="image")
    loaders = {"reference_s": Compose([*read, crop, normalize]), "reference_uncropped_s": Compose([*read, normalize])}
    raw = PostProcessing.from_run_config({"postprocess": False})  # the plain MONAI pipeline has none
    out_dir = Path(tempfile.mkdtemp(prefix="fedlesion-bench-"))
    rows = []
    for case in cases:
        paths = {name: str(p) for name, (p, _) in case_paths(data, spec, case).items()}

        def project() -> np.ndarray:
            prepared = load_case(data, spec, case, crop_foreground=True, require_label=False)
            probs = predict_probabilities(model, prepared.image, dims, device, patch_size=patch_size)
            labels = prepared.restore(probabilities_to_labels(probs.numpy(), spec, prepared.spacing, postprocessing))
            nib.save(nib.Nifti1Image(labels, prepared.affine, prepared.header), str(out_dir / f"{case}-ours.nii.gz"))
            return labels

        network_voxels: dict[int, int] = {}  # per pipeline: voxels the network saw, the crop's effect

        def reference(load: Compose) -> np.ndarray:
            item = load({name: paths[name] for name in names})
            image = item["image"].unsqueeze(0).to(device)
            network_voxels[id(load)] = int(np.prod(image.shape[2:]))
            roi = (image.shape[2], image.shape[3], 1) if dims == 2 else tuple(patch_size)
            with torch.no_grad(), autocast(device):
                logits = sliding_window_inference(image, roi, 32 if dims == 2 else 4, reference_net, overlap=0.5)
            labels = probabilities_to_labels(torch.sigmoid(logits[0].float()).cpu().numpy(), spec,
                                             tuple(float(s) for s in item["image"].pixdim), raw)
            labels_t = item["image"][:1].clone()  # keeps the crop in its applied operations
            labels_t.array = labels[None].astype(np.float32)
            if crop in load.transforms:
                labels_t = crop.inverse({"image": labels_t})["image"]  # back onto the full RAS grid
            saver = SaveImage(output_dir=out_dir, output_postfix="ref", separate_folder=False, print_log=False,
                              output_dtype=np.uint8, resample=False)
            saver(labels_t)
            return np.asarray(labels_t[0]).astype(np.uint8)

        prepared = load_case(data, spec, case, crop_foreground=True)
        volume = torch.as_tensor(prepared.image).to(device)

        def model_only() -> None:
            with torch.no_grad(), autocast(device):
                if dims == 2:
                    slices = volume.permute(3, 0, 1, 2)
                    for i in range(0, slices.shape[0], 32):
                        model(slices[i:i + 32])
                else:
                    sliding_window_inference(volume[None], tuple(patch_size),
                                             4, model, overlap=0.5, mode="gaussian")

        ours_s, ours = median_time(project, repeats, device)
        row: dict[str, Any] = {"case": case, "end_to_end_s": ours_s}
        labels_of: dict[str, np.ndarray] = {}
        for key, load in loaders.items():
            row[key], labels_of[key] = median_time(lambda load=load: reference(load), repeats, device)
            row[key.replace("_s", "_network_voxels")] = network_voxels[id(load)]
        row["model_only_s"], _ = median_time(model_only, repeats, device)
        if prepared.regions is not None:
            truth = load_case(data, spec, case, crop_foreground=False)  # regions on the full RAS grid
            frames = {"dice_project": nib.orientations.apply_orientation(ours, truth.ornt),  # file grid -> RAS
                      "dice_reference": labels_of["reference_s"],  # Orientationd already gave RAS
                      "dice_reference_uncropped": labels_of["reference_uncropped_s"]}
            first = next(iter(spec.regions))
            for tag, labels in frames.items():
                row[tag] = region_metrics(regions_from_labels(labels, spec), truth.regions, list(spec.regions))[first]["dice"]
        rows.append(row)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "end_to_end_s": statistics.median(r["end_to_end_s"] for r in rows),
        "reference_s": statistics.median(r["reference_s"] for r in rows),
        "reference_uncropped_s": statistics.median(r["reference_uncropped_s"] for r in rows),
        "end_to_end_ratio": statistics.median(r["end_to_end_s"] / r["reference_s"] for r in rows),
        "end_to_end_ratio_uncropped_reference": statistics.median(r["end_to_end_s"] / r["reference_uncropped_s"] for r in rows),
        "model_only_s": statistics.median(r["model_only_s"] for r in rows),
        "cases": rows,
    }


SECTIONS = ("inference", "training", "federation", "scale")


def run_bench(data: str | Path | None, out: str | Path, models: Sequence[str], manifest: str | None = None,
              cases: int = 2, repeats: int = 3, checkpoints: dict[str, str] | None = None,
              model_args: dict[str, dict] | None = None, sections: Sequence[str] = ("inference", "training"),
              scale_sites: Sequence[int] = (8, 16, 33), federation_config: dict[str, Any] | None = None,
              devices: Sequence[str] | None = None, site_sizes: Sequence[int] = (10, 100, 500),
              site_shape: tuple[int, int, int] = (240, 240, 155)) -> dict[str, Any]:
    """Run the chosen ``sections`` (inference and training for ``models``, on the CPU and on CUDA
    when present, or ``devices``; federation overhead and scale in simulation: sites, and one site's
    ClientApp process at ``site_sizes`` cases); write bench.json / bench.md."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; choose from {list(SECTIONS)}.")
    if {"inference", "training"} & set(sections):
        if not data:
            raise ValueError("bench: the inference and training sections time cases of --data; give a data folder.")
        spec = resolve_spec(data, manifest)
        ids = discover_cases(data, spec)[:cases]
    else:  # federation and scale make their own synthetic sites
        ids = []
    if devices:
        chosen = [torch.device(d) for d in devices]
        for d in chosen:
            if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
                raise ValueError(f"bench --devices names {d}, but torch sees {torch.cuda.device_count()} CUDA device(s).")
    else:
        chosen = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                          "cpu_threads": torch.get_num_threads(),
                                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                              "versions": _versions(), "settings": {"data": str(data) if data else None, "cases": ids, "repeats": repeats,
                                                                    "sections": list(sections)}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .bench_federation import bench_training

    per_model = {
        "inference": lambda name, device: bench_inference(data, ids, name, device, spec, (checkpoints or {}).get(name),
                                                          repeats, model_args=(model_args or {}).get(name)),
        "training": lambda name, device: bench_training(data, ids, name, device, spec, repeats=repeats,
                                                        model_args=(model_args or {}).get(name)),
    }
    for section, measure in per_model.items():
        if section not in sections:
            continue
        result[section] = {}
        for name in models:
            for device in chosen:
                print(f"{section}: {name} on {device.type}, ours then the MONAI reference ...", flush=True)
                result[section].setdefault(name, {})[str(device)] = measure(name, device)
                (out / "bench.json").write_text(json.dumps(result, indent=2))  # what is measured survives a later failure
    if "federation" in sections:
        from .bench_federation import bench_federation
        from fedlesion.common.config import declared_run_config

        config = {**declared_run_config(), "num-server-rounds": 4, **(federation_config or {})}
        print("federation: simulating the main job with float32, then float16 transport ...", flush=True)
        result["federation"] = bench_federation(out, config)
    if "scale" in sections:
        from .bench_federation import bench_scale

        from .bench_site import bench_site_sizes

        if scale_sites:
            print(f"scale: simulating {', '.join(map(str, scale_sites))} sites ...", flush=True)
            result["scale"] = bench_scale(out, scale_sites)
            (out / "bench.json").write_text(json.dumps(result, indent=2))
        if site_sizes:
            result["site_scale"] = bench_site_sizes(out, site_sizes, site_shape,
                                                    progress=lambda line: print(line, flush=True))
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(bench_markdown(result))
    return result


def bench_markdown(result: dict[str, Any]) -> str:
    """The short tables of ``bench.md``."""
    lines = [f"Machine: {result['machine']['platform']}, {result['machine']['cpu_threads']} CPU threads, "
             f"CUDA {result['machine']['cuda'] or 'none'}; versions {result['versions']}.", ""]
    if "inference" in result:
        lines += _inference_lines(result)
    if "training" in result:
        lines += ["", "| model | device | ours (samples/s) | MONAI recipe (samples/s) | ratio | batch | slice/patch |",
                  "|---|---|---|---|---|---|---|"]
        for name, by_device in result["training"].items():
            for device, row in by_device.items():
                lines.append(f"| {name} | {device} | {row['samples_per_s']:.2f} | {row['reference_samples_per_s']:.2f} | "
                             f"{row['throughput_ratio']:.2f} | {row['batch_size']} | {'x'.join(map(str, row['window']))} |")
    if "federation" in result:
        fed = result["federation"]
        lines += ["", "| transport | overhead share of the training phase | bytes per site per round / fp32 model | final Dice |",
                  "|---|---|---|---|"]
        for dtype in ("float32", "float16"):
            row = fed[dtype]
            dice = " ".join(f"{k[5:].upper()} {v:.3f}" for k, v in row["final_dice"].items())
            lines.append(f"| {dtype} | {row['overhead_fraction']:.3f} | {row['bytes_ratio']:.3f} | {dice} |")
        if "float16_cost" in fed:
            cost = fed["float16_cost"]
            lines += ["", "float16 transport, paired (same site updates averaged as float32 and as float16, "
                      f"{cost['validation_cases']} validation cases): largest Dice difference per region over "
                      f"{len(cost['rounds'])} rounds: " + ", ".join(f"{r} {v:.4f}" for r, v in cost["max_abs_dice_difference"].items())]
    if "scale" in result:
        lines += ["", "| sites | cases | peak RSS (GiB) | s / round | s / round / case |", "|---|---|---|---|---|"]
        for row in result["scale"].values():
            lines.append(f"| {row['sites']} | {row['total_cases']} | {row['peak_rss_gib']:.2f} | {row['seconds_per_round']:.1f} | "
                         f"{row['seconds_per_round_per_case']:.2f} |")
    if "site_scale" in result:
        lines += ["", "| cases at the site | peak RSS per ClientApp process (GiB) | s / train message | cases opened "
                  "per train message | s / evaluated case | first train message (s, preprocessing its new cases) |",
                  "|---|---|---|---|---|---|"]
        for row in result["site_scale"].values():
            lines.append(f"| {row['cases']} | {row['peak_rss_gib']:.2f} | {row['train_message_s']:.1f} | "
                         f"{row['train_message_cases_opened']} | {row['evaluate_s_per_case']:.1f} | {row['first_train_message_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _inference_lines(result: dict[str, Any]) -> list[str]:
    lines = ["| model | device | parameters | ours end to end (s) | MONAI reference, cropped / uncropped (s) | "
             "ratio to cropped / uncropped | network only (s) | Dice ours / reference |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by_device in result["inference"].items():
        for device, row in by_device.items():
            dice = [(c.get("dice_project"), c.get("dice_reference")) for c in row["cases"]]
            dice_text = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in dice if a is not None)
            lines.append(f"| {name} | {device} | {row['params'] / 1e6:.2f} M | {row['end_to_end_s']:.2f} | "
                         f"{row['reference_s']:.2f} / {row['reference_uncropped_s']:.2f} | {row['end_to_end_ratio']:.2f} / "
                         f"{row['end_to_end_ratio_uncropped_reference']:.2f} | {row['model_only_s']:.2f} | {dice_text} |")
    return lines


def _versions() -> dict[str, str]:
    import monai

    return {"torch": torch.__version__, "monai": monai.__version__, "nibabel": nib.__version__, "numpy": np.__version__}
