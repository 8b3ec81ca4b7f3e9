"""Where a SuperNode's cases come from, and the per-process state kept between rounds.

A real hospital's SuperNode names its data with ``--node-config "data-path=..."``
(plus optional ``manifest``, ``site-name``, ``device``). In simulation each virtual
SuperNode gets a ``partition-id``: it picks the matching synthetic site (generated on
first use) or the matching sub-folder of ``data-root``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlesion.common.config import DATASET_SPEC_KEY, dataset_spec, parse_shape, with_defaults
from fedlesion.common.data import (
    CACHE,
    LAYOUTS,
    CaseCache,
    DatasetSpec,
    divide_cases,
    PreparedCase,
    conform_spec,
    discover_cases,
    load_site,
    resolve_spec,
)
from fedlesion.common.engine import select_device
from fedlesion.common.splits import Split, make_split, tumour_volumes

logger = logging.getLogger("flwr")


@dataclass
class Site:
    """One site's usable cases: labelled ones split into training and validation, and unlabelled ones
    (no label, or its label hidden by ``label-fraction``), which train only under ``semi-supervised``."""

    name: str
    data_path: Path
    spec: DatasetSpec
    train: list[PreparedCase]
    val: list[PreparedCase]
    skipped: dict[str, str]
    empty_label_cases: int
    device: torch.device
    unlabelled: list[PreparedCase] = field(default_factory=list)

    def counts(self) -> dict[str, float]:
        """Scalar facts every reply carries (no case IDs, no paths)."""
        return {
            "skipped-cases": float(len(self.skipped)),
            "empty-label-cases": float(self.empty_label_cases),
            "labelled-cases": float(len(self.train)),
            "unlabelled-cases": float(len(self.unlabelled)),
        }


def synthetic_root(run_config: Mapping[str, Any], num_sites: int) -> Path:
    """The folder synthetic sites for this configuration live in (reused across runs)."""
    values = with_defaults(run_config)
    shape = parse_shape(values["synth-shape"])
    key = f"sites{num_sites}-cases{values['synth-cases-per-site']}-shape{'x'.join(map(str, shape))}-seed{values['seed']}"
    return Path(values["output-dir"]).resolve() / "synthetic" / key


@dataclass(frozen=True)
class SiteSource:
    """Where one site's cases are: a folder, its layout, and (for splits) which cases."""

    name: str
    path: Path
    manifest: str | None = None
    case_ids: tuple[str, ...] | None = None


def locate(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSource:
    """This SuperNode's :class:`SiteSource`.

    Real SuperNodes name ``data-path``. In simulation ``partition-id`` selects: a synthetic
    site (``data-root`` empty; the launcher writes them under :func:`synthetic_root` before the
    run, the hospital side never generates data); the ``partition-id``-th sub-folder of ``data-root``
    (``split = "folders"``); or the ``partition-id``-th site of a split of ``data-root``'s
    cases (``split`` = a kind from :mod:`fedlesion.common.splits` or a split JSON file).

    Raises:
        ValueError: when the node config names no data and this is not a simulation, or a
            simulation's synthetic site has not been written.
    """
    values = with_defaults(run_config)
    if "data-path" in node_config:
        path = Path(str(node_config["data-path"])).expanduser()
        manifest = str(node_config.get("manifest", "")) or None
        return SiteSource(str(node_config.get("site-name", path.name)), path, manifest)
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode has no data: start it with --node-config \"data-path=/path/to/cases\" "
            "(optionally manifest=..., site-name=..., device=...)."
        )
    pid, num = int(node_config["partition-id"]), int(node_config.get("num-partitions", 1))
    root, seed, split_kind = values["data-root"], values["seed"], values["split"]
    if not root:
        path = synthetic_root(values, num) / f"site-{pid}"
        if not path.is_dir():
            raise ValueError(
                f"synthetic site {path} does not exist: `fedlesion simulate` generates the synthetic sites before "
                f"the run; with `flwr run` directly, write them first with `fedlesion synth --out {path.parent} "
                f"--sites {num} --cases-per-site {values['synth-cases-per-site']} --shape {values['synth-shape']} "
                f"--seed {seed}`, or point data-root at your own site folders.")
        return SiteSource(f"synthetic-{pid}", path)
    if split_kind == "folders":
        sites = sorted(p for p in Path(root).iterdir() if p.is_dir())
        if pid >= len(sites):
            raise ValueError(f"data-root {root} has {len(sites)} site folder(s); partition-id {pid} has none.")
        return SiteSource(sites[pid].name, sites[pid])
    manifest = values["manifest"] or None
    split = _split(root, manifest, split_kind, num, values["split-alpha"], seed)
    names = split.site_names()
    if pid >= len(names):
        raise ValueError(f"split '{split_kind}' of {root} has {len(names)} site(s); partition-id {pid} has none "
                         f"(run the simulation with as many SuperNodes as sites).")
    return SiteSource(names[pid], Path(root), manifest, tuple(split.sites[names[pid]]))


def _split(root: str, manifest: str | None, kind: str, num_sites: int, alpha: float, seed: int) -> Split:
    if Path(kind).suffix == ".json":
        return Split.load(kind)
    spec = dataset_spec(manifest) if manifest else resolve_spec(root)
    ids = discover_cases(root, spec)
    volumes = tumour_volumes(root, spec, ids) if kind == "dirichlet-volume" else None
    return make_split(kind, ids, num_sites=num_sites, alpha=alpha, seed=seed, volumes=volumes)


