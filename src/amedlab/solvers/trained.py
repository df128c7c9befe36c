"""Trained rules in the registry: a rule whose factory carries a ``trained`` hook (AMED's predictor,
the learned solver's grid + coefficients, a user's) needs a trained part before it samples.

The evaluation asks the hook, never the rule's name: the config layer builds a :class:`TrainedCell`
(the cell's plain values) and asks ``hook.cell_settings(cell)`` for what the part is trained for (its
cache key, also recorded in the cell key under ``hook.key``) and ``hook.given(cell)`` for a part given
as a file; ``stage=evaluate`` then asks ``hook.prepare(model, settings, cell, use_cache)`` for the
part (cached or trained now) and builds the rule with ``hook.build_kwargs(part, device)``.
:func:`amedlab.solvers.trained_hook` finds the hook of a solver node (its ``_target_`` class or
registered factory). docs/extending.md and ``tests/test_trained_method.py`` show a complete one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class TrainedCell:
    """One ``stage=evaluate`` cell as a trained rule sees it: plain values only (no config node).

    ``read(what)``: the config layer's checked reading of a part of the config the rule names
    (``"distill"``: AMED's :class:`~amedlab.amed.spec.DistillSpec` from the ``distill`` group;
    ``"solver.predictor"``: the predictor file, opened and checked); only while the cell is checked.
    """

    solver: Mapping                 # the solver node (name, afs, final_step, options, distill, predictor, ...)
    nfe: int
    num_points: int                 # the cell's grid size
    schedule: Mapping               # the cell's schedule (eval.schedule_per_solver applied)
    seed: int
    eval_seeds: Sequence[int]       # the evaluation seeds (training seeds must stay disjoint)
    dtype: str                      # eval.dtype
    ode_reference: Mapping          # eval.ode_reference: the high-NFE solution every cell's RMSE uses
    batch_size: int                 # eval.batch_size
    model_name: str | None
    device: str
    cache_dir: Path | None = None   # cache_dir (set once the checks have passed)
    read: Callable[[str], Any] | None = None


@runtime_checkable
class TrainedRule(Protocol):
    """The ``trained`` hook on a rule's factory (or ``_target_`` class)."""

    #: the cell key's entry holding the settings (``distill``, ``learned``) and the logger's prefix
    key: str

    def cell_settings(self, cell: TrainedCell) -> Any:
        """What the cell's part is trained for (checked; a bad value is an error naming its key), or
        None when it is given as a file (:meth:`given`)."""

    def prepare(self, model, settings, cell: TrainedCell, use_cache: bool) -> tuple[Any, dict]:
        """(the trained part, info: source, path, records, distill_seconds), from the cache or trained now."""

    def build_kwargs(self, part, device: str) -> dict:
        """The rule's keyword arguments for ``part`` (``{"predictor": part}``)."""


def given_part(hook, cell: TrainedCell):
    """The part the cell gives as a file (the hook's optional ``given(cell)``), or None."""
    given = getattr(hook, "given", None)
    return None if given is None else given(cell)


def key_content(hook, settings) -> Mapping:
    """What the cell key records of ``settings`` (the hook's optional ``key_content``; else the settings)."""
    content = getattr(hook, "key_content", None)
    return settings if content is None else content(settings)


__all__ = ["TrainedCell", "TrainedRule", "given_part", "key_content"]
