"""Bridges from config nodes to objects, and config validation that runs before any compute."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from .schedules import check_schedule_args
from .solvers import Solver, make_solver

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
# conf/config.yaml puts ${amedlab.root:} on Hydra's search path: experiments=<name> from any folder
OmegaConf.register_new_resolver("amedlab.root", lambda: str(EXPERIMENTS_ROOT), replace=True)


def cell_dirname(override_dirname: str) -> str:
    """A sweep cell's folder name from its overrides, always ONE path component inside the sweep folder:
    a swept path value (``eval.digits_classifier=../../x``) must not choose where results go. Path
    separators become ``%2F``; a name over 200 bytes is cut and ends in a digest of the whole."""
    import hashlib

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
    ``--config-dir`` included), else :data:`CONF_DIR`."""
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


def solver_from_cfg(node: Mapping, **extra) -> Solver:
    """``node`` is a ``solver`` config: name, afs, final_step, options."""
    options = dict(node.get("options") or {})
    options.update(extra)
    return make_solver(node["name"], afs=node.get("afs", False), final_step=node.get("final_step", "sigma_min"), **options)


def check_schedule_cfg(node: Mapping) -> None:
    check_schedule_args(node["kind"], 2, float(node["sigma_min"]), float(node["sigma_max"]), float(node["rho"]))
