"""Checkpoints load as data only: a file that would run code when unpickled is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlesion.common.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from fedlesion.common.config import dataset_spec


class _Payload:
    """Unpickling this would create ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return os.mkdir, (str(self.marker),)


def test_checkpoint_holding_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"format": FORMAT, "model": "unet2d", "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused, .*holds objects other than tensors.*posix\.mkdir"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_numpy_scalar_metrics_still_load(tmp_path: Path) -> None:
    """Metrics computed with NumPy (``np.float64`` Dice) are plain numbers, not code."""
    path = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                      metrics={"dice-wt": np.float64(0.5), "cases": np.int64(3)}), tmp_path / "a.pt")
    assert load_checkpoint(path).metrics == {"dice-wt": 0.5, "cases": 3}


def test_a_checkpoint_carries_no_local_path_or_case_id(tmp_path: Path) -> None:
    """What is shared (the global model) names no file of the coordinator's and no held-out case."""
    run_config = {"dataset": "/srv/coordinator/lesions.json", "split": "/srv/coordinator/split.json",
                  "server-eval-data": "/srv/coordinator/held-out", "server-eval-include": "*CBICA_ASK*",
                  "server-eval-manifest": "/srv/m.json", "output-dir": "/srv/out", "resume-from": "/srv/out/r/last.pt",
                  "data-root": "/srv/data", "manifest": "/srv/data/m.json", "learning-rate": 0.002,
                  "postprocess": True, "train-case-count": 12}
    path = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                      run_config=run_config), tmp_path / "global.pt")
    kept = load_checkpoint(path).run_config
    assert kept == {"learning-rate": 0.002, "postprocess": True, "train-case-count": 12}
    assert "/srv" not in path.read_bytes().decode("latin-1") and b"CBICA" not in path.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o600
    # Layouts and split kinds named, not file paths, are kept.
    named = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                       run_config={"dataset": "brats2021", "split": "institution"}), tmp_path / "b.pt")
    assert load_checkpoint(named).run_config == {"dataset": "brats2021", "split": "institution"}


@pytest.mark.parametrize("field, value", [("model_args", [1, 2]), ("model", ["unet2d"]), ("run_config", [1]),
                                          ("round", "3"), ("round", True), ("epoch", 2.0), ("extra", "x")])
def test_a_checkpoint_with_fields_of_the_wrong_type_is_refused_with_the_file_named(tmp_path: Path, field: str,
                                                                                  value: object) -> None:
    """Fields a loader would use as a mapping, a name or a number: a wrong type is a clean error, not a
    TypeError deep in whatever reads it."""
    payload = {"format": FORMAT, "model": "unet2d", "model_args": {}, "spec": dataset_spec("brats2021").to_json(),
               "state_dict": {}, field: value}
    torch.save(payload, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=rf"odd\.pt: {field} of the wrong type"):
        load_checkpoint(tmp_path / "odd.pt")
    torch.save({**payload, field: {"model": "unet2d", "round": np.int64(3), "epoch": 2, "extra": {}, "model_args": {},
                                   "run_config": {}}[field]}, tmp_path / "fine.pt")
    fine = load_checkpoint(tmp_path / "fine.pt")
    assert fine.model == "unet2d" and type(fine.round) is int and type(fine.epoch) is int


@pytest.mark.parametrize("recorded, expected", [
    ([16, 16, 8], (16, 16, 8)), ((np.int64(32), 32, 16), (32, 32, 16)), ("64,64,40", (64, 64, 40)),
    ([16, 16, 4], None), ("16,16", None), ([16, "x", 8], None), (7, None), ([16.0, 16, 8], None),
    ([True, 16, 8], None), ("100000,100000,100000", None)])
def test_a_recorded_patch_is_used_only_when_it_is_a_real_shape(tmp_path: Path, recorded: object,
                                                                 expected: tuple[int, ...] | None) -> None:
    """A received checkpoint's patch is its sliding window and a fine-tuning's patch: one that is not three
    whole numbers of a sensible size is refused with the file named, not turned into a crash or a huge patch."""
    path = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                      run_config={"patch_size": recorded}), tmp_path / "received.pt")
    ckpt = load_checkpoint(path)
    if expected is not None:
        assert ckpt.patch_size == expected
    else:
        with pytest.raises(ValueError, match=r"received\.pt: its recorded patch size is unusable"):
            ckpt.patch_size  # noqa: B018 - the property validates


@pytest.mark.parametrize("recorded", ["false", 0, None])
def test_a_recorded_crop_setting_that_is_not_a_boolean_is_refused(tmp_path: Path, recorded: object) -> None:
    """bool('false') is True: a guess would feed the model volumes cropped the other way."""
    path = save_checkpoint(Checkpoint(model="unet2d", model_args={}, spec=dataset_spec("brats2021"), state_dict={},
                                      run_config={"crop_foreground": recorded}), tmp_path / "received.pt")
    with pytest.raises(ValueError, match=r"received\.pt: its recorded crop-foreground"):
        load_checkpoint(path).crop_foreground  # noqa: B018 - the property validates
