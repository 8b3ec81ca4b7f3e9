from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedlesion.common.data import discover_cases, load_manifest
from fedlesion.cli import main
from fedlesion.common.splits import KINDS, Split, by_institution, dirichlet_count, dirichlet_volume, fets, iid, make_split, skew
from tests.conftest import REPO

IDS = [f"Brats18_{inst}_{i:03d}_1" for inst, n in (("CBICA", 12), ("TCIA01", 5), ("TCIA08", 3), ("2013", 4))
       for i in range(n)]
VOLUMES = {case: float(v) for case, v in zip(IDS, np.random.default_rng(0).lognormal(8, 1, len(IDS)))}


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("fets")])
def test_every_split_covers_each_case_exactly_once(kind: str) -> None:
    split = make_split(kind, IDS, num_sites=4, alpha=0.3, seed=1, volumes=VOLUMES)
    assigned = Counter(c for cases in split.sites.values() for c in cases)
    assert set(assigned) == set(IDS) and set(assigned.values()) == {1}
    assert all(split.sites.values()), "no site is empty"


def test_institution_split_reads_the_id() -> None:
    sizes = by_institution(IDS).sizes()
    assert sizes == {"CBICA": 12, "TCIA01": 5, "2013": 4, "TCIA08": 3}
    with pytest.raises(ValueError, match="cannot tell the institution"):
        by_institution(["case-1"])


def test_shared_sample_by_institution(sample_dir: Path) -> None:
    spec = load_manifest(REPO / "common" / "manifests" / "brats18-sample.json")
    assert by_institution(discover_cases(sample_dir, spec)).sizes() == {"CBICA": 4, "TCIA02": 1, "TCIA08": 1}


def test_fets_partitioning_1_has_the_published_sites() -> None:
    split = fets("fets1")
    sizes = sorted(split.sizes().values(), reverse=True)
    assert len(split.sites) == 23 and sum(sizes) == 1251
    assert sizes[:2] == [511, 382] and sizes[-1] == 4
    assert all(c.startswith("BraTS2021_") for cases in split.sites.values() for c in cases)
    assert any("inferred" in note for note in split.notes)
    assert len(fets("fets2").sites) == 33


def test_fets_reports_subjects_missing_from_the_data() -> None:
    present = fets("fets1").sites["site-01"][:5]
    split = fets("fets1", case_ids=present)
    assert split.sizes() == {"site-01": 5}
    assert any("not in the data folder" in note for note in split.notes)


def test_small_alpha_is_more_skewed_than_large() -> None:
    ids = [f"c{i:03d}" for i in range(200)]
    small = np.mean([skew(dirichlet_count(ids, 8, 0.1, seed)) for seed in range(10)])
    large = np.mean([skew(dirichlet_count(ids, 8, 100.0, seed)) for seed in range(10)])
    assert small > 3 * large
    volumes = {c: float(i) for i, c in enumerate(ids)}

    def volume_spread(alpha: float, seed: int) -> float:  # how differently sized the sites' tumours are
        means = [np.mean([volumes[c] for c in cases]) for cases in dirichlet_volume(volumes, 4, alpha, seed).sites.values()]
        return float(np.std(means))

    assert np.mean([volume_spread(0.1, s) for s in range(10)]) > 2 * np.mean([volume_spread(100.0, s) for s in range(10)])


def test_iid_is_balanced_and_seeded() -> None:
    split = iid(IDS, 4, seed=3)
    assert set(split.sizes().values()) == {6}
    assert split.sites == iid(IDS, 4, seed=3).sites != iid(IDS, 4, seed=4).sites


@pytest.mark.parametrize("kwargs, match", [({"num_sites": 0}, "need 1 <= sites"), ({"alpha": 0.0}, "alpha must be > 0")])
def test_bad_split_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dirichlet_count(IDS, **{"num_sites": 3, "alpha": 1.0, "seed": 0, **kwargs})


def test_split_command_writes_json_and_prints_sizes(tiny_sites: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "split.json"
    assert main(["split", "--data", str(tiny_sites / "site-2"), "--kind", "iid", "--sites", "2", "--out", str(out)]) == 0
    assert "site-0: 2 case(s)" in capsys.readouterr().out
    split = Split.load(out)
    assert sorted(c for cases in split.sites.values() for c in cases) == sorted(p.name for p in (tiny_sites / "site-2").glob("Synth*"))
    assert json.loads(out.read_text())["kind"] == "iid"


@pytest.mark.parametrize("case", ["../../etc/passwd", "Brats18_CBICA_AAA_1/../../x", ".hidden", "", 7])
def test_a_split_file_naming_a_path_instead_of_a_case_is_refused(tmp_path: Path, case: object) -> None:
    """Case IDs become folder names below the data folder: one that climbs out of it (or is not a name) is refused
    with the file named."""
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"kind": "iid", "sites": {"a": ["Brats18_CBICA_AAB_1", case]}}))
    with pytest.raises(ValueError, match=f"split file {path}: .*not case folder names"):
        Split.load(path)


@pytest.mark.parametrize("name", ["partitioning_1", "partitioning_2", "small_split", "validation"])
def test_shipped_partition_tables_are_the_fets_csvs_row_for_row(name: str) -> None:
    import csv

    folder = Path(os.environ.get("FEDLESION_FETS_PARTITIONS") or REPO.parent / "shared" / "data" / "fets-partitions")
    source = folder / f"{name}.csv"
    if not source.is_file():
        pytest.skip(f"FeTS partition CSVs not found at {folder}: set FEDLESION_FETS_PARTITIONS to compare")
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    shipped = json.loads((REPO / "common" / "partitions" / f"{name}.json").read_text())
    assert [shipped["columns"], *shipped["rows"]] == rows
