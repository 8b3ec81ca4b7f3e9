from __future__ import annotations

import pytest
import torch

from common.model import MODELS, build_model, model_spatial_dims, resolved_model_args


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
        ("unet2d", {"depth": 0}, "depth must be >= 1"),
    ],
)
def test_build_model_rejects_bad_arguments(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 4, 3, **kwargs)


def test_registry_reports_dimensions_and_defaults() -> None:
    assert "unet2d" in MODELS
    assert model_spatial_dims("unet2d") == 2
    assert resolved_model_args("unet2d", depth=2)["depth"] == 2
