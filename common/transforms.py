"""Mask-aware training transforms built from MONAI dictionary transforms.

Every spatial transform acts on ``image`` and ``label`` together, with one random draw,
so the mask always stays on the lesion; intensity jitter touches the image alone.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    SqueezeDimd,
)

KEYS = ("image", "label")
MODES = ("bilinear", "nearest")  # labels are resampled without mixing values


class ApplyIfLesiond(Randomizable, MapTransform):
    """Apply ``transform`` only to samples whose label holds lesion.

    Used for the stronger affine that the reference applies to lesion samples only.
    """

    def __init__(self, transform: Randomizable, label_key: str = "label") -> None:
        MapTransform.__init__(self, keys=[label_key])
        self.transform = transform
        self.label_key = label_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ApplyIfLesiond:
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the wrapped transform draws its own values
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        if bool(torch.as_tensor(data[self.label_key]).any()):
            return self.transform(data)
        return dict(data)


def training_transforms(
    spatial_dims: int,
    sample_size: tuple[int, ...],
    pos_ratio: float = 0.67,
    augment: bool = True,
) -> Compose:
    """Sampling plus augmentation for one training sample.

    Args:
        spatial_dims: 2 samples one axial slice ``(C, X, Y)``; 3 samples a patch ``(C, X, Y, Z)``.
        sample_size: the sample's spatial size: for 2D the largest in-plane size of the
            cases (smaller slices are zero-padded to it), for 3D the patch size. The
            lesion-sample affine translates by up to 10% of it.
        pos_ratio: fraction of samples centred on lesion (the rest on any other voxel).
        augment: add flips, rotation, lesion-only affine and intensity jitter.

    Returns:
        A MONAI ``Compose`` taking ``{"image": (C, X, Y, Z), "label": (R, X, Y, Z)}``.

    Raises:
        ValueError: for ``spatial_dims`` not 2 or 3, a ``sample_size`` of the wrong
            length, or ``pos_ratio`` outside [0, 1].
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if not 0.0 <= pos_ratio <= 1.0:
        raise ValueError(f"pos_ratio must be in [0, 1], got {pos_ratio}.")
    if len(sample_size) != spatial_dims:
        raise ValueError(f"sample_size must have {spatial_dims} values, got {tuple(sample_size)}.")
    size = (-1, -1, 1) if spatial_dims == 2 else tuple(sample_size)
    steps: list[Any] = [
        RandCropByPosNegLabeld(
            keys=KEYS, label_key="label", spatial_size=size, pos=pos_ratio, neg=1.0 - pos_ratio,
            num_samples=1, allow_smaller=True,
        ),
    ]
    if spatial_dims == 2:
        steps.append(SqueezeDimd(keys=KEYS, dim=-1))
    # Cases cropped to their brain differ in size: pad every sample to one size so they batch.
    steps.append(SpatialPadd(keys=KEYS, spatial_size=tuple(sample_size)))
    if augment:
        small = math.radians(15)
        large = math.radians(30)
        steps += [
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandRotated(keys=KEYS, range_x=small, range_y=0.0 if spatial_dims == 2 else small,
                        range_z=0.0 if spatial_dims == 2 else small, prob=0.5, mode=MODES, padding_mode="zeros"),
            ApplyIfLesiond(RandAffined(
                keys=KEYS, prob=0.5, rotate_range=large if spatial_dims == 2 else (large, large, large),
                translate_range=[0.1 * s for s in sample_size], scale_range=0.2, mode=MODES, padding_mode="zeros",
            )),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
        ]
    return Compose(steps)


def unlabelled_transforms(spatial_dims: int, sample_size: tuple[int, ...], targets: Sequence[str] = ()) -> Compose:
    """Sampling plus FixMatch's weak view for one unlabelled sample: a slice (2D) or patch (3D) centred on
    the brain (its nonzero voxels; there is no lesion mask to centre on), padded like the labelled
    samples, flipped and slightly rotated.

    Args:
        targets: keys of volumes that move with the image (an offline teacher's pseudo-label codes): cropped,
            padded (0), flipped and rotated alike, rotated nearest-neighbour.

    Returns:
        A MONAI ``Compose`` taking ``{"image": (C, X, Y, Z), "brain": (1, X, Y, Z), *targets}`` and giving
        ``{"image", *targets}``.

    Raises:
        ValueError: for ``spatial_dims`` not 2 or 3 or a ``sample_size`` of the wrong length.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if len(sample_size) != spatial_dims:
        raise ValueError(f"sample_size must have {spatial_dims} values, got {tuple(sample_size)}.")
    moved = ("image", *targets)
    keys = (*moved, "brain")
    size = (-1, -1, 1) if spatial_dims == 2 else tuple(sample_size)
    steps: list[Any] = [RandCropByPosNegLabeld(keys=keys, label_key="brain", spatial_size=size, pos=1.0, neg=0.0,
                                               num_samples=1, allow_smaller=True)]
    if spatial_dims == 2:
        steps.append(SqueezeDimd(keys=keys, dim=-1))
    small = math.radians(10)
    steps += [
        DeleteItemsd(keys="brain"),
        SpatialPadd(keys=moved, spatial_size=tuple(sample_size)),
        RandFlipd(keys=moved, prob=0.5, spatial_axis=0),
        RandFlipd(keys=moved, prob=0.5, spatial_axis=1),
        RandRotated(keys=moved, range_x=small, range_y=0.0 if spatial_dims == 2 else small,
                    range_z=0.0 if spatial_dims == 2 else small, prob=0.5, padding_mode="zeros",
                    mode=("bilinear", *("nearest" for _ in targets))),
    ]
    return Compose(steps)


STRONG_KEYS = ("image", "pseudo", "mask")  # the weak view, its pseudo-label, and where that label is confident


def strong_transforms(spatial_dims: int, sample_size: tuple[int, ...]) -> Compose:
    """FixMatch's strong view of a weak one: one random affine moves the image, its pseudo-label and its
    confidence mask together (nearest-neighbour for the two masks, zeros outside: no loss there), then
    intensity changes touch the image alone: contrast (gamma), bias field, noise, blur, scaling.

    Returns:
        A MONAI ``Compose`` taking and giving ``{"image", "pseudo", "mask"}`` of one sample ``(C, *spatial)``.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    large = math.radians(30)
    return Compose([
        RandAffined(keys=STRONG_KEYS, prob=0.8, rotate_range=large if spatial_dims == 2 else (large, large, large),
                    translate_range=[0.1 * s for s in sample_size], scale_range=(0.2,) * spatial_dims,
                    mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", gamma=(0.6, 1.6), prob=0.5),
        RandBiasFieldd(keys="image", coeff_range=(0.0, 0.2), prob=0.4),
        RandGaussianNoised(keys="image", std=0.15, prob=0.5),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.2), sigma_y=(0.5, 1.2), sigma_z=(0.5, 1.2), prob=0.3),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.5),
    ])
