"""Dataset layouts, validated case loading, preprocessing and the preprocessed-case cache.

A dataset is described by a :class:`DatasetSpec` (nnU-Net's ``dataset.json`` idea):
the channels and the label file as path patterns with a ``{case}`` placeholder, the
label values the label file may hold, and the regions built from them. Built-in specs
cover BraTS 2018-2021, BraTS 2023+ and the Medical Segmentation Decathlon's Task01; a
site's own layout is described by a small JSON manifest (see ``README.md``).

Every case is checked as it loads (files exist and decode, shapes and affines agree,
values are finite, labels are declared) and a failure raises :class:`CaseError`
naming the file and the problem.
"""

from __future__ import annotations

import base64
import fnmatch
import glob
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache, partial
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, Callable, Literal

import nibabel as nib
import numpy as np
from monai.transforms import NormalizeIntensity
from monai.transforms.utils import generate_spatial_bounding_box

from .files import is_case_name, open_private, private_folder, replace_private

logger = logging.getLogger(__name__)

MANIFEST_NAMES = ("fedlesion.json", "manifest.json")
CACHE_FORMAT = "fedlesion-case-cache/3"  # slice-major .npy arrays (no pickle, read memory-mapped) and JSON metadata, a folder per case
MAX_MANIFEST_BYTES = 1 << 20
# Largest volume a file may declare before any voxel is decoded, counted as decoded (8 bytes a voxel, the widest
# type scaled data decodes to): BraTS is 240 x 240 x 155 x 8 bytes = 71 MB. FEDLESION_MAX_VOLUME_MB overrides it.
DEFAULT_MAX_VOLUME_MB = 1024.0


def max_volume_bytes() -> int:
    """``FEDLESION_MAX_VOLUME_MB`` (default :data:`DEFAULT_MAX_VOLUME_MB`) in bytes.

    Raises:
        ValueError: when the variable is not a positive number.
    """
    text = os.environ.get("FEDLESION_MAX_VOLUME_MB", str(DEFAULT_MAX_VOLUME_MB))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"FEDLESION_MAX_VOLUME_MB='{text}' must be a positive number of megabytes.")
    return int(value * (1 << 20))
AFFINE_TOLERANCE = 1e-3  # mm; scanners write affines in float32, exact equality is too strict


class CaseError(ValueError):
    """A case that cannot be used. The message names the file and the problem."""

    def __init__(self, case: str, path: str | os.PathLike[str], problem: str) -> None:
        self.case = case
        self.path = str(path)
        self.problem = problem
        super().__init__(f"case '{case}': {self.path}: {problem}")


def _split_pattern(pattern: str, source: str = "pattern") -> tuple[str, int | None]:
    """``(path pattern, 4D volume index or None)`` of ``"path#k"``.

    Raises:
        ValueError: naming ``source`` when ``k`` is not a whole number >= 0.
    """
    if "#" in pattern:
        path, index = pattern.rsplit("#", 1)
        if not index.isdigit():
            raise ValueError(f"{source}: pattern '{pattern}' ends in '#{index}'; the volume index must be a whole "
                             "number >= 0 (e.g. '#0').")
        return path, int(index)
    return pattern, None


MAX_LABEL = 255  # the largest label value: a predicted label map is written as uint8


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset's files hold and how its regions are built.

    Args:
        name: a short name for logs and checkpoints.
        channels: channel name -> path pattern relative to the data folder. ``{case}``
            stands for the case ID; a trailing ``#k`` selects volume ``k`` of a 4D file.
            The first channel's pattern is also how cases are discovered. Names are matched to
            a run's by modality (:data:`CHANNEL_ALIASES`, :func:`conform_spec`).
        label: path pattern of the label file, or ``None`` for unlabelled data.
        labels: every value the label file may hold, background (0) included.
        regions: region name -> label values it covers, e.g. ``{"WT": [1, 2, 4]}``.
            Regions must nest (or be disjoint) so that each maps back to one label.
        unlabelled: case-ID globs of cases whose label file is not read (a manifest's ``"unlabelled"``):
            unlabelled cases, used only by semi-supervised training.

    Raises:
        ValueError: for empty channels, undeclared region labels, or regions that do
            not map back to a single label each.
    """

    name: str
    channels: dict[str, str]
    label: str | None
    labels: tuple[int, ...]
    regions: dict[str, tuple[int, ...]]
    unlabelled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError(f"dataset spec '{self.name}': 'channels' is empty; name at least one channel.")
        for pattern in [*self.channels.values(), *([self.label] if self.label else [])]:
            if not isinstance(pattern, str) or "{case}" not in pattern:
                raise ValueError(
                    f"dataset spec '{self.name}': pattern {pattern!r} is not a string with a '{{case}}' placeholder."
                )
            _split_pattern(pattern, f"dataset spec '{self.name}'")
        if not self.regions:
            raise ValueError(f"dataset spec '{self.name}': 'regions' is empty; name at least one region.")
        outside = sorted(v for v in self.labels if not 0 <= v <= MAX_LABEL)
        if outside:  # predictions are written as uint8 label maps, and labels are read as int16
            raise ValueError(f"dataset spec '{self.name}': label value(s) {outside} are outside 0-{MAX_LABEL}.")
        for region, values in self.regions.items():
            undeclared = set(values) - set(self.labels)
            if undeclared or 0 in values:
                raise ValueError(
                    f"dataset spec '{self.name}': region '{region}' uses label(s) "
                    f"{sorted(undeclared | ({0} & set(values)))} that are not declared foreground labels {self.labels}."
                )
        self.region_labels()  # validates nesting

    @property
    def region_names(self) -> list[str]:
        return list(self.regions)

    def region_labels(self) -> dict[str, int]:
        """The label value each region paints when predictions are turned back into a label map.

        A region paints the one label it holds that no smaller region inside it holds:
        for BraTS, WT {1,2,4} paints 2, TC {1,4} paints 1, ET {4} paints 4.
        """
        out: dict[str, int] = {}
        for region, values in self.regions.items():
            inner = set().union(*(set(v) for r, v in self.regions.items() if r != region and set(v) < set(values)))
            own = set(values) - inner
            if len(own) != 1:
                raise ValueError(
                    f"dataset spec '{self.name}': region '{region}' {sorted(values)} does not map back to one "
                    f"label (left {sorted(own)} after removing nested regions); make regions nested or disjoint."
                )
            out[region] = own.pop()
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": dict(self.channels),
            "label": self.label,
            "labels": list(self.labels),
            "regions": {k: list(v) for k, v in self.regions.items()},
            **({"unlabelled": list(self.unlabelled)} if self.unlabelled else {}),
        }

    def marked_unlabelled(self, case: str) -> bool:
        """Whether ``case`` matches one of :attr:`unlabelled`'s globs (its label file is not read)."""
        return any(fnmatch.fnmatchcase(case, pattern) for pattern in self.unlabelled)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest") -> DatasetSpec:
        """Build a spec from a manifest's JSON object; errors name ``source``."""
        missing = {"channels", "labels", "regions"} - set(data)
        if missing:
            raise ValueError(f"{source}: missing key(s) {sorted(missing)}; see README 'Data layouts'.")

        def whole(value: Any, key: str) -> int:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{source}: '{key}' holds {value!r}; label values are whole numbers "
                                 "(see README 'Data layouts').")
            return value

        def mapping(key: str) -> dict[str, Any]:
            if not isinstance(data[key], dict):
                raise ValueError(f"{source}: '{key}' must be an object, got {type(data[key]).__name__}; "
                                 "see README 'Data layouts'.")
            return data[key]

        def strings(value: Any, key: str) -> str:
            if not isinstance(value, str):
                raise ValueError(f"{source}: '{key}' must be a path pattern string, got {value!r}.")
            return value

        if not isinstance(data["labels"], list):
            raise ValueError(f"{source}: 'labels' must be a list of whole numbers, got {data['labels']!r}.")
        regions = mapping("regions")
        for region, values in regions.items():
            if not isinstance(values, list):
                raise ValueError(f"{source}: 'regions.{region}' must be a list of label values, got {values!r}.")
        label = data.get("label")
        unlabelled = data.get("unlabelled", [])
        if not isinstance(unlabelled, list) or not all(isinstance(v, str) and v for v in unlabelled):
            raise ValueError(f"{source}: 'unlabelled' must be a list of case-ID globs (strings), got {unlabelled!r}.")
        return cls(
            name=str(data.get("name", Path(source).stem)),
            channels={str(k): strings(v, f"channels.{k}") for k, v in mapping("channels").items()},
            label=None if label is None else strings(label, "label"),
            labels=tuple(whole(v, "labels") for v in data["labels"]),
            regions={str(k): tuple(whole(x, f"regions.{k}") for x in v) for k, v in regions.items()},
            unlabelled=tuple(unlabelled),
        )


