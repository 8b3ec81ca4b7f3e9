"""Post-processing: the lesion's far-off islands go, the lesion stays; every path applies the same settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedlesion.client import app as client_app
from fedlesion.common import api
from fedlesion.common.checkpoint import Checkpoint, save_checkpoint
from fedlesion.common.config import declared_run_config, model_from
from fedlesion.common.data import LAYOUTS, regions_from_labels
from fedlesion.common.engine import probabilities_to_labels
from fedlesion.common.model import build_model
from fedlesion.common.postprocess import PostProcessing, postprocess_labels
from fedlesion.server import app as server_app
from fedlesion.cli import _postprocess_overrides, build_parser, main
from tests.conftest import write_case

BRATS = LAYOUTS["brats2021"]
DECLARED = declared_run_config()
LESION = (slice(2, 12), slice(2, 12), slice(2, 12))  # 1000 voxels: oedema, with core and enhancing tumour inside
SECOND = (slice(20, 26), slice(2, 8), slice(2, 8))  # 216 voxels: a second, smaller real component
ISLAND = (slice(28, 30), slice(28, 30), slice(28, 29))  # 4 voxels far from both: enhancing tumour alone


def _labels() -> np.ndarray:
    labels = np.zeros((32, 32, 32), np.uint8)
    labels[LESION] = 2
    labels[4:10, 4:10, 4:10] = 1
    labels[6:8, 6:8, 6:8] = 4
    labels[SECOND] = 2
    labels[ISLAND] = 4
    return labels


def _settings(enabled: bool = True, min_mm3: float = 0.0, components: int = 0) -> PostProcessing:
    return PostProcessing(enabled, min_mm3, components)


@pytest.mark.parametrize(
    "settings, spacing, kept",
    [
        (_settings(enabled=False, min_mm3=100.0, components=1), (1.0, 1.0, 1.0), {"second", "island"}),
        (_settings(min_mm3=20.0), (1.0, 1.0, 1.0), {"second"}),  # the island is 4 mm^3
        (_settings(min_mm3=20.0), (2.0, 2.0, 2.0), {"second", "island"}),  # ... or 32 mm^3 with 2 mm voxels
        (_settings(min_mm3=300.0), (1.0, 1.0, 1.0), set()),  # the second component is 216 mm^3
        (_settings(min_mm3=5000.0), (1.0, 1.0, 1.0), set()),  # the largest stays, however small
        (_settings(components=1), (1.0, 1.0, 1.0), set()),
        (_settings(components=2), (1.0, 1.0, 1.0), {"second"}),
        (_settings(min_mm3=20.0, components=3), (1.0, 1.0, 1.0), {"second"}),
    ],
)
def test_islands_go_and_the_lesion_stays(settings: PostProcessing, spacing: tuple[float, ...], kept: set[str]) -> None:
    labels = _labels()
    out = postprocess_labels(labels, settings, spacing)
    np.testing.assert_array_equal(out[LESION], labels[LESION])
    for name, box in (("second", SECOND), ("island", ISLAND)):
        if name in kept:
            np.testing.assert_array_equal(out[box], labels[box])
        else:
            assert not regions_from_labels(out, BRATS)[(slice(None), *box)].any(), f"{name} is background in every region"
    assert np.count_nonzero(out) == np.count_nonzero(labels[LESION]) + sum(
        np.count_nonzero(labels[box]) for name, box in (("second", SECOND), ("island", ISLAND)) if name in kept)


def test_the_one_step_to_labels_post_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = np.stack([np.isin(_labels(), labels) for labels in BRATS.regions.values()]).astype(np.float32)
    spacing = (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(probabilities_to_labels(probs, BRATS, spacing, _settings(enabled=False)), _labels())
    lesion_only = np.where(np.arange(32)[:, None, None] < 12, _labels(), 0)
    np.testing.assert_array_equal(probabilities_to_labels(probs, BRATS, spacing, _settings(components=1)), lesion_only)
    # Without settings it applies the declared ones (made distinguishable here).
    monkeypatch.setattr(PostProcessing, "from_run_config", classmethod(lambda cls, run_config: _settings(components=1)))
    np.testing.assert_array_equal(probabilities_to_labels(probs, BRATS, spacing), lesion_only)


def test_settings_come_from_the_run_config() -> None:
    assert PostProcessing.from_run_config({}) == PostProcessing(
        DECLARED["postprocess"], DECLARED["postprocess-min-mm3"], DECLARED["postprocess-components"])
    assert PostProcessing.from_run_config({}).to_run_config() == {
        key: DECLARED[key] for key in ("postprocess", "postprocess-min-mm3", "postprocess-components")}
    # A pooled checkpoint's run config holds other keys too: they are not post-processing's business.
    settings = PostProcessing.from_run_config({"train_cases": ["a"], "postprocess": False, "postprocess-min-mm3": 5})
    assert settings == PostProcessing(False, 5.0, DECLARED["postprocess-components"])


@pytest.mark.parametrize(
    "run_config, match",
    [
        ({"postprocess": "yes"}, r"run-config 'postprocess' = 'yes' has type str; it must be bool"),
        ({"postprocess-components": 1.5}, r"run-config 'postprocess-components' = 1.5 has type float; it must be int"),
        ({"postprocess-min-mm3": -1.0}, r"'postprocess-min-mm3' = -1.0 is out of range: it must be >= 0"),
        ({"postprocess-components": -1}, r"'postprocess-components' = -1 is out of range: it must be >= 0"),
    ],
)
def test_bad_settings_are_refused(run_config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PostProcessing.from_run_config(run_config)


@pytest.mark.parametrize(
    "run_config, overrides, expected",
    [
        ({}, None, PostProcessing.from_run_config({})),  # a checkpoint that predates post-processing
        ({"postprocess": True, "postprocess-min-mm3": 7.0, "postprocess-components": 2}, None, _settings(True, 7.0, 2)),
        ({"postprocess": True, "postprocess-min-mm3": 7.0, "postprocess-components": 2}, {"postprocess": False},
         _settings(False, 7.0, 2)),
        ({"postprocess": False}, {"postprocess-components": 1}, _settings(False, DECLARED["postprocess-min-mm3"], 1)),
    ],
)
def test_a_checkpoint_carries_its_settings(run_config: dict[str, Any], overrides: dict[str, Any] | None,
                                           expected: PostProcessing) -> None:
    ckpt = Checkpoint("unet2d", {}, BRATS, {}, run_config={"seed": 0, **run_config})
    assert ckpt.postprocessing(overrides) == expected


@pytest.mark.parametrize(
    "flags, overrides",
    [
        ([], {}),
        (["--no-postprocess"], {"postprocess": False}),
        (["--postprocess", "--postprocess-min-mm3", "50", "--postprocess-components", "2"],
         {"postprocess": True, "postprocess-min-mm3": 50.0, "postprocess-components": 2}),
    ],
)
def test_cli_flags_override_only_what_they_name(flags: list[str], overrides: dict[str, Any]) -> None:
    for command in (["evaluate", "--checkpoint", "c.pt", "--data", "d"], ["predict", "--checkpoint", "c.pt", "--case", "c",
                                                                          "--out", "o.nii.gz"]):
        assert _postprocess_overrides(build_parser().parse_args(command + flags)) == overrides


@pytest.fixture
def island_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A checkpoint trained with ``postprocess-components = 1`` and a case whose prediction has a far ET island."""
    torch.manual_seed(0)
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    checkpoint = save_checkpoint(Checkpoint(
        "unet2d", {"base_channels": 4, "depth": 2}, BRATS, model.state_dict(),
        run_config={"crop_foreground": False, "postprocess": True, "postprocess-min-mm3": 0.0, "postprocess-components": 1},
    ), tmp_path / "model.pt")
    case_dir = write_case(tmp_path / "data", "Case_001")  # truth: labels in x 0..7, y and z 2..5
    probs = np.zeros((3, 16, 16, 8), np.float32)
    probs[0, 0:8, 2:6, 2:6] = 0.9
    probs[1, 2:6, 2:6, 2:6] = 0.8
    probs[2, 4:6, 2:6, 2:6] = 0.7
    probs[2, 12:14, 12:14, 6:8] = 0.7  # the island
    monkeypatch.setattr(api, "predict_probabilities", lambda *args, **kwargs: torch.from_numpy(probs))
    return checkpoint, case_dir


