"""Semi-supervised training (FixMatch): unlabelled cases are data under ``semi-supervised``, and only there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlesion.client import app as client_app
from fedlesion.client import site as sites
from fedlesion.common.api import cases_file, train_centralized
from fedlesion.common.checkpoint import load_checkpoint
from fedlesion.common.config import TrainConfig, with_defaults
from fedlesion.common.data import (
    LAYOUTS,
    CaseCache,
    DatasetSpec,
    divide_cases,
    labelled_subset,
    load_site,
    split_train_val,
)
from fedlesion.common.engine import FixMatch, train, unlabelled_weight
from fedlesion.common.losses import ConsistencyLoss, UnlabelledLoss
from fedlesion.common.model import build_model
from fedlesion.simulations.synthetic import write_site

TINY = {"base_channels": 4, "depth": 2}
RUN = {"model": "unet2d", "model-args": "base_channels=4 depth=2", "dataset": "brats2021", "seed": 0,
       "val-fraction": 0.0, "samples-per-case": 4, "batch-size": 4, "local-epochs": 1, "local-steps": 2,
       "num-server-rounds": 4}


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    write_site(tmp_path / "site", site=0, cases=5, shape=(32, 32, 16), seed=0)
    return tmp_path / "site"


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


def test_an_unlabelled_case_loads_only_in_semi_supervised_mode(site_dir: Path, tmp_path: Path) -> None:
    (site_dir / "Synth_S00_000" / "Synth_S00_000_seg.nii.gz").unlink()
    plain = load_site(site_dir, cache=None)
    assert [c.case for c in plain.cases] == [f"Synth_S00_00{i}" for i in range(1, 5)]
    assert "Synth_S00_000_seg.nii.gz" in plain.skipped["Synth_S00_000"]
    semi = load_site(site_dir, cache=None, unlabelled=True)
    assert len(semi.cases) == 5 and not semi.skipped
    assert [c.case for c in semi.cases if not c.labelled] == ["Synth_S00_000"]
    # Through a disk cache too: an entry written unlabelled (a semi-supervised run) does not let the case in later.
    cache = CaseCache(2**30, disk_dir=tmp_path / "cache")
    assert len(load_site(site_dir, cache=cache, unlabelled=True).cases) == 5
    later = load_site(site_dir, cache=CaseCache(2**30, disk_dir=tmp_path / "cache"))
    assert "Synth_S00_000" in later.skipped and "semi-supervised" in later.skipped["Synth_S00_000"]


def test_the_manifest_marks_cases_unlabelled_and_their_labels_are_never_read(site_dir: Path, tmp_path: Path) -> None:
    (site_dir / "Synth_S00_001" / "Synth_S00_001_seg.nii.gz").write_bytes(b"not a NIfTI file")  # read -> CaseError
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({**LAYOUTS['brats2021'].to_json(), "name": "marked", "unlabelled": ["*_001"]}))
    spec = DatasetSpec.from_json(json.loads(manifest.read_text()))
    assert spec.unlabelled == ("*_001",) and spec.marked_unlabelled("Synth_S00_001")
    skipped = load_site(site_dir, spec, cache=None)
    assert "has no label" in skipped.skipped["Synth_S00_001"] and len(skipped.cases) == 4
    semi = load_site(site_dir, spec, cache=None, unlabelled=True)
    assert [c.case for c in semi.cases if not c.labelled] == ["Synth_S00_001"] and not semi.skipped
    with pytest.raises(ValueError, match="unlabelled"):
        DatasetSpec.from_json({**LAYOUTS['brats2021'].to_json(), "unlabelled": "*_001"})
    assert "unlabelled" not in LAYOUTS['brats2021'].to_json(), "specs without marked cases keep their JSON (and cache keys)"


def test_label_fraction_hides_labels_reproducibly(site_dir: Path) -> None:
    ids = [f"case-{i:02d}" for i in range(10)]
    kept = labelled_subset(ids, 0.3, seed=5)
    assert len(kept) == 3 and set(kept) <= set(ids) and kept == labelled_subset(list(reversed(ids)), 0.3, seed=5)
    assert any(labelled_subset(ids, 0.3, seed=s) != kept for s in range(6, 12)), "the seed chooses"
    assert labelled_subset(ids, 0.0, 1) == [] and labelled_subset(ids, 1.0, 1) == ids
    assert len(labelled_subset(ids[:2], 0.3, 1)) == 1, "at least one label while the fraction is > 0"
    with pytest.raises(ValueError):
        labelled_subset(ids, 1.5, 0)

    cases = load_site(site_dir, cache=None).cases
    train_cases, val, unlabelled = divide_cases(cases, 0.25, 0.5, seed=3, site_name="a")
    expected_train, expected_val = split_train_val([c.case for c in cases], 0.25, 3)
    assert [c.case for c in val] == expected_val, "validation keeps its labels and its cases"
    assert sorted(c.case for c in train_cases + unlabelled) == expected_train and len(train_cases) == 2
    assert all(c.labelled for c in unlabelled), "hidden, not removed: the site never reads them as labels"
    again = divide_cases(cases, 0.25, 0.5, seed=3, site_name="a")
    assert [c.case for c in again[0]] == [c.case for c in train_cases]

    node = {"data-path": str(site_dir), "site-name": "hospital-x"}
    site = sites.load(node, {**RUN, "label-fraction": 0.4})
    assert (len(site.train), len(site.unlabelled)) == (2, 3)
    assert site.counts()["labelled-cases"] == 2.0 and site.counts()["unlabelled-cases"] == 3.0


def test_pseudo_labels_below_tau_contribute_nothing_to_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    pseudo = (torch.rand(2, 3, 16, 16) > 0.5).float()
    mask = (torch.rand(2, 3, 16, 16) > 0.5).float()
    loss = UnlabelledLoss()(logits, pseudo, mask)
    loss.backward()
    assert float(loss.detach()) > 0 and logits.grad[mask == 1].abs().max() > 0
    assert logits.grad[mask == 0].abs().max() == 0, "no gradient where the pseudo-label is not confident"
    flipped = torch.where(mask == 0, 1 - pseudo, pseudo)
    assert float(UnlabelledLoss()(logits.detach(), flipped, mask)) == pytest.approx(float(loss.detach()), abs=1e-7)

    class Fixed(torch.nn.Module):  # probabilities 0.95, 0.52 and 0.05 in the three region channels
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            values = torch.tensor([2.944, 0.08, -2.944]).view(1, 3, 1, 1)
            return values.expand(x.shape[0], 3, *x.shape[2:])

    fixmatch = FixMatch(2, (16, 16), TrainConfig(seed=0, fixmatch_threshold=0.9))
    pseudo, mask = fixmatch.pseudo_labels(Fixed(), torch.zeros(2, 4, 16, 16), torch.device("cpu"))
    assert pseudo[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0] and mask[0, :, 0, 0].tolist() == [1.0, 0.0, 1.0]


class _FocalBiased(torch.nn.Module):
    """What a focal-trained model gives: lesion (x >= 12) 0.95, brain background 0.15-0.35 rising towards the
    lesion (never below 1 - tau = 0.1), air (image 0) 0.12; one region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        column = torch.arange(x.shape[-1], dtype=torch.float32).expand(*x.shape[:1], 1, *x.shape[2:])
        probs = torch.where(column >= 12, torch.tensor(0.95), 0.15 + 0.2 * column / 11)
        probs = torch.where((x != 0).any(dim=1, keepdim=True), probs, torch.tensor(0.12))
        return torch.logit(probs)


