"""Single-step rules: Euler (DDIM), Heun (EDM), and the mean-direction family (midpoint, DPM-Solver-2)."""
from __future__ import annotations

import torch

from .base import Point, StepRule, bcast, evaluate, mid_time


class Euler(StepRule):
    """x_next = x + h d(x, t_cur) (DDIM; Song et al. 2021, Karras et al. 2022 Alg. 1 without 2nd order)."""

    name = "euler"

    def step(self, denoiser, cur, t_next, history, remaining):
        return cur.x + bcast(t_next - cur.t, cur.x) * cur.slope, [cur]


class Heun(StepRule):
    """EDM's 2nd-order Heun step (Karras et al. 2022, Alg. 1): Euler predictor, trapezoidal corrector."""

    name = "heun"
    nfe_per_step = 2

    def step(self, denoiser, cur, t_next, history, remaining):
        h = bcast(t_next - cur.t, cur.x)
        nxt = evaluate(denoiser, cur.x + h * cur.slope, t_next)
        return cur.x + h * 0.5 * (cur.slope + nxt.slope), [cur]


def _scaled(c, x: torch.Tensor):
    """A per-sample scale [B] broadcast against x, or a plain number as it is."""
    return bcast(c, x) if torch.is_tensor(c) else c


def mean_direction_step(
    denoiser,
    cur: Point,
    t_next: torch.Tensor,
    t_mid: torch.Tensor,
    t_model: torch.Tensor | None = None,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """x_next = x + scale * (t_next - t_cur) * d(x_mid, t_mid), x_mid Euler-predicted (AMED eq. 7).

    With t_mid the arithmetic midpoint this is the midpoint method; with the geometric one,
    sqrt(t_cur t_next), it is DPM-Solver-2 in the EDM parameterisation; with a learned t_mid,
    model time a * t_mid and direction scale c, it is AMED-Solver.
    """
    x_mid = cur.x + bcast(t_mid - cur.t, cur.x) * cur.slope
    mid = evaluate(denoiser, x_mid, t_mid, t_model)
    return cur.x + _scaled(scale, cur.x) * bcast(t_next - cur.t, cur.x) * mid.slope


class MeanDirection(StepRule):
    """One slope at an intermediate time stands for the whole interval; 2 NFE per step.

    ``midpoint``: arithmetic (the midpoint method) or geometric (sqrt(t_cur t_next), AMED-Solver's
    interpolation; at r = 1/2 it coincides with DPM-Solver-2).
    """

    nfe_per_step = 2

    def __init__(self, midpoint: str = "geometric") -> None:
        if midpoint not in ("arithmetic", "geometric"):
            raise ValueError(f"midpoint={midpoint!r}; accepted: arithmetic, geometric")
        self.midpoint = midpoint
        self.name = "midpoint" if midpoint == "arithmetic" else "mean_direction"

    def fixed_mid_time(self, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """The rule's own intermediate time (the learned one is :func:`.base.mid_time`)."""
        return 0.5 * (t_cur + t_next) if self.midpoint == "arithmetic" else torch.sqrt(t_cur * t_next)

    def step(self, denoiser, cur, t_next, history, remaining):
        return mean_direction_step(denoiser, cur, t_next, self.fixed_mid_time(cur.t, t_next)), [cur]

    def step_at(self, denoiser, cur, t_next, r, a, c):
        """The interval split at t_mid = t_next^r t_cur^(1-r) (AMED-Solver's step)."""
        t_mid = mid_time(cur.t, t_next, r)
        return mean_direction_step(denoiser, cur, t_next, t_mid, a * t_mid, c)


class DPMSolver2(StepRule):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r1) in the EDM parameterisation, 2 NFE per step.

    With noise prediction d and alpha = 1 the exponential integrator is Euler in sigma: the
    intermediate point sits at lambda_cur + r h (t_mid = t_next^r t_cur^(1-r)) and
    x_next = x + h ((1 - 1/(2r)) d_cur + 1/(2r) d_mid), second order for every r; r = 1/2 (default)
    is the geometric-midpoint mean-direction step.
    """

    name = "dpm2"
    nfe_per_step = 2

    def __init__(self, r: float = 0.5) -> None:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"solver.r={r!r} must be in (0, 1]")
        self.r = float(r)

    def options(self):
        return {"r": self.r}

    def step(self, denoiser, cur, t_next, history, remaining):
        r = torch.full_like(cur.t, self.r)
        return self.step_at(denoiser, cur, t_next, r, 1.0, 1.0), [cur]

    def step_at(self, denoiser, cur, t_next, r, a, c):
        t_mid = mid_time(cur.t, t_next, r)
        x_mid = cur.x + bcast(t_mid - cur.t, cur.x) * cur.slope
        mid = evaluate(denoiser, x_mid, t_mid, a * t_mid)
        w = bcast(0.5 / r, cur.x)
        return cur.x + _scaled(c, cur.x) * bcast(t_next - cur.t, cur.x) * ((1 - w) * cur.slope + w * mid.slope)
