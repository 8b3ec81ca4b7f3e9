from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedlesion.common.data import (
    DECODE_STATS,
    LAYOUTS,
    CaseCache,
    CaseError,
    DatasetSpec,
    case_paths,
    conform_spec,
    discover_cases,
    load_case,
    load_manifest,
    load_site,
    resolve_spec,
    split_train_val,
)
from tests.conftest import REPO, write_case

BRATS = LAYOUTS["brats2021"]
SAMPLE_MANIFEST = REPO / "common" / "manifests" / "brats18-sample.json"


def test_brats2021_case_loads_with_regions(tmp_path: Path) -> None:
    write_case(tmp_path, "Case_001")
    prepared = load_case(tmp_path, BRATS, "Case_001")
    assert prepared.image.shape == (4, 16, 16, 8) and prepared.image.dtype == np.float32
    assert prepared.regions.shape == (3, 16, 16, 8)
    # WT = 1,2,4; TC = 1,4; ET = 4: nested, so WT >= TC >= ET.
    wt, tc, et = (prepared.regions[i].sum() for i in range(3))
    assert wt > tc > et > 0
    nonzero = prepared.image[0] != 0
    assert abs(prepared.image[0][nonzero].mean()) < 1e-4 and abs(prepared.image[0][nonzero].std() - 1) < 1e-3


def test_brats2023_and_msd_layouts_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    case = tmp_path / "b23" / "BraTS-GLI-00000-000"
    case.mkdir(parents=True)
    for m in ("t2f", "t1n", "t1c", "t2w"):
        nib.save(nib.Nifti1Image(rng.uniform(1, 5, (8, 8, 8)).astype(np.float32), np.eye(4)), case / f"{case.name}-{m}.nii.gz")
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 3
    nib.save(nib.Nifti1Image(label, np.eye(4)), case / f"{case.name}-seg.nii.gz")
    spec = resolve_spec(tmp_path / "b23")
    assert spec.name == "brats2023"
    prepared = load_site(tmp_path / "b23", spec).cases[0]
    assert prepared.regions[2].sum() == 8  # ET = 3

    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(rng.uniform(1, 5, (8, 8, 8, 4)).astype(np.float32), np.eye(4)), msd / "imagesTr" / "BRATS_001.nii.gz")
    label[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), msd / "labelsTr" / "BRATS_001.nii.gz")
    spec = resolve_spec(msd)
    assert spec.name == "msd-task01"
    prepared = load_site(msd, spec).cases[0]
    assert prepared.image.shape == (4, 8, 8, 8) and prepared.regions[0].sum() == 8 and prepared.regions[1].sum() == 0


@pytest.mark.parametrize("case", ["../outside", "a/../../b", "..", "", "x\\..\\y"])
def test_a_case_id_cannot_lead_outside_the_data_folder(tmp_path: Path, case: str) -> None:
    """Case IDs come from split files, the Python API and manifests' globs: one that is a path is refused before any
    file is touched, as patterns are."""
    with pytest.raises(ValueError, match="is not a case name"):
        case_paths(tmp_path, BRATS, case)
    assert case_paths(tmp_path, BRATS, "Brats18_CBICA_AAB_1")["flair"][0].parent == tmp_path / "Brats18_CBICA_AAB_1"


