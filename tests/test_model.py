from __future__ import annotations

import pytest
import torch

from fedlesion.common.model import MODELS, build_model, model_spatial_dims, resolved_model_args


@pytest.mark.parametrize("size", [(32, 32), (33, 45), (48, 40)])
def test_unet2d_output_matches_input_size(size: tuple[int, int]) -> None:
    model = build_model("unet2d", in_channels=4, out_channels=3, base_channels=4, depth=3)
    x = torch.randn(2, 4, *size)
    y = model(x)
    assert y.shape == (2, 3, *size)
    y.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet2d_width_and_depth_change_parameter_count() -> None:
    small = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    wide = build_model("unet2d", 4, 3, base_channels=8, depth=2)
    deep = build_model("unet2d", 4, 3, base_channels=4, depth=3)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(wide) and count(small) < count(deep)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("nonet", {}, "unknown model 'nonet'"),
        ("unet2d", {"width": 3}, "takes no argument"),
        ("unet2d", {"depth": 0}, "depth=0 must be from 1 to 8"),
        # What another party's run config or checkpoint may make a site build is bounded, before any allocation.
        ("unet2d", {"depth": 30}, "depth=30 must be from 1 to 8"),
        ("unet2d", {"base_channels": 100_000}, "base_channels=100000 must be from 1 to 256"),
        ("unet2d", {"base_channels": 256}, "would have 501,997,315 parameters"),
        ("dynunet", {"base_channels": 256, "depth": 8}, "more than the 100,000,000 a site builds"),
        ("unet2d", {"base_channels": "abc"}, "base_channels='abc' must be int"),
        ("unet2d", {"depth": 2.5}, "depth=2.5 must be int"),
        ("unet2d", {"norm": 3}, "norm=3 must be str"),
        ("segresnet", {"dropout_prob": 1.5}, "dropout_prob=1.5 must be in"),
    ],
)
def test_build_model_rejects_bad_arguments(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 4, 3, **kwargs)


def test_registry_reports_dimensions_and_defaults() -> None:
    assert "unet2d" in MODELS
    assert model_spatial_dims("unet2d") == 2
    assert resolved_model_args("unet2d", depth=2)["depth"] == 2


@pytest.mark.parametrize(
    "name, args, size",
    [
        ("unet2d-lite", {"base_channels": 4, "depth": 3}, (33, 40)),
        ("unet3d", {"base_channels": 4, "depth": 4}, (32, 32, 32)),
        ("dynunet", {"base_channels": 4, "depth": 3}, (32, 32, 16)),
        ("segresnet", {"init_filters": 8}, (32, 32, 16)),
        ("swinunetr", {"feature_size": 12}, (64, 64, 32)),
    ],
)
def test_every_model_runs_forward_and_backward(name: str, args: dict, size: tuple[int, ...]) -> None:
    model = build_model(name, in_channels=2, out_channels=3, **args)
    assert model_spatial_dims(name) == len(size)
    y = model(torch.randn(1, 2, *size))
    assert y.shape == (1, 3, *size)
    y.float().mean().backward()


def test_lite_model_is_much_smaller_than_the_reference() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("unet2d-lite", 4, 3)) * 3 < count(build_model("unet2d", 4, 3))


@pytest.mark.parametrize(
    "name, kwargs, match",
    [("swinunetr", {"feature_size": 10}, "multiple of 12"), ("unet3d", {"depth": 0}, "must be from 1 to 8"),
     ("swinunetr", {"feature_size": 72}, "feature_size=72 must be from 1 to 60"),
     ("segresnet", {"dropout_prob": 1.5}, "dropout_prob")],
)
def test_3d_models_validate_arguments(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 4, 3, **kwargs)


@pytest.mark.parametrize("norm, layer", [("batch", torch.nn.BatchNorm2d), ("instance", torch.nn.InstanceNorm2d),
                                         ("group", torch.nn.GroupNorm)])
def test_unet2d_normalisation_is_selectable(norm: str, layer: type) -> None:
    model = build_model("unet2d", 4, 3, base_channels=8, depth=2, norm=norm)
    assert any(isinstance(m, layer) for m in model.modules())
    assert model(torch.randn(2, 4, 32, 32)).shape == (2, 3, 32, 32)
    has_statistics = any(k.endswith("running_mean") for k in model.state_dict())
    assert has_statistics == (norm == "batch")


def test_unknown_normalisation_is_refused() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("unet2d", 4, 3, norm="layer")
