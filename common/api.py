"""The Python API behind ``fedlesion train | evaluate | predict``.

Each function takes paths and plain values, does one stage, and writes its result to
files, so the stages can be rerun alone and called from tests, scripts and notebooks.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, declared_run_config
from .files import check_output, replace_private
from .data import (
    LAYOUTS,
    MANIFEST_NAMES,
    CaseError,
    DatasetSpec,
    PreparedCase,
    case_paths,
    conform_spec,
    discover_cases,
    label_seed,
    labelled_subset,
    load_case,
    load_site,
    regions_from_labels,
    resolve_spec,
    split_train_val,
)
from .engine import (
    evaluate,
    learning_rate,
    predict_probabilities,
    predicted_regions,
    probabilities_to_labels,
    score_regions,
    select_device,
    train,
    unlabelled_weight,
)
from .metrics import summarize
from .splits import Split, make_split
from .model import build_model, model_spatial_dims, resolved_model_args
from .postprocess import PostProcessing

logger = logging.getLogger(__name__)


def select_cases(case_ids: Sequence[str], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """Case IDs matching any ``include`` glob (all when empty) and no ``exclude`` glob."""
    return [c for c in case_ids
            if (not include or any(fnmatch.fnmatch(c, p) for p in include))
            and not any(fnmatch.fnmatch(c, p) for p in exclude)]


def train_centralized(
    data: str | Path,
    out: str | Path,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
    manifest: str | None = None,
    config: TrainConfig | None = None,
    val_fraction: float = 0.0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    case_ids: Sequence[str] | None = None,
    crop_foreground: bool | None = None,
    device: str = "auto",
    report: Callable[[str], None] = print,
    on_epoch: Callable[[int, torch.nn.Module], dict[str, float] | None] | None = None,
    lr_schedule: str = "constant",
    epochs_per_round: int = 1,
    force: bool = False,
    semi_supervised: bool = False,
    hidden_labels: Sequence[str] = (),
    fixmatch_rampup: float = 0.0,
    label_fraction: float = 1.0,
    init_from: str | Path | None = None,
    postprocess: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Pooled (centralized) training: the baseline federation is compared with. From a checkpoint
    (``init_from``), the same on one site's cases is that site's fine-tuning of a model it received.

    Args:
        data: the data folder.
        out: where the checkpoint is written (after every epoch, atomically).
        model: a registered model name (default: the declared ``model``).
        model_args: overrides of the model's defaults.
        manifest: a manifest path or built-in layout name; found in ``data`` when ``None``.
        config: training settings; ``config.epochs`` epochs with one optimiser and one schedule.
        val_fraction: share of cases held out to report validation Dice each epoch.
        include / exclude: glob patterns on case IDs selecting the cases to use.
        case_ids: an explicit list of cases (instead of all discovered ones) before the filters.
        crop_foreground: crop volumes to their nonzero box (faster 2D training); ``None``: the declared default
            (``crop-foreground``), or ``init_from``'s.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        report: where per-epoch progress lines go.
        on_epoch: called as ``on_epoch(epoch, model)`` after each epoch; metrics it returns
            are added to the epoch's record (``checkpoint.extra["history"]``).
        lr_schedule: ``constant`` or ``cosine`` over ``config.epochs / epochs_per_round``
            "rounds", the schedule a federated run with ``local-epochs = epochs_per_round`` follows
            (stepped by torch's ``LambdaLR``).
        epochs_per_round: epochs that share one learning rate.
        force: replace an existing checkpoint at ``out``.
        semi_supervised: train on unlabelled cases too (FixMatch, as the sites do with ``semi-supervised``):
            cases without a label, and ``hidden_labels``; lambda_u is ``config.unlabelled_weight``, ramped up over
            the first ``fixmatch_rampup`` of the "rounds" (:func:`fedlesion.common.engine.unlabelled_weight`).
        hidden_labels: training cases whose labels are not used (``label-fraction`` experiments): unlabelled
            cases under ``semi_supervised``, unused otherwise.
        label_fraction: keep the labels of this share of the (other) training cases, as a site does with
            ``label-fraction`` (:func:`fedlesion.common.data.labelled_subset`, seed ``label_seed(seed, "pooled")``).
        init_from: a checkpoint (a federation's ``final.pt``, another ``train``'s) to start from instead of
            random weights: its model and arguments (``model`` / ``model_args`` must be left unset or equal), its
            channels and regions (``data`` must have them), its ``crop-foreground``. With
            ``config.proximal_mu`` > 0 the loss adds ``mu / 2 * ||w - w_start||^2``: a personal model that stays
            near the one it started from (FedProx's term, Ditto's personal objective). ``config`` must carry the
            checkpoint's patch (:attr:`Checkpoint.patch_size`, also its sliding window); the learning rate is
            ``config``'s (the command defaults it to ``finetune-learning-rate``).
        postprocess: run-config values whose post-processing keys (``postprocess``, ``postprocess-min-mm3``,
            ``postprocess-components``; others are ignored) win over the declared ones (or ``init_from``'s):
            what the checkpoint records, and how an offline FixMatch teacher cleans its pseudo-labels.

    Returns:
        The final :class:`Checkpoint`.

    Raises:
        ValueError: when no usable training case is left; for an unreadable ``init_from``, one of another model
            or of other channels or regions; for ``config.proximal_mu`` > 0 without ``init_from``.
        FileExistsError: before any work, when ``out`` is a folder or exists without ``force``.
    """
    config = config or TrainConfig()
    initial = start = None
    if init_from is not None:
        initial = load_checkpoint(init_from)  # data only; refused with the file named when damaged or not a model
        try:  # before any case is read: weights that do not fit their own model, a bad patch or post-processing
            start, patch, postprocessing = initial.build(), initial.patch_size, initial.postprocessing(None)
            held = resolved_model_args(initial.model, **initial.model_args)
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"init_from {init_from}: not a usable model ({exc})") from None
        differ = {key: value for key, value in (model_args or {}).items() if held.get(key) != value}
        if differ or model not in (None, initial.model):
            raise ValueError(f"init_from {init_from} holds {initial.model} {initial.model_args}, not "
                             f"{model or initial.model}{f' {differ}' if differ and model in (None, initial.model) else ''}"
                             "; leave the model and its arguments unset to fine-tune it")
        if patch != tuple(config.patch_size):
            raise ValueError(f"init_from {init_from} was trained with patch {patch} (its sliding window too), not "
                             f"{tuple(config.patch_size)}; fine-tune it with its own patch")
        if crop_foreground not in (None, initial.crop_foreground):
            raise ValueError(f"init_from {init_from} was trained with crop-foreground {initial.crop_foreground}; "
                             "fine-tuning it the other way would feed it volumes it never saw")
        model, model_args, crop_foreground = initial.model, initial.model_args, initial.crop_foreground
        spec = _data_spec(initial.spec, data, manifest)
    elif config.proximal_mu > 0:
        raise ValueError("a proximal term pulls the weights towards the ones training starts from: it needs a "
                         "checkpoint to start from (init_from, --init-from)")
    else:
        postprocessing = PostProcessing.from_run_config({})
        declared = declared_run_config()
        model = model or declared["model"]
        crop_foreground = declared["crop-foreground"] if crop_foreground is None else crop_foreground
        spec = resolve_spec(data, manifest)
    if postprocess is not None:  # a run's own settings win, checked before any case is read
        postprocessing = PostProcessing.from_run_config({**postprocessing.to_run_config(), **postprocess})
    ids = select_cases(discover_cases(data, spec) if case_ids is None else list(case_ids), include, exclude)
    check_output(out, inputs=[*([init_from] if init_from is not None else []), *_input_files(data, spec, ids, manifest)],
                 force=force, what="--out")
    site = load_site(data, spec, case_ids=ids, crop_foreground=crop_foreground, unlabelled=semi_supervised)
    by_id = {c.case: c for c in site.cases if c.labelled}
    train_ids, val_ids = split_train_val(list(by_id), val_fraction, config.seed or 0) if by_id else ([], [])
    hidden = set(hidden_labels)
    kept = labelled_subset([c for c in train_ids if c not in hidden], label_fraction, label_seed(config.seed or 0, "pooled"))
    hidden |= set(train_ids) - set(kept)
    unlabelled = [by_id[c] for c in train_ids if c in hidden] + [c for c in site.cases if not c.labelled]
    train_ids = [c for c in train_ids if c not in hidden]
    unlabelled = unlabelled if semi_supervised else []
    if not train_ids and not unlabelled:
        raise ValueError(f"{data}: no usable training case (selected {len(ids)}, skipped {len(site.skipped)}"
                         + (f", {len(hidden)} with hidden labels" if hidden else "") + ").")
    args = resolved_model_args(model, **(model_args or {}))
    torch.manual_seed(config.seed or 0)
    dev = select_device(device)
    network = (start if start is not None else build_model(model, len(spec.channels), len(spec.regions), **args)).to(dev)
    spatial_dims = model_spatial_dims(model)
    report(f"{'fine-tuning' if initial is not None else 'training'} {model}"
           + (f" from {Path(init_from).name} ({_taken_at(initial)}, proximal mu {config.proximal_mu:g})"
              if initial is not None else "")
           + f" on {len(train_ids)} case(s) ({len(val_ids)} validation, {len(site.skipped)} skipped"
           + (f", {len(unlabelled)} unlabelled through FixMatch" if unlabelled else "")
           + f") on {dev}{' with float16 mixed precision' if dev.type == 'cuda' else ''}")
    checkpoint = Checkpoint(model=model, model_args=args, spec=spec, state_dict={},
                            run_config={"train-case-count": len(train_ids), "val-case-count": len(val_ids),
                                        "unlabelled-case-count": len(unlabelled),
                                        **config.to_dict(), "crop_foreground": crop_foreground,
                                        **postprocessing.to_run_config()})
    if initial is not None:  # where it started: no path (the checkpoint may be shared)
        checkpoint.extra["init-from"] = {"model": initial.model, "round": initial.round, "epoch": initial.epoch}
    # Which cases trained stays at this site, beside the checkpoint (the checkpoint itself may be shared).
    replace_private(cases_file(out), json.dumps({"data": str(data), "train": train_ids, "validation": val_ids,
                                                 "unlabelled": [c.case for c in unlabelled]}, indent=2).encode())
    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    rounds = max(1, config.epochs // epochs_per_round)

    def lr_factor(epoch_index: int) -> float:
        return learning_rate(1.0, lr_schedule, min(epoch_index // epochs_per_round + 1, rounds), rounds)

    def after_epoch(epoch: int, loss: float) -> None:
        line = f"epoch {epoch}/{config.epochs}: loss {loss:.4f}"
        metrics: dict[str, Any] = {"train-loss": loss}
        if val_ids:
            _, summary = evaluate(network, [by_id[c] for c in val_ids], spec, spatial_dims, dev,
                                  patch_size=config.patch_size, postprocessing=postprocessing)  # as evaluate will
            metrics.update({f"dice-{r.lower()}": s["dice_mean"] for r, s in summary.items()})
            line += " | validation Dice " + " ".join(f"{r} {s['dice_mean']:.3f}" for r, s in summary.items())
        if on_epoch is not None:
            metrics.update(on_epoch(epoch, network) or {})
        report(f"{line} | {time.perf_counter() - start:.0f} s")
        history.append({"epoch": epoch, **metrics})
        checkpoint.state_dict = network.state_dict()
        checkpoint.epoch, checkpoint.metrics = epoch, metrics
        checkpoint.extra["history"] = history
        save_checkpoint(checkpoint, out)

    # One optimiser and one schedule for the whole run: the pooled baseline is not restarted every epoch.
    def unlabelled_factor(epoch_index: int) -> float:
        return unlabelled_weight(1.0, min(epoch_index // epochs_per_round + 1, rounds), rounds, fixmatch_rampup)

    train(network, [by_id[c] for c in train_ids], spatial_dims, config, dev, progress=after_epoch, lr_factor=lr_factor,
          unlabelled=unlabelled, unlabelled_factor=unlabelled_factor, postprocessing=postprocessing)
    return checkpoint


def _taken_at(checkpoint: Checkpoint) -> str:
    """When a checkpoint was taken: a federation's round, else a pooled run's epoch."""
    return f"round {checkpoint.round}" if checkpoint.round else f"epoch {checkpoint.epoch}"


def _input_files(data: str | Path, spec: DatasetSpec, case_ids: Sequence[str], manifest: str | None) -> list[Path]:
    """Every file a command reads from a data folder: the manifest (given or found) and each case's files."""
    found = [Path(data) / name for name in MANIFEST_NAMES]
    files = [*([Path(manifest)] if manifest and manifest not in LAYOUTS else []), *found]
    for case in case_ids:
        files += [path for path, _ in case_paths(data, spec, case).values()]
    return files


def cases_file(checkpoint: str | Path) -> Path:
    """The local record of the cases a pooled run trained and validated on: ``<checkpoint>.cases.json``
    (mode 0600), kept out of the checkpoint so that sharing a model never shares case IDs or paths."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name}.cases.json")


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    manifest: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device: str = "auto",
    report: Callable[[str], None] = print,
    postprocess: Mapping[str, Any] | None = None,
    force: bool = False,
    sites: Mapping[str, Sequence[str]] | str | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on every labelled case of a data folder.

    Per case the clock runs over loading, preprocessing and prediction (not scoring),
    so ``seconds_per_case`` is the end-to-end inference time. The label map scored is the
    one :func:`predict_case` writes, post-processed as the checkpoint says.

    Args:
        postprocess: post-processing run-config values that win over the checkpoint's
            (see :meth:`fedlesion.common.checkpoint.Checkpoint.postprocessing`).
        sites: site -> its case IDs (a split, :class:`fedlesion.common.splits.Split`'s ``sites``), or a split JSON
            path, or ``institution`` / ``fets1`` / ``fets2`` / ``fets-small`` (split of the selected cases): adds
            ``"sites": {site: {"num_cases", "summary", "skipped"}}`` summarising each site's own
            cases (the same per-case scores as the whole), and ``"worst_site"`` by the first
            region's mean Dice. Only cases that are also selected are scored.

    Returns:
        ``{"checkpoint", "data", "postprocessing": {postprocess, postprocess-min-mm3, postprocess-components},
        "summary": {region: {dice_mean, dice_std, iou_mean, iou_std, hd95_mean, ...}},
        "cases": [{"case", "seconds", region: {dice, iou, hd95, ...}}], "seconds_per_case", "skipped"}``,
        also written to ``out`` as JSON when given.

    Raises:
        ValueError: for an unreadable checkpoint, data whose channels or regions differ from it,
            a post-processing value of the wrong type, or when no case could be scored.
        FileExistsError: before any work, when ``out`` is the checkpoint or exists without ``force``.
    """
    ckpt = load_checkpoint(checkpoint)
    postprocessing, patch = ckpt.postprocessing(postprocess), ckpt.patch_size  # refused before any case is read
    spec = _data_spec(ckpt.spec, data, manifest)
    ids = select_cases(discover_cases(data, spec), include, exclude)
    if out is not None:
        check_output(out, inputs=[checkpoint, *_input_files(data, spec, ids, manifest)], force=force,
                     suffixes=(".json",), what="--out")
    if not ids:
        raise ValueError(f"{data}: no case matches layout '{spec.name}' and the case filters.")
    if isinstance(sites, str):
        sites = _split_sites(sites, ids)
    crop = ckpt.crop_foreground
    dev = select_device(device)
    model = ckpt.build().to(dev)
    regions = list(spec.regions)
    cases, skipped = [], {}
    for i, case_id in enumerate(ids, 1):
        start = time.perf_counter()
        try:
            case = load_case(data, spec, case_id, crop_foreground=crop)
        except Exception as exc:  # noqa: BLE001 - one case never stops the evaluation of the others
            skipped[case_id] = str(exc) if isinstance(exc, ValueError) else f"case '{case_id}': {type(exc).__name__}: {exc}"
            report(f"skipped {skipped[case_id]}")
            continue
        probs = predict_probabilities(model, case.image, ckpt.spatial_dims, dev, patch_size=patch)
        masks = predicted_regions(probs, spec, case.spacing, postprocessing)  # the label map predict would write
        seconds = time.perf_counter() - start
        scores = score_regions(masks, case, spec)
        cases.append({"case": case_id, "seconds": seconds, **scores})
        report(f"[{i}/{len(ids)}] {case_id}: " + " ".join(f"{r} Dice {scores[r]['dice']:.3f}" for r in regions)
               + f" | {seconds:.2f} s")
    result = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "postprocessing": postprocessing.to_run_config(),
        "summary": summarize([{r: c[r] for r in regions} for c in cases], regions),
        "cases": cases,
        "seconds_per_case": float(np.mean([c["seconds"] for c in cases])) if cases else None,
        "skipped": skipped,
    }
    if sites is not None:
        result.update(by_site(cases, skipped, sites, regions))
    if out is not None:  # per-case scores under case IDs: mode 0600, like everything patient-derived
        replace_private(out, json.dumps(result, indent=2).encode())
    if not cases:
        raise ValueError(f"{data}: none of {len(ids)} case(s) could be scored; every one was skipped"
                         + (f" (reasons in {out})." if out is not None else ": " + "; ".join(skipped.values())))
    return result


def _split_sites(split: str, case_ids: Sequence[str]) -> dict[str, list[str]]:
    """A split JSON's sites, or those of a split kind that needs no further settings.

    Raises:
        ValueError: for another kind (iid and Dirichlet splits are written by ``fedlesion split``).
    """
    if split.endswith(".json"):
        return Split.load(split).sites
    if split not in ("institution", "fets1", "fets2", "fets-small"):
        raise ValueError(f"--by-site {split}: give institution, fets1, fets2, fets-small, or a split JSON "
                         "(`fedlesion split` writes one for iid and Dirichlet splits).")
    return make_split(split, case_ids, num_sites=1, alpha=1.0, seed=0).sites


def by_site(cases: Sequence[dict[str, Any]], skipped: Mapping[str, str], sites: Mapping[str, Sequence[str]],
             regions: Sequence[str]) -> dict[str, Any]:
    """Per-site summaries of per-case scores, and the site with the lowest mean Dice of the first region."""
    by_case = {c["case"]: c for c in cases}
    out: dict[str, Any] = {}
    for site, ids in sites.items():
        scored = [by_case[c] for c in ids if c in by_case]
        out[site] = {"num_cases": len(scored), "skipped": sum(1 for c in ids if c in skipped),
                     "summary": summarize([{r: c[r] for r in regions} for c in scored], regions)}
    scored_sites = {site: block for site, block in out.items() if block["num_cases"]}
    worst = min(scored_sites, key=lambda site: scored_sites[site]["summary"][regions[0]]["dice_mean"], default=None)
    return {"sites": out, "worst_site": None if worst is None else {
        "site": worst, "region": regions[0], "dice_mean": scored_sites[worst]["summary"][regions[0]]["dice_mean"]}}


def _data_spec(trained: DatasetSpec, data: str | Path, manifest: str | None) -> DatasetSpec:
    """The layout of ``data``, its channels and regions matched by name to the checkpoint's and put in its order.

    Raises:
        ValueError: when ``data``'s channels or regions are not the checkpoint's (see :func:`conform_spec`).
    """
    try:
        spec = resolve_spec(data, manifest)
    except ValueError:
        if manifest:
            raise
        return trained  # the checkpoint's own layout, for folders without a recognisable one
    return conform_spec(spec, trained, str(data))


def predict_case(
    checkpoint: str | Path,
    case_dir: str | Path,
    out: str | Path,
    manifest: str | None = None,
    overlay: str | Path | None = None,
    device: str = "auto",
    postprocess: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Segment one case folder and write the label map as NIfTI with the input's affine and header.

    Region channels are turned back into the dataset's label values (0/1/2/4 for BraTS), then
    post-processed as the checkpoint says.

    Args:
        postprocess: post-processing run-config values that win over the checkpoint's
            (see :meth:`fedlesion.common.checkpoint.Checkpoint.postprocessing`).
        force: replace an existing ``out`` / ``overlay`` (never one of the case's files or the checkpoint).

    Returns:
        ``{"case", "out", "seconds", "postprocessing", "labels": {value: voxels}}`` (and ``"overlay"``).

    Raises:
        FileExistsError: before any work, when ``out`` or ``overlay`` is an input or exists without ``force``.
        ValueError: for an ``out`` that is not ``.nii.gz`` / ``.nii``, or an overlay that is not ``.png``.
    """
    case_dir = Path(case_dir)
    ckpt = load_checkpoint(checkpoint)
    postprocessing, patch = ckpt.postprocessing(postprocess), ckpt.patch_size  # refused before the case is read
    spec = _data_spec(ckpt.spec, case_dir.parent, manifest) if manifest else ckpt.spec
    inputs = [checkpoint, *(path for path, _ in case_paths(case_dir.parent, spec, case_dir.name).values())]
    check_output(out, inputs=inputs, force=force, suffixes=(".nii.gz", ".nii"), what="--out")
    if overlay is not None:
        check_output(overlay, inputs=[*inputs, out], force=force, suffixes=(".png", ".pdf", ".svg"), what="--overlay")
    dev = select_device(device)
    model = ckpt.build().to(dev)
    start = time.perf_counter()
    load = partial(load_case, case_dir.parent, spec, case_dir.name, crop_foreground=ckpt.crop_foreground,
                   require_label=False)
    try:  # the label, if any, only draws the overlay's ground truth: a bad one must not stop the prediction
        case = load(read_label=overlay is not None)
    except CaseError as error:
        label = case_paths(case_dir.parent, spec, case_dir.name).get("label")
        if label is None or error.path != str(label[0]):
            raise
        logger.warning("%s; predicting without it (the overlay shows no ground truth)", error)
        case = load(read_label=False)
    probs = predict_probabilities(model, case.image, ckpt.spatial_dims, dev, patch_size=patch)
    prepared_labels = probabilities_to_labels(probs, spec, case.spacing, postprocessing)
    labels = case.restore(prepared_labels)
    header = case.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = 0, int(labels.max())  # not the scan's display range: labels stay visible
    header.set_intent("label")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image  # the input's format
    written = image_class(labels, case.affine, header)
    raw = written.to_bytes()  # patient-derived: written private and atomically, like every other output
    replace_private(out, gzip.compress(raw, compresslevel=6) if str(out).endswith(".gz") else raw)
    result: dict[str, Any] = {
        "case": case.case, "out": str(out), "seconds": time.perf_counter() - start,
        "postprocessing": postprocessing.to_run_config(),
        "labels": {int(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True))},
    }
    if overlay is not None:
        result["overlay"] = str(write_overlay([(case, regions_from_labels(prepared_labels, spec))], spec, overlay))
    return result


def write_overlay(items: Sequence[tuple[PreparedCase, np.ndarray]], spec: DatasetSpec, path: str | Path,
                  title: str | None = None) -> Path:
    """Scan | prediction | ground truth on the axial slice with the most lesion, one row per case.

    Args:
        items: ``(case, predicted region masks (R, X, Y, Z))`` pairs, in the prepared frame.
        spec: the dataset spec (for region names).
        path: the PNG to write.
        title: a figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ["#f4d03f", "#e74c3c", "#3498db", "#2ecc71", "#9b59b6"]
    has_truth = any(case.regions is not None for case, _ in items)
    columns = 3 if has_truth else 2
    fig, axes = plt.subplots(len(items), columns, figsize=(3.2 * columns, 3.2 * len(items)), squeeze=False)
    for row, (case, masks) in enumerate(items):
        reference = case.regions if case.regions is not None else masks
        z = int(np.argmax(reference[0].sum(axis=(0, 1)))) if reference[0].any() else case.image.shape[-1] // 2
        scan = np.rot90(case.image[0, :, :, z])
        panels = [("scan", None), ("prediction", masks)] + ([("ground truth", case.regions)] if has_truth else [])
        for col, (name, overlay) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(scan, cmap="gray")
            if overlay is not None:
                for r, region in enumerate(spec.regions):
                    layer = np.ma.masked_where(~np.rot90(overlay[r, :, :, z].astype(bool)), np.ones(scan.shape))
                    ax.imshow(layer, cmap=matplotlib.colors.ListedColormap([colours[r % len(colours)]]), alpha=0.45,
                              vmin=0, vmax=1)
            ax.set_title(f"{case.case}\n{name} (slice {z})" if col == 0 else name, fontsize=8)
            ax.set_xlabel("x (voxels)", fontsize=7)
            ax.set_ylabel("y (voxels)", fontsize=7)
            ax.tick_params(labelsize=6)
    handles = [matplotlib.patches.Patch(color=colours[r % len(colours)], label=region)
               for r, region in enumerate(spec.regions)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