def expected_spec(round_config: Mapping[str, Any], node_config: Mapping[str, Any],
                  run_config: Mapping[str, Any]) -> DatasetSpec:
    """The channels and regions the shared model has, as the server states them.

    The server sends the spec's JSON in every round's config (:data:`fedlesion.common.config.DATASET_SPEC_KEY`);
    only its channel names, their order and the region names are used (:func:`fedlesion.common.data.conform_spec`):
    file patterns and label values always come from the site's own layout. A SuperNode never reads
    a file the run config names: a hospital's node config alone says which paths it reads
    (``data-path``, ``manifest``, ``cache-dir``). Without the server's spec, the run config's
    ``dataset`` is used when it is a built-in layout, or, in simulation (one machine, one researcher),
    a manifest path.

    Raises:
        ValueError: for a malformed spec, or a SuperNode asked to read the file a run config names.
    """
    if DATASET_SPEC_KEY in round_config:
        try:
            data = json.loads(str(round_config[DATASET_SPEC_KEY]))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"the server's {DATASET_SPEC_KEY} is not JSON ({type(exc).__name__}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"the server's {DATASET_SPEC_KEY} is not a JSON object.")
        try:
            return DatasetSpec.from_json(data, source=f"the server's {DATASET_SPEC_KEY}")
        except (OverflowError, RecursionError) as exc:
            raise ValueError(f"the server's {DATASET_SPEC_KEY} is malformed ({type(exc).__name__}).") from None
    name = str(with_defaults(run_config)["dataset"])
    if name in LAYOUTS or "data-path" not in node_config:
        return dataset_spec(name)
    raise ValueError(f"the run config's dataset '{name}' is not a built-in layout {sorted(LAYOUTS)}, and this "
                     "SuperNode reads only the paths its own node config names (data-path, manifest), never one "
                     "from the run config; the server should send the spec itself (FedLesion's ServerApp does).")


_SITES: dict[tuple[Any, ...], Site] = {}
_CACHES: dict[str, CaseCache] = {}


def _cache(node_config: Mapping[str, Any]) -> CaseCache:
    """Where the site's preprocessed cases come from (:class:`~fedlesion.common.data.CaseCache`).

    On disk only when the hospital chose a folder, ``cache-dir`` in the node config or
    ``$FEDLESION_CACHE_DIR``: it holds patient-derived arrays outside the data folder, so it is
    opt-in. With it, each message's ClientApp process (a SuperNode starts one per message) maps
    the cases it samples from there, decoding nothing; without it, each process decodes the
    site's cases once and keeps at most ``$FEDLESION_CACHE_GIB`` of them in memory.
    """
    folder = str(node_config.get("cache-dir", "")) or os.environ.get("FEDLESION_CACHE_DIR", "")
    if folder not in _CACHES:
        _CACHES[folder] = CaseCache(CACHE.max_bytes, disk_dir=folder or None)
    return _CACHES[folder]


def load(node_config: Mapping[str, Any], run_config: Mapping[str, Any], expected: DatasetSpec | None = None) -> Site:
    """This SuperNode's :class:`Site`, validated once and kept for the process's lifetime.

    Args:
        node_config: the SuperNode's node config.
        run_config: the run config.
        expected: the shared model's spec (:func:`expected_spec`); default: the run config's
            ``dataset`` under the same rules.

    Raises:
        ValueError: when the data is missing, its channels or regions are not the run's
            dataset's (channels listed in another order are reordered), or it holds no usable case.
    """
    values = with_defaults(run_config)
    source = locate(node_config, values)
    name, path, manifest = source.name, source.path, source.manifest
    seed, val_fraction, crop = values["seed"], values["val-fraction"], values["crop-foreground"]
    semi, label_fraction = values["semi-supervised"], values["label-fraction"]
    if expected is None:
        expected = expected_spec({}, node_config, values)
    key = (name, str(path.resolve()), manifest, source.case_ids, seed, val_fraction, json.dumps(expected.to_json()), crop,
           semi, label_fraction)
    if key in _SITES:
        return _SITES[key]
    spec = conform_spec(dataset_spec(manifest) if manifest else resolve_spec(path), expected, f"site {name} ({path})")
    data = load_site(path, spec, case_ids=None if source.case_ids is None else list(source.case_ids),
                     crop_foreground=crop, cache=_cache(node_config), unlabelled=semi)
    if not data.cases:
        raise ValueError(f"site {name}: no usable case in {path}; {len(data.skipped)} skipped (see the SuperNode log).")
    train, val, unlabelled = divide_cases(data.cases, val_fraction, label_fraction, seed, name)
    device = select_device(str(node_config.get("device", "auto")))
    site = Site(
        name=name, data_path=path, spec=spec, train=train, val=val, unlabelled=unlabelled,
        skipped=data.skipped, empty_label_cases=data.empty_label_count, device=device,
    )
    logger.info(
        "site %s: %d usable case(s) (%d train, %d validation, %d unlabelled%s), %d skipped, %d with empty label; "
        "device %s%s", name, len(data.cases), len(site.train), len(site.val), len(site.unlabelled),
        "" if semi or not site.unlabelled else ": not used, semi-supervised is off", len(data.skipped),
        site.empty_label_cases, device, " with float16 mixed precision" if device.type == "cuda" else "",
    )
    _SITES[key] = site
    return site
