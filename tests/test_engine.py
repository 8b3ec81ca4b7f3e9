from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedlesion.common import engine
from fedlesion.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, state_dict_from_arrays
from fedlesion.common.data import LAYOUTS, PreparedCase, load_site, regions_from_labels
from fedlesion.common.engine import TrainConfig, evaluate, predict_probabilities, probabilities_to_labels, select_device, train
from fedlesion.common.losses import build_loss
from fedlesion.common.model import build_model
from fedlesion.common.postprocess import PostProcessing

BRATS = LAYOUTS["brats2021"]
RAW = PostProcessing(enabled=False, min_mm3=0.0, components=0)  # painting alone: these lesions are a few voxels


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("unet2d", 4, 3, base_channels=4, depth=2)


def test_training_lowers_the_loss_and_scores_cases(tiny_sites: Path) -> None:
    cases = load_site(tiny_sites / "site-2").cases
    model = _tiny_model()
    config = TrainConfig(epochs=4, steps=0, batch_size=8, learning_rate=3e-3, samples_per_case=8, seed=0)
    losses: list[float] = []
    stats = train(model, cases, 2, config, torch.device("cpu"), progress=lambda e, loss: losses.append(loss))
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert stats["train-samples"] == 4 * 4 * 8
    per_case, summary = evaluate(model, cases[:2], BRATS, 2, torch.device("cpu"))
    assert [c["case"] for c in per_case] == [c.case for c in cases[:2]]
    assert set(summary) == {"WT", "TC", "ET"} and 0.0 <= summary["WT"]["dice_mean"] <= 1.0


def test_proximal_term_keeps_weights_near_the_global_model(tiny_sites: Path) -> None:
    cases = load_site(tiny_sites / "site-1").cases
    drift = {}
    for mu in (0.0, 10.0):
        model = _tiny_model()
        start = [p.detach().clone() for p in model.parameters()]
        train(model, cases, 2, TrainConfig(epochs=2, batch_size=4, samples_per_case=4, proximal_mu=mu, seed=0), torch.device("cpu"))
        drift[mu] = sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[10.0] < drift[0.0]


def test_whole_volume_prediction_shape() -> None:
    model = _tiny_model()
    probs = predict_probabilities(model, np.random.rand(4, 20, 24, 7).astype(np.float32), 2, torch.device("cpu"), slice_batch=3)
    assert probs.shape == (3, 20, 24, 7) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_regions_turn_back_into_brats_labels() -> None:
    probs = np.zeros((3, 4, 1, 1), np.float32)
    probs[0, 0:3] = 1  # WT covers voxels 0..2
    probs[1, 1:3] = 1  # TC covers 1..2
    probs[2, 2] = 1  # ET covers 2
    labels = probabilities_to_labels(probs, BRATS, (1.0, 1.0, 1.0), RAW)
    assert labels[:, 0, 0].tolist() == [2, 1, 4, 0]


