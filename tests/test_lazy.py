"""Case data whose memory does not grow with the site: arrays are read when a case is used, and only then.

A SuperNode starts a ClientApp process per message; what one process reads and holds must depend
on what it samples, not on how many cases the hospital has.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fedlesion.common.data as data
from fedlesion.client import site as client_site
from fedlesion.common.config import TrainConfig
from fedlesion.common.data import LAYOUTS, CaseCache, LazyCase, load_case, load_site, purge_cache
from fedlesion.common.engine import train
from fedlesion.common.model import build_model
from fedlesion.simulations.synthetic import write_site

BRATS = LAYOUTS["brats2021"]
SHAPE = (24, 24, 12)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lazy") / "site"
    write_site(folder, 0, 10, SHAPE, seed=0)
    return folder


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Every cached array file a test maps (the only way arrays come off the cache's disk), by case folder."""
    opened: Counter = Counter()
    real = data.map_npy

    def counting(path):  # noqa: ANN001, ANN202
        opened[Path(path).parent.name] += 1
        return real(path)

    monkeypatch.setattr(data, "map_npy", counting)
    return opened


def test_listing_a_cached_site_reads_no_array_and_decodes_nothing(site: Path, tmp_path: Path, mapped: Counter) -> None:
    load_site(site, BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache"))  # preprocess once
    mapped.clear()
    before = data.DECODE_STATS.files
    cases = load_site(site, BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache")).cases  # a fresh process
    assert len(cases) == 10 and all(isinstance(c, LazyCase) for c in cases)
    assert not mapped and data.DECODE_STATS.files == before
    assert cases[3].shape == cases[3].image.shape and cases[3].labelled
    assert len(mapped) == 1, "using one case reads that case only"


def test_training_reads_only_the_cases_it_samples(site: Path, tmp_path: Path, mapped: Counter) -> None:
    load_site(site, BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache"))
    cases = load_site(site, BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache")).cases
    mapped.clear()
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    train(model, cases, 2, TrainConfig(epochs=1, steps=1, batch_size=2, samples_per_case=4, seed=0), torch.device("cpu"))
    assert 1 <= len(mapped) <= 2, f"one batch of 2 samples read {len(mapped)} of 10 cases"


def test_mapped_arrays_equal_the_decoded_ones_and_writes_never_reach_the_cache(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_site(site, BRATS, crop_foreground=True, cache=CaseCache(1 << 30, disk_dir=cache))
    [lazy] = load_site(site, BRATS, case_ids=["Synth_S00_004"], crop_foreground=True,
                       cache=CaseCache(1 << 30, disk_dir=cache)).cases
    decoded = load_case(site, BRATS, "Synth_S00_004", crop_foreground=True)
    case = lazy.load()
    assert case.image.shape == decoded.image.shape and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.image, decoded.image)
    np.testing.assert_array_equal(case.regions, decoded.regions)
    case.image[...] = 0  # a transform writing in place: private pages (copy-on-write), not the file
    np.testing.assert_array_equal(lazy.image, decoded.image)


def test_without_a_disk_cache_memory_holds_at_most_its_bound(site: Path) -> None:
    one = load_case(site, BRATS, "Synth_S00_000").nbytes
    cache = CaseCache(max_bytes=int(2.5 * one))
    cases = load_site(site, BRATS, cache=cache).cases
    for case in cases:
        np.testing.assert_array_equal(case.image, load_case(site, BRATS, case.case).image)
        assert cache._bytes <= 2.5 * one and len(cache._items) <= 2
    assert cache.disk_dir is None


def test_an_unlabelled_case_dropped_from_memory_is_decoded_again_without_its_label(site: Path, tmp_path: Path) -> None:
    """Semi-supervised: a case with no label file loads (unlabelled); once memory has dropped it, it must decode again
    as it first did, not be refused for the missing label."""
    folder = tmp_path / "site"
    for case in ("Synth_S00_004", "Synth_S00_005"):
        (folder / case).mkdir(parents=True)
        for f in (site / case).iterdir():
            if case == "Synth_S00_004" or not f.name.endswith("_seg.nii.gz"):
                (folder / case / f.name).write_bytes(f.read_bytes())
    cases = {c.case: c for c in load_site(folder, BRATS, cache=CaseCache(0), unlabelled=True).cases}  # no disk
    assert not cases["Synth_S00_005"].labelled and cases["Synth_S00_004"].labelled
    cases["Synth_S00_004"].image  # noqa: B018 - memory keeps one case: this drops the unlabelled one
    before = data.DECODE_STATS.files
    np.testing.assert_array_equal(cases["Synth_S00_005"].image,
                                  load_case(folder, BRATS, "Synth_S00_005", require_label=False).image)
    assert data.DECODE_STATS.files - before == 8  # its 4 scans decoded again, then 4 for the comparison


def test_an_entry_purged_while_a_site_uses_it_is_decoded_again(site: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    cases = load_site(site, BRATS, case_ids=["Synth_S00_001"], cache=CaseCache(0, disk_dir=folder)).cases
    purge_cache(folder)  # `fedlesion cache --purge`, or the size bound, between listing and use
    before = data.DECODE_STATS.files
    np.testing.assert_array_equal(cases[0].image, load_case(site, BRATS, "Synth_S00_001").image)
    assert data.DECODE_STATS.files - before == 10  # decoded (5 files), then compared with a fresh decode (5)


def test_a_supernode_caches_on_disk_only_where_the_hospital_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The disk cache holds patient-derived arrays outside the data folder: opt-in."""
    monkeypatch.delenv("FEDLESION_CACHE_DIR", raising=False)
    monkeypatch.setattr(client_site, "_CACHES", {})
    assert client_site._cache({}).disk_dir is None
    assert client_site._cache({"cache-dir": str(tmp_path / "c")}).disk_dir == tmp_path / "c"
    monkeypatch.setenv("FEDLESION_CACHE_DIR", str(tmp_path / "env"))
    assert client_site._cache({}).disk_dir == tmp_path / "env"


@pytest.mark.process
def test_a_clientapp_process_opens_only_the_cases_it_samples(site: Path, tmp_path: Path) -> None:
    """The real ClientApp handler in a fresh process per message, files counted by an audit hook on open()."""
    from fedlesion.simulations.bench_site import run_message

    config = {"model-args": "base_channels=4 depth=2", "local-steps": 1, "batch-size": 2, "val-fraction": 0.0}
    first = run_message(site, tmp_path / "cache", "train", config)
    assert first["decoded_files"] == 50  # the site's 10 cases, preprocessed once
    second = run_message(site, tmp_path / "cache", "train", config)
    assert second["decoded_files"] == 0 and 1 <= second["cases_opened"] <= 2, second
    assert second["process_seconds"] > second["seconds"] > 0, "the process's time holds the handler's and its start"


def test_lazy_cases_cross_into_a_spawned_dataloader_worker(site: Path, tmp_path: Path) -> None:
    """A DataLoader worker started by spawn (macOS, and Linux from Python 3.14) receives pickled cases; they
    unpickle with the same arrays (with no disk cache, with memory of their own), and a worker trains on them."""
    import pickle

    for disk in (None, tmp_path / "cache"):
        cases = load_site(site, BRATS, case_ids=["Synth_S00_002"], cache=CaseCache(1 << 30, disk_dir=disk)).cases
        copy = pickle.loads(pickle.dumps(cases[0]))
        np.testing.assert_array_equal(copy.image, cases[0].image)
    model = build_model("unet2d", 4, 3, base_channels=4, depth=2)
    stats = train(model, cases, 2, TrainConfig(epochs=1, steps=1, batch_size=2, samples_per_case=2, seed=0, num_workers=1),
                  torch.device("cpu"))
    assert np.isfinite(stats["train-loss"])


def test_an_interrupted_write_leaves_nothing_the_purge_cannot_remove(site: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    load_site(site, BRATS, case_ids=["Synth_S00_003"], cache=CaseCache(0, disk_dir=folder))
    [entry] = data.cache_entries(folder)
    partial = folder / f".{entry.name}.abcd1234"  # a writer killed mid-np.save: its folder and temporary file
    partial.mkdir(mode=0o700)
    (partial / ".image.npy.x1y2z3w4.tmp").write_bytes(b"\x93NUMPY half")
    assert partial in data.cache_entries(folder)
    removed, _ = purge_cache(folder)
    assert removed == 2 and not partial.exists() and not entry.exists()
