"""Checkpoints load as data only: a file that would run code when unpickled is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import FORMAT, Checkpoint, load_checkpoint, save_checkpoint
from common.config import dataset_spec


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
