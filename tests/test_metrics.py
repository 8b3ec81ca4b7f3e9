"""``region_metrics`` against an independent NumPy/SciPy computation, on the regions of written label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedlesion.common.data import LAYOUTS, regions_from_labels
from fedlesion.common.metrics import region_metrics, summarize

BRATS = LAYOUTS["brats2021"]
SHAPE = (12, 10, 8)
SPACING = (1.0, 1.5, 2.0)


def _surface_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    return ndimage.distance_transform_edt(~surface_b, sampling=SPACING)[surface_a]


def _reference(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice, IoU, HD95, sensitivity and specificity of one binary region, with the BraTS empty-mask rule."""
    tp, fp = int((pred & true).sum()), int((pred & ~true).sum())
    fn, tn = int((~pred & true).sum()), int((~pred & ~true).sum())
    if not pred.any() and not true.any():
        dice = iou = 1.0
        hd95 = 0.0
    elif not pred.any() or not true.any():
        dice = iou = 0.0
        hd95 = math.dist([0.0] * 3, [n * s for n, s in zip(SHAPE, SPACING)])
    else:
        dice, iou = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
        hd95 = max(np.percentile(_surface_distances(pred, true), 95), np.percentile(_surface_distances(true, pred), 95))
    return {"dice": dice, "iou": iou, "hd95": float(hd95),
            "sensitivity": tp / (tp + fn) if true.any() else float(not pred.any()),
            "specificity": tn / (tn + fp) if tn + fp else 1.0}


def _random_labels(seed: int) -> np.ndarray:
    """A label map of a blob-shaped tumour: edema around a core, enhancing parts inside it."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(SHAPE), 1.5)
    labels = np.zeros(SHAPE, np.uint8)
    labels[smooth > np.quantile(smooth, 0.6)] = 2
    labels[smooth > np.quantile(smooth, 0.8)] = 1
    labels[(smooth > np.quantile(smooth, 0.8)) & (rng.random(SHAPE) > 0.5)] = 4
    return labels


def _one_voxel(value: int, at: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[at] = value
    return labels


EMPTY = np.zeros(SHAPE, np.uint8)

LABEL_MAPS = {
    "random tumours": (_random_labels(0), _random_labels(1)),
    "another pair": (_random_labels(2), _random_labels(3)),
    "perfect": (_random_labels(4), _random_labels(4)),
    "one voxel each, far apart": (_one_voxel(4, (1, 1, 1)), _one_voxel(4, (10, 8, 6))),
    "one voxel against a tumour": (_one_voxel(1, (5, 5, 4)), _random_labels(5)),
    "nothing predicted": (EMPTY, _random_labels(6)),
    "nothing there": (_random_labels(7), EMPTY),
    "both empty": (EMPTY, EMPTY),
}


@pytest.mark.parametrize("predicted, truth", LABEL_MAPS.values(), ids=LABEL_MAPS.keys())
def test_metrics_match_an_independent_computation(predicted: np.ndarray, truth: np.ndarray) -> None:
    pred, true = regions_from_labels(predicted, BRATS), regions_from_labels(truth, BRATS)
    ours = region_metrics(pred, true, list(BRATS.regions), spacing=SPACING)
    for r, region in enumerate(BRATS.regions):
        expected = _reference(pred[r].astype(bool), true[r].astype(bool))
        assert ours[region] == pytest.approx(expected, abs=1e-5), region


def test_empty_mask_rule() -> None:
    empty = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    blob = empty.clone()
    blob[0, 2:4, 2:4, 2:4] = True
    both_empty = region_metrics(empty, empty, ["WT"])["WT"]
    assert both_empty["dice"] == 1.0 and both_empty["iou"] == 1.0 and both_empty["hd95"] == 0.0
    missed = region_metrics(empty, blob, ["WT"])["WT"]
    assert missed["dice"] == 0.0 and missed["hd95"] == pytest.approx(math.sqrt(3 * 8**2))
    false_alarm = region_metrics(blob, empty, ["WT"], spacing=(2, 2, 2))["WT"]
    assert false_alarm["dice"] == 0.0 and false_alarm["hd95"] == pytest.approx(math.sqrt(3 * 16**2))


def test_region_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must both be"):
        region_metrics(torch.zeros(2, 4, 4, 4), torch.zeros(1, 4, 4, 4), ["A", "B"])


def test_summarize_mean_and_std() -> None:
    cases = [{"WT": {"dice": d, "iou": d, "hd95": 1.0, "sensitivity": 1.0, "specificity": 1.0}} for d in (0.6, 0.8)]
    summary = summarize(cases, ["WT"])
    assert summary["WT"]["dice_mean"] == pytest.approx(0.7)
    assert summary["WT"]["dice_std"] == pytest.approx(0.1)
    assert summarize([], ["WT"]) == {}


def test_the_empty_region_penalty_is_the_whole_scans_diagonal_however_it_was_cropped(tmp_path) -> None:  # noqa: ANN001
    """A false-alarm ET on a case without ET costs the same HD95 with the foreground crop on or off."""
    from fedlesion.common.data import load_case
    from fedlesion.common.engine import predicted_regions, score_regions
    from fedlesion.common.postprocess import PostProcessing
    from tests.conftest import write_case

    import nibabel as nib

    folder = write_case(tmp_path, "Crop_001", shape=(24, 20, 12), labels=(0, 1, 2), affine=np.diag([1.0, 1.5, 2.0, 1.0]))
    for path in folder.glob("*.nii.gz"):  # a brain inside air, so that the crop is smaller than the scan
        image = nib.load(path)
        data = np.asarray(image.dataobj).copy()
        keep = np.zeros(data.shape, bool)
        keep[:16, :14, :9] = True
        nib.save(nib.Nifti1Image(np.where(keep, data, 0).astype(data.dtype), image.affine), path)
    diagonal = math.sqrt(24 ** 2 + (20 * 1.5) ** 2 + (12 * 2.0) ** 2)
    scores = []
    for crop in (False, True):
        case = load_case(tmp_path, BRATS, "Crop_001", crop_foreground=crop)
        assert (case.image.shape[1:] != (24, 20, 12)) == crop
        probs = np.zeros((3, *case.image.shape[1:]), np.float32)
        probs[:, 3:6, 3:6, 3:5] = 0.9  # WT, TC and ET predicted; the truth has no ET
        masks = predicted_regions(probs, BRATS, case.spacing, PostProcessing(False, 0.0, 0))
        scores.append(score_regions(masks, case, BRATS)["ET"]["hd95"])
    assert scores == [pytest.approx(diagonal)] * 2


def test_the_penalty_extent_must_match_the_masks() -> None:
    empty, blob = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    blob[0, 1, 1, 1] = 1
    assert region_metrics(blob, empty, ["A"], extent=(8, 4, 4))["A"]["hd95"] == pytest.approx(math.sqrt(96))
    with pytest.raises(ValueError, match="one size per spatial axis"):
        region_metrics(blob, empty, ["A"], extent=(8, 4))
