"""train -> evaluate -> predict through the commands, on tiny synthetic cases."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from unittest.mock import patch

import nibabel as nib
import numpy as np
import pytest
import torch

from fedlesion.common import api
from fedlesion.common.api import cases_file, evaluate_checkpoint, predict_case, select_cases
from fedlesion.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.config import declared_run_config
from fedlesion.common.data import LAYOUTS, load_case, regions_from_labels
from fedlesion.common.metrics import region_metrics
from fedlesion.common.model import build_model
from fedlesion.cli import main
from tests.conftest import weight_distance, write_case

BRATS = LAYOUTS["brats2021"]

SUMMARY_KEYS = {"dice_mean", "dice_std", "iou_mean", "iou_std", "hd95_mean"}


@pytest.fixture(scope="module")
def trained(tiny_sites: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "model.pt"
    code = main(["train", "--data", str(tiny_sites / "site-2"), "--out", str(out), "--model-args", "base_channels=4 depth=2",
                 "--epochs", "2", "--batch-size", "8", "--samples-per-case", "4", "--val-fraction", "0",
                 "--exclude", "*_003"])
    assert code == 0
    return out


def test_train_writes_a_self_describing_checkpoint(trained: Path) -> None:
    ckpt = load_checkpoint(trained)
    assert ckpt.epoch == 2 and ckpt.model == "unet2d" and ckpt.model_args == {"base_channels": 4, "depth": 2, "norm": "group"}
    assert ckpt.run_config["train-case-count"] == 3
    # Case IDs and paths stay in a private file beside the checkpoint, never in the checkpoint, which may be shared.
    record = cases_file(trained)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and stat.S_IMODE(trained.stat().st_mode) == 0o600
    cases = json.loads(record.read_text())
    assert len(cases["train"]) == 3 and "Synth_S02_003" not in cases["train"]
    shared = json.dumps(ckpt.run_config) + json.dumps(ckpt.metrics) + json.dumps(ckpt.extra)
    assert "Synth_S02" not in shared and str(trained.parent) not in shared and cases["data"] not in shared
    declared = declared_run_config()
    for key in ("postprocess", "postprocess-min-mm3", "postprocess-components"):
        assert ckpt.run_config[key] == declared[key], "the post-processing it was trained with"


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
    written = np.asarray(seg.dataobj)
    assert set(np.unique(written).tolist()) <= {0, 1, 2, 4}
    # A label map, displayed as one: not the scan's intensity window (a viewer would show labels 1-4 as black).
    assert seg.header.get_intent()[0] == "label"
    assert (float(seg.header["cal_min"]), float(seg.header["cal_max"])) == (0.0, float(written.max()))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600, "patient-derived output is private"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_predict_does_not_need_a_sound_label(trained: Path, tiny_sites: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A label file the layout does not allow (label 3 under BraTS 2018-21) only loses the overlay's ground truth."""
    import shutil

    case_dir = tmp_path / "Synth_S02_000"
    shutil.copytree(tiny_sites / "site-2" / "Synth_S02_000", case_dir)
    seg = case_dir / "Synth_S02_000_seg.nii.gz"
    label = nib.load(seg)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, label.affine), seg)
    good = tmp_path / "good.nii.gz"
    assert main(["predict", "--checkpoint", str(trained), "--case", str(tiny_sites / "site-2" / "Synth_S02_000"),
                 "--out", str(good)]) == 0
    for overlay in (None, tmp_path / "overlay.png"):
        out = tmp_path / f"seg-{overlay is None}.nii.gz"
        caplog.clear()
        assert main(["predict", "--checkpoint", str(trained), "--case", str(case_dir), "--out", str(out),
                     *(["--overlay", str(overlay)] if overlay else [])]) == 0
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(good).dataobj))
        assert ("label values [3]" in caplog.text) == (overlay is not None), "read, and warned about, only for the overlay"


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


@pytest.fixture
def brats_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    return save_checkpoint(Checkpoint("unet2d", {"base_channels": 4, "depth": 2}, BRATS, model.state_dict(),
                                      run_config={"crop_foreground": False}), tmp_path / "model.pt")


