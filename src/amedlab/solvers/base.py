"""The pieces every solver shares: evaluated points, the step-rule interface, AFS and the driver loop.

A solver is a *step rule* (one interval t_cur -> t_next, given the point evaluated at t_cur and the
history of earlier points) plus this driver, which walks the grid, evaluates the model at the start
of every interval (or applies AFS on the first), calls the callback, and handles the final step.
The walk is :meth:`Solver.steps`, a generator of :class:`Interval`; sampling, AMED's distillation
(``amed/distill.py``) and the mean-direction oracle (``analysis/trajectories.py``) all run on it.
AMED's plug-in (``amedlab.amed``) is itself a step rule wrapping another one, so each rule exists
once. All times are per-sample tensors of shape [B]; everything stays differentiable.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

FINAL_STEPS = ("sigma_min", "denoise")
AFS_MODES = (False, True, "mean")


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times [B] so they broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class Point:
    """A state on the trajectory: step time t [B], x, and the model's D at (x, t_model)."""

    t: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor
    features: torch.Tensor | None = None

    @functools.cached_property
    def slope(self) -> torch.Tensor:
        """d(x, t) = (x - D) / t: the probability-flow ODE's dx/dsigma (EDM eq. 3).

        Divides by the step time t even when the model was queried at another time (AMED's a*t).
        """
        return (self.x - self.denoised) / bcast(self.t, self.x)

    @property
    def lam(self) -> torch.Tensor:
        """lambda = -log sigma (half the log-SNR), the time variable of DPM-Solver(++)/UniPC."""
        return -torch.log(self.t)


    def detach(self) -> "Point":
        """The same point cut from the autograd graph (a student's own history is a constant)."""
        f = None if self.features is None else self.features.detach()
        return Point(self.t.detach(), self.x.detach(), self.denoised.detach(), f)


def mid_time(t_cur: torch.Tensor, t_next: torch.Tensor, r) -> torch.Tensor:
    """The intermediate time t_mid = t_next^r t_cur^(1-r): a fraction r of the step in log sigma
    (AMED, Zhou et al. 2024, Sec. 3.2; DPM-Solver-2's r1, Lu et al. 2022, Alg. 1)."""
    return t_next**r * t_cur ** (1 - r)


def window(history: list[Point], new: list[Point], size: int) -> list[Point]:
    """The last ``size`` points of ``history + new``: what a rule reading ``size`` earlier points keeps."""
    return (history + new)[-size:] if size else []


def evaluate(denoiser, x: torch.Tensor, t: torch.Tensor, t_model: torch.Tensor | None = None) -> Point:
    """One function evaluation: D(x, t_model or t), with the features captured in the same call."""
    denoised = denoiser(x, t if t_model is None else t_model)
    return Point(t, x, denoised, getattr(denoiser, "last_features", None))


def afs_point(x: torch.Tensor, t: torch.Tensor, mean: torch.Tensor | None = None) -> Point:
    """Analytical first step (Dockhorn et al. 2022, GENIE): d(x_T, t_0) ~= x_T / sqrt(1 + t_0^2).

    That slope is exact for zero-mean, unit-variance data. With ``mean`` (the data mean E[x0]) the
    first D is taken as E[x0] instead: the large-sigma limit of D for any data (``afs="mean"``).
    Expressed as the implied D so it can enter multistep histories; no features (no forward pass
    ran), so AMED's predictor sees zeros.
    """
    if mean is not None:
        return Point(t, x, mean.expand_as(x), None)
    tb = bcast(t, x)
    return Point(t, x, x - tb * x / torch.sqrt(1 + tb**2), None)


def check_afs(afs) -> None:
    if not any(afs is m or (isinstance(afs, str) and afs == m) for m in AFS_MODES):
        raise ValueError(f"solver.afs={afs!r}; accepted: false, true (GENIE's AFS), mean (AFS with the data mean)")


def first_point(denoiser, x: torch.Tensor, t: torch.Tensor, afs) -> Point:
    """The evaluated point at sigma_max: a model call, or AFS (no call)."""
    if not afs:
        return evaluate(denoiser, x, t)
    if afs == "mean":
        from ..models.base import data_mean

        return afs_point(x, t, data_mean(denoiser, float(t[0]), x))
    return afs_point(x, t)


class StepRule:
    """One interval of a solver. Subclasses set ``nfe_per_step`` and implement :meth:`step`."""

    name: str = ""
    #: model evaluations per interval, including the one at t_cur that the driver makes
    nfe_per_step: int = 1
    #: how many earlier points the rule may read (the driver keeps no more)
    history_size: int = 0
    #: AFS when the caller does not say (make_solver(afs=None))
    default_afs: bool | str = False

    def step(
        self, denoiser, cur: Point, t_next: torch.Tensor, history: list[Point], remaining: int
    ) -> tuple[torch.Tensor, list[Point]]:
        """Advance from ``cur`` to ``t_next``.

        ``history``: earlier points, oldest first (``cur`` excluded). ``remaining``: steps left
        including this one (for lower-order-final policies). Returns x_next and the points to append
        to the history (normally ``[cur]``).
        """
        raise NotImplementedError

    def options(self) -> dict:
        return {}

    def prepare(self, denoiser, sigmas: torch.Tensor, afs) -> None:
        """Called once before sampling; rules trained for one setting (AMED) check it here."""

    def own_grid(self) -> torch.Tensor | None:
        """The grid this rule was trained on, if it learned one (the learned solver); else None: the
        caller's schedule decides the grid."""
        return None


