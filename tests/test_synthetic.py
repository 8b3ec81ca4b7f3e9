from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedlesion.cli import main
from fedlesion.simulations.synthetic import MODALITIES, make_case, scanner_profile, site_case_counts
from tests.conftest import TINY_SHAPE


def test_synth_command_writes_brats2021_layout(tmp_path: Path) -> None:
    assert main(["synth", "--out", str(tmp_path), "--sites", "2", "--cases-per-site", "2", "--shape", "24,24,12"]) == 0
    cases = sorted((tmp_path / "site-0").glob("Synth_*"))
    assert len(cases) == 2
    for case in cases:
        for modality in MODALITIES:
            img = nib.load(case / f"{case.name}_{modality}.nii.gz")
            assert img.shape == (24, 24, 12) and img.get_data_dtype() == np.float32
            assert np.linalg.det(img.affine[:3, :3]) != 0
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        seg = nib.load(case / f"{case.name}_seg.nii.gz")
        assert seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, img.affine)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_tumours_nest_inside_the_brain(tiny_sites: Path) -> None:
    for case in sorted(tiny_sites.glob("site-*/Synth_*")):
        seg = np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
        flair = np.asarray(nib.load(case / f"{case.name}_flair.nii.gz").dataobj)
        assert (seg == 2).any(), "every case has edema"
        assert np.all(flair[seg > 0] > 0), "tumour lies inside the (nonzero) brain"


def test_modalities_have_different_tissue_contrast() -> None:
    channels, seg = make_case((64, 64, 40), np.random.default_rng(1), scanner_profile(0, 0))
    ratios = {}
    for modality, image in channels.items():
        brain = (image > 0) & (seg == 0)
        ratios[modality] = image[seg == 2].mean() / np.median(image[brain])
    assert ratios["flair"] > 1.2, "edema is bright on FLAIR"
    assert ratios["t1"] < 1.0, "edema is dark on T1"
    assert ratios["t2"] > 1.2, "edema is bright on T2"
    if (seg == 4).any():
        assert channels["t1ce"][seg == 4].mean() > 1.3 * channels["t1"][seg == 4].mean(), "the rim enhances"


def test_sites_differ_in_size_and_intensity(tiny_sites: Path) -> None:
    sizes = [len(list(tiny_sites.glob(f"site-{i}/Synth_*"))) for i in range(3)]
    assert sizes == site_case_counts(3, 3) == [2, 3, 4]
    stats = []
    for i in range(3):
        images = [np.asarray(nib.load(c / f"{c.name}_t1.nii.gz").dataobj)
                  for c in sorted(tiny_sites.glob(f"site-{i}/Synth_*"))]
        values = np.concatenate([image[image > 0] for image in images])
        stats.append((np.median(values), np.std(values) / np.median(values)))
    medians = [m for m, _ in stats]
    assert max(medians) / min(medians) > 2.0, f"scanner intensity scales should differ: {medians}"


def test_same_seed_same_data(tmp_path: Path) -> None:
    from fedlesion.simulations.synthetic import synthesize

    synthesize(tmp_path / "a", 1, 2, TINY_SHAPE, seed=5)
    synthesize(tmp_path / "b", 1, 2, TINY_SHAPE, seed=5)
    for a in sorted((tmp_path / "a").rglob("*.nii.gz")):
        b = tmp_path / "b" / a.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))


@pytest.mark.parametrize("sites, per_site", [(0, 3), (3, 0)])
def test_bad_site_counts(sites: int, per_site: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        site_case_counts(sites, per_site)