def test_the_least_likely_share_of_predicted_background_counts_as_confident_negatives() -> None:
    image = torch.zeros(2, 4, 16, 16)
    image[:, :, 2:14] = 1.0  # rows 0-1 and 14-15 are air
    by_tau = FixMatch(2, (16, 16), TrainConfig(seed=0, fixmatch_threshold=0.9, fixmatch_negative_share=0.0))
    pseudo, mask = by_tau.pseudo_labels(_FocalBiased(), image, torch.device("cpu"))
    assert pseudo[mask == 1].min() == 1, "by tau alone every confident voxel is lesion: the drift this rule stops"

    fixmatch = FixMatch(2, (16, 16), TrainConfig(seed=0, fixmatch_threshold=0.9, fixmatch_negative_share=0.5))
    pseudo, mask = fixmatch.pseudo_labels(_FocalBiased(), image, torch.device("cpu"))
    brain_background = mask[:, 0, 2:14, :12]
    assert pseudo[:, 0, 2:14, :12].max() == 0
    assert brain_background[..., :6].min() == 1 and brain_background[..., 6:].max() == 0, \
        "the half of the brain's predicted background least likely to be lesion, and none nearer the lesion"
    assert mask[:, 0, 2:14, 12:].min() == 1 and pseudo[:, 0, 2:14, 12:].min() == 1, "the lesion (p > tau) still counts"
    assert mask[:, 0, :2].max() == 0 and mask[:, 0, 14:].max() == 0, "air is no candidate (and above 1 - tau)"

    declared = FixMatch(2, (16, 16), TrainConfig(seed=0))  # tau 1.0: lesion pseudo-labels were too often wrong
    pseudo, mask = declared.pseudo_labels(_FocalBiased(), image, torch.device("cpu"))
    assert torch.equal(mask[:, 0, 2:14, :12], brain_background) and mask[:, 0, :, 12:].max() == 0, \
        "by default only the least likely half of the brain's predicted background counts, and no lesion"


