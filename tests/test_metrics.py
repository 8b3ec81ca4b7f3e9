from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from common.metrics import region_metrics, summarize


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_monai_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = torch.from_numpy(rng.random((2, 12, 12, 10)) > 0.6)
    true = torch.from_numpy(rng.random((2, 12, 12, 10)) > 0.5)
    spacing = (1.0, 1.5, 2.0)
    ours = region_metrics(pred, true, ["A", "B"], spacing=spacing)
    dice = DiceMetric(include_background=True, reduction="none")(pred[None].float(), true[None].float())[0]
    iou = MeanIoU(include_background=True, reduction="none")(pred[None].float(), true[None].float())[0]
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        pred[None].float(), true[None].float(), spacing=spacing)[0]
    for r, region in enumerate(["A", "B"]):
        assert ours[region]["dice"] == pytest.approx(float(dice[r]), abs=1e-6)
        assert ours[region]["iou"] == pytest.approx(float(iou[r]), abs=1e-6)
        assert ours[region]["hd95"] == pytest.approx(float(hd[r]), abs=1e-5)
        tp = float((pred[r] & true[r]).sum())
        assert ours[region]["sensitivity"] == pytest.approx(tp / float(true[r].sum()), abs=1e-6)


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