def check_grid(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of >= 2 points, got shape {tuple(sigmas.shape)}")


@dataclass
class Interval:
    """One interval of :meth:`Solver.steps`: the point evaluated at t_cur, the step to t_next and its result."""

    index: int
    cur: Point
    t_next: torch.Tensor
    remaining: int  # intervals left, this one included
    x_next: torch.Tensor
    new_points: list[Point] = field(default_factory=list)


@dataclass
class State:
    """What a callback receives after each evaluated grid point (and once at the end)."""

    index: int
    sigma: float
    x: torch.Tensor
    denoised: torch.Tensor | None


class Solver:
    """A step rule driven over a grid: ``sample(denoiser, x, sigmas, callback=None) -> x``."""

    def __init__(self, rule: StepRule, afs: bool | str = False, final_step: str = "sigma_min") -> None:
        if final_step not in FINAL_STEPS:
            raise ValueError(f"solver.final_step={final_step!r}; accepted: {', '.join(FINAL_STEPS)}")
        check_afs(afs)
        self.rule, self.afs, self.final_step = rule, afs, final_step

    @property
    def name(self) -> str:
        return self.rule.name

    def nfe(self, num_points: int) -> int:
        """Model evaluations for a grid of ``num_points`` points: (N-1)k - AFS + final denoise."""
        return (num_points - 1) * self.rule.nfe_per_step - int(bool(self.afs)) + int(self.final_step == "denoise")

    def num_points(self, nfe: int) -> int:
        """Inverse of :meth:`nfe`; an unreachable NFE is an error listing the reachable ones."""
        k = self.rule.nfe_per_step
        steps, rem = divmod(nfe + int(bool(self.afs)) - int(self.final_step == "denoise"), k)
        if rem or steps < 1:
            reachable = [self.nfe(n) for n in range(2, 9)]
            raise ValueError(
                f"nfe={nfe} is not reachable by solver={self.name} (afs={self.afs}, "
                f"final_step={self.final_step}); reachable: {', '.join(map(str, reachable))}, ..."
            )
        return steps + 1

    def steps(self, denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callable[[State], None] | None = None,
              restart: torch.Tensor | None = None, detach: bool = False):
        """Walk the grid: per interval, evaluate the model at (x, t_cur) (AFS on the first), call
        ``callback``, take the rule's step and yield the :class:`Interval`.

        The next interval starts from the step's result, or with ``restart`` ([B, len(sigmas), ...],
        e.g. teacher states) from ``restart[:, i + 1]``. ``detach``: the start points are constants
        (evaluated without gradient, x and the history carried detached), so a loss on one interval
        trains that interval only (AMED's distillation, Sec. 3.4). A consumer may update parameters
        between intervals. No final step and no :meth:`StepRule.prepare` (see :meth:`sample`).
        """
        check_grid(sigmas)
        grid = sigmas.to(device=x.device, dtype=x.dtype)
        ones = torch.ones(x.shape[0], device=x.device, dtype=x.dtype)
        steps = len(grid) - 1
        history: list[Point] = []
        for i in range(steps):
            t_cur, t_next = grid[i] * ones, grid[i + 1] * ones
            with torch.no_grad() if detach else contextlib.nullcontext():
                cur = first_point(denoiser, x, t_cur, self.afs) if i == 0 else evaluate(denoiser, x, t_cur)
            if callback is not None:
                callback(State(i, float(sigmas[i].detach()), x, cur.denoised))  # detach: a learned grid requires grad
            x_next, new_points = self.rule.step(denoiser, cur, t_next, history, steps - i)
            yield Interval(i, cur, t_next, steps - i, x_next, new_points)
            history = window(history, new_points, self.rule.history_size)
            if detach:
                history = [p.detach() for p in history]
            if restart is not None:
                x = restart[:, i + 1]
            else:
                x = x_next.detach() if detach else x_next

    def sample(
        self,
        denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        callback: Callable[[State], None] | None = None,
    ) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``x`` at sigmas[0] to sigmas[-1] (or to 0)."""
        check_grid(sigmas)
        self.rule.prepare(denoiser, sigmas, self.afs)
        for interval in self.steps(denoiser, x, sigmas, callback):
            x = interval.x_next
        steps = len(sigmas) - 1
        if self.final_step == "denoise":
            # EDM's last Euler step from sigma_min to 0 lands exactly on D(x, sigma_min): one NFE.
            sigma_min = sigmas[-1].to(device=x.device, dtype=x.dtype)
            x = denoiser(x, sigma_min * torch.ones(x.shape[0], device=x.device, dtype=x.dtype))
            if callback is not None:
                callback(State(steps, 0.0, x, x))
        elif callback is not None:
            callback(State(steps, float(sigmas[-1].detach()), x, None))
        return x