def test_evaluation_scores_the_label_map_that_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """ET predicted outside TC is written as label 4, which is WT and TC too: that is what is scored."""
    probs = np.zeros((3, 6, 1, 1), np.float32)
    probs[0, 0:3] = 1  # WT: voxels 0..2
    probs[1, 1:3] = 1  # TC: voxels 1..2
    probs[2, [2, 4]] = 1  # ET: voxel 2, and voxel 4 outside WT and TC
    written = probabilities_to_labels(probs, BRATS, (1.0, 1.0, 1.0), RAW)
    assert written[:, 0, 0].tolist() == [2, 1, 4, 0, 4, 0]
    header = nib.Nifti1Header()
    header.set_data_shape((6, 1, 1))
    case = PreparedCase(case="c", image=np.zeros((4, 6, 1, 1), np.float32), regions=regions_from_labels(written, BRATS),
                        affine=np.eye(4), header=header, original_shape=(6, 1, 1),
                        ornt=nib.orientations.axcodes2ornt("RAS"), crop=((0, 6), (0, 1), (0, 1)))
    monkeypatch.setattr(engine, "predict_probabilities", lambda *args, **kwargs: torch.from_numpy(probs))
    per_case, _ = evaluate(_tiny_model(), [case], BRATS, 2, torch.device("cpu"), postprocessing=RAW)
    for region in BRATS.regions:
        assert per_case[0][region]["dice"] == 1.0, region  # the thresholded channels: WT 6/7, TC 4/5
    np.testing.assert_array_equal(engine.predicted_regions(probs, BRATS, case.spacing, RAW), case.regions)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _tiny_model()
    path = save_checkpoint(Checkpoint("unet2d", {"base_channels": 4, "depth": 2}, BRATS, model.state_dict(),
                                      round=3, run_config={"seed": 0}), tmp_path / "c.pt")
    loaded = load_checkpoint(path)
    assert loaded.round == 3 and loaded.spec == BRATS and loaded.spatial_dims == 2
    rebuilt = loaded.build()
    x = torch.randn(1, 4, 16, 16)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(model(x), rebuilt(x))
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: (cannot be read|refused)"):
        load_checkpoint(junk)


def test_state_dict_from_arrays_checks_shapes() -> None:
    model = _tiny_model()
    arrays = [v.numpy() for v in model.state_dict().values()]
    assert list(state_dict_from_arrays(model, arrays)) == list(model.state_dict())
    arrays[0] = np.zeros((1, 1))
    with pytest.raises(ValueError, match="has shape"):
        state_dict_from_arrays(model, arrays)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs must be >= 1"), ({"learning_rate": 0}, "learning_rate must be > 0"),
     ({"proximal_mu": -1}, "proximal_mu must be >= 0")],
)
def test_bad_train_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"focal_gamma": -1}, "focal_gamma"), ({"focal_alpha": 2}, "focal_alpha"), ({"lambda_dice": 0, "lambda_focal": 0}, "loss weights")],
)
def test_bad_loss_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_loss(**kwargs)


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


@pytest.mark.parametrize("model_name, shape", [("unet2d", (4, 10, 13, 5)), ("unet3d", (4, 10, 13, 9))])
def test_a_volume_smaller_than_the_pooling_needs_is_padded_and_cropped_back(model_name: str, shape: tuple) -> None:
    """The default-depth U-Nets pool four times; a 10 x 13 crop once aborted a whole evaluation."""
    torch.manual_seed(0)
    model = build_model(model_name, 4, 3, base_channels=4)  # default depth 4
    probs = predict_probabilities(model, np.random.default_rng(0).normal(size=shape).astype(np.float32),
                                  2 if model_name == "unet2d" else 3, torch.device("cpu"), patch_size=(32, 32, 32))
    assert tuple(probs.shape) == (3, *shape[1:]) and torch.isfinite(probs).all()


@pytest.mark.parametrize("model_name, args", [("unet3d", {"base_channels": 2}), ("dynunet", {"base_channels": 2}),
                                              ("segresnet", {"init_filters": 8})])
def test_a_3d_volume_between_the_minimum_and_the_patch_is_predicted_whole(model_name: str, args: dict) -> None:
    """Sides of 50, 40 and 36 (a cropped brain) once cut the window to sizes no U-Net's skips could join."""
    torch.manual_seed(0)
    model = build_model(model_name, 4, 3, **args)
    probs = predict_probabilities(model, np.random.default_rng(0).normal(size=(4, 50, 40, 36)).astype(np.float32), 3,
                                  torch.device("cpu"), patch_size=(64, 64, 64))
    assert tuple(probs.shape) == (3, 50, 40, 36) and torch.isfinite(probs).all()


def test_training_on_small_crops_pads_them(tiny_sites: Path) -> None:
    cases = load_site(tiny_sites / "site-2").cases
    small = [replace(c.load(), image=c.image[:, :9, :11], regions=c.regions[:, :9, :11]) for c in cases]
    torch.manual_seed(0)
    model = build_model("unet2d", 4, 3, base_channels=4)  # depth 4 needs 16 x 16
    stats = train(model, small, 2, TrainConfig(epochs=1, batch_size=4, samples_per_case=2, seed=0), torch.device("cpu"))
    assert np.isfinite(stats["train-loss"])


