from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlesion.common.transforms import strong_transforms, training_transforms, unlabelled_transforms


def _lesion_volume(seed: int, shape: tuple[int, int, int] = (48, 48, 12)) -> dict[str, torch.Tensor]:
    """An image whose lesion is defined by intensity (10 inside, 1 elsewhere), and its mask."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = rng.uniform([12, 12, 3], [36, 36, 9])
    radius = rng.uniform(5, 9)
    lesion = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 2) ** 2) < radius**2
    image = np.where(lesion, 10.0, 1.0).astype(np.float32)
    return {"image": torch.from_numpy(np.stack([image, image])), "label": torch.from_numpy(lesion[None].astype(np.float32))}


def _agreement(sample: dict[str, torch.Tensor]) -> float:
    """Dice between the voxels the image marks as lesion and the mask."""
    image = sample["image"][0]
    lo, hi = float(image.min()), float(image.max())
    from_image = image > (lo + hi) / 2
    mask = sample["label"][0] > 0.5
    total = int(from_image.sum() + mask.sum())
    return 1.0 if total == 0 else 2.0 * int((from_image & mask).sum()) / total


@pytest.mark.parametrize("spatial_dims, size", [(2, (48, 48)), (3, (32, 32, 8))])
def test_mask_follows_the_image_through_every_augmentation(spatial_dims: int, size: tuple[int, ...]) -> None:
    transform = training_transforms(spatial_dims, size, pos_ratio=1.0, augment=True)
    transform.set_random_state(seed=0)
    scores = []
    for seed in range(40):
        out = transform(_lesion_volume(seed))
        out = out[0] if isinstance(out, list) else out
        assert out["image"].shape[1:] == out["label"].shape[1:] == size
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}, "labels are never interpolated"
        if out["label"].any():
            scores.append(_agreement(out))
    assert len(scores) >= 30
    # Bilinear resampling blurs only the image's edge by a voxel; the mask stays on it. (Separate random affines for
    # image and mask, the reference snippet's bug, score a mean of 0.40 and a minimum of 0 on these volumes.)
    assert min(scores) > 0.8 and float(np.mean(scores)) > 0.9


def test_lesion_aware_sampling_ratio() -> None:
    transform = training_transforms(2, (48, 48), pos_ratio=0.9, augment=False)
    transform.set_random_state(seed=1)
    hits = [bool(transform(_lesion_volume(0))[0]["label"].any()) for _ in range(100)]
    assert sum(hits) >= 80


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 4, "sample_size": (1, 2, 3, 4)}, "spatial_dims must be 2 or 3"),
        ({"spatial_dims": 2, "sample_size": (32, 32), "pos_ratio": 1.5}, "pos_ratio must be in"),
        ({"spatial_dims": 3, "sample_size": (32, 32)}, "sample_size must have 3 values"),
    ],
)
def test_bad_transform_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        training_transforms(**kwargs)


def _strong_agreement(out: dict[str, torch.Tensor]) -> float:
    """Dice, over confident voxels, between the voxels the strong view's image marks as lesion and its pseudo-label
    (a robust midpoint: noise, bias field and contrast change the intensities, not which voxels are bright)."""
    image, inside = torch.as_tensor(out["image"][0]), torch.as_tensor(out["mask"][0]) > 0.5
    values = image[inside]
    lo, hi = float(torch.quantile(values, 0.02)), float(torch.quantile(values, 0.995))
    from_image = (image > (lo + hi) / 2) & inside
    pseudo = (torch.as_tensor(out["pseudo"][0]) > 0.5) & inside
    total = int(from_image.sum() + pseudo.sum())
    return 1.0 if total == 0 else 2.0 * int((from_image & pseudo).sum()) / total


def _weak_view(seed: int, spatial_dims: int) -> dict[str, torch.Tensor]:
    data = _lesion_volume(seed)
    if spatial_dims == 2:
        data = {key: value[..., 6] for key, value in data.items()}
    regions = data["label"].repeat(3, *[1] * spatial_dims)  # three region channels, as BraTS
    return {"image": data["image"], "pseudo": regions, "mask": torch.ones_like(regions)}


@pytest.mark.parametrize("spatial_dims, size", [(2, (48, 48)), (3, (48, 48, 12))])
def test_the_strong_view_moves_the_pseudo_label_with_the_image(spatial_dims: int, size: tuple[int, ...]) -> None:
    """FixMatch's strong view: intensity-defined lesions stay under the transformed pseudo-label, whatever the draw."""
    transform = strong_transforms(spatial_dims, size)
    transform.set_random_state(seed=0)
    scores, moved = [], 0
    for seed in range(40):
        weak = _weak_view(seed, spatial_dims)
        out = transform(weak)
        assert set(torch.unique(torch.as_tensor(out["pseudo"])).tolist()) <= {0.0, 1.0}, "never interpolated"
        assert set(torch.unique(torch.as_tensor(out["mask"])).tolist()) <= {0.0, 1.0}
        moved += not torch.equal(torch.as_tensor(out["pseudo"]), weak["pseudo"])
        if torch.as_tensor(out["pseudo"]).any():
            scores.append(_strong_agreement(out))
    assert moved >= 20, "the strong view moves the sample"
    assert len(scores) >= 30 and min(scores) > 0.85 and float(np.mean(scores)) > 0.93