def test_region_labels_map_back_to_one_label() -> None:
    assert BRATS.region_labels() == {"WT": 2, "TC": 1, "ET": 4}
    assert LAYOUTS["brats2023"].region_labels() == {"WT": 2, "TC": 1, "ET": 3}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"channels": {}, "labels": [0, 1], "regions": {"A": [1]}}, "'channels' is empty"),
        ({"channels": {"a": "x.nii.gz"}, "labels": [0, 1], "regions": {"A": [1]}}, "with a '\\{case\\}' placeholder"),
        # Patterns that would read outside the data folder.
        ({"channels": {"a": "../{case}.nii.gz"}, "labels": [0, 1], "regions": {"A": [1]}}, "relative path inside"),
        ({"channels": {"a": "{case}/../../x/{case}.nii.gz"}, "labels": [0, 1], "regions": {"A": [1]}}, "no '..'"),
        ({"channels": {"a": "/etc/{case}.nii.gz"}, "labels": [0, 1], "regions": {"A": [1]}}, "no leading '/'"),
        ({"channels": {"a": "{case}.nii.gz"}, "label": "../{case}_seg.nii.gz", "labels": [0, 1], "regions": {"A": [1]}},
         "relative path inside"),
        # Values of the wrong kind name the key.
        ({"channels": {"a": "{case}.nii.gz"}, "labels": "abc", "regions": {"A": [1]}}, "'labels' must be a list"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, "x"], "regions": {"A": [1]}}, "'labels' holds 'x'"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, 1.5], "regions": {"A": [1]}}, "'labels' holds 1.5"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, 1], "regions": {"A": "1"}}, "'regions.A' must be a list"),
        ({"channels": {"a": {"nested": "{case}"}}, "labels": [0, 1], "regions": {"A": [1]}}, "'channels.a' must be a path"),
        ({"channels": ["{case}.nii.gz"], "labels": [0, 1], "regions": {"A": [1]}}, "'channels' must be an object"),
        ({"channels": {"a": "{case}.nii.gz#x"}, "labels": [0, 1], "regions": {"A": [1]}}, "volume index must be a whole"),
        ({"channels": {"a": "{case}.nii.gz#-1"}, "labels": [0, 1], "regions": {"A": [1]}}, "volume index must be a whole"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, 1], "regions": {"A": [2]}}, "not declared"),
        # A label map is written as uint8: 300 could never be written, -1 never read.
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, 300], "regions": {"A": [300]}}, "\\[300\\] are outside 0-255"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [-1, 0, 1], "regions": {"A": [1]}}, "\\[-1\\] are outside 0-255"),
        ({"channels": {"a": "{case}.nii.gz"}, "labels": [0, 1, 2, 3], "regions": {"A": [1, 2], "B": [2, 3]}},
         "does not map back to one label"),
        ({"channels": {"a": "{case}.nii.gz"}}, "missing key"),
    ],
)
def test_bad_manifests_are_rejected(tmp_path: Path, data: dict, match: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as error:
        load_manifest(path)
    assert str(path) in str(error.value) or "dataset spec" in str(error.value), "the error names the file or the spec"


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not valid UTF-8 JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid UTF-8 JSON"),
    (b'["a list"]', "expected a JSON object"),
])
def test_unreadable_manifests_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as error:
        load_manifest(path)
    assert str(path) in str(error.value)


def _brats_with_channels(*names: str, regions: tuple[str, ...] = ("WT", "TC", "ET")) -> DatasetSpec:
    """BraTS 2021 files, listed under the given modality names in the given order."""
    return DatasetSpec(name="site", channels={n: f"{{case}}/{{case}}_{n}.nii.gz" for n in names},
                       label=BRATS.label, labels=BRATS.labels, regions={r: BRATS.regions[r] for r in regions})


@pytest.mark.parametrize(
    "spec, run, order",
    [
        (_brats_with_channels("t1", "flair", "t2", "t1ce"), BRATS, ["flair", "t1", "t1ce", "t2"]),
        (_brats_with_channels("flair", "t1", "t1ce", "t2", regions=("ET", "WT", "TC")), BRATS, ["flair", "t1", "t1ce", "t2"]),
        (LAYOUTS["brats2023"], BRATS, ["t2f", "t1n", "t1c", "t2w"]),
        (LAYOUTS["msd-task01"], LAYOUTS["brats2023"], ["flair", "t1", "t1gd", "t2"]),
        (_brats_with_channels("T2W", "T1N", "T2F", "T1C"), LAYOUTS["msd-task01"], ["T2F", "T1N", "T1C", "T2W"]),
    ],
)
def test_channels_are_matched_by_modality_and_put_in_the_run_order(spec: DatasetSpec, run: DatasetSpec,
                                                                   order: list[str]) -> None:
    conformed = conform_spec(spec, run, "site")
    assert list(conformed.channels) == order and list(conformed.regions) == list(run.regions)
    assert all(conformed.channels[name] == spec.channels[name] for name in order), "each name keeps its own file"


