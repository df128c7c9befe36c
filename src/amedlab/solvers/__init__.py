"""Solver registry: ``make_solver(name, **options)`` and the NFE <-> grid-size helpers.

A user's step rule (docs/extending.md): ``register_solver(name, MyRule)`` from Python, or
``solver._target_=mypkg.MyRule`` in a config (``make_solver(name, target=...)``, :func:`rule_class`).
A rule that needs a trained part carries a ``trained`` hook on its factory (:mod:`.trained`,
:func:`trained_hook`): the evaluation asks the hook, never the rule's name."""
from __future__ import annotations

import importlib
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


# name -> "module:factory" of step rules that live in other packages, imported on first use: the
# classical solvers never import them (AMED imports this package, so an eager import would be a cycle)
_PLUGINS: dict[str, str] = {
    "amed": "amedlab.amed.solvers:amed",
    "amed_plugin": "amedlab.amed.solvers:amed_plugin",
    "learned": "amedlab.learned.solver:learned",
}


def register_solver(name: str, factory: Callable[..., StepRule] | str) -> None:
    """Add a step rule under ``name``: its factory, or ``"module:attr"`` to import when first used.

    The factory (typically a :class:`StepRule` subclass) is called with the solver's options as
    keyword arguments (``make_solver(name, **options)``, ``solver.options`` in a config) and returns
    the rule; its signature is what ``make_solver`` checks the options against. Registering a name
    again replaces it. From a config without Python code, ``solver._target_=mypkg.MyRule`` names the
    class instead (:func:`rule_class`). docs/extending.md has a complete example.
    """
    if isinstance(factory, str):
        _PLUGINS[name] = factory
        _RULES.pop(name, None)
    else:
        _RULES[name] = factory


def available_solvers() -> list[str]:
    return sorted({*_RULES, *_PLUGINS})


def _factory(name: str) -> Callable[..., StepRule]:
    if name not in _RULES and name in _PLUGINS:
        module, attr = _PLUGINS[name].split(":")
        _RULES[name] = getattr(importlib.import_module(module), attr)
    if name not in _RULES:
        raise ValueError(f"solver.name={name!r} is not a known solver; accepted: {', '.join(available_solvers())}")
    return _RULES[name]


def rule_class(target) -> type[StepRule]:
    """The :class:`StepRule` subclass named by ``solver._target_`` (a dotted path ``mypkg.MyRule``):
    imported and checked to be such a class; nothing is called. A ValueError names the key otherwise."""
    from ..targets import import_class

    return import_class(target, "solver._target_", StepRule)


def rule_factory(name: str, target: str | None = None) -> Callable[..., StepRule]:
    """What builds the rule of a solver node: the ``_target_`` class when given, else the factory
    registered under ``name`` (for a factory's attributes, e.g. a ``stand_in`` or ``row_label``)."""
    return rule_class(target) if target is not None else _factory(name)


def _hook(factory):
    """A factory's ``trained`` hook: the object, or ``"module:attr"`` imported on first use (so that a
    rule's module need not import its training)."""
    hook = getattr(factory, "trained", None)
    if isinstance(hook, str):
        module, attr = hook.split(":")
        hook = getattr(importlib.import_module(module), attr)
    return hook


def trained_hook(name: str, target: str | None = None):
    """The ``trained`` hook of a solver's rule (its ``_target_`` class or registered factory), or None
    for a rule that needs no trained part (:mod:`amedlab.solvers.trained`)."""
    return _hook(rule_factory(name, target))


def trained_solvers(reads: str | None = None) -> list[str]:
    """The registered names whose rule needs a trained part; with ``reads``, those whose hook reads that
    part of the config (``"distill"``: what ``stage=distill`` trains)."""
    out = []
    for name in available_solvers():
        hook = _hook(_factory(name))
        if hook is not None and (reads is None or reads in getattr(hook, "reads", ())):
            out.append(name)
    return out


def solver_family(name) -> tuple:
    """``name`` and every registered name sharing its trained hook (one training, the same settings:
    amed and amed_plugin); ``(name,)`` for any other name."""
    if not isinstance(name, str) or name not in available_solvers():
        return (name,)
    hook = _hook(_factory(name))
    if hook is None:
        return (name,)
    return tuple(n for n in available_solvers() if _hook(_factory(n)) is hook)


def make_solver(name: str, afs: bool | str | None = None, final_step: str = "sigma_min", target: str | None = None,
                **options) -> Solver:
    """Build a solver. ``afs``: analytical first step, False / True (GENIE) / "mean" (with the data
    mean); None: the rule's default, e.g. what an AMED predictor was trained with, else off; ``final_step``: ``sigma_min`` (paper tables) or
    ``denoise`` (one extra evaluation, EDM's final step to 0). ``target``: ``solver._target_``, the
    dotted path of a user's :class:`StepRule` subclass (:func:`rule_class`), built instead of the
    registered ``name`` (then only a label). Other options go to the step rule."""
    factory = rule_factory(name, target)
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params]
    if unknown and not accepts_any:
        accepted = ", ".join(["afs", "final_step", *params]) or "none"
        what = f"{name!r} ({target})" if target is not None else repr(name)
        raise ValueError(f"solver {what} has no option {', '.join(unknown)}; accepted: {accepted}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"solver.final_step={final_step!r}; accepted: {', '.join(FINAL_STEPS)}")
    if target is not None:
        from ..targets import check_arguments

        check_arguments(factory, options, "solver._target_", "solver.options")  # required options, before the call
    rule = factory(**options)
    if target is not None and "name" not in vars(rule) and "name" not in vars(type(rule)):
        rule.name = str(name)  # a class that names no rule itself (or inherits its parent's name): the config's
    return Solver(rule, afs=rule.default_afs if afs is None else afs, final_step=final_step)


def nfe_for(name: str, num_points: int, afs: bool | None = None, final_step: str = "sigma_min", **options) -> int:
    """Counted model evaluations of ``name`` on a grid of ``num_points`` points."""
    return make_solver(name, afs, final_step, **options).nfe(num_points)


def num_points_for(name: str, nfe: int, afs: bool | None = None, final_step: str = "sigma_min", **options) -> int:
    """Grid points giving exactly ``nfe`` evaluations; a clear error lists the reachable NFEs."""
    return make_solver(name, afs, final_step, **options).num_points(nfe)


__all__ = [
    "Solver", "StepRule", "Point", "State", "make_solver", "register_solver", "available_solvers", "rule_class",
    "rule_factory", "trained_hook", "trained_solvers", "solver_family",
    "nfe_for", "num_points_for", "evaluate", "afs_point", "first_point", "bcast", "mean_direction_step",
    "Euler", "Heun", "MeanDirection", "DPMSolver2", "IPNDM", "DPMSolverPP", "UniPC",
]
