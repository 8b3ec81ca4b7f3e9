from __future__ import annotations

import json
from pathlib import Path

import os
import time

import pytest

from fedlesion.simulations.bench import run_bench
from fedlesion.simulations.bench_federation import federation_overhead, fets2_sizes, tree_rss


def test_bench_writes_the_contracted_keys(tiny_sites: Path, tmp_path: Path) -> None:
    result = run_bench(tiny_sites / "site-1", tmp_path, ["unet2d"], cases=2, repeats=1,
                       model_args={"unet2d": {"base_channels": 4, "depth": 2}})
    row = json.loads((tmp_path / "bench.json").read_text())["inference"]["unet2d"]["cpu"]
    assert row["end_to_end_ratio"] > 0 and row["model_only_s"] > 0 and row["reference_s"] > 0
    assert row["reference_uncropped_s"] > 0 and row["end_to_end_ratio_uncropped_reference"] > 0
    assert row == result["inference"]["unet2d"]["cpu"]
    assert {"dice_project", "dice_reference", "dice_reference_uncropped"} <= set(row["cases"][0])
    # The cropping reference runs the network on the head's box only; its labels are scored on the full grid.
    for case in row["cases"]:
        assert case["reference_network_voxels"] < case["reference_uncropped_network_voxels"]
    assert result["versions"]["monai"] and "| unet2d | cpu |" in (tmp_path / "bench.md").read_text()
    training = result["training"]["unet2d"]["cpu"]
    assert training["throughput_ratio"] > 0 and training["samples_per_s"] > 0 and training["reference_samples_per_s"] > 0
    assert training["reference_batch_sizes"] == [training["batch_size"]], "both sides step on batches of one size"
    assert "| unet2d | cpu |" in (tmp_path / "bench.md").read_text().split("MONAI recipe (samples/s)")[1]


def test_fets2_proportions_cover_every_case() -> None:
    sizes = fets2_sizes(33, 99)
    assert len(sizes) == 33 and sum(sizes) == 99 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 5 * sizes[-1]
    with pytest.raises(ValueError, match="fewer than 40"):
        fets2_sizes(40, 100)


def test_federation_overhead_from_round_records() -> None:
    history = [{"round": r, "train-phase-seconds": 10.0,
                "replies": [{"metrics": {"train-seconds": 9.0, "update-bytes": 1010.0}},
                            {"metrics": {"train-seconds": 6.0, "update-bytes": 1010.0}}]}
               for r in (1, 2, 3)]
    result = federation_overhead(history, fp32_bytes=1000)
    assert result["overhead_fraction"] == pytest.approx(0.1) and result["bytes_ratio"] == pytest.approx(1.01)


def test_tree_memory_counts_child_processes() -> None:
    import subprocess
    import sys

    alone = tree_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(5)"])
    try:
        time.sleep(2)
        assert tree_rss(os.getpid()) > alone + 150 * 2**20
    finally:
        child.kill()
        child.wait()


def test_bench_devices_are_chosen_and_checked(tiny_sites: Path, tmp_path: Path) -> None:
    import torch

    result = run_bench(tiny_sites / "site-1", tmp_path / "cpu", ["unet2d"], cases=1, repeats=1, sections=["inference"],
                       model_args={"unet2d": {"base_channels": 4, "depth": 2}}, devices=["cpu"])
    assert list(result["inference"]["unet2d"]) == ["cpu"]
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    with pytest.raises(ValueError, match="CUDA device"):
        run_bench(tiny_sites / "site-1", tmp_path / "gpu", ["unet2d"], cases=1, repeats=1, sections=["inference"],
                  devices=[missing])
