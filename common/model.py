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


NORMS = ("batch", "instance", "group")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """A 2D normalisation layer: ``group`` (8 groups, FedLesion's default), ``batch`` (the
    reference U-Net's) or ``instance``.

    ``group`` and ``instance`` keep no running statistics, so a federated model behaves the same
    in training and evaluation whatever mix of sites its statistics would have come from, and
    everything a site sends is a parameter (which DP protects). Measured on the main job's
    non-IID synthetic sites, GroupNorm made FedAvg's global model converge instead of swinging
    between rounds (README "Why FedAvg lagged").
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, got '{kind}'.")


class DoubleConv(nn.Module):
    """(Conv3x3 -> norm -> ReLU) twice, the reference U-Net block."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """MaxPool by 2, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Bilinear upsampling by 2, pad to the skip's size, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, norm)

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
        norm: ``group`` (the default), ``batch`` (the reference's) or ``instance``; see :func:`norm_layer`.

    Raises:
        ValueError: when a width or the depth is not positive, or the norm is unknown.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 32, depth: int = 4,
                 norm: str = "group") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"UNet2D: norm must be one of {NORMS}, got '{norm}'.")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("depth", depth)):
            if value < 1:
                raise ValueError(f"UNet2D: {name} must be >= 1, got {value}.")
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], norm)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], norm) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], norm) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: 1x1 expand -> depthwise 3x3 -> squeeze-excite -> 1x1 project (+ skip)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_skip = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.Hardswish(inplace=True),
            SqueezeExcite(hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_skip else out


class SqueezeExcite(nn.Module):
    """Channel attention as in MobileNetV3, with a hard sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, max(channels // reduction, 8), 1), nn.ReLU(inplace=True),
            nn.Conv2d(max(channels // reduction, 8), channels, 1), nn.Hardsigmoid(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class UNet2DLite(nn.Module):
    """A lightweight 2D U-Net for real-time use: a MobileNetV3-style encoder of
    depthwise-separable inverted residuals, and a decoder of single depthwise-separable convs.

    Args:
        in_channels: number of input modalities.
        out_channels: number of output region channels.
        base_channels: width of the first level; each level doubles it.
        depth: number of down-sampling steps.
        expand: expansion ratio of the inverted residuals.

    Raises:
        ValueError: when a width, the depth or the expansion is not positive.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4, expand: int = 4) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_channels", base_channels), ("depth", depth), ("expand", expand)):
            if value < 1:
                raise ValueError(f"UNet2DLite: {name} must be >= 1, got {value}.")
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.Hardswish(inplace=True))
        self.downs = nn.ModuleList(
            nn.Sequential(InvertedResidual(widths[i], widths[i + 1], stride=2, expand=expand),
                          InvertedResidual(widths[i + 1], widths[i + 1], stride=1, expand=expand))
            for i in range(depth)
        )
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i + 1] + widths[i], widths[i + 1] + widths[i], 3, padding=1,
                          groups=widths[i + 1] + widths[i], bias=False),
                nn.Conv2d(widths[i + 1] + widths[i], widths[i], 1, bias=False),
                nn.BatchNorm2d(widths[i]), nn.ReLU(inplace=True),
            )
            for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([skip, x], dim=1))
        return self.outc(x)


def _levels(base_channels: int, depth: int, model: str) -> list[int]:
    if base_channels < 1 or depth < 1:
        raise ValueError(f"{model}: base_channels and depth must be >= 1, got {base_channels} and {depth}.")
    return [base_channels * 2**level for level in range(depth + 1)]


def unet3d(in_channels: int, out_channels: int, base_channels: int = 16, depth: int = 4) -> nn.Module:
    """A full 3D U-Net (MONAI ``UNet``): ``depth + 1`` levels, instance norm, residual units."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                channels=_levels(base_channels, depth, "unet3d"), strides=[2] * depth, num_res_units=2, norm="INSTANCE")


def dynunet(in_channels: int, out_channels: int, base_channels: int = 32, depth: int = 4) -> nn.Module:
    """nnU-Net's architecture (MONAI ``DynUNet``): 3x3x3 kernels, stride-2 levels, instance norm."""
    from monai.networks.nets import DynUNet

    filters = [min(f, 320) for f in _levels(base_channels, depth, "dynunet")]  # nnU-Net caps widths at 320
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=[3] * (depth + 1), strides=[1] + [2] * depth, upsample_kernel_size=[2] * depth,
                   filters=filters, norm_name="instance", res_block=True)