def test_a_pseudo_label_moved_by_its_own_draw_would_misalign() -> None:
    """Control for the property above: the same transforms, the image and the labels drawn independently."""
    image_only, labels_only = strong_transforms(2, (48, 48)), strong_transforms(2, (48, 48))
    image_only.set_random_state(seed=0)
    labels_only.set_random_state(seed=1000)
    scores = []
    for seed in range(40):
        weak = _weak_view(seed, 2)
        image = image_only(dict(weak))["image"]
        moved = labels_only(dict(weak))
        out = {"image": image, "pseudo": moved["pseudo"], "mask": torch.ones_like(torch.as_tensor(moved["mask"]))}
        if torch.as_tensor(out["pseudo"]).any():
            scores.append(_strong_agreement(out))
    assert float(np.mean(scores)) < 0.85


@pytest.mark.parametrize("spatial_dims, size", [(2, (48, 48)), (3, (32, 32, 8)), (2, (64, 64)), (3, (64, 64, 16))])
def test_the_weak_view_moves_an_offline_teachers_labels_with_the_image(spatial_dims: int, size: tuple[int, ...]) -> None:
    """An offline teacher's pseudo-label codes (0 not counted, 1 background, 2 lesion) travel through the weak view's
    crop, padding, flips and rotation with the image: intensity-defined lesions stay under them, they are never
    interpolated, and a voxel padded or rotated in is not counted."""
    transform = unlabelled_transforms(spatial_dims, size, ("pseudo",))
    transform.set_random_state(seed=0)
    scores, padded = [], 0
    for seed in range(40):
        data = _lesion_volume(seed)
        codes = (1 + data["label"]).repeat(3, 1, 1, 1).to(torch.uint8)  # every voxel counted
        out = transform({"image": data["image"], "brain": torch.ones_like(data["label"]), "pseudo": codes})
        out = out[0] if isinstance(out, list) else out
        image, pseudo = torch.as_tensor(out["image"]), torch.as_tensor(out["pseudo"])
        assert set(out) == {"image", "pseudo"} and pseudo.shape[1:] == image.shape[1:] == size
        assert set(torch.unique(pseudo).tolist()) <= {0.0, 1.0, 2.0}, "never interpolated"
        outside = (image == 0).all(dim=0)  # padded or rotated in: the image holds 0 there (1 or 10 elsewhere)
        assert (pseudo[:, outside] == 0).all() and (pseudo[:, ~outside] > 0).float().mean() > 0.85  # bilinear edges
        padded += bool(outside.any())
        if (pseudo == 2).any():
            scores.append(_agreement({"image": image, "label": (pseudo == 2).float()}))
    assert len(scores) >= 20 and min(scores) > 0.8 and float(np.mean(scores)) > 0.9
    if size[0] > 48:
        assert padded == 40