@pytest.mark.parametrize(
    "spec, match",
    [
        (_brats_with_channels("flair", "t1", "t1ce", "pd"), r"site: layout 'site' has channels \['flair', 't1', 't1ce', 'pd'\]"
                                                            r".*expects channels \['flair', 't1', 't1ce', 't2'\]"),
        (_brats_with_channels("flair", "t1", "t1ce"), r"has channels \['flair', 't1', 't1ce'\].*expects channels"),
        (_brats_with_channels("flair", "t1", "t1ce", "t2", regions=("TC", "ET")), r"regions \['TC', 'ET'\].*regions \['WT', 'TC', 'ET'\]"),
        (_brats_with_channels("flair", "t1", "t1ce", "t1c"), "names modality 't1ce' twice"),
    ],
)
def test_data_with_other_channels_or_regions_is_refused(spec: DatasetSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        conform_spec(spec, BRATS, "site")


def test_reordered_channels_and_regions_load_in_the_run_order(tmp_path: Path) -> None:
    write_case(tmp_path, "Order_001")
    reference = load_case(tmp_path, BRATS, "Order_001")
    cache = CaseCache(max_bytes=1 << 30)  # shared: a reordered spec must not be served another order's arrays
    site = _brats_with_channels("t1", "flair", "t2", "t1ce", regions=("ET", "WT", "TC"))
    as_listed = load_site(tmp_path, site, cache=cache).cases[0]
    np.testing.assert_array_equal(as_listed.image, reference.image[[1, 0, 3, 2]])
    conformed = load_site(tmp_path, conform_spec(site, BRATS, "site"), cache=cache).cases[0]
    np.testing.assert_array_equal(conformed.image, reference.image)
    np.testing.assert_array_equal(conformed.regions, reference.regions)
    regions_only = load_site(tmp_path, _brats_with_channels("flair", "t1", "t1ce", "t2", regions=("ET", "WT", "TC")),
                             cache=cache).cases[0]
    np.testing.assert_array_equal(regions_only.regions, reference.regions[[2, 0, 1]])


def test_unknown_layout_error_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="add a manifest"):
        resolve_spec(tmp_path)


