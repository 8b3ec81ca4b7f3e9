"""Synthetic BraTS-like sites: head-shaped brains, four MR contrasts, nested tumours, scanner effects.

Each case is written in the BraTS 2018-2021 layout (``{case}/{case}_{flair,t1,t1ce,t2,seg}.nii.gz``,
labels 0 background, 1 necrotic core, 2 edema, 4 enhancing tumour) with an LPS-style affine
like the real data. Sites differ in size and in their scanner: intensity scale, noise level,
bias field strength and contrast, so a federation over them is non-IID like real hospitals.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fedlesion.common.config import MAX_SYNTH_SIDE


MODALITIES = ("flair", "t1", "t1ce", "t2")
# Relative signal per tissue and modality, after the usual BraTS appearance:
# FLAIR suppresses CSF and lights up edema; T1ce lights up the enhancing rim; T2 shows fluid bright.
#               WM    GM    CSF   edema necrosis enhancing
CONTRAST = {
    "flair": (0.45, 0.60, 0.08, 1.00, 0.55, 0.80),
    "t1":    (0.85, 0.60, 0.20, 0.50, 0.25, 0.55),
    "t1ce":  (0.85, 0.60, 0.20, 0.50, 0.25, 1.25),
    "t2":    (0.35, 0.55, 1.00, 0.85, 0.95, 0.70),
}
WM, GM, CSF, EDEMA, NECROSIS, ENHANCING = range(6)


@dataclass(frozen=True)
class ScannerProfile:
    """What makes one site's scans look different from another's."""

    intensity_scale: float  # arbitrary units a scanner writes (BraTS values range from ~100 to ~5000)
    noise: float  # Rician-like noise, as a fraction of white-matter signal
    bias: float  # peak-to-peak strength of the smooth multiplicative bias field
    gamma: float  # contrast curve of the vendor's reconstruction


def scanner_profile(site: int, seed: int) -> ScannerProfile:
    """A site's scanner, spread so that sites differ measurably but plausibly."""
    rng = np.random.default_rng([seed, site, 7])
    return ScannerProfile(
        intensity_scale=float(300.0 * 2.0 ** (site % 5) * rng.uniform(0.9, 1.1)),
        noise=float(0.02 + 0.02 * (site % 4) + rng.uniform(0.0, 0.01)),
        bias=float(0.05 + 0.1 * (site % 3) + rng.uniform(0.0, 0.05)),
        gamma=float(rng.uniform(0.85, 1.15)),
    )


def site_case_counts(sites: int, cases_per_site: int) -> list[int]:
    """Unequal site sizes averaging ``cases_per_site``: from half to one and a half times it (at least 2)."""
    if sites < 1 or cases_per_site < 1:
        raise ValueError(f"sites and cases_per_site must be >= 1, got {sites} and {cases_per_site}.")
    factors = np.linspace(0.5, 1.5, sites) if sites > 1 else np.ones(1)
    return [max(2, int(round(cases_per_site * f))) for f in factors]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int = 4) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled trilinearly."""
    grid = torch.from_numpy(rng.standard_normal((1, 1, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(grid, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def _blur(volume: np.ndarray) -> np.ndarray:
    """A 3x3x3 mean filter: partial-volume softening of tissue edges."""
    t = torch.from_numpy(volume.astype(np.float32))[None, None]
    return F.avg_pool3d(F.pad(t, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0].numpy()


def make_case(shape: tuple[int, int, int], rng: np.random.Generator, profile: ScannerProfile) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case.

    Args:
        shape: volume size ``(X, Y, Z)``.
        rng: the random source.
        profile: the site's scanner.

    Returns:
        ``({modality: (X, Y, Z) float32}, (X, Y, Z) uint8 labels in {0, 1, 2, 4})``.
    """
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    # Brain: a deformed ellipsoid, longer front to back, flatter top to bottom.
    radii = np.array([0.78, 0.92, 0.80]) * rng.uniform(0.92, 1.04)
    r_brain = np.sqrt((x / radii[0]) ** 2 + (y / radii[1]) ** 2 + (z / radii[2]) ** 2)
    r_brain = r_brain * (1.0 + 0.05 * _smooth_noise(rng, shape))
    brain = r_brain < 1.0
    tissue = np.full(shape, GM, dtype=np.int8)
    tissue[r_brain * (1.0 + 0.12 * _smooth_noise(rng, shape, coarse=6)) < 0.72] = WM
    tissue[r_brain > 0.94] = CSF  # subarachnoid CSF rim
    for side in (-1.0, 1.0):  # lateral ventricles
        v = ((x - side * 0.13) / 0.08) ** 2 + ((y - 0.05) / 0.30) ** 2 + ((z - 0.10) / 0.14) ** 2
        tissue[v < 1.0] = CSF
    # Tumour: lobulated nested shells, edema > core (necrosis + enhancing rim).
    centre = np.array([rng.uniform(0.2, 0.45) * rng.choice([-1, 1]), rng.uniform(-0.4, 0.4), rng.uniform(-0.25, 0.35)])
    r_edema = rng.uniform(0.18, 0.34)
    r_core = r_edema * rng.uniform(0.45, 0.7)
    r_necrosis = r_core * rng.uniform(0.3, 0.65)
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    d = d / (1.0 + 0.3 * _smooth_noise(rng, shape, coarse=5))
    enhancing = rng.uniform() > 0.15  # some tumours (low grade) do not enhance
    labels = np.zeros(shape, dtype=np.uint8)
    labels[d < r_edema] = 2
    labels[d < r_core] = 4 if enhancing else 1
    labels[d < r_necrosis] = 1
    labels[~brain] = 0
    tumour_tissue = {2: EDEMA, 1: NECROSIS, 4: ENHANCING}
    for label, kind in tumour_tissue.items():
        tissue[labels == label] = kind
    bias = 1.0 + 0.5 * profile.bias * _smooth_noise(rng, shape, coarse=3)
    channels = {}
    for modality in MODALITIES:
        signal = np.asarray(CONTRAST[modality], dtype=np.float32)[tissue]
        signal = signal * rng.uniform(0.95, 1.05)  # per-scan calibration drift
        signal = _blur(signal) ** profile.gamma * bias
        noise = profile.noise * np.hypot(rng.standard_normal(shape), rng.standard_normal(shape)) / np.sqrt(2)
        image = np.clip(signal + noise.astype(np.float32), 0.0, None) * profile.intensity_scale
        image[~brain] = 0.0  # skull-stripped, like BraTS
        channels[modality] = image.astype(np.float32)
    return channels, labels