_BRATS_OLD_REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}

LAYOUTS: dict[str, DatasetSpec] = {
    "brats2021": DatasetSpec(
        name="brats2021",
        channels={m: f"{{case}}/{{case}}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")},
        label="{case}/{case}_seg.nii.gz",
        labels=(0, 1, 2, 4),
        regions=_BRATS_OLD_REGIONS,
    ),
    "brats2023": DatasetSpec(
        name="brats2023",
        channels={m: f"{{case}}/{{case}}-{m}.nii.gz" for m in ("t2f", "t1n", "t1c", "t2w")},
        label="{case}/{case}-seg.nii.gz",
        labels=(0, 1, 2, 3),
        regions={"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    ),
    "msd-task01": DatasetSpec(
        name="msd-task01",
        channels={m: f"imagesTr/{{case}}.nii.gz#{i}" for i, m in enumerate(("flair", "t1", "t1gd", "t2"))},
        label="labelsTr/{case}.nii.gz",
        labels=(0, 1, 2, 3),
        # MSD: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.
        regions={"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    ),
}


def regions_from_labels(labels: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """The region masks of a label map: the one definition of region membership.

    Ground truth is built with it from a label file, and a prediction is scored with it
    from the label map that is written, so both mean the same thing by a region.

    Args:
        labels: ``(*spatial)`` label values of ``spec``.
        spec: the dataset spec whose regions say which labels each region covers.

    Returns:
        ``(R, *spatial)`` uint8 masks, regions in ``spec.regions`` order.
    """
    return np.stack([np.isin(labels, values) for values in spec.regions.values()]).astype(np.uint8)


# The built-in layouts name the same four MRI sequences differently; channels are matched by
# the canonical name (BraTS 2018-2021's), so a site's channel k is the run's channel k.
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("t2f", "t2-flair"),
    "t1": ("t1n",),
    "t1ce": ("t1c", "t1gd"),
    "t2": ("t2w",),
}
_CANONICAL = {alias: name for name, aliases in CHANNEL_ALIASES.items() for alias in (name, *aliases)}


def canonical_channel(name: str) -> str:
    """The canonical modality of a channel name (``t2f`` -> ``flair``); other names are only lower-cased."""
    return _CANONICAL.get(name.lower(), name.lower())


def _channels_by_modality(spec: DatasetSpec, source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in spec.channels:
        modality = canonical_channel(name)
        if modality in out:
            raise ValueError(f"{source}: layout '{spec.name}' names modality '{modality}' twice "
                             f"('{out[modality]}' and '{name}'); give each channel a distinct modality.")
        out[modality] = name
    return out


def conform_spec(spec: DatasetSpec, expected: DatasetSpec, source: str) -> DatasetSpec:
    """``spec`` with its channels and regions put in ``expected``'s order, matched by name.

    Channels match by modality (:data:`CHANNEL_ALIASES`: a BraTS 2023 ``t2f`` is a BraTS 2021
    ``flair``), so data whose layout lists the run's modalities in another order loads with
    the run's channel order, and a model never sees one sequence where it learnt another.

    Args:
        spec: the layout of the data at hand (a site's, or the data a checkpoint is used on).
        expected: the layout the model is trained on (the run's ``dataset``, a checkpoint's spec).
        source: what ``spec`` describes, for the error message (a site, a folder).

    Returns:
        ``spec`` reordered; its file patterns and labels are its own.

    Raises:
        ValueError: naming both lists, when a modality or region is missing or extra, or a
            layout names one modality twice.
    """
    own, wanted = _channels_by_modality(spec, source), _channels_by_modality(expected, expected.name)
    if set(own) != set(wanted) or set(spec.regions) != set(expected.regions):
        raise ValueError(
            f"{source}: layout '{spec.name}' has channels {list(spec.channels)} and regions {list(spec.regions)}, "
            f"but '{expected.name}' expects channels {list(expected.channels)} and regions {list(expected.regions)}. "
            f"Channels are matched by modality ({', '.join(f'{k}: {list(v)}' for k, v in CHANNEL_ALIASES.items())}); "
            "describe the data with a manifest that names these channels and regions."
        )
    return replace(spec, channels={own[m]: spec.channels[own[m]] for m in wanted},
                   regions={r: spec.regions[r] for r in expected.regions})


def load_manifest(path: str | os.PathLike[str]) -> DatasetSpec:
    """Read a manifest JSON file into a :class:`DatasetSpec`.

    Raises:
        ValueError: when the file is missing, not JSON, or not a valid manifest.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest {path}: {path.stat().st_size} bytes; a manifest is a small JSON file "
                             f"(at most {MAX_MANIFEST_BYTES} bytes).")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"manifest {path}: file not found; pass an existing file with --manifest.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"manifest {path}: not valid UTF-8 JSON ({type(exc).__name__}: {exc}).") from None
    except OSError as exc:
        raise ValueError(f"manifest {path}: cannot be read ({exc.strerror or exc}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"manifest {path}: expected a JSON object, got {type(data).__name__}.")
    if "layout" in data:  # a manifest may simply name a built-in layout
        return _layout(str(data["layout"]), str(path))
    spec = DatasetSpec.from_json(data, source=str(path))
    check_patterns(spec, f"manifest {path}")
    return spec


def shipped_manifests() -> list[str]:
    """Names of the manifests that ship with FedLesion (``common/manifests/<name>.json``)."""
    return list(_shipped_manifests())


@cache  # package data: listed once per process
def _shipped_manifests() -> tuple[str, ...]:
    return tuple(sorted(p.name.removesuffix(".json") for p in files(__package__).joinpath("manifests").iterdir()
                        if p.name.endswith(".json")))


def builtin_spec(name: str) -> DatasetSpec | None:
    """A built-in layout or a shipped manifest by name, found through the installed package's
    resources (a checkout, a FAB and an installed wheel alike); ``None`` for any other name."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    if name in shipped_manifests():
        with as_file(files(__package__).joinpath("manifests", f"{name}.json")) as path:
            return load_manifest(path)
    return None


def _layout(name: str, source: str) -> DatasetSpec:
    if name not in LAYOUTS:
        raise ValueError(f"{source}: unknown layout '{name}'; choose one of {sorted(LAYOUTS)}.")
    return LAYOUTS[name]


def resolve_spec(data_dir: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None) -> DatasetSpec:
    """Find how a data folder is laid out.

    Order: an explicit ``manifest`` (a path, or a built-in layout name), a manifest
    file (``fedlesion.json`` / ``manifest.json``) inside ``data_dir``, then the
    built-in layouts recognised by their file names.

    Raises:
        ValueError: when the folder does not exist or matches no layout.
    """
    data_dir = Path(data_dir)
    if manifest:
        return builtin_spec(str(manifest)) or load_manifest(manifest)
    if not data_dir.is_dir():
        raise ValueError(f"data folder {data_dir}: not a directory; pass an existing folder with --data.")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"data folder {data_dir}: cannot be read (permissions); give this user read access.")
    for name in MANIFEST_NAMES:
        if (data_dir / name).is_file():
            return load_manifest(data_dir / name)
    for spec in LAYOUTS.values():
        if discover_cases(data_dir, spec):
            return spec
    raise ValueError(
        f"data folder {data_dir}: no known layout found (BraTS 2018-2021 '{{case}}/{{case}}_flair.nii.gz', "
        f"BraTS 2023 '{{case}}/{{case}}-t2f.nii.gz', MSD 'imagesTr/'); add a manifest "
        f"({MANIFEST_NAMES[0]}) or pass --manifest."
    )


def check_patterns(spec: DatasetSpec, source: str) -> None:
    """Refuse file patterns that would read outside the data folder (a leading ``/``, ``..``, a drive).

    Checked where files are found and read (a manifest as it loads, :func:`case_paths`), so a
    layout from anywhere, a checkpoint's included, never names a file outside the folder given. Symbolic links
    inside the folder are followed: whoever can write the data folder decides what it holds (sites often link
    their scans in from an archive).

    Raises:
        ValueError: naming ``source`` and the pattern.
    """
    for pattern in [*spec.channels.values(), *([spec.label] if spec.label else [])]:
        path = _split_pattern(pattern, source)[0]
        if path.startswith(("/", "\\")) or ".." in Path(path).parts or ":" in Path(path).parts[0]:
            raise ValueError(f"{source}: pattern '{pattern}' must be a relative path inside the data folder "
                             "(no leading '/', no '..').")


def discover_cases(data_dir: str | os.PathLike[str], spec: DatasetSpec) -> list[str]:
    """Case IDs found in ``data_dir``: every ID that any channel's pattern matches, sorted.

    A case missing one modality is still found, so that loading it can say what is missing; so is
    a case folder that cannot be read (glob would pass over it in silence), so that it is counted.
    """
    check_patterns(spec, f"layout '{spec.name}'")
    cases: set[str] = set()
    for channel_pattern in spec.channels.values():
        first, sep, _ = _split_pattern(channel_pattern)[0].partition("/")
        if "{case}" in first and sep:  # a folder per case: look for folders that cannot be read
            folder = re.compile(re.escape(first).replace(re.escape("{case}"), "(?P<case>[^/]+)", 1) + "$")
            try:
                entries = list(os.scandir(data_dir))
            except OSError:
                entries = []
            for entry in entries:
                found = folder.match(entry.name)
                if found and entry.is_dir() and not os.access(entry.path, os.R_OK | os.X_OK):
                    cases.add(found.group("case"))
    for channel_pattern in spec.channels.values():
        pattern, _ = _split_pattern(channel_pattern)
        search = glob.escape(str(Path(data_dir))) + "/" + pattern.replace("{case}", "*")
        regex = re.compile(re.escape(pattern).replace(re.escape("{case}"), "(?P<case>[^/]+)", 1)
                           .replace(re.escape("{case}"), "(?P=case)") + "$")
        for match in glob.glob(search):
            found = regex.match(Path(match).relative_to(data_dir).as_posix())
            if found:
                cases.add(found.group("case"))
    return sorted(cases)


def case_paths(data_dir: str | os.PathLike[str], spec: DatasetSpec, case: str) -> dict[str, tuple[Path, int | None]]:
    """Channel (and ``"label"``) -> (file path, 4D volume index or None) for one case.

    Raises:
        ValueError: for a pattern that would lead outside ``data_dir`` (:func:`check_patterns`), or a case ID
            that is not a plain name (empty, a path separator, ``..``: it could do the same).
    """
    check_patterns(spec, f"layout '{spec.name}'")
    if not is_case_name(case):
        raise ValueError(f"case ID {case!r} is not a case name (it must not be empty, hold '/' or '\\', or start with '.').")
    out = {}
    for name, pattern in spec.channels.items():
        path, index = _split_pattern(pattern)
        out[name] = (Path(data_dir) / path.replace("{case}", case), index)
    if spec.label and not spec.marked_unlabelled(case):
        out["label"] = (Path(data_dir) / spec.label.replace("{case}", case), None)
    return out


@dataclass
class PreparedCase:
    """One case after validation and preprocessing.

    Attributes:
        case: the case ID.
        image: ``(C, X, Y, Z)`` float32, canonical (RAS) orientation, z-scored per channel
            inside the brain (nonzero voxels), cropped to ``crop``.
        regions: ``(R, X, Y, Z)`` uint8 region masks, or ``None`` when unlabelled.
        affine: the first channel's original affine; ``header`` its NIfTI header.
        original_shape: spatial shape of the files on disk.
        ornt: the orientation transform from file axes to RAS (nibabel ``ornt`` form).
        crop: ``(start, stop)`` per RAS axis of the kept box in the reoriented volume.
        empty_label: whether the label holds no foreground at all.
    """

    case: str
    image: np.ndarray
    regions: np.ndarray | None
    affine: np.ndarray
    header: Any
    original_shape: tuple[int, ...]
    ornt: np.ndarray
    crop: tuple[tuple[int, int], ...]
    empty_label: bool = False

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along the prepared (RAS) axes, from the affine the voxels are placed by (a header's
        pixdim can disagree with its sform)."""
        return tuple(float(v) for v in self._to_ras(nib.affines.voxel_sizes(self.affine)))

    @property
    def full_shape(self) -> tuple[int, ...]:
        """Spatial shape of the whole scan in the prepared (RAS) axes, before the foreground crop."""
        return tuple(int(v) for v in self._to_ras(self.original_shape))

    def _to_ras(self, per_file_axis: Sequence[float]) -> list[float]:
        out = [0.0] * len(self.ornt)
        for file_axis, (ras_axis, _) in enumerate(self.ornt):
            out[int(ras_axis)] = per_file_axis[file_axis]
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, X, Y, Z)`` of ``image``."""
        return tuple(self.image.shape)

    @property
    def labelled(self) -> bool:
        return self.regions is not None

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + (0 if self.regions is None else self.regions.nbytes)

    def load(self) -> PreparedCase:
        """The case with its arrays (itself; a :class:`LazyCase` reads them)."""
        return self

    def info(self) -> dict[str, Any]:
        """Everything but the voxels, as JSON-able values (a cache entry's ``meta.json``)."""
        return {
            "case": self.case, "shape": list(self.shape), "labelled": self.labelled,
            "regions_shape": None if self.regions is None else list(self.regions.shape),
            "affine": np.asarray(self.affine, np.float64).tolist(), "header_class": type(self.header).__name__,
            "header": base64.b64encode(self.header.binaryblock).decode(), "original_shape": list(self.original_shape),
            "ornt": np.asarray(self.ornt).tolist(), "crop": [list(c) for c in self.crop], "empty_label": self.empty_label,
        }

    def restore(self, volume: np.ndarray) -> np.ndarray:
        """Map a ``(X, Y, Z)`` array in the prepared frame back to the file's voxel grid."""
        full = np.zeros(self.full_shape, dtype=volume.dtype)
        full[tuple(slice(a, b) for a, b in self.crop)] = volume
        to_file = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), self.ornt)
        back = nib.orientations.apply_orientation(full, to_file)
        return np.ascontiguousarray(back)


class LazyCase(PreparedCase):
    """A usable case whose voxels are read only when ``image`` or ``regions`` is used.

    Everything else (ID, shape, header, affine, crop) is held; the arrays come from the
    :class:`CaseCache` each time: memory-mapped from its folder on disk when it has one (the
    mapping is dropped with the array, so a process holds only the cases it is using), else from
    its bounded memory, else decoded again. A site of any size thus costs a ClientApp process
    the cases it samples, not the cases it has.
    """

    def __init__(self, info: dict[str, Any], fetch: Callable[[LazyCase], PreparedCase]) -> None:
        header_class = {"Nifti1Header": nib.Nifti1Header, "Nifti2Header": nib.Nifti2Header}[info["header_class"]]
        self.case = str(info["case"])
        self.affine = np.asarray(info["affine"], np.float64)
        self.header = header_class(binaryblock=base64.b64decode(info["header"]))
        self.original_shape = tuple(int(v) for v in info["original_shape"])
        self.ornt = np.asarray(info["ornt"], np.float64)
        self.crop = tuple((int(a), int(b)) for a, b in info["crop"])
        self.empty_label = bool(info["empty_label"])
        self._shape = tuple(int(v) for v in info["shape"])
        self._labelled = bool(info["labelled"])
        self._regions_shape = tuple(int(v) for v in info["regions_shape"]) if info.get("regions_shape") else None
        self._fetch = fetch

    image = property(lambda self: self._fetch(self).image)  # type: ignore[assignment]
    regions = property(lambda self: self._fetch(self).regions)  # type: ignore[assignment]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def labelled(self) -> bool:
        return self._labelled

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self._shape) + (math.prod(self._regions_shape) if self._regions_shape else 0)

    def load(self) -> PreparedCase:
        """The case with its arrays, read once (for code that uses them repeatedly)."""
        return self._fetch(self)

    def __repr__(self) -> str:
        return f"LazyCase({self.case!r}, shape={self._shape}, labelled={self._labelled})"

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