class _Constant(torch.nn.Module):
    """Logit ``value`` everywhere, for each of three regions: a model whose weights are one number."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], 3, *x.shape[2:])


def test_the_ema_teacher_starts_as_the_received_model_and_follows_the_student_slowly() -> None:
    student = _Constant(2.0)
    fixmatch = FixMatch(2, (8, 8), TrainConfig(seed=0, fixmatch_threshold=0.6, fixmatch_teacher="ema",
                                               fixmatch_ema_decay=0.75), student)
    weak = torch.ones(1, 4, 8, 8)
    with torch.no_grad():
        student.value.fill_(-2.0)  # the student moves; its teacher has not yet
    pseudo, mask = fixmatch.pseudo_labels(student, weak, torch.device("cpu"))
    assert pseudo.min() == 1 and mask.min() == 1, "labelled by the teacher (the model as received), not the student"
    fixmatch.update_teacher(student)
    assert float(fixmatch.teacher.module.value.detach()) == pytest.approx(0.75 * 2.0 + 0.25 * -2.0)  # 1.0
    pseudo, _ = fixmatch.pseudo_labels(student, weak, torch.device("cpu"))
    assert pseudo.min() == 1
    for _ in range(4):
        fixmatch.update_teacher(student)
    pseudo, _ = fixmatch.pseudo_labels(student, weak, torch.device("cpu"))
    assert pseudo.max() == 0, "the teacher follows the student: 1.0 x 0.75^4 - 2 (1 - 0.75^4) < 0"
    assert float(student.value.detach()) == -2.0, "updating the teacher leaves the student alone"
    # BatchNorm's running statistics are averaged too (use_buffers), and the teacher labels in eval mode.
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2, norm="batch")
    batch_norm = FixMatch(2, (16, 16), TrainConfig(seed=0, fixmatch_teacher="ema", fixmatch_ema_decay=0.75), model)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    model.train()
    model(torch.randn(2, 4, 16, 16) + 3.0)  # the student's running means move
    batch_norm.update_teacher(model)
    teacher = batch_norm.teacher.module.state_dict()
    for key, old in before.items():
        new = model.state_dict()[key]
        assert not torch.equal(new, old)
        assert torch.allclose(teacher[key], 0.75 * old + 0.25 * new, atol=1e-6), key
    assert not batch_norm.teacher.module.training
    # The default teacher is the student itself.
    itself = FixMatch(2, (8, 8), TrainConfig(seed=0, fixmatch_threshold=0.6), student)
    assert itself.teacher is None and itself.pseudo_labels(student, weak, torch.device("cpu"))[0].max() == 0


def test_the_soft_loss_pulls_towards_the_teachers_probabilities_on_brain_voxels_only() -> None:
    image = torch.zeros(2, 4, 16, 16)
    image[:, :, 2:14] = 1.0  # rows 0-1 and 14-15 are air
    soft = FixMatch(2, (16, 16), TrainConfig(seed=0, fixmatch_loss="soft"))
    target, mask = soft.pseudo_labels(_FocalBiased(), image, torch.device("cpu"))
    expected = torch.sigmoid(_FocalBiased()(image))
    assert torch.allclose(target, expected.expand_as(target), atol=1e-6), "the probabilities, not thresholded"
    assert mask[:, :, 2:14].min() == 1 and mask[:, :, :2].max() == 0 and mask[:, :, 14:].max() == 0, "brain only"
    # The loss: 0 where the student agrees, a gradient towards the teacher where it does not, none outside the mask.
    loss = ConsistencyLoss()
    agree = torch.logit(target).clone().requires_grad_(True)
    assert float(loss(agree, target, mask).detach()) == pytest.approx(0.0, abs=1e-10)
    logits = torch.zeros_like(target, requires_grad=True)  # 0.5 everywhere
    value = loss(logits, target, mask)
    value.backward()
    assert float(value.detach()) == pytest.approx(float(((0.5 - target) ** 2 * mask).sum() / mask.sum()))
    assert logits.grad[mask == 0].abs().max() == 0
    brain = mask == 1
    assert torch.equal(logits.grad[brain] > 0, target[brain] < 0.5), "lowered where the teacher says less than 0.5"


class _LabelGuard:
    """A case whose label must not be read (a label hidden by label-fraction)."""

    def __init__(self, case) -> None:  # noqa: ANN001
        self._case = case

    def __getattr__(self, name: str):  # noqa: ANN204
        if name in ("regions", "load"):
            raise AssertionError(f"{self._case.case}: a hidden label was read")
        return getattr(self._case, name)


@pytest.mark.parametrize("teacher, loss", [("student", "hard"), ("ema", "soft")])
def test_fixmatch_trains_on_unlabelled_cases_without_reading_their_labels(site_dir: Path, teacher: str, loss: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cases = load_site(site_dir, cache=None).cases
    config = TrainConfig(epochs=1, steps=3, batch_size=4, samples_per_case=4, seed=0, fixmatch_threshold=0.6,
                         fixmatch_teacher=teacher, fixmatch_loss=loss)
    torch.manual_seed(0)
    model = build_model("unet2d", 4, 3, **TINY)
    teacher_updates, labellers, made = [], [], []
    original_init, original_update = FixMatch.__init__, FixMatch.update_teacher

    def init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original_init(self, *args, **kwargs)
        made.append(self)
        if self.teacher is not None:
            teacher_updates.append(0)
            module, forward = self.teacher.module, self.teacher.module.forward
            module.forward = lambda x: (labellers.append(module), forward(x))[1]

    def update(self, student) -> None:  # noqa: ANN001
        if self.teacher is not None:
            teacher_updates[-1] += 1
        original_update(self, student)

    monkeypatch.setattr(FixMatch, "__init__", init)
    monkeypatch.setattr(FixMatch, "update_teacher", update)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train(model, cases[:2], 2, config, torch.device("cpu"), unlabelled=[_LabelGuard(c) for c in cases[2:]])
    assert len(made) == 1
    assert 0.0 <= stats["unlabelled-confident"] <= 1.0 and stats["unlabelled-loss"] >= 0.0
    assert stats["unlabelled-weight"] == 1.0 and stats["train-samples"] == 24.0  # 3 steps x (4 labelled + 4 unlabelled)
    if teacher == "ema":  # the teacher moved after each of the 3 steps, and labelled every unlabelled batch
        assert teacher_updates == [3] and len(labellers) == 3 and all(m is not model for m in labellers)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Unlabelled cases alone train too (a site with no label at all); lambda_u 0 with no label trains nothing.
    only = train(build_model("unet2d", 4, 3, **TINY), [], 2, config, torch.device("cpu"), unlabelled=cases[2:])
    assert only["train-samples"] == 12.0 and np.isfinite(only["train-loss"])
    with pytest.raises(ValueError, match="no labelled"):
        train(build_model("unet2d", 4, 3, **TINY), [], 2, TrainConfig(unlabelled_weight=0.0), torch.device("cpu"),
              unlabelled=cases[2:])


def test_lambda_u_ramps_up_over_the_rounds() -> None:
    weights = [unlabelled_weight(2.0, r, 10, 0.3) for r in range(1, 11)]
    assert weights[0] < 0.25 and weights == sorted(weights) and weights[2:] == [2.0] * 8
    assert unlabelled_weight(2.0, 1, 10, 0.0) == 2.0


def _train_reply(node: dict, run_config: dict, **round_config: object) -> Message:
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("unet2d", 4, 3, **TINY).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, **round_config})})
    return client_app.train(Message(content=content, dst_node_id=7, message_type="train"), context)


def test_a_site_with_zero_labelled_cases_still_trains_and_replies(site_dir: Path) -> None:
    node = {"data-path": str(site_dir), "site-name": "hospital-x"}
    reply = _train_reply(node, {**RUN, "semi-supervised": True, "label-fraction": 0.0})
    assert not reply.has_error()
    metrics = dict(reply.content["metrics"])
    assert metrics["labelled-cases"] == 0.0 and metrics["unlabelled-cases"] == 5.0 and metrics["num-examples"] == 5.0
    assert 0.0 <= metrics["unlabelled-confident"] <= 1.0 and 0.0 < metrics["unlabelled-weight"] <= 1.0
    # Scalars and the model only: no case ID, path or voxel in the reply.
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert all(isinstance(v, float | int) for v in metrics.values())
    assert not any("Synth" in key or str(site_dir) in key for key in [*metrics, *reply.content["arrays"]])
    # Without semi-supervised training the same site has nothing to learn from: an error for the server, no details.
    with pytest.raises(client_app.SiteError) as failed:
        _train_reply(node, {**RUN, "label-fraction": 0.0})
    assert "Synth" not in str(failed.value) and str(site_dir) not in str(failed.value)


def test_every_site_sends_the_same_metric_names_with_or_without_unlabelled_cases(site_dir: Path) -> None:
    """The server rejects a reply whose metric names differ from the round's: a site with no unlabelled case
    must still send FixMatch's metrics under semi-supervised training."""
    node = {"data-path": str(site_dir), "site-name": "hospital-x"}
    without = dict(_train_reply(node, {**RUN, "semi-supervised": True}).content["metrics"])
    with_some = dict(_train_reply(node, {**RUN, "semi-supervised": True, "label-fraction": 0.4}).content["metrics"])
    assert set(without) == set(with_some) and set(client_app.UNLABELLED_METRICS) <= set(without)
    assert [without[k] for k in client_app.UNLABELLED_METRICS] == [0.0, 0.0, 0.0] and without["num-examples"] == 5.0
    assert with_some["num-examples"] == 5.0 and with_some["labelled-cases"] == 2.0 and with_some["unlabelled-weight"] > 0
    plain = dict(_train_reply(node, {**RUN, "label-fraction": 0.4}).content["metrics"])
    assert not set(client_app.UNLABELLED_METRICS) & set(plain) and plain["num-examples"] == 2.0, "hidden labels: unused"


