"""Reading the composed config: the config folders in Hydra's order, a group's option file, and the
resolvers ``conf/config.yaml`` uses (``amedlab.root`` for experiments=<name> from any folder,
``amedlab.cell_dir`` for a sweep cell's folder, ``amedlab.cache`` for the one cache folder)."""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from ..resources import CONF_DIR, EXPERIMENTS_ROOT

OmegaConf.register_new_resolver("amedlab.root", lambda: str(EXPERIMENTS_ROOT), replace=True)


def default_cache_dir() -> str:
    """The one cache folder, shared by every working folder: ``AMEDLAB_CACHE`` if set, else the user
    cache directory, ``$XDG_CACHE_HOME/amedlab`` or ``~/.cache/amedlab`` (the convention of torch.hub,
    Hugging Face and torch-fidelity). An empty ``AMEDLAB_CACHE`` is returned as is: the checks refuse it."""
    if "AMEDLAB_CACHE" in os.environ:
        return os.environ["AMEDLAB_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "amedlab")


# conf/config.yaml: cache_dir: ${amedlab.cache:}
OmegaConf.register_new_resolver("amedlab.cache", default_cache_dir, replace=True)


def cell_dirname(override_dirname: str) -> str:
    """A sweep cell's folder name from its overrides, always ONE path component inside the sweep folder:
    a swept path value (``eval.digits_classifier=../../x``) must not choose where results go. Path
    separators become ``%2F``; a name over 200 bytes is cut and ends in a digest of the whole."""
    name = str(override_dirname).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C").replace("\0", "")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    if len(name.encode()) > 200:
        name = name.encode()[:180].decode(errors="ignore") + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return name


# conf/config.yaml: hydra.sweep.subdir=${amedlab.cell_dir:${hydra:job.override_dirname}}
OmegaConf.register_new_resolver("amedlab.cell_dir", cell_dirname, replace=True)


def config_dirs() -> list[Path]:
    """The folders configs are read from, in Hydra's order: inside a Hydra job its search path (a
    ``--config-dir`` included), else the package's ``conf/``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
        dirs = [Path(src.path) for src in sources if src.schema == "file"]
    except ValueError:  # not in a Hydra job (Python API, tests, benchmarks)
        dirs = []
    return dirs + [CONF_DIR] if CONF_DIR not in dirs else dirs


def load_group(group: str, name: str) -> Mapping:
    """Load ``<group>/<name>.yaml`` from the first config folder holding it (e.g. each solver's own
    settings in a comparison; a ``--config-dir`` may add solvers)."""
    dirs = config_dirs()
    for folder in dirs:
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    choices = sorted({p.stem for folder in dirs for p in (folder / group).glob("*.yaml")})
    raise ValueError(f"{group}={name!r} has no config file {group}/{name}.yaml in {', '.join(map(str, dirs))}; "
                     f"accepted: {', '.join(choices)}")


def hydra_command() -> str:
    """The command line that reproduces this run: ``python -m amedlab <overrides>``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = sys.argv[1:]
    return " ".join(["python -m amedlab", *overrides])
