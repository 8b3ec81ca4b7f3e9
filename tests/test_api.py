"""train -> evaluate -> predict through the commands, on tiny synthetic cases."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.api import select_cases
from common.checkpoint import load_checkpoint
from simulations.cli import main

SUMMARY_KEYS = {"dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean"}


@pytest.fixture(scope="module")
def trained(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "model.pt"
    code = main(["train", "--data", str(tiny_sites / "site-2"), "--out", str(out), "--model-args", "base_channels=4 depth=2",
                 "--epochs", "2", "--batch-size", "8", "--samples-per-case", "4", "--exclude", "*_003"])
    assert code == 0
    return out


def test_train_writes_a_self_describing_checkpoint(trained: Path) -> None:
    ckpt = load_checkpoint(trained)
    assert ckpt.epoch == 2 and ckpt.model == "unet2d" and ckpt.model_args == {"base_channels": 4, "depth": 2, "norm": "batch"}
    assert "Synth_S02_003" not in ckpt.run_config["train_cases"] and len(ckpt.run_config["train_cases"]) == 3


def test_evaluate_writes_the_contracted_json(trained: Path, tiny_sites: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(trained), "--data", str(tiny_sites / "site-2"),
                 "--include", "*_003", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"WT", "TC", "ET"}
    for block in result["summary"].values():
        assert SUMMARY_KEYS <= set(block)
    assert [c["case"] for c in result["cases"]] == ["Synth_S02_003"]
    case = result["cases"][0]
    assert case["seconds"] > 0 and {"dice", "iou", "hd95"} <= set(case["WT"])
    assert result["seconds_per_case"] == pytest.approx(case["seconds"])


def test_predict_overlays_the_input(trained: Path, tiny_sites: Path, tmp_path: Path) -> None:
    case_dir = tiny_sites / "site-2" / "Synth_S02_003"
    out, png = tmp_path / "seg.nii.gz", tmp_path / "overlay.png"
    assert main(["predict", "--checkpoint", str(trained), "--case", str(case_dir), "--out", str(out), "--overlay", str(png)]) == 0
    seg, flair = nib.load(out), nib.load(case_dir / "Synth_S02_003_flair.nii.gz")
    assert seg.shape == flair.shape
    np.testing.assert_allclose(seg.affine, flair.affine)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_predict_on_unlabelled_case(trained: Path, tiny_sites: Path, tmp_path: Path) -> None:
    import shutil

    case_dir = tmp_path / "Synth_S02_000"
    shutil.copytree(tiny_sites / "site-2" / "Synth_S02_000", case_dir)
    (case_dir / "Synth_S02_000_seg.nii.gz").unlink()
    assert main(["predict", "--checkpoint", str(trained), "--case", str(case_dir), "--out", str(tmp_path / "s.nii.gz")]) == 0


def test_commands_report_bad_input_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path)]) == 2
    assert "none.pt: file not found" in capsys.readouterr().err


def test_3d_model_trains_on_patches(tiny_sites: Path, tmp_path: Path) -> None:
    out = tmp_path / "m3d.pt"
    assert main(["train", "--data", str(tiny_sites / "site-0"), "--out", str(out), "--model", "unet3d",
                 "--model-args", "base_channels=4 depth=2", "--epochs", "1", "--batch-size", "2",
                 "--samples-per-case", "2", "--patch-size", "16,16,16"]) == 0
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(tiny_sites / "site-0"), "--out", str(tmp_path / "m.json")]) == 0


def test_select_cases() -> None:
    ids = ["Brats18_CBICA_A", "Brats18_TCIA02_B", "Brats18_TCIA08_C"]
    assert select_cases(ids, include=["*TCIA*"], exclude=["*08*"]) == ["Brats18_TCIA02_B"]