def test_training_stops_at_a_non_finite_loss(tiny_sites: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "build_loss", lambda *args: (lambda logits, label: logits.mean() * float("nan")))
    with pytest.raises(engine.TrainingDiverged, match="training diverged: the loss is nan at epoch 1, step 1"):
        train(_tiny_model(), load_site(tiny_sites / "site-2").cases, 2,
              TrainConfig(epochs=1, batch_size=4, samples_per_case=2, seed=0), torch.device("cpu"))


@pytest.mark.parametrize("field", ["learning_rate", "pos_ratio", "lambda_dice"])
def test_train_config_refuses_non_finite_values(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        TrainConfig(**{field: float("inf")})


def test_a_fixmatch_setting_that_leaves_no_voxel_confident_is_refused() -> None:
    with pytest.raises(ValueError, match="leaves no voxel confident"):
        TrainConfig(fixmatch_threshold=1.0, fixmatch_negative_share=0.0)
    assert TrainConfig(fixmatch_threshold=0.9, fixmatch_negative_share=0.0).fixmatch_threshold == 0.9, "tau alone"
    # The soft loss uses neither tau nor the share, so it needs neither.
    assert TrainConfig(fixmatch_threshold=1.0, fixmatch_negative_share=0.0, fixmatch_loss="soft").fixmatch_loss == "soft"


@pytest.mark.parametrize("settings, message", [
    ({"fixmatch_teacher": "oracle"}, "fixmatch_teacher must be one of"),
    ({"fixmatch_loss": "kl"}, "fixmatch_loss must be one of"),
    ({"fixmatch_ema_decay": 1.0}, "fixmatch_ema_decay must be in"),
    ({"fixmatch_ema_decay": -0.1}, "fixmatch_ema_decay must be in"),
])
def test_train_config_refuses_unknown_fixmatch_variants(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_training_with_the_same_seed_gives_the_same_model(tiny_sites: Path) -> None:
    """The augmentation draws from the run's seed, whatever MONAI's global seed (a Compose wrapping the
    pipeline reseeds it from there): two runs with one seed train the same weights; another seed does not."""
    cases = load_site(tiny_sites / "site-1").cases

    def trained(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
        train(model, cases, 2, TrainConfig(epochs=1, steps=3, batch_size=2, samples_per_case=4, seed=seed),
              torch.device("cpu"))
        return model.state_dict()

    first, second, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_reading_cases_lazily_draws_the_same_samples_as_arrays_in_memory(tiny_sites: Path) -> None:
    """The lazy reader is one more, non-random step of the same pipeline: every random transform draws the
    seeds it drew when the arrays were the dataset's items (results stay reproducible across versions)."""
    from monai.data import DataLoader, Dataset

    from fedlesion.common.engine import _training_loader
    from fedlesion.common.transforms import training_transforms

    cases = load_site(tiny_sites / "site-2").cases
    config = TrainConfig(epochs=1, batch_size=4, samples_per_case=3, seed=5)
    lazy = next(iter(_training_loader(cases, 2, config)))
    transform = training_transforms(2, tuple(max(16, *(c.shape[a] for c in cases)) for a in (1, 2)), config.pos_ratio)
    transform.set_random_state(seed=5)
    items = [{"image": c.image, "label": c.regions} for c in cases for _ in range(3)]
    generator = torch.Generator()
    generator.manual_seed(5)
    eager = next(iter(DataLoader(Dataset(items, transform=transform), batch_size=4, shuffle=True, generator=generator,
                                 drop_last=True)))
    assert torch.equal(torch.as_tensor(lazy["image"]), torch.as_tensor(eager["image"]))
    assert torch.equal(torch.as_tensor(lazy["label"]), torch.as_tensor(eager["label"]))