def _corrupt(case_dir: Path, kind: str) -> str:
    """Break one case in one way; return the file the error must name."""
    case = case_dir.name
    flair = case_dir / f"{case}_flair.nii.gz"
    seg = case_dir / f"{case}_seg.nii.gz"
    if kind == "truncated":
        data = flair.read_bytes()
        flair.write_bytes(data[: len(data) // 2])
        return flair.name
    if kind == "not-nifti":
        flair.write_bytes(gzip.compress(b"this is a text report, not an image" * 20))
        return flair.name
    if kind == "shape":
        nib.save(nib.Nifti1Image(np.ones((16, 16, 9), np.float32), np.eye(4)), flair)
        return flair.name
    if kind == "affine":
        shifted = np.eye(4)
        shifted[0, 3] = 5.0
        nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), shifted), flair)
        return flair.name
    if kind == "nan":
        image = np.ones((16, 16, 8), np.float32)
        image[1, 1, 1] = np.nan
        image[2, 2, 2] = np.inf
        nib.save(nib.Nifti1Image(image, np.eye(4)), flair)
        return flair.name
    if kind == "labels":
        label = np.zeros((16, 16, 8), np.uint8)
        label[0, 0, 0] = 3
        nib.save(nib.Nifti1Image(label, np.eye(4)), seg)
        return seg.name
    if kind == "missing":
        flair.unlink()
        return flair.name
    if kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((16, 16, 8, 2), np.float32), np.eye(4)), flair)
        return flair.name
    image = np.random.default_rng(2).uniform(1, 100, (16, 16, 8)).astype(np.float32)
    if kind in ("singular", "nonfinite-affine"):  # nibabel refuses to write these: the header bytes are edited
        raw = bytearray(nib.Nifti1Image(image, np.eye(4)).to_bytes())
        raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the affine is srow_x/y/z
        raw[312:328] = np.array([0, 0, 0.0 if kind == "singular" else np.nan, 0], "<f4").tobytes()  # srow_z
        flair.write_bytes(gzip.compress(bytes(raw)))
        return flair.name
    if kind == "complex":
        nib.save(nib.Nifti1Image(image.astype(np.complex64), np.eye(4)), flair)
        return flair.name
    if kind == "rgb":  # an RGB24 export of a scan
        rgb = np.zeros((16, 16, 8), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
        rgb["R"] = image.astype(np.uint8)
        nib.save(nib.Nifti1Image(rgb, np.eye(4)), flair)
        return flair.name
    if kind == "constant":  # a missing modality exported as zeros
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), flair)
        return flair.name
    if kind == "huge-header":  # a small file whose header declares 32767^3 voxels (a decompression bomb's header)
        raw = bytearray(nib.Nifti1Image(image, np.eye(4)).to_bytes())
        raw[42:48] = np.array([32767, 32767, 32767], "<i2").tobytes()  # dim[1..3] of the NIfTI-1 header
        flair.write_bytes(gzip.compress(bytes(raw)))
        return flair.name
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("truncated", "truncated or corrupt"),
        ("not-nifti", "not a NIfTI file"),
        ("shape", "differs from"),
        ("affine", "affine differs"),
        ("nan", "2 voxel\\(s\\) are NaN or Inf"),
        ("labels", "label values \\[3\\] are not in the declared set"),
        ("missing", "missing modality file"),
        ("4d", "expected a 3D volume"),
        ("singular", "affine is missing, non-finite or singular"),
        ("nonfinite-affine", "affine is missing, non-finite or singular"),
        ("complex", "voxels are of type complex64"),
        ("rgb", "voxels are of type .*R.*u1"),
        ("constant", "every voxel is 0: a blank or missing scan"),
        ("huge-header", "header declares shape \\(32767, 32767, 32767\\)"),
    ],
)
def test_each_bad_case_gives_its_named_error(tmp_path: Path, kind: str, problem: str) -> None:
    write_case(tmp_path, "Good_001")
    bad = write_case(tmp_path, "Bad_002", seed=1)
    filename = _corrupt(bad, kind)
    with pytest.raises(CaseError, match=problem) as info:
        load_case(tmp_path, BRATS, "Bad_002")
    assert filename in str(info.value) and "Bad_002" in str(info.value)
    # A dataset skips it with a reason and keeps the good case; or stops, by setting.
    site = load_site(tmp_path, BRATS, cache=None)
    assert [c.case for c in site.cases] == ["Good_001"]
    assert list(site.skipped) == ["Bad_002"] and filename in site.skipped["Bad_002"]
    with pytest.raises(CaseError):
        load_site(tmp_path, BRATS, on_error="raise", cache=None)


def test_any_failure_while_loading_one_case_is_that_cases_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nibabel's OrientationError (or anything else unforeseen) for one case never stops a site."""
    import fedlesion.common.data as data

    write_case(tmp_path, "Good_001")
    write_case(tmp_path, "Bad_002", seed=1)
    real = data.load_case

    def flaky(folder, spec, case, **kwargs):  # noqa: ANN001, ANN202
        if case == "Bad_002":
            raise nib.orientations.OrientationError("affine is not orthogonal")
        return real(folder, spec, case, **kwargs)

    monkeypatch.setattr(data, "load_case", flaky)
    site = load_site(tmp_path, BRATS, cache=None)
    assert [c.case for c in site.cases] == ["Good_001"]
    assert "OrientationError" in site.skipped["Bad_002"] and "Bad_002" in site.skipped["Bad_002"]
    with pytest.raises(CaseError, match="OrientationError"):
        load_site(tmp_path, BRATS, on_error="raise", cache=None)


