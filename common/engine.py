"""Training, evaluation and inference loops shared by the CLI, the clients and the server."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from monai.inferers import sliding_window_inference
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import TrainConfig
from .data import DatasetSpec, PreparedCase, regions_from_labels
from .losses import ConsistencyLoss, UnlabelledLoss, build_loss
from .metrics import region_metrics, summarize
from .postprocess import PostProcessing, postprocess_labels
from .transforms import strong_transforms, training_transforms, unlabelled_transforms


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


def unlabelled_weight(base: float, server_round: int, num_rounds: int, rampup: float) -> float:
    """FixMatch's lambda_u in ``server_round`` (1-based): ``base`` x exp(-5 (1 - t)^2), t = round / (rampup x
    rounds) capped at 1 (the usual sigmoid-shaped ramp-up: early pseudo-labels come from a model that has
    learnt little); ``base`` throughout when ``rampup`` is 0."""
    if rampup <= 0:
        return base
    t = min(1.0, server_round / max(rampup * num_rounds, 1e-9))
    return base * math.exp(-5.0 * (1.0 - t) ** 2)


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


def _read_case(item: dict[str, PreparedCase]) -> dict[str, np.ndarray]:
    case = item["case"].load()
    return {"image": case.image, "label": case.regions}


def _sample_size(cases: Sequence[PreparedCase], spatial_dims: int, config: TrainConfig) -> tuple[int, ...]:
    if spatial_dims == 2:  # small crops are padded so that every pooling level of a default-depth U-Net keeps a voxel
        return tuple(max(MIN_TRAINING_SIDE, *(c.shape[axis] for c in cases)) for axis in (1, 2))
    return tuple(config.patch_size)


def _training_loader(cases: Sequence[PreparedCase], spatial_dims: int, config: TrainConfig,
                     sample_size: tuple[int, ...] | None = None) -> DataLoader:
    sample_size = sample_size or _sample_size(cases, spatial_dims, config)
    transform = training_transforms(spatial_dims, tuple(sample_size), config.pos_ratio, config.augment)
    # Reading the case is the pipeline's first, non-random step: in the same Compose (not a Compose around it),
    # so each random transform draws the same seeds from the run's seed as without it.
    pipeline = Compose([_read_case, *transform.transforms])
    if config.seed is not None:
        pipeline.set_random_state(seed=config.seed)
    # Each case appears samples_per_case times; each appearance draws a fresh slice/patch. The arrays are
    # read when a sample is drawn (a LazyCase reads only then), so memory holds the batch's cases, not the site.
    items = [{"case": c} for c in cases if c.labelled for _ in range(config.samples_per_case)]
    generator = torch.Generator()
    if config.seed is not None:
        generator.manual_seed(config.seed)
    return DataLoader(
        Dataset(items, transform=pipeline), batch_size=config.batch_size, shuffle=True,
        num_workers=config.num_workers, generator=generator, drop_last=len(items) > config.batch_size,
    )


OFFLINE_KEY = "pseudo"  # what an offline teacher's labels add to an unlabelled sample (FixMatch.label_volumes)
OFFLINE_CODES = {"not counted": 0, "background": 1, "lesion": 2}  # its values with the hard loss


def _read_image(item: dict[str, Any]) -> dict[str, np.ndarray]:
    """An unlabelled sample's source: the scans only (a hidden label is never read) and the brain to sample in;
    with an offline teacher also the case's pseudo-label volume (:meth:`FixMatch.label_volumes`)."""
    image = item["case"].image
    return {"image": image, "brain": (image[:1] != 0).astype(np.uint8),  # z-scored over the brain: 0 outside it
            **({OFFLINE_KEY: item[OFFLINE_KEY]} if OFFLINE_KEY in item else {})}


