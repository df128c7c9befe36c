"""Multistep rules (1 NFE per step): iPNDM, DPM-Solver++(2M/3M), UniPC (bh1/bh2).

All warm up with lower orders; the history they read is the list of earlier points the driver keeps.
"""
from __future__ import annotations

import torch

from .base import Point, StepRule, bcast

# Adams-Bashforth weights on the newest slope first (Zhang & Chen 2023, iPNDM; Liu et al. 2022, PNDM).
IPNDM_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _order(max_order: int, history: list[Point], remaining: int, lower_order_final: bool) -> int:
    """Warm-up (order <= available points) and, optionally, order <= steps remaining at the end."""
    order = min(max_order, len(history) + 1)
    return min(order, remaining) if lower_order_final else order


# 3-point Gauss-Legendre rule on [0, 1]: exact for polynomials of degree <= 5 (the Lagrange basis of
# order 4 has degree 3), so the variable-step weights below are exact integrals, not approximations.
_GL_NODES = (0.5 - 0.5 * 0.6**0.5, 0.5, 0.5 + 0.5 * 0.6**0.5)
_GL_WEIGHTS = (5 / 18, 8 / 18, 5 / 18)


def adams_bashforth_weights(times: list[torch.Tensor], t_next: torch.Tensor) -> list[torch.Tensor]:
    """Variable-step Adams-Bashforth weights, per sample: w_j = (1/h) int_{t_0}^{t_next} L_j(s) ds.

    ``times`` = [t_0 (current), t_1, ...] (newest first, each [B]), h = t_next - t_0, L_j the Lagrange
    basis polynomial of node j over ``times``; x_next = x_0 + h sum_j w_j d_j integrates the
    interpolant of the slopes d_j at their own times exactly. On equal steps (t_j = t_0 - j h) the
    weights are the fixed ones of :data:`IPNDM_WEIGHTS` (tested); torch ops throughout, so they are
    differentiable in every time (AMED's learned mid point).
    """
    h = t_next - times[0]
    u = [(t - times[0]) / h for t in times]  # nodes in units of the step: u_0 = 0, earlier nodes < 0
    weights = []
    for j, uj in enumerate(u):
        w = 0.0
        for node, gw in zip(_GL_NODES, _GL_WEIGHTS):
            basis = 1.0
            for m, um in enumerate(u):
                if m != j:
                    basis = basis * (node - um) / (uj - um)
            w = w + gw * basis
        weights.append(w if torch.is_tensor(w) else torch.full_like(h, w))
    return weights


class IPNDM(StepRule):
    """iPNDM: Adams-Bashforth with FIXED weights on the stored slopes, whatever the step sizes.

    ``variable_step=True``: the weights are recomputed per sample from the stored points' own times
    (:func:`adams_bashforth_weights`); identical on equal steps, and correct when an interval is split
    at another time (AMED-Plugin's learned mid point enters the history).
    """

    name = "ipndm"

    def __init__(self, max_order: int = 4, variable_step: bool = False) -> None:
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"solver.max_order={max_order!r}; accepted: 1, 2, 3, 4")
        if not isinstance(variable_step, bool):
            raise ValueError(f"solver.variable_step={variable_step!r}; accepted: true, false")
        self.max_order, self.history_size = max_order, max_order - 1
        self.variable_step = variable_step

    def options(self):
        return {"max_order": self.max_order, **({"variable_step": True} if self.variable_step else {})}

    def step(self, denoiser, cur, t_next, history, remaining):
        order = min(self.max_order, len(history) + 1)
        points = [cur] + list(reversed(history[len(history) - order + 1 :]))
        if self.variable_step:
            weights = [bcast(w, cur.x) for w in adams_bashforth_weights([p.t for p in points], t_next)]
        else:
            weights = IPNDM_WEIGHTS[order - 1]
        direction = sum(w * p.slope for w, p in zip(weights, points))
        return cur.x + bcast(t_next - cur.t, cur.x) * direction, [cur]


