"""Where the package's own config files are: ``conf/`` (and ``experiments/``) of a source checkout, or
their copies inside an installed wheel. The bottom layer: the library reads the paper's defaults from
these files (so the Python API and the command line cannot drift apart); :mod:`amedlab.specs` reads
the user's composed config."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _config_locations() -> tuple[Path, Path]:
    """(the primary config folder, the folder holding ``experiments/``).

    In a source checkout (``src/amedlab``, run with PYTHONPATH=src or installed editable) the
    top-level ``conf/`` and ``experiments/`` are used, so edits take effect without reinstalling.
    An installed wheel carries both as ``amedlab/conf/`` and ``amedlab/conf/experiments/`` (mapped
    by ``[tool.setuptools.package-dir]`` in pyproject.toml).
    """
    checkout = _PACKAGE.parents[1]
    if _PACKAGE.parent.name == "src" and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "conf", checkout
    return _PACKAGE / "conf", _PACKAGE / "conf"


CONF_DIR, EXPERIMENTS_ROOT = _config_locations()


def package_conf(group: str, name: str) -> dict:
    """``conf/<group>/<name>.yaml`` of the package as plain values (not a user's ``--config-dir``)."""
    from omegaconf import OmegaConf

    from .io import plain

    return plain(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"))