def test_an_unreadable_case_folder_is_counted_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """glob passes over a folder it cannot read in silence; discovery finds it, and loading counts it."""
    write_case(tmp_path, "Good_001")
    write_case(tmp_path, "Locked_002", seed=1)
    locked = tmp_path / "Locked_002"
    os.chmod(locked, 0o000)
    real_access = os.access
    if os.geteuid() == 0:  # root reads every folder: answer as the kernel does for an ordinary user
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    try:
        site = load_site(tmp_path, BRATS, cache=None)
    finally:
        os.chmod(locked, 0o755)
    assert [c.case for c in site.cases] == ["Good_001"]
    assert "case folder is not readable" in site.skipped["Locked_002"]


def test_empty_label_is_allowed_and_counted(tmp_path: Path) -> None:
    write_case(tmp_path, "Empty_001", labels=(0,))
    write_case(tmp_path, "Full_002")
    site = load_site(tmp_path, BRATS, cache=None)
    assert len(site.cases) == 2 and site.empty_label_count == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder regardless of permissions")
def test_unreadable_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(ValueError, match="missing or unreadable"):
            load_site(folder, BRATS)
    finally:
        folder.chmod(0o755)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing or unreadable"):
        load_site(tmp_path / "nowhere", BRATS)


@pytest.mark.parametrize("crop", [False, True])
def test_reorientation_and_crop_round_trip_to_the_file_grid(tmp_path: Path, crop: bool) -> None:
    """Permuted, flipped, anisotropic axes and a brain inside air: what is predicted in the prepared frame lands on
    the file's voxels, and spacing and the whole scan's shape follow the axes."""
    shape = (20, 24, 18)
    affine = np.array([[0, 0, -1.5, 10], [-2.0, 0, 0, 20], [0, 1.2, 0, -5], [0, 0, 0, 1]])  # file axes (z, x, y)
    rng = np.random.default_rng(0)
    folder = tmp_path / "Odd_001"
    folder.mkdir()
    for channel in ("flair", "t1", "t1ce", "t2"):
        image = np.zeros(shape, np.float32)
        image[3:15, 5:20, 2:16] = rng.uniform(1, 2, (12, 15, 14))
        nib.save(nib.Nifti1Image(image, affine), folder / f"Odd_001_{channel}.nii.gz")
    seg = np.zeros(shape, np.int16)
    seg[5:8, 7:9, 4:6], seg[6, 8, 5], seg[9, 10, 7] = 2, 4, 1
    nib.save(nib.Nifti1Image(seg, affine), folder / "Odd_001_seg.nii.gz")
    prepared = load_case(tmp_path, BRATS, "Odd_001", crop_foreground=crop)
    # RAS x is file axis 2 (1.5 mm), y file axis 0 (2 mm), z file axis 1 (1.2 mm); the crop keeps a 2-voxel margin.
    assert prepared.full_shape == (18, 20, 24) and prepared.spacing == pytest.approx((1.5, 2.0, 1.2))
    assert prepared.image.shape[1:] == ((18, 12 + 4, 15 + 4) if crop else (18, 20, 24))
    for r, labels in enumerate(BRATS.regions.values()):
        np.testing.assert_array_equal(prepared.restore(prepared.regions[r]), np.isin(seg, labels).astype(np.uint8))


def test_spacing_follows_the_affine_not_a_disagreeing_pixdim(tmp_path: Path) -> None:
    """Converters can leave pixdim at 1 with an sform of 2 mm voxels: the voxels are placed by the affine."""
    write_case(tmp_path, "Pix_001", affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    for path in (tmp_path / "Pix_001").iterdir():
        image = nib.load(path)
        header = image.header.copy()
        header.set_zooms((1.0, 1.0, 1.0))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), path)
        assert nib.load(path).header.get_zooms() == (1.0, 1.0, 1.0)
    assert load_case(tmp_path, BRATS, "Pix_001").spacing == (2.0, 2.0, 3.0)