@pytest.mark.parametrize("flags, island_kept", [([], False), (["--no-postprocess"], True)])
def test_evaluate_and_predict_apply_the_checkpoint_settings_unless_told(
        island_case: tuple[Path, Path], tmp_path: Path, flags: list[str], island_kept: bool) -> None:
    checkpoint, case_dir = island_case
    seg = tmp_path / "seg.nii.gz"
    assert main(["predict", "--checkpoint", str(checkpoint), "--case", str(case_dir), "--out", str(seg), *flags]) == 0
    written = np.asarray(nib.load(seg).dataobj)
    assert (written[12:14, 12:14, 6:8] == 4).all() == island_kept and written[0:8, 2:6, 2:6].all()
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(case_dir.parent), "--out", str(metrics),
                 *flags]) == 0
    result = json.loads(metrics.read_text())
    assert result["postprocessing"]["postprocess"] is not island_kept
    assert (result["cases"][0]["WT"]["hd95"] > 5.0) == island_kept, "the island is what HD95 measures"


def test_the_federation_evaluates_with_the_run_config_settings(tiny_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are stamped with the running task's identity; outside a SuperNode the test provides one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    seen: list[PostProcessing] = []

    def fake_evaluate(*args: Any, postprocessing: PostProcessing | None = None, **kwargs: Any) -> tuple[list, dict]:
        seen.append(postprocessing)
        return [], {}

    monkeypatch.setattr(client_app, "evaluate_cases", fake_evaluate)
    monkeypatch.setattr(server_app, "evaluate", fake_evaluate)
    run_config = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "val-fraction": 0.5,
                  "postprocess-min-mm3": 12.5, "postprocess-components": 2}
    model_name, model_args = model_from(run_config)
    arrays = ArrayRecord(build_model(model_name, 4, 3, **model_args).state_dict())
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(tiny_sites / "site-1"), "site-name": "h"},
                      state=RecordDict(), run_config=run_config)
    client_app.evaluate(Message(content=RecordDict({"arrays": arrays}), dst_node_id=7, message_type="evaluate"), context)
    values = {**DECLARED, **run_config, "server-eval-data": str(tiny_sites / "site-1")}
    evaluator = server_app.server_evaluator(values, model_name, model_args, BRATS)
    evaluator(1, arrays)
    assert seen == [_settings(DECLARED["postprocess"], 12.5, 2)] * 2


def test_the_server_scores_held_out_cases_every_n_rounds_and_after_the_last(
        tiny_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scored: list[int] = []
    monkeypatch.setattr(server_app, "evaluate", lambda *a, **k: (scored.append(1), ([], {}))[1])
    run_config = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "num-server-rounds": 5,
                  "server-eval-every": 3}
    model_name, model_args = model_from(run_config)
    arrays = ArrayRecord(build_model(model_name, 4, 3, **model_args).state_dict())
    values = {**DECLARED, **run_config, "server-eval-data": str(tiny_sites / "site-1")}
    evaluator = server_app.server_evaluator(values, model_name, model_args, BRATS)
    rounds = [r for r in range(6) if (scored.clear(), evaluator(r, arrays), scored)[2]]
    assert rounds == [0, 3, 5], "round 0 (the initial model), every 3rd round and the last"
    with pytest.raises(ValueError, match="server-eval-every"):
        server_app.server_evaluator({**values, "server-eval-every": 0}, model_name, model_args, BRATS)
