"""Single-step rules: Euler (DDIM), Heun (EDM), and the mean-direction family (midpoint, DPM-Solver-2)."""
from __future__ import annotations

import torch

from .base import Point, StepRule, bcast, evaluate


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
    return cur.x + (bcast(scale, cur.x) if torch.is_tensor(scale) else scale) * bcast(t_next - cur.t, cur.x) * mid.slope


class MeanDirection(StepRule):
    """One slope at an intermediate time stands for the whole interval; 2 NFE per step."""

    nfe_per_step = 2

    def __init__(self, midpoint: str) -> None:
        if midpoint not in ("arithmetic", "geometric"):
            raise ValueError(f"midpoint={midpoint!r}; accepted: arithmetic, geometric")
        self.midpoint = midpoint
        self.name = "midpoint" if midpoint == "arithmetic" else "dpm2"

    def mid_time(self, t_cur: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        return 0.5 * (t_cur + t_next) if self.midpoint == "arithmetic" else torch.sqrt(t_cur * t_next)

    def step(self, denoiser, cur, t_next, history, remaining):
        return mean_direction_step(denoiser, cur, t_next, self.mid_time(cur.t, t_next)), [cur]

