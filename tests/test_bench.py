from __future__ import annotations

import json
from pathlib import Path

from simulations.bench import run_bench


def test_bench_writes_the_contracted_keys(tiny_sites: Path, tmp_path: Path) -> None:
    result = run_bench(tiny_sites / "site-1", tmp_path, ["unet2d"], cases=1, repeats=1,
                       model_args={"unet2d": {"base_channels": 4, "depth": 2}})
    row = json.loads((tmp_path / "bench.json").read_text())["inference"]["unet2d"]["cpu"]
    assert row["end_to_end_ratio"] > 0 and row["model_only_s"] > 0 and row["reference_s"] > 0
    assert row == result["inference"]["unet2d"]["cpu"]
    assert {"dice_project", "dice_reference"} <= set(row["cases"][0])
    assert result["versions"]["monai"] and "| unet2d | cpu |" in (tmp_path / "bench.md").read_text()