def test_the_ramp_up_follows_the_servers_schedule_across_a_resume(site_dir: Path) -> None:
    """A run resumed with more rounds keeps the horizon its schedules started with (the server sends it, as for the
    learning rate), so lambda_u in round 2 is the uninterrupted run's; a malformed horizon is refused."""
    node = {"data-path": str(site_dir), "site-name": "hospital-x"}
    run = {**RUN, "semi-supervised": True, "label-fraction": 0.4, "num-server-rounds": 40, "fixmatch-rampup": 0.5}
    sent = dict(_train_reply(node, run, **{"schedule-rounds": 4}).content["metrics"])
    assert sent["unlabelled-weight"] == pytest.approx(unlabelled_weight(with_defaults(run)["fixmatch-weight"], 2, 4, 0.5))  # == 1
    own = dict(_train_reply(node, run).content["metrics"])  # an older server: the run config's rounds
    assert own["unlabelled-weight"] == pytest.approx(unlabelled_weight(with_defaults(run)["fixmatch-weight"], 2, 40, 0.5))
    assert own["unlabelled-weight"] < 0.1 < sent["unlabelled-weight"]
    with pytest.raises(client_app.SiteError):
        _train_reply(node, run, **{"schedule-rounds": -3})


def test_pooled_semi_supervised_training_uses_the_hidden_cases(site_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, steps=2, batch_size=4, samples_per_case=4, seed=0)
    semi = train_centralized(site_dir, tmp_path / "semi.pt", model_args=TINY, config=config, report=lambda _: None,
                             semi_supervised=True, label_fraction=0.4)
    assert semi.run_config["train-case-count"] == 2 and semi.run_config["unlabelled-case-count"] == 3
    listed = json.loads(cases_file(tmp_path / "semi.pt").read_text())
    assert len(listed["unlabelled"]) == 3 and not set(listed["unlabelled"]) & set(listed["train"])
    plain = train_centralized(site_dir, tmp_path / "plain.pt", model_args=TINY, config=config, report=lambda _: None,
                              label_fraction=0.4)
    assert plain.run_config["train-case-count"] == 2 and plain.run_config["unlabelled-case-count"] == 0
    assert json.loads(cases_file(tmp_path / "plain.pt").read_text())["train"] == listed["train"], "the same labels kept"
    assert not all(torch.equal(a, b) for a, b in zip(semi.state_dict.values(), load_checkpoint(tmp_path / "plain.pt").state_dict.values()))


