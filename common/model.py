"""Segmentation networks, selected by name from a registry.

Every model takes ``(B, in_channels, *spatial)`` and returns logits of shape
``(B, out_channels, *spatial)``; one sigmoid channel per region.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    """(Conv3x3 -> BatchNorm -> ReLU) twice, the reference U-Net block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """MaxPool by 2, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Bilinear upsampling by 2, pad to the skip's size, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        # Odd input sizes lose a pixel when pooled; padding restores the skip's size.
        dy = skip.shape[-2] - x.shape[-2]
        dx = skip.shape[-1] - x.shape[-1]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """The reference 2D U-Net (Ronneberger et al. 2015, bilinear variant).

    Args:
        in_channels: number of input modalities.
        out_channels: number of output region channels.
        base_channels: width of the first level; each level doubles it.
        depth: number of down-sampling steps (the U has ``depth + 1`` levels).

    Raises:
        ValueError: when a width or the depth is not positive.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 32, depth: int = 4) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("depth", depth)):
            if value < 1:
                raise ValueError(f"UNet2D: {name} must be >= 1, got {value}.")
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model."""

    factory: Callable[..., nn.Module]
    spatial_dims: int  # 2: trained on slices, predicted slice by slice; 3: patches, sliding window
    defaults: dict[str, Any]


MODELS: dict[str, ModelEntry] = {
    "unet2d": ModelEntry(UNet2D, 2, {"base_channels": 32, "depth": 4}),
}


def model_spatial_dims(name: str) -> int:
    """Return 2 or 3, the dimensionality a registered model works in."""
    return _entry(name).spatial_dims


def build_model(name: str, in_channels: int, out_channels: int, **model_args: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of ``MODELS`` (``unet2d``, ...).
        in_channels: number of input modalities.
        out_channels: number of region channels.
        model_args: overrides of the model's defaults; unknown names are an error.

    Returns:
        The initialised ``nn.Module``.

    Raises:
        ValueError: for an unknown model name or argument.
    """
    entry = _entry(name)
    unknown = set(model_args) - set(entry.defaults)
    if unknown:
        raise ValueError(
            f"model '{name}' takes no argument(s) {sorted(unknown)}; allowed: {sorted(entry.defaults)}."
        )
    return entry.factory(in_channels=in_channels, out_channels=out_channels, **{**entry.defaults, **model_args})


def resolved_model_args(name: str, **model_args: Any) -> dict[str, Any]:
    """The full argument set a model is built with: its defaults updated by ``model_args``."""
    return {**_entry(name).defaults, **model_args}


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}.")
    return MODELS[name]
