"""A SuperNode's data is checked against the run's dataset: channels matched by modality, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlesion.client import site as sites
from fedlesion.common.config import declared_run_config
from fedlesion.common.data import LAYOUTS, load_case
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


def _manifest(folder: Path, channels: tuple[str, ...] = ("flair", "t1"), regions: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "coordinator.json"
    path.write_text(json.dumps({"name": "coordinator", "channels": {c: f"{{case}}_{c}.nii.gz" for c in channels},
                                "label": "{case}_seg.nii.gz", "labels": [0, 1], "regions": regions or {"WT": [1]}}))
    return path


def test_a_supernode_never_reads_a_path_from_the_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _manifest(tmp_path / "coordinator")
    opened: list[str] = []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: opened.append(str(self)) or real_read_text(self, *a, **k))
    hospital = {"data-path": str(tmp_path / "hospital")}
    with pytest.raises(ValueError, match="reads only the paths its own node config names"):
        sites.expected_spec({}, hospital, {"dataset": str(manifest)})
    with pytest.raises(ValueError, match="reads only the paths its own node config names"):
        sites.load(hospital, {"dataset": str(manifest)})
    assert str(manifest) not in opened
    # A built-in layout name is not a path; in simulation (no data-path) the researcher's manifest is read.
    assert sites.expected_spec({}, hospital, {"dataset": "brats2021"}) == BRATS
    assert list(sites.expected_spec({}, {"partition-id": 0}, {"dataset": str(manifest)}).channels) == ["flair", "t1"]


def test_the_server_states_the_spec_and_the_site_keeps_its_own_files(tmp_path: Path) -> None:
    folder = _site(tmp_path / "hospital", "t1", "flair", "t2", "t1ce")
    shared = {**BRATS.to_json(), "name": "shared", "label": "labels/{case}", "channels": {
        m: f"elsewhere/{{case}}_{m}" for m in ("flair", "t1", "t1ce", "t2")}}
    expected = sites.expected_spec({"dataset-spec": json.dumps(shared)}, {"data-path": str(folder)}, {"dataset": "/no/such.json"})
    assert list(expected.channels) == ["flair", "t1", "t1ce", "t2"]
    site = sites.load({"data-path": str(folder)}, {"dataset": "/no/such.json", "val-fraction": 0.0}, expected)
    assert list(site.spec.channels) == ["flair", "t1", "t1ce", "t2"]
    # The channel order is the server's, the file patterns and the label the site's own.
    assert site.spec.label == "{case}/{case}_seg.nii.gz"
    assert site.spec.channels["flair"] == "{case}/{case}_flair.nii.gz"
    assert len(site.train) == 1


@pytest.mark.parametrize("value, match", [
    ("not json", "is not JSON"), ("[1, 2]", "not a JSON object"), ('{"channels": {}}', "missing key"),
    ('{"channels": {"flair": "x"}, "labels": ["a"], "regions": {"WT": [1]}}', "'labels' holds 'a'"),
])
def test_a_malformed_spec_from_the_server_is_refused(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sites.expected_spec({"dataset-spec": value}, {"data-path": "/data"}, {})
