"""A SuperNode's data is checked against the run's dataset: channels matched by modality, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client import site as sites
from common.config import declared_run_config
from common.data import LAYOUTS, load_case
from tests.conftest import write_case

BRATS = LAYOUTS["brats2021"]
RUN_CONFIG = {"dataset": "brats2021", "val-fraction": 0.0}


def _site(folder: Path, *channels: str) -> Path:
    write_case(folder, "Case_001")
    (folder / "fedlesion.json").write_text(json.dumps({
        "name": "hospital", "channels": {c: f"{{case}}/{{case}}_{c}.nii.gz" for c in channels},
        "label": "{case}/{case}_seg.nii.gz", "labels": [0, 1, 2, 4], "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
    }))
    return folder


def test_a_site_listing_t1_before_flair_trains_on_the_run_channel_order(tmp_path: Path) -> None:
    folder = _site(tmp_path / "hospital", "t1", "flair", "t2", "t1ce")
    site = sites.load({"data-path": str(folder)}, RUN_CONFIG)
    assert list(site.spec.channels) == ["flair", "t1", "t1ce", "t2"]
    reference = load_case(folder, BRATS, "Case_001", crop_foreground=declared_run_config()["crop-foreground"])
    np.testing.assert_array_equal(site.train[0].image, reference.image)


def test_a_site_with_another_modality_is_refused(tmp_path: Path) -> None:
    folder = _site(tmp_path / "hospital", "flair", "t1", "t1ce", "pd")
    with pytest.raises(ValueError, match=r"site hospital .*has channels \['flair', 't1', 't1ce', 'pd'\].*'brats2021' "
                                         r"expects channels \['flair', 't1', 't1ce', 't2'\]"):
        sites.load({"data-path": str(folder)}, RUN_CONFIG)
