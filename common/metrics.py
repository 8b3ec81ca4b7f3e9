"""Per-region segmentation metrics, computed with MONAI.

Empty-mask rule (BraTS convention): when both the prediction and the ground truth of a
region are empty, Dice and IoU are 1 and HD95 is 0. When exactly one is empty, Dice and
IoU are 0 and HD95 is the length of the whole scan's diagonal in mm (the largest distance
possible in it; the same whether or not the brain was cropped out of it for the model), so
empty-vs-nonempty errors are penalised, never dropped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou, get_confusion_matrix
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

# MONAI's own HD95 code passes an argument it has itself deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)

METRICS = ("dice", "iou", "hd95", "sensitivity", "specificity")


def region_metrics(
    prediction: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    regions: Sequence[str],
    spacing: Sequence[float] | None = None,
    extent: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Dice, IoU, HD95, sensitivity and specificity for each region of one case.

    Args:
        prediction: binary masks ``(R, *spatial)``.
        target: binary masks ``(R, *spatial)``.
        regions: the ``R`` region names.
        spacing: voxel size in mm per spatial axis (default 1).
        extent: the spatial shape whose diagonal (in mm) is HD95's empty-vs-nonempty penalty: the whole
            scan's, when the masks are a crop of it (default: the masks' own shape).

    Returns:
        ``{region: {"dice", "iou", "hd95", "sensitivity", "specificity"}}``.

    Raises:
        ValueError: when the shapes differ or do not match ``regions``.
    """
    pred = torch.as_tensor(np.asarray(prediction) if not isinstance(prediction, torch.Tensor) else prediction).bool()
    true = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).bool()
    if pred.shape != true.shape or pred.shape[0] != len(regions):
        raise ValueError(
            f"prediction {tuple(pred.shape)} and target {tuple(true.shape)} must both be (R={len(regions)}, *spatial)."
        )
    spatial = pred.shape[1:]
    spacing = [1.0] * len(spatial) if spacing is None else [float(s) for s in spacing]
    extent = spatial if extent is None else [int(n) for n in extent]
    if len(extent) != len(spatial):
        raise ValueError(f"extent {tuple(extent)} must have one size per spatial axis of {tuple(spatial)}.")
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(extent, spacing)))
    y_pred, y = pred[None].float(), true[None].float()  # (1, R, ...)
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)[0]
    confusion = get_confusion_matrix(y_pred, y, include_background=True)
    sensitivity = compute_confusion_matrix_metric("sensitivity", confusion)[0]
    specificity = compute_confusion_matrix_metric("specificity", confusion)[0]
    out = {}
    for r, region in enumerate(regions):
        has_pred, has_true = bool(pred[r].any()), bool(true[r].any())
        if has_pred and has_true:
            hd95 = float(compute_hausdorff_distance(
                y_pred[:, r:r + 1], y[:, r:r + 1], include_background=True, percentile=95, spacing=spacing
            )[0, 0])
        else:
            hd95 = 0.0 if has_pred == has_true else diagonal
        out[region] = {
            "dice": float(dice[r]),
            "iou": float(iou[r]),
            "hd95": hd95,
            # An empty ground truth has no sensitivity to measure: 1 if nothing was predicted.
            "sensitivity": float(sensitivity[r]) if has_true else float(not has_pred),
            "specificity": float(specificity[r]) if not math.isnan(float(specificity[r])) else 1.0,
        }
    return out


def summarize(cases: Sequence[dict[str, dict[str, float]]], regions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation over cases of each metric, per region.

    Args:
        cases: one :func:`region_metrics` result per case.
        regions: the region names.

    Returns:
        ``{region: {"dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean", "hd95_std", ...}}``.
        Empty when there are no cases.
    """
    summary: dict[str, dict[str, float]] = {}
    if not cases:
        return summary
    for region in regions:
        block = {}
        for metric in METRICS:
            values = np.array([c[region][metric] for c in cases], dtype=np.float64)
            block[f"{metric}_mean"] = float(values.mean())
            block[f"{metric}_std"] = float(values.std())
        summary[region] = block
    return summary


def flat_means(summary: dict[str, dict[str, float]], regions: Sequence[str]) -> dict[str, float]:
    """``{"dice-wt": ..., "iou-wt": ..., "hd95-wt": ...}``: the per-region means as flat metric names.

    These are the names round metrics carry; a region without cases (no validation case
    at a site) reports 0.0.
    """
    return {f"{metric}-{region.lower()}": float(summary.get(region, {}).get(f"{metric}_mean", 0.0))
            for region in regions for metric in ("dice", "iou", "hd95")}
