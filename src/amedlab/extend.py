"""Everything a user's own model or step rule needs, in one import (docs/extending.md).

- a model: subclass :class:`Denoiser` (``denoise(x, sigma)``, ``sample_shape``; for AMED a feature hook:
  ``feature_dim`` and ``self.last_features`` set in ``denoise``), then ``register_model(name)`` from
  Python or ``model._target_=mypkg.MyDenoiser`` in a config; or wrap a plain ``D(x, sigma)`` in
  :class:`CallableDenoiser`;
- a step rule: subclass :class:`StepRule` (``step(denoiser, cur, t_next, history, remaining)``,
  ``nfe_per_step``), then ``register_solver(name, MyRule)`` or ``solver._target_=mypkg.MyRule``.
"""
from .models.base import Denoiser
from .models.callable import CallableDenoiser
from .models.factory import build_model, model_class, register_model
from .solvers import make_solver, register_solver, rule_class
from .solvers.base import Point, StepRule, bcast, evaluate, mid_time

__all__ = ["Denoiser", "CallableDenoiser", "register_model", "build_model", "model_class", "StepRule", "Point",
           "bcast", "evaluate", "mid_time", "register_solver", "make_solver", "rule_class"]