def test_a_lesion_where_every_scan_is_zero_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(tmp_path, "Air_001")
    folder = tmp_path / "Air_001"
    for path in folder.glob("*_*.nii.gz"):
        image = nib.load(path)
        data = np.asarray(image.dataobj).copy()
        if path.name.endswith("_seg.nii.gz"):
            data[:, :, -1] = 2  # lesion in the last slice ...
        else:
            data[:, :, -4:] = 0  # ... where no scan has signal
        nib.save(nib.Nifti1Image(data, image.affine), path)
    with caplog.at_level("WARNING"):
        prepared = load_case(tmp_path, BRATS, "Air_001", crop_foreground=True)
    assert "lie where every scan is 0" in caplog.text and "Air_001_seg.nii.gz" in caplog.text
    assert prepared.full_shape[2] - prepared.image.shape[3] >= 1


def test_cache_decodes_each_file_once(tmp_path: Path) -> None:
    write_case(tmp_path, "Cached_001")
    cache = CaseCache(max_bytes=1 << 30)
    before = DECODE_STATS.files
    for _ in range(3):
        load_site(tmp_path, BRATS, cache=cache)
    assert DECODE_STATS.files - before == 5  # four modalities and the label, once


def test_a_4d_image_is_decoded_once_per_case(tmp_path: Path) -> None:
    """MSD Task01 keeps the four channels in one 4D file: one decode, not one per channel."""
    rng = np.random.default_rng(0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    volumes = rng.uniform(1, 5, (8, 8, 8, 4)).astype(np.float32)
    image = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    nib.save(nib.Nifti1Image(volumes, np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    before = DECODE_STATS.by_path.get(str(image), 0)
    prepared = load_case(tmp_path, LAYOUTS["msd-task01"], "BRATS_001")
    assert DECODE_STATS.by_path[str(image)] - before == 1
    for k in range(4):  # each channel is its own volume of the file
        np.testing.assert_allclose(prepared.image[k], load_case(tmp_path, DatasetSpec(
            "one", {"c": f"imagesTr/{{case}}.nii.gz#{k}"}, "labelsTr/{case}.nii.gz", (0, 1, 2, 3), {"ET": (3,)}),
            "BRATS_001").image[0])


def test_split_is_deterministic_and_disjoint() -> None:
    ids = [f"c{i}" for i in range(10)]
    train, val = split_train_val(ids, 0.25, seed=3)
    assert (train, val) == split_train_val(ids, 0.25, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_train_val(["only"], 0.25, 0) == (["only"], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(ids, 1.0, 0)


def test_real_sample_loads_through_the_documented_manifest(sample_dir: Path) -> None:
    spec = load_manifest(SAMPLE_MANIFEST)
    assert discover_cases(sample_dir, spec) == sorted(p.name for p in sample_dir.iterdir() if p.is_dir())
    site = load_site(sample_dir, spec, on_error="raise", cache=None)
    assert len(site.cases) == 6 and not site.skipped
    for case in site.cases:
        assert case.image.shape == (2, 240, 240, 155)
        assert case.regions.shape == (1, 240, 240, 155) and case.regions.sum() > 0
        assert case.spacing == (1.0, 1.0, 1.0)


def test_spec_json_round_trip() -> None:
    assert DatasetSpec.from_json(BRATS.to_json()) == BRATS


def test_disk_cache_spares_a_fresh_process_the_decoding(tmp_path: Path) -> None:
    """A SuperNode may start a new ClientApp process per round: the second one decodes nothing."""
    write_case(tmp_path / "data", "Disk_001")
    before = DECODE_STATS.files
    first = load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache")).cases[0]
    assert DECODE_STATS.files - before == 5
    second = load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache")).cases[0]
    assert DECODE_STATS.files - before == 5, "no NIfTI decoded again"
    np.testing.assert_array_equal(first.image, second.image)
    # A re-exported scan (new mtime) is decoded afresh.
    flair = tmp_path / "data" / "Disk_001" / "Disk_001_flair.nii.gz"
    os.utime(flair, ns=(flair.stat().st_atime_ns, flair.stat().st_mtime_ns + 10**9))
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache"))
    assert DECODE_STATS.files - before == 10


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_disk_cache_is_not_read_from_another_users_folder(tmp_path: Path) -> None:
    """Cache entries are unpickled: a folder someone else owns could hold a crafted one, so it is not used."""
    write_case(tmp_path / "data", "Disk_001")
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache"))
    os.chown(tmp_path / "cache", 65534, 65534)
    before = DECODE_STATS.files
    cache = CaseCache(1 << 30, disk_dir=tmp_path / "cache")
    assert cache.disk_dir is None
    load_site(tmp_path / "data", BRATS, cache=cache)
    assert DECODE_STATS.files - before == 5, "decoded, not read from the other user's folder"


def test_disk_cache_folder_others_could_write_is_not_used(tmp_path: Path) -> None:
    """Nothing planted in the cache runs or is used: a folder others could write is not used at all, a
    file others could write is not read, and entries are arrays and JSON read without pickle."""
    class Planted:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return os.mkdir, (str(tmp_path / "planted-ran"),)

    write_case(tmp_path / "data", "Disk_001")
    folder = tmp_path / "cache"
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))
    [entry] = [p for p in folder.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["image.npy", "meta.json", "regions.npy"]  # no pickle stored
    for array in ("image.npy", "regions.npy"):
        np.load(entry / array, allow_pickle=False)
    os.chmod(entry / "image.npy", 0o600)
    np.save(entry / "image.npy", np.array([Planted()], dtype=object), allow_pickle=True)  # an object array: a pickle
    before = DECODE_STATS.files
    [case] = load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder)).cases
    assert DECODE_STATS.files == before  # the entry's metadata is fine: its arrays are read only when used ...
    assert case.image.dtype == np.float32  # ... and then the planted one is refused, and the case decoded again
    assert not (tmp_path / "planted-ran").exists() and DECODE_STATS.files - before == 5, "refused, decoded again"
    # The refused entry was replaced by a clean one, which is read (no decoding) ...
    before = DECODE_STATS.files
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))
    assert DECODE_STATS.files == before
    os.chmod(folder, 0o777)
    reopened = CaseCache(1 << 30, disk_dir=folder)
    assert reopened.disk_dir is None and stat.S_IMODE(folder.stat().st_mode) == 0o777
    os.chmod(folder, 0o700)
    # ... until one of its files becomes writable by others: then it is not read.
    os.chmod(entry / "meta.json", 0o666)
    before = DECODE_STATS.files
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))
    assert DECODE_STATS.files - before == 5, "a group/world-writable entry file is not read"
    assert not (tmp_path / "planted-ran").exists()