@dataclass
class DecodeStats:
    """How many NIfTI files this process has decoded; the cache's job is to keep this low."""

    files: int = 0
    by_path: dict[str, int] = field(default_factory=dict)

    def record(self, path: Path) -> None:
        with _LOCK:
            self.files += 1
            self.by_path[str(path)] = self.by_path.get(str(path), 0) + 1


DECODE_STATS = DecodeStats()
_LOCK = threading.Lock()


def _decode(case: str, path: Path, kind: Literal["image", "label"]) -> tuple[np.ndarray, Any]:
    """The voxel data (3D, or 4D for a multi-volume file) and the image of one file."""
    if not os.access(path.parent, os.X_OK) and os.path.isdir(path.parent):
        raise CaseError(case, path.parent, "case folder is not readable (permissions)")
    if not path.exists():
        what = "label file" if kind == "label" else "modality file"
        raise CaseError(case, path, f"missing {what}")
    if not os.access(path, os.R_OK):
        raise CaseError(case, path, "file is not readable (permissions)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign files
        raise CaseError(case, path, f"not a NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(case, path, f"not a NIfTI file (read as {type(img).__name__})")
    # The header is checked before any voxel is decoded: a header may declare any size, and a small
    # gzip file may inflate to gigabytes.
    shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
    declared, limit = float(np.prod(shape, dtype=np.float64)) * 8, max_volume_bytes()
    if declared > limit:
        raise CaseError(case, path, f"header declares shape {tuple(shape)}: {declared / 2**20:.0f} MB decoded, more "
                                    f"than the {limit / 2**20:.0f} MB limit (FEDLESION_MAX_VOLUME_MB)")
    if dtype.fields is not None or dtype.kind not in "biuf":  # complex, RGB (a structured type), strings
        raise CaseError(case, path, f"voxels are of type {dtype}; a scan holds real intensities, a label integers")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CaseError(case, path, "affine is missing, non-finite or singular (zero voxel size); the header is corrupt")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip gives EOFError, zlib.error or OSError
        raise CaseError(case, path, f"cannot decode voxel data, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    DECODE_STATS.record(path)
    return data, img


def _volume(case: str, path: Path, data: np.ndarray, index: int | None) -> np.ndarray:
    """The 3D volume a channel names: volume ``index`` of a 4D file, or the file's only volume."""
    if index is not None:
        if data.ndim != 4 or index >= data.shape[3]:
            raise CaseError(case, path, f"expected a 4D image with volume #{index}, got shape {data.shape}")
        data = data[..., index]
    elif data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(case, path, f"expected a 3D volume, got {data.ndim}D shape {data.shape}")
    return data


def load_case(
    data_dir: str | os.PathLike[str],
    spec: DatasetSpec,
    case: str,
    crop_foreground: bool = False,
    require_label: bool = True,
    read_label: bool = True,
) -> PreparedCase:
    """Load, validate and preprocess one case.

    Args:
        data_dir: the data folder.
        spec: its layout.
        case: the case ID.
        crop_foreground: crop to the bounding box of nonzero voxels (plus a 2-voxel margin).
        require_label: raise when the label file is missing; when False, a missing label
            leaves ``regions`` as ``None`` (prediction on unlabelled scans).
        read_label: False: the label file is neither read nor checked, ``regions`` is ``None``
            (prediction needs only the scans).

    Returns:
        The :class:`PreparedCase`.

    Raises:
        CaseError: naming the file and the problem, for every check that fails.
    """
    paths = case_paths(data_dir, spec, case)
    if "label" in paths and (not read_label or (not require_label and not paths["label"][0].exists())):
        del paths["label"]
    # Each file is decoded once, however many channels it holds (MSD Task01: all four in one 4D file).
    files: dict[Path, Literal["image", "label"]] = {path: "label" if name == "label" else "image"
                                                    for name, (path, _) in paths.items()}
    # zlib releases the GIL, so decoding the files in threads overlaps their inflation.
    with ThreadPoolExecutor(max_workers=min(4, len(files))) as pool:
        raw = dict(zip(files, pool.map(lambda item: _decode(case, *item), files.items())))
    decoded = {name: (_volume(case, path, raw[path][0], index), raw[path][1]) for name, (path, index) in paths.items()}
    first_name = next(iter(spec.channels))
    ref_path = paths[first_name][0]
    ref_data, ref_img = decoded[first_name]
    for name, (data, img) in decoded.items():
        path = paths[name][0]
        if data.shape != ref_data.shape:
            raise CaseError(case, path, f"shape {data.shape} differs from {ref_path.name} shape {ref_data.shape}")
        if not np.allclose(img.affine, ref_img.affine, atol=AFFINE_TOLERANCE):
            raise CaseError(
                case, path, f"affine differs from {ref_path.name}'s (max difference "
                f"{np.abs(img.affine - ref_img.affine).max():.4g} mm); the volumes are not co-registered"
            )
    channels = []
    for name in spec.channels:
        data = np.asarray(decoded[name][0], dtype=np.float32)
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise CaseError(case, paths[name][0], f"{bad} voxel(s) are NaN or Inf")
        if data.min() == data.max():
            raise CaseError(case, paths[name][0], f"every voxel is {data.flat[0]:g}: a blank or missing scan "
                                                  "(a model would learn that this modality carries nothing)")
        channels.append(data)
    regions = None
    empty = False
    if "label" in decoded:
        label = np.asarray(decoded["label"][0])
        label_path = paths["label"][0]
        if not np.isfinite(label).all():
            raise CaseError(case, label_path, "label holds NaN or Inf values")
        values = np.unique(label)
        if not np.all(values == np.round(values)):
            raise CaseError(case, label_path, f"label holds non-integer values {values[values != np.round(values)][:5].tolist()}")
        undeclared = sorted(set(values.astype(int).tolist()) - set(spec.labels))
        if undeclared:
            raise CaseError(case, label_path, f"label values {undeclared} are not in the declared set {list(spec.labels)}")
        label = label.astype(np.int16)
        regions = regions_from_labels(label, spec)
        empty = not bool(label.any())
    ornt = nib.orientations.io_orientation(ref_img.affine)
    image = np.stack([nib.orientations.apply_orientation(c, ornt) for c in channels])
    if regions is not None:
        regions = np.stack([nib.orientations.apply_orientation(r, ornt) for r in regions])
    crop = tuple((0, s) for s in image.shape[1:])
    if crop_foreground:
        crop = foreground_box(image, margin=2)
        window = (slice(None), *(slice(a, b) for a, b in crop))
        image = image[window]
        if regions is not None:
            lesion = regions.any(axis=0)
            lost = int(np.count_nonzero(lesion)) - int(np.count_nonzero(lesion[window[1:]]))
            if lost:  # lesion where every scan is 0: no model could see it, and scoring leaves it out
                logger.warning("%s: %d lesion voxel(s) of %s lie where every scan is 0, outside the cropped box; "
                               "they are not scored", case, lost, paths["label"][0])
            regions = regions[window]
    return PreparedCase(
        case=case,
        image=np.ascontiguousarray(zscore_nonzero(image)),
        regions=None if regions is None else np.ascontiguousarray(regions),
        affine=np.asarray(ref_img.affine),
        header=ref_img.header.copy(),
        original_shape=tuple(ref_data.shape),
        ornt=ornt,
        crop=crop,
        empty_label=empty,
    )


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``(C, ...)`` over its nonzero (brain) voxels; zero background stays zero.

    MONAI's ``NormalizeIntensity(nonzero=True, channel_wise=True)``, the rule its BraTS recipes use.
    """
    return np.asarray(_ZSCORE(image), dtype=np.float32)


_ZSCORE = NormalizeIntensity(nonzero=True, channel_wise=True)


def foreground_box(image: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per spatial axis of the nonzero voxels of ``(C, ...)``, widened by ``margin``
    (MONAI's ``generate_spatial_bounding_box``); the whole volume when nothing is nonzero."""
    if not np.any(image):
        return tuple((0, s) for s in image.shape[1:])
    start, stop = generate_spatial_bounding_box(image, select_fn=lambda x: x != 0, margin=margin, allow_smaller=True)
    return tuple((int(a), int(b)) for a, b in zip(start, stop))


def map_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A memory-mapped (copy-on-write) view of a ``.npy`` file that this user owns and no one else may write
    (checked on the open file, as :func:`fedlesion.common.files.open_private` does); never pickle.
    Only the pages used are read, and the mapping goes when the array does."""
    with open_private(path) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{path}: .npy format {version} is not one this cache writes.")
        shape, fortran, dtype = read_header[version](handle)
        if dtype.hasobject:
            raise ValueError(f"{path}: holds Python objects; refusing it.")
        offset = handle.tell()
        size = os.fstat(handle.fileno()).st_size
        if size < offset + dtype.itemsize * math.prod(shape):
            raise ValueError(f"{path}: shorter than its header says (a torn write).")
        if size == offset or math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        # Copy-on-write: a transform writing in place gets private pages; the file never changes.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


class CaseCache:
    """Where preprocessed cases come from, so epochs and rounds never decode NIfTI twice, in a
    bounded amount of memory whatever the number of cases.

    :meth:`lazy` validates and preprocesses a case once and returns a :class:`LazyCase`: its
    metadata only. Its arrays are read when used:

    - with ``disk_dir`` (opt-in: it holds patient-derived arrays outside the data folder), every
      preprocessed case is written there once (``.npy`` arrays without pickle and a JSON file,
      mode 0600, in a 0700 folder that this user owns, checked with
      :func:`fedlesion.common.files.private_folder`; another user's folder is not used) and read
      back memory-mapped (:func:`map_npy`): a process, such as the ClientApp process a SuperNode
      starts for each message, maps only the cases it samples, and the operating system's page
      cache, not the process, keeps the recently used ones;
    - without it, the most recently used cases stay in this process's memory up to ``max_bytes``
      (least recently used dropped first) and a dropped case is decoded again when next used.

    Entries are keyed by the files' paths, sizes and modification times and the preprocessing,
    so a re-exported scan is decoded afresh.

    Args:
        max_bytes: the most memory cases held in memory may take (no ``disk_dir``).
        disk_dir: where preprocessed cases persist between processes, or ``None``.
        max_disk_bytes: the bound on ``disk_dir`` (default ``FEDLESION_CACHE_DISK_GIB``, 100 GiB; 0: none).
    """

    def __init__(self, max_bytes: int, disk_dir: str | os.PathLike[str] | None = None,
                 max_disk_bytes: int | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"CaseCache: max_bytes must be >= 0, got {max_bytes}.")
        self.max_bytes = max_bytes
        # On disk: FEDLESION_CACHE_DISK_GIB (default 100); 0 means no bound.
        self.max_disk_bytes = _env_size("FEDLESION_CACHE_DISK_GIB", 100.0, 2**30) if max_disk_bytes is None else max_disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else None
        if self.disk_dir is not None:
            try:  # entries are only read from a folder no one else owns or can write to
                private_folder(self.disk_dir)
                if not (self.disk_dir / CACHE_TAG).exists():  # what `fedlesion cache --purge` requires
                    (self.disk_dir / CACHE_TAG).write_text(CACHE_TAG_TEXT)
            except (PermissionError, OSError) as exc:
                logger.warning("case cache: not using %s on disk (%s); cases are decoded in each process", disk_dir, exc)
                self.disk_dir = None
        self._items: OrderedDict[tuple[Any, ...], PreparedCase] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A copy (a DataLoader worker, a spawned process) reads the same folder, with memory of its own.
        state = self.__dict__.copy()
        state.update(_items=OrderedDict(), _bytes=0, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def lazy(self, data_dir: str | os.PathLike[str], spec: DatasetSpec, case: str, crop_foreground: bool,
             require_label: bool = True) -> LazyCase:
        """The case, validated and preprocessed (decoded now only if no entry holds it), without its arrays
        (``require_label``: as :func:`load_case`).

        Raises:
            CaseError: (or another exception) for a case that cannot be used.
        """
        key = self._key(data_dir, spec, case, crop_foreground)
        fetch = partial(self._fetch, (key, Path(data_dir), spec, crop_foreground))
        cached = self._cached_case(key, fetch)
        if cached is not None:
            return cached
        prepared = load_case(data_dir, spec, case, crop_foreground=crop_foreground, require_label=require_label)
        if not self._write_disk(key, prepared):
            self._remember(key, prepared)
        return LazyCase(prepared.info(), fetch)

    def get_or_load(self, data_dir: str | os.PathLike[str], spec: DatasetSpec, case: str, crop_foreground: bool) -> PreparedCase:
        """The case with its arrays (read once)."""
        return self.lazy(data_dir, spec, case, crop_foreground).load()

    def _fetch(self, source: tuple[tuple[Any, ...], Path, DatasetSpec, bool], lazy: LazyCase) -> PreparedCase:
        key, data_dir, spec, crop = source
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        prepared = self._map_disk(key, lazy)
        if prepared is not None:
            return prepared
        # Not on disk (no cache folder, or its entry was purged meanwhile): decode again.
        prepared = load_case(data_dir, spec, lazy.case, crop_foreground=crop, require_label=lazy.labelled)
        if not self._write_disk(key, prepared):
            self._remember(key, prepared)
        return prepared

    def _remember(self, key: tuple[Any, ...], prepared: PreparedCase) -> None:
        with self._lock:
            self._items[key] = prepared
            self._bytes += prepared.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def _disk_path(self, key: tuple[Any, ...]) -> Path | None:
        """The entry's folder: ``image.npy``, ``regions.npy`` (labelled cases) and ``meta.json``."""
        if self.disk_dir is None:
            return None
        return self.disk_dir / hashlib.sha256(f"{CACHE_FORMAT}|{key!r}".encode()).hexdigest()[:32]

    def _cached_case(self, key: tuple[Any, ...], fetch: Callable[[LazyCase], PreparedCase]) -> LazyCase | None:
        """The case, without its arrays, when a complete entry for ``key`` is on disk (or the case is in memory)."""
        with self._lock:
            if key in self._items:
                return LazyCase(self._items[key].info(), fetch)
        folder = self._disk_path(key)
        if folder is None or not (folder / "meta.json").is_file():
            return None
        try:
            # Data only (JSON, and arrays without pickle), only from files this user wrote and no one else could have.
            with open_private(folder / "meta.json") as handle:
                meta = json.loads(handle.read().decode())
            if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != repr(key):
                raise ValueError("another version's entry, or a digest collision")
            case = LazyCase(meta, fetch)  # every field there and well-formed (no array is read yet)
            files_there = {"image.npy", *(("regions.npy",) if meta["labelled"] else ())}
            if not all((folder / name).is_file() for name in files_there):
                raise ValueError("an array is missing")
        except PermissionError as exc:  # not ours to trust, nor to delete
            logger.warning("case cache: ignoring %s (%s)", folder, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a torn, stale or foreign entry is removed and rebuilt
            logger.debug("case cache: rebuilding %s (%s)", folder, exc)
            _discard(folder)
            return None
        return case

    def _map_disk(self, key: tuple[Any, ...], lazy: LazyCase) -> PreparedCase | None:
        folder = self._disk_path(key)
        if folder is None:
            return None
        try:
            # Stored slice-major (Z first, see _write_disk): viewed back as (C, X, Y, Z) without a copy.
            image = np.moveaxis(map_npy(folder / "image.npy"), 0, -1)
            regions = np.moveaxis(map_npy(folder / "regions.npy"), 0, -1) if lazy.labelled else None
            if tuple(image.shape) != lazy.shape or image.dtype != np.float32:
                raise ValueError(f"image {image.shape} {image.dtype}, expected {lazy.shape} float32")
            if regions is not None and (regions.shape[1:] != image.shape[1:] or regions.dtype != np.uint8):
                raise ValueError(f"regions {regions.shape} {regions.dtype} do not fit image {image.shape}")
        except FileNotFoundError:  # purged since this process read its metadata
            return None
        except PermissionError as exc:
            logger.warning("case cache: ignoring %s (%s)", folder, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - torn or foreign: removed, then decoded again
            logger.warning("case cache: rebuilding %s (%s)", folder, exc)
            _discard(folder)
            return None
        try:
            os.utime(folder)  # used: the size bound removes the least recently used entries first
        except OSError:
            pass
        return PreparedCase(case=lazy.case, image=image, regions=regions, affine=lazy.affine, header=lazy.header,
                            original_shape=lazy.original_shape, ornt=lazy.ornt, crop=lazy.crop,
                            empty_label=lazy.empty_label)

    def _write_disk(self, key: tuple[Any, ...], prepared: PreparedCase) -> bool:
        """Write the entry; ``False`` when there is no cache folder or it cannot be written."""
        folder = self._disk_path(key)
        if folder is None:
            return False
        meta = {"format": CACHE_FORMAT, "key": repr(key), **prepared.info()}
        tmp: Path | None = None
        try:
            # Written in a private temporary folder, then renamed into place: readers never see half an entry.
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            files = {"image.npy": prepared.image, **({"regions.npy": prepared.regions} if prepared.regions is not None else {})}
            for name, array in files.items():
                # Slice-major (Z, C, X, Y): an axial slice, what a 2D model samples and infers on, is one
                # contiguous block, so a mapped read of one slice reads that slice, not the whole case.
                major = np.ascontiguousarray(np.moveaxis(array, -1, 0))
                replace_private(tmp / name, lambda handle, a=major: np.save(handle, a, allow_pickle=False))
            replace_private(tmp / "meta.json", json.dumps(meta).encode())
            try:
                os.replace(tmp, folder)
            except OSError:  # an entry is there already: another process's (kept when sound), or a bad one
                # Only whether the entry is sound matters here: the returned case is dropped, its fetch never called.
                if self._cached_case(key, self._fetch) is None and not folder.exists():  # it was bad, and is gone
                    try:
                        os.replace(tmp, folder)
                    except OSError:
                        pass
            if self.max_disk_bytes:
                purge_cache(folder.parent, keep_bytes=self.max_disk_bytes, spare_recent_s=RECENT_USE_S)
        except OSError as exc:  # a full or read-only disk only costs speed
            logger.warning("case cache: cannot write %s (%s); continuing without it", folder, exc)
            return False
        finally:
            if tmp is not None and tmp.exists():  # not renamed into place: nothing half-written stays behind
                shutil.rmtree(tmp, ignore_errors=True)
        return (folder / "meta.json").is_file()

    @staticmethod
    def _key(data_dir: str | os.PathLike[str], spec: DatasetSpec, case: str, crop: bool) -> tuple[Any, ...]:
        # File size and mtime in the key: a re-exported scan is decoded again.
        stats = []
        for path, _ in case_paths(data_dir, spec, case).values():
            try:
                st = path.stat()
                stats.append((str(path.resolve()), st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((str(path), None, None))
        # The spec's channel and region order is part of the key: a reordered spec is another case.
        return (json.dumps(spec.to_json()), tuple(stats), crop)


def default_cache_dir() -> Path:
    """The folder ``fedlesion cache`` looks at without ``--dir``: ``$FEDLESION_CACHE_DIR``, else
    ``~/.cache/fedlesion/cases`` (where SuperNodes cached before the cache became opt-in)."""
    return Path(os.environ.get("FEDLESION_CACHE_DIR") or Path.home() / ".cache" / "fedlesion" / "cases")


_ENTRY = re.compile(r"^[0-9a-f]{32}$")  # an entry folder's name (see CaseCache._disk_path)
_PARTIAL = re.compile(r"^\.[0-9a-f]{32}\.[a-z0-9_]{8}$")  # a writer's temporary folder (tempfile.mkdtemp)
_OLD_PICKLE = re.compile(r"^[0-9a-f]{32}\.pkl$|^tmp[a-z0-9_]{8}\.tmp$")  # entries before 2026-11-27 (pickles)
_ENTRY_FILES = {"image.npy", "regions.npy", "meta.json"}
_WRITING = re.compile(r"^\.(image\.npy|regions\.npy|meta\.json)\.[a-z0-9_]{8}\.tmp$")  # replace_private's file, mid-write
CACHE_TAG = "CACHEDIR.TAG"  # marks a FedLesion case cache (https://bford.info/cachedir/)
CACHE_TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# FedLesion preprocessed-case cache\n"
RECENT_USE_S = 600.0  # the size bound never removes an entry used this recently (a site's round in progress)


def _env_size(name: str, default: float, unit: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}='{text}' must be a number >= 0.")
    return int(value * unit)


def _discard(path: Path) -> None:
    """Remove a cache entry or file: renamed aside first, so no reader ever sees it half deleted."""
    aside = path.with_name(f".{path.name[:32]}.gone{os.getpid() % 10000:04d}")  # a temporary folder's name
    try:
        os.replace(path, aside)
    except OSError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _entry_size(path: Path) -> int | None:
    """Bytes of a cache entry (folder of entry files, a writer's temporary folder, an old pickle), or None when
    ``path`` is not one or has gone (other processes add and remove entries all the time)."""
    try:
        if path.is_symlink():
            return None
        if path.is_file():
            return path.stat().st_size if _OLD_PICKLE.match(path.name) else None
        if not (_ENTRY.match(path.name) or _PARTIAL.match(path.name)) or not path.is_dir():
            return None
        files = list(path.iterdir())
        partial = bool(_PARTIAL.match(path.name))  # a writer killed mid-write leaves its temporary file here
        if any((f.name not in _ENTRY_FILES and not (partial and _WRITING.match(f.name))) or f.is_symlink() or not f.is_file()
               for f in files):
            return None  # something else lives here: never ours to count or delete
        return sum(f.stat().st_size for f in files)
    except OSError:
        return None


def cache_entries(folder: str | os.PathLike[str]) -> list[Path]:
    """The case-cache entries in ``folder`` (and writers' temporary folders, and old pickled entries),
    least recently used first."""
    folder = Path(folder)
    found = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    for path in children:
        try:
            if _entry_size(path) is not None:
                found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    return [path for _, path in sorted(found)]


def cache_size(folder: str | os.PathLike[str]) -> int:
    """Bytes the case-cache entries in ``folder`` take."""
    return sum(_entry_size(entry) or 0 for entry in cache_entries(folder))


def purge_cache(folder: str | os.PathLike[str], keep_bytes: int = 0, spare_recent_s: float = 0.0) -> tuple[int, int]:
    """Remove case-cache entries from ``folder``, least recently used first, until at most ``keep_bytes``
    remain (0: all). Only cache entries are touched: folders holding nothing but entry files, writers'
    temporary folders, old pickled entries. Entries used in the last ``spare_recent_s`` seconds are kept
    (a bound below one round's cases would otherwise evict what the round is about to read).

    Raises:
        ValueError: when ``folder`` exists but is not a FedLesion case cache (no ``CACHEDIR.TAG``).

    Returns:
        ``(entries removed, bytes freed)``.
    """
    folder = Path(folder)
    if folder.exists() and not (folder / CACHE_TAG).is_file():
        raise ValueError(f"{folder} is not a FedLesion case cache (no {CACHE_TAG}); nothing was removed.")
    entries = cache_entries(folder)
    sizes = {entry: _entry_size(entry) or 0 for entry in entries}
    total, removed, freed, now = sum(sizes.values()), 0, 0, time.time()
    for entry in entries:
        if total - freed <= keep_bytes:
            break
        try:
            if spare_recent_s and now - entry.stat().st_mtime < spare_recent_s:
                continue
        except OSError:
            continue
        _discard(entry)
        if not entry.exists():
            removed, freed = removed + 1, freed + sizes[entry]
    return removed, freed


CACHE = CaseCache(
    max_bytes=int(float(os.environ.get("FEDLESION_CACHE_GIB", "8")) * 2**30),
    disk_dir=os.environ.get("FEDLESION_CACHE_DIR") or None,
)


@dataclass
class SiteData:
    """The usable cases of one data folder, and what was skipped and why."""

    spec: DatasetSpec
    cases: list[PreparedCase]
    skipped: dict[str, str]  # case ID -> reason

    @property
    def empty_label_count(self) -> int:
        return sum(c.empty_label for c in self.cases)


def load_site(
    data_dir: str | os.PathLike[str],
    spec: DatasetSpec | None = None,
    case_ids: list[str] | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    crop_foreground: bool = False,
    cache: CaseCache | None = CACHE,
    unlabelled: bool = False,
) -> SiteData:
    """Load every case of a data folder (or the listed ones), validated and preprocessed.

    Through a ``cache`` the cases are :class:`LazyCase` objects: each is decoded and validated
    once (or found in the cache), and its arrays are read only when used, so the memory a site
    takes does not grow with its number of cases. With ``cache=None`` every case is decoded and
    held (:class:`PreparedCase`).

    Args:
        data_dir: the data folder.
        spec: its layout; found with :func:`resolve_spec` when ``None``.
        case_ids: the cases to load; all discovered cases when ``None``.
        on_error: ``"skip"`` drops bad cases with one summary warning; ``"raise"`` stops
            at the first bad case.
        crop_foreground: crop each case to its nonzero box.
        cache: where preprocessed cases come from (:class:`CaseCache`); ``None``: decode and hold every case.
        unlabelled: keep a case without a label (its label file missing, or marked in the manifest's
            ``"unlabelled"``) as an unlabelled case, for semi-supervised training; False: skip it, saying why.
            A layout without a label pattern (prediction data) gives unlabelled cases either way.

    Returns:
        The :class:`SiteData`.

    Raises:
        ValueError: for a bad ``on_error``, an unreadable folder, or no case found.
        CaseError: for a bad case when ``on_error="raise"``.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got '{on_error}'.")
    data_dir = Path(data_dir)
    if not data_dir.is_dir() or not os.access(data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"data folder {data_dir}: missing or unreadable; check the path and its permissions.")
    spec = spec or resolve_spec(data_dir)
    ids = discover_cases(data_dir, spec) if case_ids is None else list(case_ids)
    if not ids:
        raise ValueError(f"data folder {data_dir}: no case matches layout '{spec.name}'.")
    cases, skipped = [], {}
    for case in ids:
        try:
            if cache is None:
                loaded = load_case(data_dir, spec, case, crop_foreground=crop_foreground, require_label=not unlabelled)
            else:
                loaded = cache.lazy(data_dir, spec, case, crop_foreground, require_label=not unlabelled)
            if spec.label and not loaded.labelled and not unlabelled:
                raise CaseError(case, data_dir, "has no label (its label file is missing, or the manifest marks it "
                                                "unlabelled); unlabelled cases train only with semi-supervised = true")
            cases.append(loaded)
        except CaseError as exc:
            if on_error == "raise":
                raise
            skipped[case] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one case (a MemoryError included) must never stop a site
            if on_error == "raise":
                raise CaseError(case, data_dir, f"{type(exc).__name__}: {exc}") from exc
            skipped[case] = str(CaseError(case, data_dir, f"unexpected {type(exc).__name__} while loading: {exc}"))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d case(s):\n  %s", data_dir, len(skipped), len(ids), "\n  ".join(skipped.values())
        )
    total = sum(c.nbytes for c in cases)
    if cache is not None and cache.disk_dir is None and total > cache.max_bytes:
        logger.warning("%s: its %d case(s) take %.1f GiB preprocessed, more than the %.1f GiB this process may hold "
                       "(FEDLESION_CACHE_GIB) with no case-cache folder: a case dropped from memory is decoded again "
                       "each time it is sampled. Give a case-cache folder (a SuperNode's cache-dir, "
                       "$FEDLESION_CACHE_DIR) to decode each case once.", data_dir, len(cases), total / 2**30,
                       cache.max_bytes / 2**30)
    return SiteData(spec=spec, cases=cases, skipped=skipped)


def labelled_subset(case_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The training cases that keep their labels under ``label-fraction`` (experiments with few labels):
    ``round(n * fraction)`` of them, at least one while ``fraction > 0``, all at 1, none at 0; chosen by
    ``seed`` from the sorted IDs, so a rerun hides the same ones.

    Raises:
        ValueError: when ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label-fraction must be in [0, 1], got {fraction}.")
    ids = sorted(case_ids)
    keep = 0 if fraction == 0 or not ids else min(len(ids), max(1, round(len(ids) * fraction)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:keep])


def label_seed(seed: int, site_name: str) -> int:
    """The seed :func:`labelled_subset` draws a site's kept labels with: the run's seed and the site's name, so
    the pooled baseline can keep exactly the labels each site keeps."""
    return seed * 1_000_003 + zlib.crc32(site_name.encode())


def divide_cases(cases: Sequence[PreparedCase], val_fraction: float, label_fraction: float, seed: int,
                 site_name: str) -> tuple[list[PreparedCase], list[PreparedCase], list[PreparedCase]]:
    """``(train, validation, unlabelled)`` of one site: labelled cases split into training and validation as
    always (:func:`split_train_val`); then ``label-fraction`` keeps the labels of that share of the training
    cases (:func:`labelled_subset` with :func:`label_seed`) and moves the others, with every case that has no
    label, to the unlabelled ones."""
    labelled = {c.case: c for c in cases if c.labelled}
    train_ids, val_ids = split_train_val(list(labelled), val_fraction, seed) if labelled else ([], [])
    kept = set(labelled_subset(train_ids, label_fraction, label_seed(seed, site_name)))
    return ([labelled[c] for c in train_ids if c in kept], [labelled[c] for c in val_ids],
            [labelled[c] for c in train_ids if c not in kept] + [c for c in cases if not c.labelled])


def split_train_val(case_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic split of case IDs into training and validation.

    At least one case stays for training; validation gets ``round(n * val_fraction)``
    cases, at least one when ``val_fraction > 0`` and there are two or more cases.

    Raises:
        ValueError: when ``val_fraction`` is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = 0 if val_fraction == 0 or len(ids) < 2 else min(max(1, round(len(ids) * val_fraction)), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val