def segresnet(in_channels: int, out_channels: int, init_filters: int = 16, dropout_prob: float = 0.2) -> nn.Module:
    """MONAI ``SegResNet`` in NVIDIA's BraTS configuration (blocks 1-2-2-4 down, 1-1-1 up)."""
    from monai.networks.nets import SegResNet

    if init_filters < 8 or init_filters % 8 or not 0.0 <= dropout_prob < 1.0:
        raise ValueError(f"segresnet: init_filters must be a multiple of 8 (group norm) and dropout_prob in [0, 1), "
                         f"got {init_filters}, {dropout_prob}.")
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=init_filters,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=dropout_prob)


def swinunetr(in_channels: int, out_channels: int, feature_size: int = 24) -> nn.Module:
    """MONAI ``SwinUNETR``: a Swin Transformer encoder fused with a CNN decoder. Patches must be multiples of 32."""
    from monai.networks.nets import SwinUNETR

    if feature_size < 12 or feature_size % 12:
        raise ValueError(f"swinunetr: feature_size must be a positive multiple of 12, got {feature_size}.")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, spatial_dims=3)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model."""

    factory: Callable[..., nn.Module]
    spatial_dims: int  # 2: trained on slices, predicted slice by slice; 3: patches, sliding window
    defaults: dict[str, Any]


MODELS: dict[str, ModelEntry] = {
    "unet2d": ModelEntry(UNet2D, 2, {"base_channels": 32, "depth": 4, "norm": "group"}),
    "unet2d-lite": ModelEntry(UNet2DLite, 2, {"base_channels": 16, "depth": 4, "expand": 4}),
    "unet3d": ModelEntry(unet3d, 3, {"base_channels": 16, "depth": 4}),
    "dynunet": ModelEntry(dynunet, 3, {"base_channels": 32, "depth": 4}),
    "segresnet": ModelEntry(segresnet, 3, {"init_filters": 16, "dropout_prob": 0.2}),
    "swinunetr": ModelEntry(swinunetr, 3, {"feature_size": 24}),
}


def model_spatial_dims(name: str) -> int:
    """Return 2 or 3, the dimensionality a registered model works in."""
    return _entry(name).spatial_dims


# Bounds on what a run config or a checkpoint (another party's) may ask a site to build: the largest value of each
# integer argument, and of the parameter count (counted on torch's meta device, no memory, before anything is
# allocated; 100 M parameters are 400 MB in float32, six times the largest default, dynunet's 16.7 M).
MODEL_ARG_MAX: dict[str, int] = {"base_channels": 256, "init_filters": 256, "feature_size": 60, "depth": 8, "expand": 16}
MAX_PARAMETERS = 100_000_000


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
    args = resolved_model_args(name, **model_args)
    if not (1 <= in_channels <= 64 and 1 <= out_channels <= 64):
        raise ValueError(f"model '{name}': {in_channels} input and {out_channels} output channels; each must be 1 to 64.")
    factory = _entry(name).factory
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in factory(in_channels=in_channels, out_channels=out_channels, **args).parameters())
    except RuntimeError as exc:  # a network that reads values while it is built (SwinUNETR): its arguments' bounds hold
        if "meta" not in str(exc):
            raise
        size = 0
    if size > MAX_PARAMETERS:
        raise ValueError(f"model '{name}' with {args} would have {size:,} parameters, more than the {MAX_PARAMETERS:,} "
                         "a site builds.")
    return factory(in_channels=in_channels, out_channels=out_channels, **args)


def resolved_model_args(name: str, **model_args: Any) -> dict[str, Any]:
    """The full argument set a model is built with: its defaults updated by ``model_args``.

    Raises:
        ValueError: for an unknown model or argument name, a value of another type than the
            argument's default (an integer is accepted for a float), an integer outside 1 to its bound
            (:data:`MODEL_ARG_MAX`, else 1024) or a
            float outside ``[0, 1)`` (the only float arguments are dropout probabilities).
    """
    entry = _entry(name)
    unknown = set(model_args) - set(entry.defaults)
    if unknown:
        raise ValueError(
            f"model '{name}' takes no argument(s) {sorted(unknown)}; allowed: {sorted(entry.defaults)}."
        )
    resolved = dict(entry.defaults)
    for key, value in model_args.items():
        default = entry.defaults[key]
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise ValueError(f"model '{name}' argument {key}={value!r} must be {type(default).__name__} "
                             f"like its default {default!r}.")
        if isinstance(value, int) and not 1 <= value <= MODEL_ARG_MAX.get(key, 1024):
            raise ValueError(f"model '{name}' argument {key}={value} must be from 1 to {MODEL_ARG_MAX.get(key, 1024)}.")
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(f"model '{name}' argument {key}={value} must be in [0, 1).")
        resolved[key] = value
    return resolved


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)}.")
    return MODELS[name]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s BatchNorm layers: affine weights and running statistics.

    FedBN (Li et al., ICLR 2021) keeps exactly these at each site.
    """
    keys = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys += [f"{prefix}.{name}" if prefix else name for name in module.state_dict()]
    return keys
