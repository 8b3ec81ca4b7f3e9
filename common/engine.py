"""Training, evaluation and inference loops shared by the CLI, the clients and the server."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from torch import nn

from .data import DatasetSpec, PreparedCase
from .losses import build_loss
from .metrics import region_metrics, summarize
from .transforms import training_transforms



@dataclass
class TrainConfig:
    """Local training settings; the federated run config maps onto these fields."""

    epochs: int = 1  # passes over the site's cases per call (per federated round)
    batch_size: int = 16  # slices (2D) or patches (3D) per optimiser step
    learning_rate: float = 1e-3  # Adam; the server may send a per-round value
    weight_decay: float = 1e-5
    samples_per_case: int = 16  # slices/patches drawn from each case per epoch
    pos_ratio: float = 0.67  # fraction of samples centred on lesion (lesion-aware sampling)
    patch_size: tuple[int, int, int] = (96, 96, 96)  # 3D models only
    augment: bool = True
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_gamma: float = 2.0  # reference value
    focal_alpha: float = 0.75  # reference value
    proximal_mu: float = 0.0  # FedProx: weight of ||w - w_global||^2 / 2; 0 disables it
    num_workers: int = 0  # DataLoader workers; 0 keeps simulation clients to one process
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "samples_per_case"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig: learning_rate must be > 0, got {self.learning_rate}.")
        if self.proximal_mu < 0:
            raise ValueError(f"TrainConfig: proximal_mu must be >= 0, got {self.proximal_mu}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate(base: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """The learning rate of ``server_round`` (1-based): what the server sends sites each round,
    and what pooled and local-only baselines use per ``local-epochs`` epochs.

    Args:
        base: the configured ``learning-rate``.
        schedule: ``constant``, or ``cosine`` (from ``base`` down to 5% of it at the last round).

    Raises:
        ValueError: for an unknown schedule.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = (server_round - 1) / max(num_rounds - 1, 1)
        return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"lr-schedule '{schedule}' is unknown; choose 'constant' or 'cosine'.")