def test_fixmatch_trains_a_3d_model_on_patches(site_dir: Path) -> None:
    cases = load_site(site_dir, cache=None).cases
    config = TrainConfig(epochs=1, steps=2, batch_size=2, samples_per_case=2, seed=0, patch_size=(16, 16, 16))
    model = build_model("unet3d", 4, 3, base_channels=4, depth=2)
    stats = train(model, cases[:1], 3, config, torch.device("cpu"), unlabelled=cases[1:3])
    assert stats["train-samples"] == 8.0 and 0.0 <= stats["unlabelled-confident"] <= 1.0


class _Bright(torch.nn.Module):
    """Lesion where the first channel is bright (> 1.5), in each of three regions: probability ~1 there, ~0 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (10.0 * (x[:, :1] - 1.5)).expand(x.shape[0], 3, *x.shape[2:])


def _two_lesions(site_dir: Path):  # noqa: ANN202
    """A real prepared case whose scan holds one tumour (10 x 10 x 6 voxels) and one far-off 8-voxel island."""
    import dataclasses

    case = load_site(site_dir, cache=None).cases[0]
    image = np.zeros_like(case.image)
    image[:, 2:30, 2:30, 2:14] = np.linspace(0.1, 0.5, 28, dtype=np.float32)[:, None, None]  # the brain, less likely lesion to one side
    image[:, 5:15, 5:15, 4:10] = 3.0  # the tumour
    image[:, 25:27, 25:27, 10:12] = 3.0  # the island, 8 voxels: far under postprocess-min-mm3
    return dataclasses.replace(case, image=image)


def test_the_offline_teacher_labels_whole_volumes_without_their_far_off_islands(site_dir: Path) -> None:
    from fedlesion.common.postprocess import PostProcessing

    case = _LabelGuard(_two_lesions(site_dir))  # a hidden label: never read
    tumour, island = (slice(None), slice(5, 15), slice(5, 15), slice(4, 10)), (slice(None), slice(25, 27), slice(25, 27), slice(10, 12))
    brain, air = (slice(None), slice(2, 30), slice(2, 30), slice(2, 14)), (slice(None), slice(0, 2))
    config = TrainConfig(seed=0, fixmatch_teacher="offline", fixmatch_threshold=0.9, fixmatch_negative_share=0.0)
    fixmatch = FixMatch(2, (32, 32), config)  # the declared post-processing
    [item] = fixmatch.label_volumes(_Bright(), [case], torch.device("cpu"))
    codes = item["pseudo"]
    assert item["case"] is case and set(item) == {"case", "pseudo"} and codes.shape == (3, *case.shape[1:])
    assert codes.dtype == np.uint8 and (codes[tumour] == 2).all(), "the tumour is confident lesion"
    assert (codes[island] == 1).all(), "the island post-processing removes counts as background"
    assert (codes == 2).sum() == 3 * 600 and (codes[brain] > 0).all()  # p ~0 elsewhere in the brain: below 1 - tau
    pseudo, mask = fixmatch.offline_labels(torch.from_numpy(codes)[None], torch.from_numpy(case.image)[None])
    assert torch.equal(pseudo[0], torch.from_numpy(codes == 2).float()) and torch.equal(mask[0], torch.from_numpy(codes > 0).float())
    raw = FixMatch(2, (32, 32), config, postprocessing=PostProcessing(False, 0.0, 0))
    assert (raw.label_volumes(_Bright(), [case], torch.device("cpu"))[0]["pseudo"][island] == 2).all(), \
        "without post-processing the island would be lesion: post-processing is what removes it"
    # The background share is taken on the volume, among its brain voxels: never air, at most half the brain.
    share = FixMatch(2, (32, 32), TrainConfig(seed=0, fixmatch_teacher="offline", fixmatch_negative_share=0.5))
    codes = share.label_volumes(_Bright(), [case], torch.device("cpu"))[0]["pseudo"]
    assert (codes[air] == 0).all() and (codes[tumour] == 0).all(), "tau 1.0: no lesion counts, air is no candidate"
    background = (case.image[0] != 0).sum() - 600  # the brain's predicted background (the island's 8 voxels included)
    counted = (codes == 1).sum(axis=(1, 2, 3))
    assert (counted >= background / 2).all() and (counted < background * 0.6).all() and (codes[island] == 1).all()
    assert (codes[:, 2:5, 2:30, 2:14] == 1).all() and (codes[:, 24:30, 2:24, 2:14] == 0).all(), "the least likely side counts"
    soft = FixMatch(2, (32, 32), TrainConfig(seed=0, fixmatch_teacher="offline", fixmatch_loss="soft"))
    [item] = soft.label_volumes(_Bright(), [case], torch.device("cpu"))
    assert item["pseudo"].dtype == np.float16 and item["pseudo"][tumour].min() > 0.99 and item["pseudo"][island].max() == 0
    target, mask = soft.offline_labels(torch.from_numpy(item["pseudo"])[None], torch.from_numpy(case.image)[None])
    assert torch.equal(mask[0], torch.from_numpy(np.broadcast_to(case.image[:1] != 0, mask.shape[1:])).float()), "soft: the brain"


def test_the_offline_teacher_relabels_each_epoch_with_the_model_as_it_starts_it(
        site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = load_site(site_dir, cache=None).cases
    config = TrainConfig(epochs=2, steps=2, batch_size=4, samples_per_case=4, seed=0, fixmatch_threshold=0.6,
                         fixmatch_teacher="offline")
    torch.manual_seed(0)
    model = build_model("unet2d", 4, 3, **TINY)
    labelled_by, batches = [], []
    original_label, original_call = FixMatch.label_volumes, FixMatch.__call__

    def label(self, teacher, unlabelled, device):  # noqa: ANN001, ANN202
        labelled_by.append({k: v.clone() for k, v in teacher.state_dict().items()})
        return original_label(self, teacher, unlabelled, device)

    def call(self, student, weak, device, labels=None):  # noqa: ANN001, ANN202
        assert student.training, "the student trains in train mode after the teacher's labelling"
        batches.append((weak.clone(), labels))
        return original_call(self, student, weak, device, labels)

    monkeypatch.setattr(FixMatch, "label_volumes", label)
    monkeypatch.setattr(FixMatch, "__call__", call)
    monkeypatch.setattr(FixMatch, "pseudo_labels", lambda *a: pytest.fail("an offline teacher never labels a view"))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train(model, cases[:2], 2, config, torch.device("cpu"), unlabelled=[_LabelGuard(c) for c in cases[2:]])
    assert len(labelled_by) == 2, "once per epoch"
    assert all(torch.equal(labelled_by[0][k], v) for k, v in start.items()), "epoch 1: the model as received"
    assert not all(torch.equal(labelled_by[1][k], v) for k, v in start.items()), "epoch 2: the model after epoch 1"
    assert len(batches) == 4 and all(b[0].shape == b[1].shape == (4, 3, 32, 32) for _, b in batches)
    assert not torch.equal(batches[0][0], batches[2][0]), "each epoch draws its own weak views"
    assert 0.0 < stats["unlabelled-confident"] <= 1.0 and stats["train-samples"] == 32.0


def test_a_site_labels_offline_with_its_run_configs_post_processing(site_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = {"data-path": str(site_dir), "site-name": "hospital-x"}
    made, original_init = [], FixMatch.__init__

    def init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FixMatch, "__init__", init)
    run = {**RUN, "semi-supervised": True, "label-fraction": 0.0, "fixmatch-teacher": "offline",
           "fixmatch-threshold": 0.9, "postprocess": False}
    reply = _train_reply(node, run)
    assert not reply.has_error() and dict(reply.content["metrics"])["unlabelled-cases"] == 5.0
    assert [(m.offline, m.postprocessing.enabled) for m in made] == [(True, False)]
    _train_reply(node, {**run, "postprocess": True, "postprocess-min-mm3": 50.0})
    assert (made[1].postprocessing.enabled, made[1].postprocessing.min_mm3) == (True, 50.0)


def test_pooled_training_labels_offline_with_the_runs_post_processing(site_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    made, original_init = [], FixMatch.__init__

    def init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FixMatch, "__init__", init)
    config = TrainConfig(epochs=1, steps=1, batch_size=4, samples_per_case=4, seed=0, fixmatch_teacher="offline",
                         fixmatch_threshold=0.9)
    checkpoint = train_centralized(site_dir, tmp_path / "semi.pt", model_args=TINY, config=config, report=lambda _: None,
                                   semi_supervised=True, label_fraction=0.4, postprocess={"postprocess-min-mm3": 50.0})
    assert [(m.offline, m.postprocessing.enabled, m.postprocessing.min_mm3) for m in made] == [(True, True, 50.0)]
    assert checkpoint.run_config["postprocess-min-mm3"] == 50.0, "the checkpoint records what its teacher used"
    with pytest.raises(ValueError, match="postprocess-min-mm3"):
        train_centralized(site_dir, tmp_path / "bad.pt", model_args=TINY, config=config, report=lambda _: None,
                          semi_supervised=True, postprocess={"postprocess-min-mm3": -1.0})


def test_the_offline_teacher_trains_a_3d_model_on_patches(site_dir: Path) -> None:
    cases = load_site(site_dir, cache=None).cases
    config = TrainConfig(epochs=1, steps=2, batch_size=2, samples_per_case=2, seed=0, patch_size=(16, 16, 16),
                         fixmatch_teacher="offline", fixmatch_threshold=0.9)
    model = build_model("unet3d", 4, 3, base_channels=4, depth=2)
    [item] = FixMatch(3, (16, 16, 16), config).label_volumes(model, cases[1:2], torch.device("cpu"))
    assert item["pseudo"].shape == (3, *cases[1].shape[1:]) and set(np.unique(item["pseudo"])) <= {0, 1, 2}
    stats = train(model, cases[:1], 3, config, torch.device("cpu"), unlabelled=[_LabelGuard(c) for c in cases[1:3]])
    assert stats["train-samples"] == 8.0 and 0.0 < stats["unlabelled-confident"] <= 1.0