def test_disk_cache_round_trips_every_field(tmp_path: Path) -> None:
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 7.5]
    write_case(tmp_path / "data", "Round_001", affine=affine)
    fresh = load_case(tmp_path / "data", BRATS, "Round_001", crop_foreground=True)
    load_site(tmp_path / "data", BRATS, crop_foreground=True, cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache"))
    before = DECODE_STATS.files
    cached = load_site(tmp_path / "data", BRATS, crop_foreground=True,
                       cache=CaseCache(1 << 30, disk_dir=tmp_path / "cache")).cases[0]
    assert DECODE_STATS.files == before
    np.testing.assert_array_equal(cached.image, fresh.image)
    np.testing.assert_array_equal(cached.regions, fresh.regions)
    np.testing.assert_array_equal(cached.affine, fresh.affine)
    np.testing.assert_array_equal(cached.ornt, fresh.ornt)
    assert (cached.crop, cached.original_shape, cached.empty_label, cached.spacing) == (
        fresh.crop, fresh.original_shape, fresh.empty_label, fresh.spacing)
    assert cached.header.binaryblock == fresh.header.binaryblock
    label = np.ones(cached.image.shape[1:], np.uint8)
    np.testing.assert_array_equal(cached.restore(label), fresh.restore(label))




def test_the_disk_cache_is_bounded_and_purged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Least recently used cases leave first when the bound is passed; `fedlesion cache --purge` empties the
    folder and touches nothing that is not a cache entry."""
    from fedlesion.common.data import cache_entries, cache_size
    from fedlesion.cli import main

    for i in range(3):
        write_case(tmp_path / "data", f"Lru_00{i}", seed=i)
    folder = tmp_path / "cache"
    unbounded = CaseCache(1 << 30, disk_dir=folder, max_disk_bytes=0)
    load_site(tmp_path / "data", BRATS, cache=unbounded)
    one_entry = cache_size(folder) // 3
    entries = cache_entries(folder)
    assert len(entries) == 3
    for age, entry in enumerate(entries):  # last used long ago, in this order
        os.utime(entry, (1000 + age, 1000 + age))
    bounded = CaseCache(1 << 30, disk_dir=folder, max_disk_bytes=int(2.5 * one_entry))
    write_case(tmp_path / "data", "Lru_003", seed=3)
    load_site(tmp_path / "data", BRATS, case_ids=["Lru_003"], cache=bounded)
    names = [p.name for p in cache_entries(folder)]
    assert len(names) == 2 and entries[0].name not in names and entries[1].name not in names
    assert cache_size(folder) <= 2.5 * one_entry
    # A recent use is spared even above the bound: a round's own cases are never evicted under it.
    write_case(tmp_path / "data", "Lru_004", seed=4)
    load_site(tmp_path / "data", BRATS, case_ids=["Lru_004"], cache=bounded)
    assert len(cache_entries(folder)) == 2 and entries[2].name not in [p.name for p in cache_entries(folder)]
    write_case(tmp_path / "data", "Lru_005", seed=5)
    load_site(tmp_path / "data", BRATS, case_ids=["Lru_005"], cache=bounded)
    assert len(cache_entries(folder)) == 3
    # Purge touches cache entries only: not a file, not a hex-named folder holding anything else, not a link.
    (folder / "notes.txt").write_text("not a cache entry")
    (folder / ("a" * 32)).mkdir()
    (folder / ("a" * 32) / "results.csv").write_text("someone's")
    (folder / ("b" * 32)).symlink_to(tmp_path / "data")
    assert main(["cache", "--dir", str(folder)]) == 0 and "3 cached case(s)" in capsys.readouterr().out
    assert main(["cache", "--dir", str(folder), "--purge"]) == 0
    assert cache_entries(folder) == [] and (folder / "notes.txt").read_text() == "not a cache entry"
    assert (folder / ("a" * 32) / "results.csv").exists() and (tmp_path / "data" / "Lru_000").is_dir()
    # A folder that is not a FedLesion cache is refused whole.
    other = tmp_path / "mlruns"
    (other / ("c" * 32)).mkdir(parents=True)
    (other / ("c" * 32) / "meta.json").write_text("{}")
    assert main(["cache", "--dir", str(other), "--purge"]) == 2 and (other / ("c" * 32)).exists()


def test_a_stale_or_torn_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    """An entry that cannot be read (a file missing, another format) is replaced, not a permanent miss."""
    write_case(tmp_path / "data", "Torn_001")
    folder = tmp_path / "cache"
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))
    [entry] = cache_entries_of(folder)
    (entry / "image.npy").unlink()
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))  # decodes, rewrites
    before = DECODE_STATS.files
    load_site(tmp_path / "data", BRATS, cache=CaseCache(1 << 30, disk_dir=folder))
    assert DECODE_STATS.files == before, "the rewritten entry is read"


def cache_entries_of(folder: Path) -> list[Path]:
    from fedlesion.common.data import cache_entries

    return cache_entries(folder)


def test_foreground_box_is_the_nonzero_voxels_widened_and_clipped() -> None:
    from fedlesion.common.data import foreground_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        image = np.zeros((2, 9, 7, 5), np.float32)
        for _ in range(rng.integers(0, 4)):
            image[tuple(rng.integers(0, s) for s in image.shape)] = rng.normal()
        margin = int(rng.integers(0, 4))
        hits = np.nonzero(np.any(image != 0, axis=0))
        expected = (tuple((0, s) for s in image.shape[1:]) if not hits[0].size else
                    tuple((max(int(h.min()) - margin, 0), min(int(h.max()) + 1 + margin, s)) for h, s in zip(hits, image.shape[1:])))
        assert foreground_box(image, margin) == expected