class DPMSolverPP(StepRule):
    """DPM-Solver++(2M/3M), multistep data prediction in lambda = -log sigma (Lu et al. 2022, Alg. 2).

    In the EDM parameterisation (alpha = 1): x_t = (sigma_t / sigma_s) x_s - (e^{-h} - 1) D + ...
    No dynamic thresholding (the official AMED code clamps x0; we do not).

    3M: the reference implementations (DPM-Solver, diffusers, k-diffusion, the AMED code) weight
    D2 = h^2 D''/2 by phi_3 = phi_2/h - 1/2 ~ h/6, half of the Taylor coefficient h/3, which makes
    the local error O(h^3): measured global order 2 even from exact history (tests/test_solvers.py).
    ``taylor_d2=True`` uses 2 phi_3, which restores order 3. The default keeps the published formula
    so that numbers agree with the paper's baselines.
    """

    def __init__(self, order: int = 2, lower_order_final: bool = True, taylor_d2: bool = False) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"solver.order={order!r}; accepted: 1, 2, 3")
        self.order, self.lower_order_final = order, bool(lower_order_final)
        self.d2_weight = 2.0 if taylor_d2 else 1.0
        self.history_size = order - 1
        self.name = f"dpmpp{order}m"

    def options(self):
        return {"order": self.order, "lower_order_final": self.lower_order_final, "taylor_d2": self.d2_weight == 2.0}

    def step(self, denoiser, cur, t_next, history, remaining):
        order = _order(self.order, history, remaining, self.lower_order_final)
        x = cur.x
        h = bcast(torch.log(cur.t / t_next), x)  # lambda_next - lambda_cur > 0
        phi1 = torch.expm1(-h)  # e^{-h} - 1
        x_next = bcast(t_next / cur.t, x) * x - phi1 * cur.denoised
        if order >= 2:
            p1 = history[-1]
            r0 = bcast(cur.lam - p1.lam, x) / h
            d1_0 = (cur.denoised - p1.denoised) / r0
            if order == 2:
                x_next = x_next - 0.5 * phi1 * d1_0
            else:
                p2 = history[-2]
                r1 = bcast(p1.lam - p2.lam, x) / h
                d1_1 = (p1.denoised - p2.denoised) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x_next = x_next + phi2 * d1 - self.d2_weight * phi3 * d2
        return x_next, [cur]


class UniPC(StepRule):
    """UniPC with the B(h) variants bh1/bh2 (Zhao et al. 2023, Alg. 1-2), data prediction.

    At each step the new evaluation first corrects the current x (UniC, no extra NFE), then the
    predictor (UniP) steps on. The history stores corrected x with the (uncorrected) evaluations.
    """

    def __init__(self, order: int = 3, variant: str = "bh2", lower_order_final: bool = True) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"solver.order={order!r}; accepted: 1, 2, 3")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"solver.variant={variant!r}; accepted: bh1, bh2")
        self.order, self.variant, self.lower_order_final = order, variant, bool(lower_order_final)
        self.history_size = order
        self.name = "unipc"

    def options(self):
        return {"order": self.order, "variant": self.variant, "lower_order_final": self.lower_order_final}

    def _coefficients(self, h, rks, order):
        """R (Vandermonde of r_k) and b of UniPC's linear system; h, rks per sample."""
        hh = -h  # data prediction
        phi1 = torch.expm1(hh)
        b_h = phi1 if self.variant == "bh2" else hh
        h_phi_k, factorial = phi1 / hh - 1, 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(rows, dim=-2), torch.stack(b, dim=-1), phi1, b_h

    def _update(self, base: Point, points: list[Point], t_next, model_next, order):
        """x at t_next from ``base`` using earlier ``points`` (newest first); corrector if model_next given."""
        x = base.x
        lam_next = -torch.log(t_next)
        h = lam_next - base.lam  # [B]
        rks = [(p.lam - base.lam) / h for p in points[: order - 1]]
        d1s = [(p.denoised - base.denoised) / bcast(rk, x) for p, rk in zip(points, rks)]
        rks = torch.stack(rks + [torch.ones_like(h)], dim=-1)
        R, b, phi1, b_h = self._coefficients(h, rks, order)
        x_next = bcast(t_next / base.t, x) * x - bcast(phi1, x) * base.denoised
        if model_next is None:  # predictor UniP
            if not d1s:
                return x_next
            rhos = torch.full_like(h, 0.5)[:, None] if order == 2 else torch.linalg.solve(R[:, :-1, :-1], b[:, :-1])
            res = sum(bcast(rhos[:, k], x) * d for k, d in enumerate(d1s))
        else:  # corrector UniC
            rhos = torch.full_like(h, 0.5)[:, None] if order == 1 else torch.linalg.solve(R, b)
            res = sum(bcast(rhos[:, k], x) * d for k, d in enumerate(d1s))
            res = res + bcast(rhos[:, -1], x) * (model_next - base.denoised)
        return x_next - bcast(b_h, x) * res

    def step(self, denoiser, cur, t_next, history, remaining):
        if history:
            # Correct x at t_cur with the evaluation just made; the previous step's order is used.
            order_c = min(self.order, len(history), remaining + 1) if self.lower_order_final else min(self.order, len(history))
            newest_first = list(reversed(history))
            x_corr = self._update(newest_first[0], newest_first[1:], cur.t, cur.denoised, order_c)
            cur = Point(cur.t, x_corr, cur.denoised, cur.features)
        order = _order(self.order, history, remaining, self.lower_order_final)
        x_next = self._update(cur, list(reversed(history)), t_next, None, order)
        return x_next, [cur]