@pytest.mark.parametrize(
    "postprocess",
    [{"postprocess": False},
     {"postprocess": True, "postprocess-min-mm3": 0.0, "postprocess-components": 1}],  # the outside ET goes
)
def test_evaluate_scores_the_label_map_predict_writes(brats_checkpoint: Path, tmp_path: Path, postprocess: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Enhancing tumour predicted outside the core is written as label 4 (WT and TC too); it is scored so,
    and post-processing removes it from both."""
    case_dir = write_case(tmp_path / "data", "Case_001")
    probs = np.zeros((3, 16, 16, 8), np.float32)
    probs[0, 0:8, 2:6, 2:6] = 0.9  # WT
    probs[1, 2:6, 2:6, 2:6] = 0.8  # TC inside WT
    probs[2, 4:6, 2:6, 2:6] = 0.7  # ET inside TC ...
    probs[2, 10:12, 2:6, 2:6] = 0.7  # ... and outside WT and TC
    monkeypatch.setattr(api, "predict_probabilities", lambda *args, **kwargs: torch.from_numpy(probs))
    scored = evaluate_checkpoint(brats_checkpoint, tmp_path / "data", report=lambda _: None,
                                 postprocess=postprocess)["cases"][0]
    predict_case(brats_checkpoint, case_dir, tmp_path / "seg.nii.gz", postprocess=postprocess)
    written = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    truth = load_case(tmp_path / "data", BRATS, "Case_001").regions
    expected = region_metrics(regions_from_labels(written, BRATS), truth, list(BRATS.regions))
    assert {r: scored[r] for r in BRATS.regions} == expected
    assert (written[10:12, 2:6, 2:6] == 4).all() != postprocess["postprocess"]
    if not postprocess["postprocess"]:
        channels = region_metrics(probs > 0.5, truth, list(BRATS.regions))
        assert channels["WT"]["dice"] != expected["WT"]["dice"], "the test must tell the two scorings apart"


def _manifest(folder: Path, *channels: str) -> None:
    (folder / "fedlesion.json").write_text(json.dumps({
        "name": "site", "channels": {c: f"{{case}}/{{case}}_{c}.nii.gz" for c in channels},
        "label": "{case}/{case}_seg.nii.gz", "labels": [0, 1, 2, 4], "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]},
    }))


def test_evaluate_and_predict_put_channels_in_the_checkpoint_order(brats_checkpoint: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    case_dir = write_case(tmp_path / "data", "Case_001")
    _manifest(tmp_path / "data", "t1", "flair", "t2", "t1ce")
    images: list[np.ndarray] = []

    def fake(model: torch.nn.Module, image: np.ndarray, *args: object, **kwargs: object) -> torch.Tensor:
        images.append(image)
        return torch.zeros((3, *image.shape[1:]))

    monkeypatch.setattr(api, "predict_probabilities", fake)
    evaluate_checkpoint(brats_checkpoint, tmp_path / "data", report=lambda _: None)
    predict_case(brats_checkpoint, case_dir, tmp_path / "seg.nii.gz", manifest=str(tmp_path / "data" / "fedlesion.json"))
    reference = load_case(tmp_path / "data", BRATS, "Case_001").image
    for image in images:
        np.testing.assert_array_equal(image, reference)


def test_evaluate_refuses_data_with_other_channels(brats_checkpoint: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "data", "Case_001")
    _manifest(tmp_path / "data", "flair", "t1", "t1ce")
    with pytest.raises(ValueError, match=r"has channels \['flair', 't1', 't1ce'\].*expects channels "
                                         r"\['flair', 't1', 't1ce', 't2'\]"):
        evaluate_checkpoint(brats_checkpoint, tmp_path / "data", report=lambda _: None)


def test_select_cases() -> None:
    ids = ["Brats18_CBICA_A", "Brats18_TCIA02_B", "Brats18_TCIA08_C"]
    assert select_cases(ids, include=["*TCIA*"], exclude=["*08*"]) == ["Brats18_TCIA02_B"]


def test_evaluate_by_site_agrees_with_evaluate_on_each_sites_cases(trained: Path, tmp_path: Path) -> None:
    """`evaluate --by-site institution` on a pooled folder: each site's summary is what `evaluate` gives on that
    site's cases alone, and the worst site is the one with the lowest mean Dice."""
    from fedlesion.simulations.synthetic import synthesize

    pooled = tmp_path / "pooled"
    synthesize(pooled, sites=2, cases_per_site=2, shape=(32, 32, 16), seed=3, flat=True)
    out = tmp_path / "by-site.json"
    assert main(["evaluate", "--checkpoint", str(trained), "--data", str(pooled), "--by-site", "institution",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["sites"]) == {"S00", "S01"} and "summary" in result and "cases" in result  # the contract stays
    for site, block in result["sites"].items():
        alone = api.evaluate_checkpoint(trained, pooled, include=[f"Synth_{site}_*"], report=lambda _: None)
        assert block["num_cases"] == len(alone["cases"])
        for region, numbers in alone["summary"].items():
            assert block["summary"][region]["dice_mean"] == pytest.approx(numbers["dice_mean"])
    worst = min(result["sites"], key=lambda s: result["sites"][s]["summary"]["WT"]["dice_mean"])
    assert result["worst_site"]["site"] == worst and result["worst_site"]["region"] == "WT"
    assert main(["evaluate", "--checkpoint", str(trained), "--data", str(pooled), "--by-site", "iid",
                 "--out", str(tmp_path / "x.json")]) == 2



def test_train_from_a_checkpoint_fine_tunes_it_and_the_proximal_term_keeps_it_near(
        trained: Path, tiny_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site's own copy of a model it received: ``train --init-from`` starts from that model's weights and
    architecture (not the command's defaults), and ``--proximal-mu`` pulls the weights back towards them."""
    start = load_checkpoint(trained).state_dict
    started_from = []
    real_train = api.train

    def spy(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        started_from.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(api, "train", spy)
    moved = {}
    for mu in (0.0, 1e4):
        out = tmp_path / f"personal-{mu:g}.pt"
        assert main(["train", "--data", str(tiny_sites / "site-1"), "--out", str(out), "--init-from", str(trained),
                     "--epochs", "2", "--batch-size", "8", "--samples-per-case", "4", "--val-fraction", "0",
                     "--learning-rate", "0.01", "--seed", "7", "--proximal-mu", str(mu)]) == 0
        assert all(torch.equal(started_from[-1][k], start[k]) for k in start), "training starts from the checkpoint"
        ckpt = load_checkpoint(out)
        assert ckpt.model_args == {"base_channels": 4, "depth": 2, "norm": "group"}, "the checkpoint's model"
        assert ckpt.run_config["proximal_mu"] == mu and ckpt.extra["init-from"] == {"model": "unet2d", "round": 0,
                                                                                    "epoch": 2}
        moved[mu] = weight_distance(ckpt.state_dict, start)
    assert 0 < moved[1e4] < 0.5 * moved[0.0], moved


def test_fine_tuning_validates_with_the_checkpoints_post_processing(
        tiny_sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation Dice of each epoch (what the history and `--select` read) is the score `evaluate` will give
    the checkpoint: with the post-processing it carries, not the defaults."""
    source = tmp_path / "received.pt"
    save_checkpoint(Checkpoint(model="unet2d", model_args={"base_channels": 4, "depth": 2, "norm": "group"}, spec=BRATS,
                               state_dict=build_model("unet2d", 4, 3, base_channels=4, depth=2).state_dict(), round=5,
                               run_config={"postprocess": True, "postprocess-min-mm3": 7.0, "postprocess-components": 1}),
                    source)
    used = []
    real_evaluate = api.evaluate

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        used.append(kwargs.get("postprocessing"))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(api, "evaluate", spy)
    assert main(["train", "--data", str(tiny_sites / "site-1"), "--init-from", str(source), "--epochs", "1",
                 "--batch-size", "4", "--samples-per-case", "2", "--val-fraction", "0.5",
                 "--out", str(tmp_path / "personal.pt")]) == 0
    assert used and all(p is not None and p.to_run_config() == {"postprocess": True, "postprocess-min-mm3": 7.0,
                                                                "postprocess-components": 1} for p in used)


def test_fine_tuning_keeps_the_checkpoints_channels_cropping_patch_and_post_processing(
        tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    channels = list(reversed(BRATS.channels))  # another order than the data folder's layout
    spec = dataclasses.replace(BRATS, channels={c: BRATS.channels[c] for c in channels})
    network = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    source = tmp_path / "received.pt"
    save_checkpoint(Checkpoint(model="unet2d", model_args={"base_channels": 4, "depth": 2, "norm": "group"}, spec=spec,
                               state_dict=network.state_dict(), round=5,
                               run_config={"crop_foreground": False, "postprocess": False, "postprocess-min-mm3": 5.0,
                                           "postprocess-components": 2, "patch_size": [16, 16, 8]}), source)
    out = tmp_path / "personal.pt"
    common = ["train", "--data", str(tiny_sites / "site-1"), "--init-from", str(source), "--epochs", "1",
              "--batch-size", "4", "--samples-per-case", "2", "--val-fraction", "0"]
    assert main([*common, "--out", str(out), "--model", "unet2d", "--model-args", "depth=2"]) == 0, "equal: accepted"
    ckpt = load_checkpoint(out)
    assert list(ckpt.spec.channels) == channels and ckpt.crop_foreground is False and ckpt.round == 0
    assert ckpt.patch_size == (16, 16, 8)
    assert ckpt.postprocessing().to_run_config() == {"postprocess": False, "postprocess-min-mm3": 5.0,
                                                     "postprocess-components": 2}
    assert ckpt.run_config["learning_rate"] == declared_run_config()["finetune-learning-rate"], "fine-tuning's rate"
    assert "from received.pt (round 5" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "c.pt"), "--crop-foreground"]) != 0
    assert "crop-foreground False" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "d.pt"), "--model", "unet3d"]) != 0
    assert "holds unet2d" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "e.pt"), "--patch-size", "8,8,8"]) != 0
    assert "trained with patch (16, 16, 8)" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "e.pt").exists()
    # A received checkpoint is not trusted to be well-formed: a bad patch or post-processing is refused with the
    # file named, before any case is read, and nothing is written.
    for name, broken, why in (("one.pt", {"patch_size": [16, "x", 8]}, "recorded patch size is unusable"),
                              ("two.pt", {"patch_size": [16, 16, 4]}, "recorded patch size is unusable"),
                              ("three.pt", {"postprocess-components": "many"}, "not a usable model")):
        save_checkpoint(Checkpoint(model="unet2d", model_args={"base_channels": 4, "depth": 2, "norm": "group"},
                                   spec=spec, state_dict=network.state_dict(), round=5,
                                   run_config={"crop_foreground": False, "patch_size": [16, 16, 8], **broken}),
                        tmp_path / name)
        with patch.object(api, "load_site", side_effect=AssertionError("a case was read")):
            assert main([*common[:3], "--init-from", str(tmp_path / name), *common[5:], "--out", str(tmp_path / "f.pt")]) != 0
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and why in err and "Traceback" not in err
        assert not (tmp_path / "f.pt").exists() and not cases_file(tmp_path / "f.pt").exists()


def test_train_refuses_a_proximal_term_without_a_start_and_another_model_over_a_checkpoint(
        trained: Path, tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["train", "--data", str(tiny_sites / "site-1"), "--epochs", "1"]
    assert main([*common, "--out", str(tmp_path / "a.pt"), "--proximal-mu", "0.1"]) != 0
    assert "needs a checkpoint to start from (init_from, --init-from)" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--init-from", str(trained), "--model-args", "base_channels=8"]) != 0
    assert f"init_from {trained} holds unet2d" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--init-from", str(trained), "--proximal-mu", "-1"]) != 0
    assert "--proximal-mu must be a number >= 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt")), "nothing written"