def _unlabelled_loader(items: Sequence[dict[str, Any]], spatial_dims: int, config: TrainConfig,
                       sample_size: tuple[int, ...], stream: int = 0) -> DataLoader:
    """Weak views of ``items`` (``{"case"}``, or with an offline teacher ``{"case", "pseudo"}``), each
    ``samples_per_case`` times; ``stream`` picks other random draws (an offline teacher's later epochs)."""
    offline = bool(items) and OFFLINE_KEY in items[0]
    transform = unlabelled_transforms(spatial_dims, sample_size, (OFFLINE_KEY,) if offline else ())
    pipeline = Compose([_read_image, *transform.transforms])
    generator = torch.Generator()
    if config.seed is not None:  # its own streams: the labelled samples are drawn as without unlabelled cases
        pipeline.set_random_state(seed=config.seed + 1 + 7919 * stream)
        generator.manual_seed(config.seed + 1 + 7919 * stream)
    items = [item for item in items for _ in range(config.samples_per_case)]
    return DataLoader(Dataset(items, transform=pipeline), batch_size=config.batch_size, shuffle=True,
                      num_workers=config.num_workers, generator=generator, drop_last=len(items) > config.batch_size)


class FixMatch:
    """FixMatch (Sohn et al., NeurIPS 2020) for segmentation, one unlabelled batch at a time.

    The model, in eval mode and without gradients, labels the weak view: a voxel's pseudo-label is its
    probability > 0.5 per region, counted where that probability is above ``threshold`` or below
    ``1 - threshold``, and, per region, for the ``negative_share`` of the batch's predicted-negative brain
    (nonzero) voxels with the lowest probability. The second rule is there because a model trained with
    focal loss (gamma 2, alpha 0.75) leaves background near 0.2, seldom below ``1 - threshold``: by
    ``threshold`` alone the confident voxels were all lesion, and the model learnt lesion everywhere.
    The declared ``threshold`` is 1.0, which counts background only: on real BraTS sites with 1-2 labelled
    cases, lesion pseudo-labels above 0.9 were right for 43-58% of their voxels, and with them FixMatch still
    drifted to lesion; the least likely half of the predicted background was 99% right (README,
    "Semi-supervised training"). :func:`fedlesion.common.transforms.strong_transforms` then moves the image, the
    pseudo-label and the mask with one affine and changes the image's intensities, and
    :class:`fedlesion.common.losses.UnlabelledLoss` scores the model on the strong view against the
    pseudo-label on confident voxels only.

    Two variants (run config): ``fixmatch-teacher = "ema"`` labels the weak view with an exponential moving
    average of the model (torch's ``AveragedModel``) instead of the model itself, started from the model as
    :func:`train` receives it (in a federation, each round's global model) and moved after every optimiser
    step; ``fixmatch-loss = "soft"`` replaces the thresholded pseudo-labels by the teacher's probabilities
    on every brain voxel, scored by :class:`fedlesion.common.losses.ConsistencyLoss` (mean squared error).
    Both together are the mean teacher (Tarvainen & Valpola 2017).

    ``fixmatch-teacher = "offline"`` is self-training with post-processed pseudo-labels (Bai et al., MICCAI
    2017, refined pseudo-labels for cardiac MR; Xie et al., CVPR 2020, Noisy Student): at the start of each
    epoch (a federation with one local epoch: each round, from its global model) :meth:`label_volumes` predicts every unlabelled
    case's whole volume and removes the lesion components post-processing removes from a prediction (the run's
    ``postprocess*`` settings; each region's channel is thresholded at 0.5 as the other teachers do, without
    the label map's nesting); the weak view then carries these labels (moved with it), not a prediction of the
    view itself. The same rule picks the confident voxels, on the volume's probabilities; the removed
    components' probability is set to 0, so they count as background under any rule. Why: a slice sees a
    far-off false-positive island as lesion; a volume's post-processing sees it is not (README,
    "Semi-supervised training"). Cost: every unlabelled volume is predicted once an epoch, and held as one byte
    (hard loss; two with the soft one) per region and voxel until the epoch ends.
    """

    def __init__(self, spatial_dims: int, sample_size: tuple[int, ...], config: TrainConfig,
                 model: nn.Module | None = None, postprocessing: PostProcessing | None = None) -> None:
        self.threshold = config.fixmatch_threshold
        self.negative_share = config.fixmatch_negative_share
        self.soft = config.fixmatch_loss == "soft"
        self.offline = config.fixmatch_teacher == "offline"
        self.spatial_dims, self.patch_size = spatial_dims, config.patch_size
        # An offline teacher's labels are cleaned as a prediction is (None: the declared defaults).
        self.postprocessing = postprocessing or PostProcessing.from_run_config({})
        self.strong = strong_transforms(spatial_dims, sample_size)
        if config.seed is not None:
            self.strong.set_random_state(seed=config.seed + 2)
        self.loss = ConsistencyLoss() if self.soft else UnlabelledLoss(
            config.lambda_dice, config.lambda_focal, config.focal_gamma, config.focal_alpha)
        # Mean teacher: torch's EMA of the model, starting from the model as it is now (a round's global model).
        self.teacher: AveragedModel | None = None
        if config.fixmatch_teacher == "ema":
            if model is None:
                raise ValueError("FixMatch: an EMA teacher needs the model it averages.")
            self.teacher = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.fixmatch_ema_decay),
                                         use_buffers=True)
            self.teacher.update_parameters(model)  # the first update copies: the teacher starts as the model
            self.teacher.eval()

    def update_teacher(self, model: nn.Module) -> None:
        """After each optimiser step: move the EMA teacher towards ``model`` (nothing without one)."""
        if self.teacher is not None:
            self.teacher.update_parameters(model)

    @torch.no_grad()
    def pseudo_labels(self, model: nn.Module, weak: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pseudo, mask)`` of a weak batch, each ``(B, R, *spatial)`` float, labelled by the teacher (the EMA
        model, else ``model`` itself): 0/1 pseudo-labels and confident voxels, or, with the soft loss, the
        teacher's probabilities and the brain (nonzero) voxels."""
        labeller = self.teacher.module if self.teacher is not None else model
        was_training = labeller.training
        labeller.eval()
        with autocast(device):
            probs = torch.sigmoid(labeller(weak).float())
        labeller.train(was_training)
        brain = (weak != 0).any(dim=1)  # z-scored scans keep the background at exactly 0
        if self.soft:
            return probs, brain.unsqueeze(1).expand_as(probs).float()
        pseudo = probs > 0.5
        return pseudo.float(), self.confident(probs, pseudo, brain).float()

    def confident(self, probs: torch.Tensor, pseudo: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
        """Where ``(B, R, *spatial)`` pseudo-labels count: probability above tau or below 1 - tau, and per region
        the ``negative_share`` of the predicted-negative ``brain`` (``(B, *spatial)``) voxels least likely lesion."""
        confident = (probs > self.threshold) | (probs < 1.0 - self.threshold)
        if self.negative_share > 0:
            for r in range(probs.shape[1]):
                candidates = ~pseudo[:, r] & brain
                values = probs[:, r][candidates]
                count = math.ceil(self.negative_share * values.numel())
                if count:
                    cut = values.kthvalue(count).values
                    confident[:, r] |= candidates & (probs[:, r] <= cut)
        return confident

    @torch.no_grad()
    def label_volumes(self, model: nn.Module, cases: Sequence[PreparedCase], device: torch.device) -> list[dict[str, Any]]:
        """The offline teacher: ``model`` (as it is now) labels each case's whole volume; only the scans are read.

        Returns:
            ``{"case", "pseudo"}`` per case, ``pseudo`` a ``(R, X, Y, Z)`` volume: with the hard loss uint8 codes,
            0 not counted, 1 background, 2 lesion (:data:`OFFLINE_CODES`; the thresholded prediction less the
            components post-processing removes, counted by the confidence rule); with the soft loss the float16
            probabilities, 0 in removed components (every brain voxel counts). :meth:`offline_labels` decodes a batch.
        """
        items = []
        for case in cases:
            image = case.image  # one read: a LazyCase fetches it on each use
            probs = predict_probabilities(model, image, self.spatial_dims, device, patch_size=self.patch_size)
            lesion = (probs > 0.5).any(dim=0)
            kept = postprocess_labels(lesion.numpy().astype(np.uint8), self.postprocessing, case.spacing) > 0
            probs[:, lesion & ~torch.from_numpy(kept)] = 0.0
            if self.soft:
                items.append({"case": case, OFFLINE_KEY: probs.numpy().astype(np.float16)})
                continue
            pseudo = probs > 0.5
            counted = self.confident(probs[None], pseudo[None], torch.from_numpy(image[:1] != 0))[0]
            codes = torch.where(pseudo, OFFLINE_CODES["lesion"], OFFLINE_CODES["background"]).to(torch.uint8)
            items.append({"case": case, OFFLINE_KEY: (codes * counted).numpy()})  # not counted: 0
        return items

    def offline_labels(self, batch: torch.Tensor, weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pseudo, mask)`` of a batch of weak views' offline labels (``batch``, moved with ``weak``); a voxel
        padded or rotated in holds 0: not counted (hard), outside the brain (soft)."""
        batch = batch.float()
        if self.soft:
            brain = (weak != 0).any(dim=1, keepdim=True).to(batch.device)
            return batch, brain.expand_as(batch).float()
        return (batch == OFFLINE_CODES["lesion"]).float(), (batch != OFFLINE_CODES["not counted"]).float()

    def strong_views(self, weak: torch.Tensor, pseudo: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The strong view of each sample: ``(image, pseudo, mask)`` batches, moved together."""
        views = [self.strong({"image": i, "pseudo": p, "mask": m}) for i, p, m in zip(weak.cpu(), pseudo.cpu(), mask.cpu())]
        return tuple(torch.stack([torch.as_tensor(v[key]).as_subclass(torch.Tensor) for v in views]).to(weak.device)
                     for key in ("image", "pseudo", "mask"))

    def __call__(self, model: nn.Module, weak: torch.Tensor, device: torch.device,
                 labels: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
        """The unlabelled loss of one weak batch, and the share of its voxels that were confident; ``labels``:
        the batch's ``(pseudo, mask)`` from an offline teacher, else the teacher labels the weak view now."""
        pseudo, mask = labels if labels is not None else self.pseudo_labels(model, weak, device)
        image, pseudo, mask = self.strong_views(weak, pseudo, mask)
        with autocast(device):
            logits = model(image)
        return self.loss(logits.float(), pseudo, mask), float(mask.mean())


def train(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    spatial_dims: int,
    config: TrainConfig,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
    lr_factor: Callable[[int], float] | None = None,
    unlabelled: Sequence[PreparedCase] = (),
    unlabelled_factor: Callable[[int], float] | None = None,
    postprocessing: PostProcessing | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on labelled cases (and, FixMatch, on unlabelled ones), with one optimiser
    for all ``config.epochs`` epochs.

    Args:
        model: the network, already on ``device``.
        cases: training cases (unlabelled ones are ignored).
        spatial_dims: 2 (slices) or 3 (patches).
        config: the settings; an epoch is one pass over ``samples_per_case`` samples of every
            case, or exactly ``config.steps`` optimiser steps when that is > 0.
        device: where to train; CUDA uses float16 mixed precision.
        progress: called after each epoch with ``(epoch, mean loss)``.
        lr_factor: the learning rate of epoch ``e`` (0-based) as a multiple of
            ``config.learning_rate``, stepped once per epoch by torch's ``LambdaLR``;
            ``None`` keeps the rate constant.
        unlabelled: cases trained through :class:`FixMatch` (only their scans are read), each step one
            unlabelled batch beside the labelled one, weighted by ``config.unlabelled_weight``; without
            labelled cases an epoch is ``config.steps`` (or one pass over the unlabelled samples) of these alone.
        unlabelled_factor: lambda_u of epoch ``e`` (0-based) as a multiple of ``config.unlabelled_weight``
            (pooled training's ramp-up, :func:`unlabelled_weight`); ``None``: constant.
        postprocessing: how an offline teacher (``fixmatch-teacher = "offline"``) cleans its labels, as
            predictions are cleaned; ``None``: the declared defaults.

    Returns:
        ``{"train-loss": mean loss of the last epoch, "train-samples": samples seen, "train-seconds": wall time}``;
        with unlabelled cases also ``unlabelled-loss`` and ``unlabelled-confident`` (the share of their voxels
        whose pseudo-label counted), means over the last epoch.

    Raises:
        ValueError: when no case has a label and none is unlabelled (or lambda_u is 0).
    """
    labelled = [c for c in cases if c.labelled]
    semi = bool(unlabelled) and config.unlabelled_weight > 0
    if not labelled and not semi:
        raise ValueError("no labelled training case to train on.")
    # Labelled and unlabelled samples batch at one size (with unlabelled ones it covers both).
    sample_size = _sample_size([*labelled, *(unlabelled if semi else ())], spatial_dims, config)
    loader = _training_loader(labelled, spatial_dims, config, sample_size) if labelled else None
    fixmatch = FixMatch(spatial_dims, sample_size, config, model, postprocessing) if semi else None
    unlabelled_batches = None
    if semi and not fixmatch.offline:  # an offline teacher's loader is made each epoch, with that epoch's labels
        unlabelled_loader = _unlabelled_loader([{"case": c} for c in unlabelled], spatial_dims, config, sample_size)
        unlabelled_batches = itertools.chain.from_iterable(itertools.repeat(unlabelled_loader))
    loss_fn = build_loss(config.lambda_dice, config.lambda_focal, config.focal_gamma, config.focal_alpha)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor) if lr_factor is not None else None
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else None
    start, seen, epoch_loss = time.perf_counter(), 0, float("nan")
    unlabelled_stats: dict[str, float] = {}
    for epoch in range(1, config.epochs + 1):
        if fixmatch is not None and fixmatch.offline:  # the model as it starts the epoch labels the unlabelled volumes
            unlabelled_batches = unlabelled_loader = None  # the last epoch's labels go first: one epoch's in memory
            items = fixmatch.label_volumes(model, unlabelled, device)
            unlabelled_loader = _unlabelled_loader(items, spatial_dims, config, sample_size, stream=epoch - 1)
            unlabelled_batches = itertools.chain.from_iterable(itertools.repeat(unlabelled_loader))
        model.train()  # ``progress`` may have evaluated the model
        total, batches, u_total, u_confident = 0.0, 0, 0.0, 0.0
        # An epoch is one pass over the samples, or exactly config.steps batches (passing over them again as needed).
        if loader is not None:
            batches_of_epoch = (itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), config.steps)
                                if config.steps > 0 else loader)
        else:  # unlabelled cases alone
            batches_of_epoch = itertools.repeat(None, config.steps if config.steps > 0 else len(unlabelled_loader))
        weight = config.unlabelled_weight * (unlabelled_factor(epoch - 1) if unlabelled_factor is not None else 1.0)
        for batch in batches_of_epoch:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            if batch is not None:
                image = batch["image"].to(device, non_blocking=True).float()
                label = batch["label"].to(device, non_blocking=True).float()
                with autocast(device):
                    loss = loss_fn(model(image), label)
                seen += image.shape[0]
            if fixmatch is not None:
                u_batch = next(unlabelled_batches)
                weak = u_batch["image"].to(device, non_blocking=True).float()
                # An offline teacher's labels stay on the CPU, where the strong view is drawn.
                labels = fixmatch.offline_labels(u_batch[OFFLINE_KEY], u_batch["image"]) if fixmatch.offline else None
                u_loss, confident = fixmatch(model, weak, device, labels)
                loss = loss + weight * u_loss
                u_total, u_confident = u_total + float(u_loss.detach()), u_confident + confident
                seen += weak.shape[0]
            if anchor is not None:
                proximal = sum((p.float() - a.float()).pow(2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * config.proximal_mu * proximal
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"training diverged: the loss is {loss.item()} at epoch {epoch}, step "
                                         f"{batches + 1} (learning rate {config.learning_rate:g}); lower the "
                                         "learning rate. The model is left as it was before this epoch's checkpoint.")
            scaler.scale(loss).backward()
            # An EMA teacher follows only the steps taken (GradScaler skips one with inf gradients, lowering its scale).
            scale = scaler.get_scale() if fixmatch is not None and fixmatch.teacher is not None else None
            scaler.step(optimizer)
            scaler.update()
            if scale is not None and scaler.get_scale() >= scale:
                fixmatch.update_teacher(model)
            total += float(loss.detach())
            batches += 1
        epoch_loss = total / max(batches, 1)
        if fixmatch is not None:
            unlabelled_stats = {"unlabelled-loss": u_total / max(batches, 1),
                                "unlabelled-confident": u_confident / max(batches, 1), "unlabelled-weight": weight}
        if scheduler is not None:
            scheduler.step()
        if progress is not None:
            progress(epoch, epoch_loss)
    return {"train-loss": epoch_loss, "train-samples": float(seen), "train-seconds": time.perf_counter() - start,
            **unlabelled_stats}


FINETUNE_FOLDS = 3  # cross-validation folds of a site's fine-tuning when it has no validation cases


def finetune_validated(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    val: Sequence[PreparedCase],
    score: Callable[[nn.Module, Sequence[PreparedCase]], list[float]],
    spatial_dims: int,
    config: TrainConfig,
    device: torch.device,
    folds: int = FINETUNE_FOLDS,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on ``cases``, and keep the result only where it scores higher than the model
    it started from on cases the fine-tuning did not train on; otherwise put the starting weights back.

    Those cases are ``val`` when there are any; otherwise ``min(folds, len(cases))``-fold cross-validation
    of the fine-tuning itself on ``cases`` (each part scored by a model fine-tuned on the others; then the
    kept model is fine-tuned on all of them). A single case cannot be validated: the starting model is kept.
    At a site, the starting model (the global one) has trained on ``cases``, so cross-validation favours it:
    a site keeps its fine-tuned model only when fine-tuning helps clearly. Measured on real BraTS sites of two
    training cases, unvalidated fine-tuning fell below the global model (README, "Each hospital's own model").

    Args:
        score: ``(model, cases) -> per-case scores`` (higher is better), e.g. mean Dice over regions.

    Returns:
        ``finetune-kept`` (1: the fine-tuned model, 0: the starting one), ``finetune-select-global`` and
        ``finetune-select-personal`` (mean score of the starting and the fine-tuned models on the cases that
        decided; -1 when none could), ``finetune-select-cases``, ``finetune-diverged`` (1: a fine-tuning's loss
        became NaN/Inf, and the starting model is kept) and, when the fine-tuned model is kept, its ``train-loss``.
    """
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cases = list(cases)
    if val:
        held_out = [(cases, list(val))]
    elif len(cases) >= 2:
        k = min(folds, len(cases))
        parts = [cases[i::k] for i in range(k)]
        held_out = [([c for j, part in enumerate(parts) if j != i for c in part], parts[i]) for i in range(k)]
    else:
        held_out = []
    global_scores: list[float] = []
    personal_scores: list[float] = []
    loss, diverged = None, False
    try:
        for train_part, scored_part in held_out:
            model.load_state_dict(start)
            global_scores += score(model, scored_part)
            loss = train(model, train_part, spatial_dims, config, device)["train-loss"]
            personal_scores += score(model, scored_part)
        decided = bool(global_scores) and len(global_scores) == len(personal_scores)
        keep = decided and float(np.mean(personal_scores)) > float(np.mean(global_scores))
        if keep and not val:  # cross-validated: the kept model trains on every case
            model.load_state_dict(start)
            loss = train(model, cases, spatial_dims, config, device)["train-loss"]
    except TrainingDiverged:  # fine-tuning that diverges is not kept; the site keeps the model it started from
        decided, keep, diverged = False, False, True
    if not keep:
        model.load_state_dict(start)
    return {"finetune-kept": float(keep), "finetune-diverged": float(diverged),
            "finetune-select-global": float(np.mean(global_scores)) if decided else -1.0,
            "finetune-select-personal": float(np.mean(personal_scores)) if decided else -1.0,
            "finetune-select-cases": float(len(global_scores)) if decided else 0.0,
            **({"train-loss": loss} if keep else {})}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf: the learning rate is too high for this model and data."""


MIN_INFERENCE_SIDE = 32  # voxels: enough for five pooling levels
MIN_TRAINING_SIDE = 16  # voxels: four pooling levels (the default depth); larger slices are not padded


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    spatial_dims: int,
    device: torch.device,
    slice_batch: int = 32,
    patch_size: Sequence[int] = TrainConfig.patch_size,
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
            # A small crop is padded with background (0 after z-scoring) so every pooling level keeps a voxel.
            size_x, size_y = slices.shape[2:]
            padding = (0, max(0, MIN_INFERENCE_SIDE - size_y), 0, max(0, MIN_INFERENCE_SIDE - size_x))
            slices = torch.nn.functional.pad(slices, padding)
            out = torch.cat([torch.sigmoid(model(slices[i:i + slice_batch]).float())
                             for i in range(0, slices.shape[0], slice_batch)])
            probs = out[:, :, :size_x, :size_y].permute(1, 2, 3, 0)
        else:
            # Always the training patch: a window cut to the volume's side (50, say) is no multiple of the U-Nets'
            # pooling and fails at their skip connections; MONAI pads a smaller volume and crops the output back.
            logits = sliding_window_inference(volume[None], list(patch_size), slice_batch, model, overlap=overlap,
                                              mode="gaussian")
            probs = torch.sigmoid(logits[0].float())
    return probs.float().cpu()


def evaluate(
    model: nn.Module,
    cases: Sequence[PreparedCase],
    spec: DatasetSpec,
    spatial_dims: int,
    device: torch.device,
    patch_size: Sequence[int] = TrainConfig.patch_size,
    progress: Callable[[int, int], None] | None = None,
    postprocessing: PostProcessing | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Predict every labelled case and score, per region, the label map that prediction writes.

    Args:
        model: the network, on ``device``.
        cases: the cases (unlabelled ones are skipped).
        spec: the dataset spec the model predicts (its regions, and the labels they paint).
        spatial_dims: 2 or 3, as :func:`predict_probabilities`.
        device: where to run.
        patch_size: the sliding window (3D).
        progress: called after each case with ``(cases done, cases)``.
        postprocessing: how the label map is cleaned, as :func:`probabilities_to_labels`.

    Returns:
        ``(per_case, summary)``: per case ``{"case", "seconds", region: {metric: value}}``;
        the summary as :func:`fedlesion.common.metrics.summarize`.
    """
    per_case = []
    regions = list(spec.regions)
    labelled = [c for c in cases if c.labelled]
    for i, case in enumerate(labelled, 1):
        case = case.load()  # one case's arrays at a time
        start = time.perf_counter()
        probs = predict_probabilities(model, case.image, spatial_dims, device, patch_size=patch_size)
        masks = predicted_regions(probs, spec, case.spacing, postprocessing)
        seconds = time.perf_counter() - start
        per_case.append({"case": case.case, "seconds": seconds, **score_regions(masks, case, spec)})
        if progress is not None:
            progress(i, len(labelled))
    return per_case, summarize([{r: c[r] for r in regions} for c in per_case], regions)


def score_regions(masks: np.ndarray, case: PreparedCase, spec: DatasetSpec) -> dict[str, dict[str, float]]:
    """Metrics per region of ``(R, *spatial)`` predicted masks of ``case`` (prepared frame) against its ground truth;
    HD95's empty-region penalty is the whole scan's diagonal, however the case was cropped."""
    return region_metrics(masks, case.regions, list(spec.regions), spacing=case.spacing, extent=case.full_shape)


def predicted_regions(probs: torch.Tensor | np.ndarray, spec: DatasetSpec, spacing: Sequence[float],
                      postprocessing: PostProcessing | None = None) -> np.ndarray:
    """The ``(R, *spatial)`` region masks of the label map :func:`probabilities_to_labels` makes.

    Scoring these, not the thresholded channels, scores what is written: an ET voxel
    predicted outside TC is label 4 in the file, so it counts as WT and TC too (as BraTS
    evaluators and nnU-Net score it).
    """
    return regions_from_labels(probabilities_to_labels(probs, spec, spacing, postprocessing), spec)


def probabilities_to_labels(probs: torch.Tensor | np.ndarray, spec: DatasetSpec, spacing: Sequence[float],
                            postprocessing: PostProcessing | None = None, threshold: float = 0.5) -> np.ndarray:
    """Turn ``(R, ...)`` region probabilities back into the dataset's label values, post-processed.

    The one step from probabilities to a segmentation: prediction writes its result and
    evaluation scores it. Regions are painted from the largest label set to the smallest,
    so nested regions end with the innermost label (BraTS: WT paints 2, then TC 1, then ET 4);
    then the whole lesion's small and surplus components are removed
    (:func:`fedlesion.common.postprocess.postprocess_labels`).

    Args:
        probs: ``(R, *spatial)`` probabilities, channels in ``spec.regions`` order.
        spec: the dataset spec the model was trained on.
        spacing: voxel size in mm per spatial axis (post-processing sizes are in mm^3).
        postprocessing: how the label map is cleaned; ``None``: the declared defaults of
            ``[tool.flwr.app.config]`` (``postprocess``, ``postprocess-min-mm3``, ``postprocess-components``).
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
    return postprocess_labels(labels, postprocessing or PostProcessing.from_run_config({}), spacing)
