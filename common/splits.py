"""Split a dataset's cases into federated sites.

Kinds:

- ``institution``: BraTS 2018-2020 IDs carry the contributing institution as their second
  token (``Brats18_CBICA_AAB_1`` -> ``CBICA``), as do synthetic IDs (``Synth_S00_000`` ->
  ``S00``); other IDs need an explicit ``site_of`` mapping or a split JSON.
- ``fets1`` / ``fets2``: the FeTS 2022 institutional partitions of BraTS 2021 (23 / 33
  sites). ``FeTS2022_NNNNN`` is read as ``BraTS2021_NNNNN``: an inferred mapping.
- ``iid``: a seeded uniform shuffle into equal sites.
- ``dirichlet-count``: site sizes drawn from Dirichlet(alpha); small alpha, skewed sizes.
- ``dirichlet-volume``: cases binned by tumour volume, each bin spread over sites by its own
  Dirichlet(alpha) draw; small alpha, sites with very different tumour sizes.

A split is written as JSON: ``{"kind", "sites": {site: [case IDs]}, "notes": [...]}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from .files import is_case_name

FETS_FILES = {"fets1": "partitioning_1.json", "fets2": "partitioning_2.json", "fets-small": "small_split.json"}
KINDS = ("institution", "fets1", "fets2", "fets-small", "iid", "dirichlet-count", "dirichlet-volume")
_INSTITUTION = re.compile(r"^(?:Brats\d{2}|Synth)_([A-Za-z0-9]+)_")  # Brats18_CBICA_AAB_1, Synth_S00_000


def partition_rows(kind: str) -> list[dict[str, str]]:
    """The rows (``Partition_ID``, ``Subject_ID``) of a shipped FeTS 2022 partition table.

    The tables ship as JSON, not as FeTS's CSV: Flower's FAB carries ``.json`` files and no
    ``.csv``, and a simulated ClientApp runs from the FAB. Read through ``importlib.resources``,
    as from an installed wheel.
    """
    data = json.loads(files(__package__).joinpath("partitions", FETS_FILES[kind]).read_text(encoding="utf-8"))
    return [dict(zip(data["columns"], row)) for row in data["rows"]]


@dataclass
class Split:
    """Site name -> case IDs, with how it was made."""

    kind: str
    sites: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {site: len(cases) for site, cases in self.sites.items()}

    def site_names(self) -> list[str]:
        """Sites in partition-id order: as written (institution and FeTS IDs keep their order)."""
        return list(self.sites)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": self.kind, "sites": self.sites, "notes": self.notes}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        try:
            data = json.loads(Path(path).read_text())
            sites = {str(k): list(v) for k, v in data["sites"].items()}
            for cases in sites.values():  # each ID names a case folder below the data folder, never a path out of it
                bad = [c for c in cases if not is_case_name(c)]
                if bad:
                    raise ValueError(f"case ID(s) {bad[:3]} are not case folder names")
            return cls(kind=data["kind"], sites=sites, notes=list(data.get("notes", [])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"split file {path}: unreadable or malformed ({exc}); make one with `fedlesion split`.") from exc


def by_institution(case_ids: Sequence[str], site_of: Mapping[str, str] | None = None) -> Split:
    """Group cases by institution.

    Args:
        case_ids: the cases.
        site_of: case -> site, for IDs that do not carry the institution; when ``None`` the
            BraTS 2018-2020 ``Brats18_<INSTITUTION>_...`` convention is used.

    Raises:
        ValueError: naming the cases whose institution cannot be told.
    """
    sites: dict[str, list[str]] = {}
    unknown = []
    for case in sorted(case_ids):
        site = site_of.get(case) if site_of is not None else (m.group(1) if (m := _INSTITUTION.match(case)) else None)
        if site is None:
            unknown.append(case)
        else:
            sites.setdefault(site, []).append(case)
    if unknown:
        raise ValueError(
            f"cannot tell the institution of {len(unknown)} case(s) (e.g. {unknown[:3]}): IDs must look like "
            f"'Brats18_CBICA_AAB_1', or give a site for every case (a 'site' column / split file)."
        )
    return Split("institution", dict(sorted(sites.items(), key=lambda kv: (-len(kv[1]), kv[0]))))


def fets(kind: str, case_ids: Sequence[str] | None = None) -> Split:
    """The FeTS 2022 partition ``kind`` (``fets1``, ``fets2`` or ``fets-small``), in its site order.

    With ``case_ids`` (the cases present in a data folder), subjects are mapped to
    ``BraTS2021_NNNNN`` IDs and those absent are listed in the notes and dropped.
    """
    if kind not in FETS_FILES:
        raise ValueError(f"unknown FeTS partition '{kind}'; choose one of {sorted(FETS_FILES)}.")
    sites: dict[str, list[str]] = {}
    for row in partition_rows(kind):
        number = row["Subject_ID"].rsplit("_", 1)[-1]
        sites.setdefault(f"site-{int(row['Partition_ID']):02d}", []).append(f"BraTS2021_{number}")
    notes = ["FeTS2022_NNNNN read as BraTS2021_NNNNN: an inferred mapping, not an official table."]
    if case_ids is not None:
        present = set(case_ids)
        missing = sorted(c for cases in sites.values() for c in cases if c not in present)
        if missing:
            notes.append(f"{len(missing)} subject(s) of the partition are not in the data folder"
                         + (f": {missing}" if len(missing) <= 10 else f", e.g. {missing[:5]}"))
        sites = {s: [c for c in cases if c in present] for s, cases in sites.items()}
        sites = {s: cases for s, cases in sites.items() if cases}
        if not sites:
            example = sorted(present)[:3]
            raise ValueError(f"none of the {len(present)} case(s) is a subject of the FeTS partition '{kind}' "
                             f"(BraTS2021_NNNNN IDs; found e.g. {example}); use another --kind.")
    return Split(kind, sites, notes)


def iid(case_ids: Sequence[str], num_sites: int, seed: int) -> Split:
    """A seeded shuffle dealt into ``num_sites`` sites of equal size (within one case)."""
    _check_sites(case_ids, num_sites)
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    return Split("iid", {f"site-{i}": sorted(order[i::num_sites].tolist()) for i in range(num_sites)})


def dirichlet_count(case_ids: Sequence[str], num_sites: int, alpha: float, seed: int) -> Split:
    """Site sizes drawn from Dirichlet(alpha), every site keeping at least one case."""
    _check_sites(case_ids, num_sites)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([alpha] * num_sites)
    spare = len(case_ids) - num_sites
    sizes = 1 + np.floor(shares * spare).astype(int)
    for i in np.argsort(-(shares * spare - np.floor(shares * spare)))[: len(case_ids) - int(sizes.sum())]:
        sizes[i] += 1
    order = rng.permutation(sorted(case_ids)).tolist()
    bounds = np.cumsum([0, *sizes])
    return Split(f"dirichlet-count(alpha={alpha})",
                 {f"site-{i}": sorted(order[bounds[i]:bounds[i + 1]]) for i in range(num_sites)})


def dirichlet_volume(volumes: Mapping[str, float], num_sites: int, alpha: float, seed: int, bins: int = 4) -> Split:
    """Tumour-volume skew: cases in volume quantile bins, each bin spread by its own Dirichlet(alpha)."""
    _check_sites(list(volumes), num_sites)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    ordered = sorted(volumes, key=lambda c: (volumes[c], c))
    sites: dict[str, list[str]] = {f"site-{i}": [] for i in range(num_sites)}
    for chunk in np.array_split(np.array(ordered, dtype=object), bins):
        if len(chunk) == 0:
            continue
        for case, site in zip(chunk.tolist(), rng.choice(num_sites, size=len(chunk), p=rng.dirichlet([alpha] * num_sites))):
            sites[f"site-{site}"].append(case)
    # Every site must train on something: move one case from the largest site into each empty one.
    for name in [s for s, cases in sites.items() if not cases]:
        largest = max(sites, key=lambda s: len(sites[s]))
        sites[name].append(sites[largest].pop())
    return Split(f"dirichlet-volume(alpha={alpha})", {s: sorted(c) for s, c in sites.items()})


def skew(split: Split) -> float:
    """Coefficient of variation of site sizes: 0 for equal sites, larger when skewed."""
    sizes = np.array(list(split.sizes().values()), dtype=float)
    return float(sizes.std() / sizes.mean())


def make_split(kind: str, case_ids: Sequence[str], num_sites: int = 3, alpha: float = 0.5, seed: int = 0,
               volumes: Mapping[str, float] | None = None) -> Split:
    """Dispatch on ``kind`` (see :data:`KINDS`).

    Raises:
        ValueError: for an unknown kind or missing inputs.
    """
    if kind == "institution":
        return by_institution(case_ids)
    if kind in FETS_FILES:
        return fets(kind, case_ids)
    if kind == "iid":
        return iid(case_ids, num_sites, seed)
    if kind == "dirichlet-count":
        return dirichlet_count(case_ids, num_sites, alpha, seed)
    if kind == "dirichlet-volume":
        if volumes is None:
            raise ValueError("dirichlet-volume needs each case's tumour volume (labels must be present).")
        return dirichlet_volume(volumes, num_sites, alpha, seed)
    raise ValueError(f"unknown split kind '{kind}'; choose one of {list(KINDS)}.")


def tumour_volumes(data_dir: str | Path, spec: Any, case_ids: Sequence[str]) -> dict[str, float]:
    """Foreground voxels of each case's label, read from the label file header-fast (no preprocessing)."""
    import nibabel as nib

    from .data import case_paths

    out = {}
    for case in case_ids:
        path, _ = case_paths(data_dir, spec, case)["label"]
        out[case] = float(np.count_nonzero(np.asarray(nib.load(str(path)).dataobj)))
    return out


def _check_sites(case_ids: Sequence[str], num_sites: int) -> None:
    if num_sites < 1 or num_sites > len(case_ids):
        raise ValueError(f"cannot split {len(case_ids)} case(s) into {num_sites} site(s); need 1 <= sites <= cases.")


def _check_alpha(alpha: float) -> None:
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}.")
