"""Bridges from config nodes to objects, and config validation that runs before any compute."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .schedules import check_schedule_args, make_sigmas
from .solvers import Solver, make_solver

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_group(group: str, name: str) -> Mapping:
    """Load ``conf/<group>/<name>.yaml`` (e.g. each solver's own settings in a comparison)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ValueError(f"{group}={name!r} has no config file {path}; accepted: {', '.join(choices)}")
    return OmegaConf.load(path)


def solver_from_cfg(node: Mapping, **extra) -> Solver:
    """``node`` is a ``solver`` config: name, afs, final_step, options."""
    options = dict(node.get("options") or {})
    options.update(extra)
    return make_solver(node["name"], afs=node.get("afs", False), final_step=node.get("final_step", "sigma_min"), **options)


def check_schedule_cfg(node: Mapping) -> None:
    check_schedule_args(node["kind"], 2, float(node["sigma_min"]), float(node["sigma_max"]), float(node["rho"]))


def grid_for(solver: Solver, nfe: int, schedule: Mapping) -> torch.Tensor:
    """The sigma grid giving exactly ``nfe`` counted evaluations for ``solver`` on ``schedule``."""
    check_schedule_cfg(schedule)
    return make_sigmas(schedule["kind"], solver.num_points(int(nfe)), float(schedule["sigma_min"]),
                       float(schedule["sigma_max"]), float(schedule["rho"]))
