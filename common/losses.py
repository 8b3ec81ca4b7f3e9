"""Dice + focal loss over sigmoid region channels, from MONAI."""

from __future__ import annotations

import torch
from monai.losses import DiceFocalLoss, FocalLoss, MaskedDiceLoss
from torch import nn


def build_loss(
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    focal_gamma: float = 2.0,
    focal_alpha: float | None = 0.75,
) -> DiceFocalLoss:
    """The reference loss: soft Dice plus focal loss, one sigmoid channel per region.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_focal: weight of the focal term.
        focal_gamma: focusing parameter (reference: 2).
        focal_alpha: weight of the positive class in the focal term (reference: 0.75),
            or ``None`` for no class weighting.

    Returns:
        A loss taking logits and targets of shape ``(B, R, *spatial)``.

    Raises:
        ValueError: for negative weights or gamma, or alpha outside [0, 1].
    """
    if lambda_dice < 0 or lambda_focal < 0 or lambda_dice + lambda_focal == 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, got dice={lambda_dice}, focal={lambda_focal}.")
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}.")
    if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
        raise ValueError(f"focal_alpha must be in [0, 1] or None, got {focal_alpha}.")
    return DiceFocalLoss(
        sigmoid=True,
        lambda_dice=lambda_dice,
        lambda_focal=lambda_focal,
        gamma=focal_gamma,
        alpha=focal_alpha,
        smooth_nr=1e-5,
        smooth_dr=1e-5,
    )


class UnlabelledLoss(nn.Module):
    """FixMatch's unlabelled loss for segmentation: the same Dice + focal terms, between the strong
    view's logits and the weak view's pseudo-label, counted only where ``mask`` is 1 (confident voxels).

    Dice is MONAI's ``MaskedDiceLoss`` per region channel (each region has its own confident voxels),
    pooled over the batch (one slice's empty pseudo-label does not dominate); focal is MONAI's
    ``FocalLoss`` per voxel, averaged over the confident voxels. A voxel with mask 0 has no gradient.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_focal: float = 1.0, focal_gamma: float = 2.0,
                 focal_alpha: float | None = 0.75) -> None:
        super().__init__()
        build_loss(lambda_dice, lambda_focal, focal_gamma, focal_alpha)  # the same checks as the supervised loss
        self.lambda_dice, self.lambda_focal = lambda_dice, lambda_focal
        self.dice = MaskedDiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.focal = FocalLoss(use_softmax=False, gamma=focal_gamma, alpha=focal_alpha, reduction="none")

    def forward(self, logits: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: ``(B, R, *spatial)`` logits, pseudo-labels (0/1) and confidence mask (0/1)."""
        dice = torch.stack([self.dice(logits[:, r:r + 1], pseudo[:, r:r + 1], mask[:, r:r + 1])
                            for r in range(logits.shape[1])]).mean()
        focal = (self.focal(logits, pseudo) * mask).sum() / mask.sum().clamp_min(1.0)
        return self.lambda_dice * dice + self.lambda_focal * focal


class ConsistencyLoss(nn.Module):
    """The mean teacher's unlabelled loss (Tarvainen & Valpola, NeurIPS 2017; Yu et al., MICCAI 2019 for
    segmentation): the mean squared error between the strong view's probabilities and the teacher's
    probabilities on the weak view (moved with it), over the voxels where ``mask`` is 1 (the brain, inside
    the view). Unlike :class:`UnlabelledLoss` no voxel is thresholded, so no region's pseudo-labels outweigh
    the others', and an uncertain voxel pulls towards the teacher's uncertainty rather than towards 0 or 1.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: ``(B, R, *spatial)`` logits, the teacher's probabilities and the mask (0/1)."""
        error = nn.functional.mse_loss(torch.sigmoid(logits), target, reduction="none")
        return (error * mask).sum() / mask.sum().clamp_min(1.0)
