"""Post-processing of a predicted label map: drop the lesion's small, far-off islands.

Small false-positive islands far from the tumour barely move Dice but dominate HD95 (tens of
mm on real scans). Post-processing works on the whole lesion (every foreground label together)
with MONAI's connected-component transforms: only the largest few components are kept
(``KeepLargestConnectedComponent``) and those under a volume in mm^3 are removed
(``RemoveSmallObjects``), but never the largest one. A removed voxel becomes background in
every region.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import KeepLargestConnectedComponent, RemoveSmallObjects

from .config import with_defaults

# MONAI's RemoveSmallObjects passes scikit-image an argument that scikit-image 0.26 deprecated; not ours to act on.
warnings.filterwarnings("ignore", message="Parameter `min_size` is deprecated", category=FutureWarning)

RUN_CONFIG_KEYS = ("postprocess", "postprocess-min-mm3", "postprocess-components")


@dataclass(frozen=True)
class PostProcessing:
    """How a predicted label map is cleaned; the run-config keys of :data:`RUN_CONFIG_KEYS`.

    Args:
        enabled: ``postprocess``; ``False`` leaves the thresholded label map as it is.
        min_mm3: ``postprocess-min-mm3``: lesion components smaller than this volume are removed (0: none).
        components: ``postprocess-components``: keep at most this many largest components (0: no limit).

    Raises:
        ValueError: for a negative ``min_mm3`` or ``components``.
    """

    enabled: bool
    min_mm3: float
    components: int

    def __post_init__(self) -> None:
        if self.min_mm3 < 0:
            raise ValueError(f"postprocess-min-mm3 must be >= 0 (0: keep small components), got {self.min_mm3}.")
        if self.components < 0:
            raise ValueError(f"postprocess-components must be >= 0 (0: no limit), got {self.components}.")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> PostProcessing:
        """The settings of a run config; keys it lacks take their declared defaults, other keys are ignored.

        Raises:
            ValueError: for a value of the wrong type (see :func:`fedlesion.common.config.with_defaults`).
        """
        values = with_defaults({key: run_config[key] for key in RUN_CONFIG_KEYS if key in run_config})
        return cls(values["postprocess"], values["postprocess-min-mm3"], values["postprocess-components"])

    def to_run_config(self) -> dict[str, Any]:
        """The settings as run-config values (what a checkpoint records)."""
        return dict(zip(RUN_CONFIG_KEYS, (self.enabled, self.min_mm3, self.components)))


def postprocess_labels(labels: np.ndarray, settings: PostProcessing, spacing: Sequence[float]) -> np.ndarray:
    """Keep the whole lesion's largest ``settings.components`` components, less those under ``settings.min_mm3``.

    The largest component always stays, however small: post-processing never empties a
    prediction, so a small tumour is not erased. Components are 26-connected (3D; 8-connected
    in 2D): voxels touching at a corner are one lesion.

    Args:
        labels: ``(*spatial)`` label map (0 is background).
        settings: what to remove; nothing is when ``settings.enabled`` is false.
        spacing: voxel size in mm per spatial axis (sizes are in mm^3).

    Returns:
        ``labels`` with the removed components' voxels set to 0 (a new array when post-processing is enabled).
    """
    if not settings.enabled:
        return labels
    lesion = (labels > 0)[None]  # (1, *spatial): the whole lesion, one channel
    connectivity = labels.ndim
    keep = lesion
    if settings.components > 0:
        keep = np.asarray(KeepLargestConnectedComponent(num_components=settings.components,
                                                        connectivity=connectivity)(keep))
    if settings.min_mm3 > 0:
        large = RemoveSmallObjects(min_size=settings.min_mm3, connectivity=connectivity, by_measure=True,
                                   pixdim=tuple(spacing))(keep)
        keep = large | np.asarray(KeepLargestConnectedComponent(connectivity=connectivity)(lesion))
    return np.where(keep[0], labels, 0).astype(labels.dtype)
