"""Solver registry: ``make_solver(name, **options)`` and the NFE <-> grid-size helpers."""
from __future__ import annotations

import inspect
from typing import Callable

from .base import FINAL_STEPS, Point, Solver, State, StepRule, afs_point, bcast, evaluate, first_point
from .multistep import IPNDM, DPMSolverPP, UniPC
from .single_step import DPMSolver2, Euler, Heun, MeanDirection, mean_direction_step

# name -> factory(**rule_options) -> StepRule
_RULES: dict[str, Callable[..., StepRule]] = {
    "euler": Euler,
    "heun": Heun,
    "midpoint": lambda: MeanDirection("arithmetic"),
    "dpm2": DPMSolver2,
    "ipndm": IPNDM,
    "dpmpp": DPMSolverPP,
    "dpmpp2m": lambda lower_order_final=True: DPMSolverPP(2, lower_order_final),
    "dpmpp3m": lambda lower_order_final=True, taylor_d2=False: DPMSolverPP(3, lower_order_final, taylor_d2),
    "unipc": UniPC,
}


def register_solver(name: str, factory: Callable[..., StepRule]) -> None:
    """Add a step rule under ``name`` (used by the AMED package for ``amed`` and ``amed_plugin``)."""
    _RULES[name] = factory


def available_solvers() -> list[str]:
    _load_plugins()
    return sorted(_RULES)


def make_solver(name: str, afs: bool | str | None = None, final_step: str = "sigma_min", **options) -> Solver:
    """Build a solver. ``afs``: analytical first step, False / True (GENIE) / "mean" (with the data
    mean); None: the rule's default, e.g. what an AMED predictor was trained with, else off; ``final_step``: ``sigma_min`` (paper tables) or
    ``denoise`` (one extra evaluation, EDM's final step to 0). Other options go to the step rule."""
    _load_plugins()
    if name not in _RULES:
        raise ValueError(f"solver.name={name!r} is not a known solver; accepted: {', '.join(sorted(_RULES))}")
    factory = _RULES[name]
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params]
    if unknown and not accepts_any:
        accepted = ", ".join(["afs", "final_step", *params]) or "none"
        raise ValueError(f"solver {name!r} has no option {', '.join(unknown)}; accepted: {accepted}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"solver.final_step={final_step!r}; accepted: {', '.join(FINAL_STEPS)}")
    rule = factory(**options)
    return Solver(rule, afs=rule.default_afs if afs is None else afs, final_step=final_step)


def nfe_for(name: str, num_points: int, afs: bool | None = None, final_step: str = "sigma_min", **options) -> int:
    """Counted model evaluations of ``name`` on a grid of ``num_points`` points."""
    return make_solver(name, afs, final_step, **options).nfe(num_points)


def num_points_for(name: str, nfe: int, afs: bool | None = None, final_step: str = "sigma_min", **options) -> int:
    """Grid points giving exactly ``nfe`` evaluations; a clear error lists the reachable NFEs."""
    return make_solver(name, afs, final_step, **options).num_points(nfe)


def _load_plugins() -> None:
    # AMED registers itself on import; imported lazily so the classical solvers have no torch.nn deps.
    for module in ("amedlab.amed.solvers", "amedlab.learned.solver"):  # AMED; the learned grid + coefficients
        try:
            __import__(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


__all__ = [
    "Solver", "StepRule", "Point", "State", "make_solver", "register_solver", "available_solvers",
    "nfe_for", "num_points_for", "evaluate", "afs_point", "first_point", "bcast", "mean_direction_step",
    "Euler", "Heun", "MeanDirection", "DPMSolver2", "IPNDM", "DPMSolverPP", "UniPC",
]
