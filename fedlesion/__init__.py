"""FedLesion: federated lesion segmentation with Flower, MONAI and PyTorch.

Everything installs under this one package: ``fedlesion.common`` (model, data, training; no
Flower), ``fedlesion.client`` (the hospital's ClientApp), ``fedlesion.server`` (the ServerApp
and the SuperLink), ``fedlesion.simulations`` (synthetic sites, experiments, benchmarks) and
``fedlesion.cli`` (the ``fedlesion`` command).

In the repository (and in a FAB built from it) the subpackages are the top-level folders
``common/``, ``client/``, ``server/`` and ``simulations/``, beside this one; an installed wheel
holds them inside this package (``pyproject.toml`` maps them there).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# The repository (or FAB) folder when running from one; None when installed from a wheel.
CHECKOUT: Path | None = None if (_HERE / "common" / "__init__.py").is_file() else _HERE.parent

if CHECKOUT is not None:  # the subpackages sit beside this folder, not inside it
    __path__.append(str(CHECKOUT))  # noqa: F821 - a package's own search path