def affine_for(shape: tuple[int, int, int]) -> np.ndarray:
    """An LPS-style affine like BraTS's, with a physical field of view of 240 x 240 x 155 mm."""
    spacing = np.array([240.0, 240.0, 155.0]) / np.array(shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [0.0, 239.0, 0.0]
    return affine


def write_site(out_dir: str | Path, site: int, cases: int, shape: tuple[int, int, int], seed: int) -> list[str]:
    """Write one site's cases in the BraTS 2021 layout; return the case IDs.

    A site is written into a temporary folder and renamed into place, so readers never
    see half a site and concurrent writers of the same site do not collide.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        return sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    profile = scanner_profile(site, seed)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{np.random.default_rng().integers(1 << 30)}")
    tmp.mkdir(parents=True)
    affine = affine_for(shape)
    ids = []
    for index in range(cases):
        case = f"Synth_S{site:02d}_{index:03d}"
        rng = np.random.default_rng([seed, site, index])
        channels, labels = make_case(shape, rng, profile)
        case_dir = tmp / case
        case_dir.mkdir()
        for modality, image in channels.items():
            nib.save(nib.Nifti1Image(image, affine), case_dir / f"{case}_{modality}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), case_dir / f"{case}_seg.nii.gz")
        ids.append(case)
    (tmp / "site.json").write_text(json.dumps({"site": site, "cases": ids, "shape": list(shape),
                                               "seed": seed, "scanner": asdict(profile)}, indent=2))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished the same site first
        shutil.rmtree(tmp, ignore_errors=True)
    return ids


def site_dir(root: str | Path, site: int) -> Path:
    return Path(root) / f"site-{site}"


def synthesize(out_dir: str | Path, sites: int, cases_per_site: int, shape: tuple[int, int, int], seed: int,
               flat: bool = False) -> dict[int, list[str]]:
    """Write ``sites`` synthetic sites under ``out_dir/site-<i>/``; see :func:`site_case_counts` for sizes.

    With ``flat`` every case goes straight into ``out_dir`` (one pooled dataset, as BraTS is
    distributed); the site stays readable from the case ID (``Synth_S<site>_<index>``), so
    ``fedlesion split --kind institution`` recovers the sites.

    Raises:
        ValueError: for fewer than one site or case, or a side above
            :data:`fedlesion.common.config.MAX_SYNTH_SIDE` (checked before anything is allocated).
    """
    if sites < 1 or cases_per_site < 1:
        raise ValueError(f"synthetic data needs at least one site and one case per site (got {sites}, {cases_per_site}).")
    if max(shape) > MAX_SYNTH_SIDE:
        raise ValueError(f"synthetic shape {tuple(shape)}: each side must be <= {MAX_SYNTH_SIDE} (BraTS is 240 x 240 x 155).")
    counts = site_case_counts(sites, cases_per_site)
    written = {site: write_site(site_dir(out_dir, site), site, counts[site], shape, seed) for site in range(sites)}
    if flat:
        for site in written:
            folder = site_dir(out_dir, site)
            for case in written[site]:
                (folder / case).rename(Path(out_dir) / case)
            shutil.rmtree(folder)
    return written
