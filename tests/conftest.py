"""Shared fixtures: tiny synthetic sites and the real BraTS 2018 sample when present."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedlesion.simulations.synthetic import synthesize

REPO = Path(__file__).resolve().parent.parent
TINY_SHAPE = (32, 32, 16)

torch.set_num_threads(min(2, torch.get_num_threads()))


# Test modules that start real processes (flower-superlink, SuperNodes, flwr run, Ray, fresh
# interpreters per round): the slow half of the suite. `pytest -m "not process"` skips them.
# Modules that mix both kinds mark their process-level tests themselves (test_resume).
PROCESS_MODULES = ("test_simulation", "test_deployment", "test_faults", "test_reproduce", "test_decode_once",
                   "test_interrupt")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in PROCESS_MODULES:
            item.add_marker(pytest.mark.process)


@pytest.fixture(scope="session", autouse=True)
def case_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the on-disk case cache of clients (and the processes tests start) out of ~/.cache."""
    folder = tmp_path_factory.mktemp("case-cache")
    os.environ["FEDLESION_CACHE_DIR"] = str(folder)
    return folder


def sample_data_dir() -> Path | None:
    """The six-case BraTS 2018 sample: $FEDLESION_SAMPLE_DATA, else ../shared/data/brats18-sample."""
    candidates = [os.environ.get("FEDLESION_SAMPLE_DATA"), REPO.parent / "shared" / "data" / "brats18-sample"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    found = sample_data_dir()
    if found is None:
        pytest.skip("real BraTS 2018 sample not found: set FEDLESION_SAMPLE_DATA or place it at ../shared/data/brats18-sample")
    return found


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny synthetic sites of 2, 3 and 4 cases."""
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(root, sites=3, cases_per_site=3, shape=TINY_SHAPE, seed=0)
    return root


def write_case(folder: Path, case: str, shape: tuple[int, ...] = (16, 16, 8), labels: tuple[int, ...] = (0, 1, 2, 4),
               affine: np.ndarray | None = None, seed: int = 0) -> Path:
    """A minimal BraTS 2021-layout case with random images and a label holding ``labels``."""
    rng = np.random.default_rng(seed)
    case_dir = folder / case
    case_dir.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    for modality in ("flair", "t1", "t1ce", "t2"):
        image = rng.uniform(1, 100, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), case_dir / f"{case}_{modality}.nii.gz")
    label = np.zeros(shape, dtype=np.uint8)
    for i, value in enumerate(labels):
        label[i:i + 2, 2:6, 2:6] = value
    nib.save(nib.Nifti1Image(label, affine), case_dir / f"{case}_seg.nii.gz")
    return case_dir


def weight_distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts' floating-point tensors."""
    return float(torch.linalg.vector_norm(torch.cat([(a[k].float() - b[k].float()).flatten()
                                                     for k in a if a[k].is_floating_point()])))