def select_device(preference: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` force one.

    Raises:
        ValueError: when CUDA is asked for but absent, or the name is unknown.
    """
    if preference in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{preference}' was asked for but CUDA is not available; use 'auto' or 'cpu'.")
    try:
        return torch.device(preference)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{preference}'; use 'auto', 'cpu' or 'cuda[:N]'.") from exc


def autocast(device: torch.device) -> Any:
    """Mixed precision (float16) on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def _training_loader(cases: Sequence[PreparedCase], spatial_dims: int, config: TrainConfig) -> DataLoader:
    if spatial_dims == 2:
        sample_size = tuple(max(c.image.shape[axis] for c in cases) for axis in (1, 2))
    else:
        sample_size = config.patch_size
    transform = training_transforms(spatial_dims, tuple(sample_size), config.pos_ratio, config.augment)
    if config.seed is not None:
        transform.set_random_state(seed=config.seed)
    # Each case appears samples_per_case times; each appearance draws a fresh slice/patch.
    items = [{"image": c.image, "label": c.regions} for c in cases if c.regions is not None
             for _ in range(config.samples_per_case)]
    generator = torch.Generator()
    if config.seed is not None:
        generator.manual_seed(config.seed)
    return DataLoader(
        Dataset(items, transform=transform), batch_size=config.batch_size, shuffle=True,
        num_workers=config.num_workers, generator=generator, drop_last=len(items) > config.batch_size,
    )


def train(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    spatial_dims: int,
    config: TrainConfig,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on labelled cases.

    Args:
        model: the network, already on ``device``.
        cases: training cases (unlabelled ones are ignored).
        spatial_dims: 2 (slices) or 3 (patches).
        config: the settings.
        device: where to train; CUDA uses float16 mixed precision.
        progress: called after each epoch with ``(epoch, mean loss)``.

    Returns:
        ``{"train-loss": mean loss of the last epoch, "train-samples": samples seen, "train-seconds": wall time}``.

    Raises:
        ValueError: when no case has a label.
    """
    labelled = [c for c in cases if c.regions is not None]
    if not labelled:
        raise ValueError("no labelled training case to train on.")
    loader = _training_loader(labelled, spatial_dims, config)
    loss_fn = build_loss(config.lambda_dice, config.lambda_focal, config.focal_gamma, config.focal_alpha)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    model.train()
    start, seen, epoch_loss = time.perf_counter(), 0, float("nan")
    for epoch in range(1, config.epochs + 1):
        total, batches = 0.0, 0
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True).float()
            label = batch["label"].to(device, non_blocking=True).float()
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                loss = loss_fn(model(image), label)
            if anchor is not None:
                proximal = sum((p.float() - a.float()).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * config.proximal_mu * proximal
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach())
            batches += 1
            seen += image.shape[0]
        epoch_loss = total / max(batches, 1)
        if progress is not None:
            progress(epoch, epoch_loss)
    return {"train-loss": epoch_loss, "train-samples": float(seen), "train-seconds": time.perf_counter() - start}


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    spatial_dims: int,
    device: torch.device,
    slice_batch: int = 32,
    patch_size: Sequence[int] = (96, 96, 96),
    overlap: float = 0.5,
) -> torch.Tensor:
    """Region probabilities for one whole volume.

    Args:
        model: the network, on ``device``.
        image: ``(C, X, Y, Z)`` preprocessed volume.
        spatial_dims: 2 predicts axial slices in batches; 3 uses sliding windows with Gaussian blending.
        device: where to run; CUDA uses float16 mixed precision.
        slice_batch: slices per forward pass (2D) or windows per pass (3D).
        patch_size: the window size (3D).
        overlap: window overlap (3D).

    Returns:
        ``(R, X, Y, Z)`` float32 probabilities on the CPU.
    """
    model.eval()
    volume = torch.as_tensor(image).to(device, non_blocking=True).float()
    with autocast(device):
        if spatial_dims == 2:
            slices = volume.permute(3, 0, 1, 2)  # (Z, C, X, Y)
            out = torch.cat([torch.sigmoid(model(slices[i:i + slice_batch]).float())
                             for i in range(0, slices.shape[0], slice_batch)])
            probs = out.permute(1, 2, 3, 0)
        else:
            window = [min(p, s) for p, s in zip(patch_size, volume.shape[1:])]
            logits = sliding_window_inference(volume[None], window, slice_batch, model, overlap=overlap, mode="gaussian")
            probs = torch.sigmoid(logits[0].float())
    return probs.float().cpu()


def evaluate(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    regions: Sequence[str],
    spatial_dims: int,
    device: torch.device,
    threshold: float = 0.5,
    patch_size: Sequence[int] = (96, 96, 96),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Predict every labelled case and score it per region.

    Returns:
        ``(per_case, summary)``: per case ``{"case", "seconds", region: {metric: value}}``;
        the summary as :func:`common.metrics.summarize`.
    """
    per_case = []
    labelled = [c for c in cases if c.regions is not None]
    for i, case in enumerate(labelled, 1):
        start = time.perf_counter()
        probs = predict_probabilities(model, case.image, spatial_dims, device, patch_size=patch_size)
        seconds = time.perf_counter() - start
        scores = region_metrics(probs > threshold, case.regions, regions, spacing=case.spacing)
        per_case.append({"case": case.case, "seconds": seconds, **scores})
        if progress is not None:
            progress(i, len(labelled))
    return per_case, summarize([{r: c[r] for r in regions} for c in per_case], regions)


def probabilities_to_labels(probs: torch.Tensor | np.ndarray, spec: DatasetSpec, threshold: float = 0.5) -> np.ndarray:
    """Turn ``(R, ...)`` region probabilities back into the dataset's label values.

    Regions are painted from the largest label set to the smallest, so nested regions
    end with the innermost label (BraTS: WT paints 2, then TC 1, then ET 4).

    Args:
        probs: ``(R, *spatial)`` probabilities, channels in ``spec.regions`` order.
        spec: the dataset spec the model was trained on.
        threshold: probability above which a voxel is in a region.

    Returns:
        ``(*spatial)`` uint8 label map.
    """
    masks = np.asarray(probs) > threshold
    paint = spec.region_labels()
    names = list(spec.regions)
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for r in sorted(range(len(names)), key=lambda r: -len(spec.regions[names[r]])):
        labels[masks[r]] = paint[names[r]]
    return labels
