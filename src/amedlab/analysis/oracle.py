"""The mean-direction oracle: the per-sample r* (and c*) that make one AMED step land on the fine trajectory.

One mean-direction step (AMED, Zhou et al. 2024, eq. 7) from t_cur to t_next with ratio r and scale c:
t_mid = t_next^r t_cur^(1-r), x_mid = x + (t_mid - t_cur) d_cur, x_next = x + c (t_next - t_cur) d(x_mid, t_mid)
(``amedlab.solvers.mean_direction_step``). For a target x* (the fine trajectory at t_next):

- r* minimises ||x_next(r, c=1) - x*|| over r in [0, 1] (r = 0 is Euler, r = 1/2 is DPM-Solver-2):
  a dense grid (which contains 1/2), golden-section refinement of the bracket around the best grid
  point and a final parabolic step, every sample searched in parallel (one batched model call per evaluation, each sample
  at its own time). The best point ever evaluated is returned, so the oracle is never worse than any
  grid point (in particular DPM-Solver-2).
- c*: for a fixed r, x_next(c) = x + c v with v = (t_next - t_cur) d(x_mid, t_mid), so the best c is the
  least-squares projection <x* - x, v> / <v, v> (clipped to ``c_bounds`` if given: exact, the error
  is quadratic in c). The (r, c) oracle is (r*, c*(r*)): never worse than r* alone. With
  ``joint_rc`` it also searches r with c = c*(r) at every r and keeps, per sample, that result when
  it beats (r*, c*(r*)) by more than 0.1% (where every r is exact, a step collinear with its
  target, c* then stays near 1).
- a shared r: one r per interval for the whole batch (mean squared error), to see how much of the
  gain needs per-sample adaptivity.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from amedlab.solvers import Point, mean_direction_step
from amedlab.solvers.base import StepRule, mid_time

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def ratio_of_mid_time(t_cur: torch.Tensor, t_next: torch.Tensor, t_mid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mid_time`: r = log(t_mid / t_cur) / log(t_next / t_cur)."""
    return torch.log(t_mid / t_cur) / torch.log(t_next / t_cur)


def search_grid(grid_points: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The dense stage of :func:`search_minimum`: ``grid_points`` equally spaced r in [0, 1]."""
    return torch.linspace(0.0, 1.0, int(grid_points), dtype=dtype, device=device)


def search_minimum(
    objective: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    grid_points: int = 9,
    iters: int = 8,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    f_grid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``size`` independent 1-D functions on [0, 1] in parallel.

    ``objective(r)`` takes r of shape [size] and returns f of shape [size]. Dense grid of
    ``grid_points`` (:func:`search_grid`; odd counts contain 1/2), then ``iters`` golden-section steps
    on the bracket of the best grid point (one objective call each), then one parabolic step through
    the final bracket. Returns the best evaluated (r, f) per function. Costs ``grid_points + iters + 3``
    calls, or ``iters + 3`` when the grid values ``f_grid`` [grid_points, size] are given (several
    objectives can share one grid pass).
    """
    if grid_points < 3 or iters < 0:
        raise ValueError(f"analysis.oracle.grid_points={grid_points} must be >= 3 and iters={iters} >= 0")
    grid = search_grid(grid_points, dtype, device)
    if f_grid is None:
        f_grid = torch.stack([objective(g.expand(size).clone()) for g in grid])  # [G, size]
    best_f, idx = f_grid.min(0)
    best_r = grid[idx]
    lo, hi = (idx - 1).clamp_min(0), (idx + 1).clamp_max(grid_points - 1)
    a, b = grid[lo], grid[hi]
    fa, fb = f_grid.gather(0, lo[None])[0], f_grid.gather(0, hi[None])[0]
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = objective(c), objective(d)

    def keep(r_, f_):
        better = f_ < best_f
        return torch.where(better, r_, best_r), torch.where(better, f_, best_f)

    best_r, best_f = keep(c, fc)
    best_r, best_f = keep(d, fd)
    for _ in range(iters):
        left = fc < fd  # the minimum is in [a, d]: drop (d, b]
        b, fb = torch.where(left, d, b), torch.where(left, fd, fb)
        a, fa = torch.where(left, a, c), torch.where(left, fa, fc)
        c_new = torch.where(left, b - GOLDEN * (b - a), d)
        d_new = torch.where(left, c, a + GOLDEN * (b - a))
        probe = torch.where(left, c_new, d_new)
        f_probe = objective(probe)
        fc, fd = torch.where(left, f_probe, fd), torch.where(left, fc, f_probe)
        c, d = c_new, d_new
        best_r, best_f = keep(probe, f_probe)
    # one parabolic step through the three points around the minimum: a smooth (squared-error)
    # objective is locally quadratic, so this lands far closer than the golden bracket's width
    left = fc < fd
    x1, x2, x3 = torch.where(left, a, c), torch.where(left, c, d), torch.where(left, d, b)
    f1, f2, f3 = torch.where(left, fa, fc), torch.where(left, fc, fd), torch.where(left, fd, fb)
    curvature = ((f3 - f2) / (x3 - x2) - (f2 - f1) / (x2 - x1)) / (x3 - x1)
    slope = (f2 - f1) / (x2 - x1) - curvature * (x2 - x1)  # derivative of the parabola at x1
    vertex = x1 - slope / (2 * curvature)
    ok = torch.isfinite(vertex) & (curvature > 0)
    probe = torch.where(ok, vertex, best_r).clamp(torch.minimum(x1, x3), torch.maximum(x1, x3))
    best_r, best_f = keep(probe, objective(probe))
    return best_r, best_f


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def best_scale(delta: torch.Tensor, v: torch.Tensor, c_bounds: Sequence[float] | None = None) -> torch.Tensor:
    """argmin_c ||delta - c v|| per sample (clipped to ``c_bounds``): [B]."""
    dv, vv = _flat(delta), _flat(v)
    c = (dv * vv).sum(-1) / (vv * vv).sum(-1).clamp_min(torch.finfo(v.dtype).tiny)
    if c_bounds is not None:
        c = c.clamp(float(c_bounds[0]), float(c_bounds[1]))
    return c


MODES = ("r", "rc", "shared")


@dataclass(frozen=True)
class OracleSearch:
    """How the oracle searches (see the module docstring): ``grid_points`` r on the dense grid,
    ``iters`` golden-section steps, c* clipped to ``c_bounds`` (None: free), and with ``joint_rc``
    a second search of r with c = c*(r) at every r."""

    grid_points: int = 9
    iters: int = 8
    c_bounds: Sequence[float] | None = None
    joint_rc: bool = False


@dataclass
class OracleStep:
    """One interval's oracle: per-sample ratios, scales, landing points and L2 errors per sample.

    Fields of a mode that was not asked for are None.
    """

    r: torch.Tensor | None = None  # [B] r* with c = 1
    x_next: torch.Tensor | None = None  # landing point with (r*, 1)
    error: torch.Tensor | None = None  # [B] ||x_next - target||
    r_rc: torch.Tensor | None = None  # [B] r of the (r, c) oracle
    c_rc: torch.Tensor | None = None  # [B] its c*
    x_next_rc: torch.Tensor | None = None
    error_rc: torch.Tensor | None = None
    r_shared: float | None = None  # one r for the whole batch (c = 1)
    x_next_shared: torch.Tensor | None = None
    error_shared: torch.Tensor | None = None
    calls: int = 0  # model evaluations the search spent (the one at t_cur excluded)


class _Counted:
    """Counts calls; passes features through (``evaluate`` reads ``last_features``)."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    @property
    def last_features(self):
        return getattr(self.denoiser, "last_features", None)

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.ndim - 1))


def oracle_step(
    denoiser,
    cur: Point,
    t_next: torch.Tensor,
    target: torch.Tensor,
    search: OracleSearch = OracleSearch(),
    modes: Sequence[str] = MODES,
) -> OracleStep:
    """Search, from ``cur`` towards ``target`` at ``t_next``, the oracle ``modes``:
    ``r`` (per-sample r*, c = 1), ``rc`` (r* with its c*; with ``search.joint_rc`` also a search of r
    with c = c*(r) at every r, one more refinement per step), ``shared`` (one r for the batch)."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"oracle modes {sorted(unknown)} unknown; accepted: {', '.join(MODES)}")
    grid_points, iters, c_bounds, joint_rc = search.grid_points, search.iters, search.c_bounds, search.joint_rc
    model = _Counted(denoiser)
    B = cur.x.shape[0]
    delta = target - cur.x
    out = OracleStep()

    def direction(r: torch.Tensor) -> torch.Tensor:  # v(r) = x_next(r, c=1) - x
        return mean_direction_step(model, cur, t_next, mid_time(cur.t, t_next, r)) - cur.x

    def sq_err_of(v):
        return _flat(delta - v).pow(2).sum(-1)

    def sq_err_rc_of(v):
        return (_flat(delta) - best_scale(delta, v, c_bounds)[:, None] * _flat(v)).pow(2).sum(-1)

    def error(x):
        return _flat(x - target).norm(dim=-1)

    # one pass over the dense grid serves every mode (one model call per grid point)
    grid_vals = {"r": [], "rc": [], "shared": []}
    for g in search_grid(grid_points, cur.x.dtype, cur.x.device):
        v = direction(g.expand(B).clone())
        e = sq_err_of(v)
        grid_vals["r"].append(e)
        grid_vals["shared"].append(e.mean().reshape(1))
        if "rc" in modes and joint_rc:
            grid_vals["rc"].append(sq_err_rc_of(v))
    opts = dict(grid_points=grid_points, iters=iters, dtype=cur.x.dtype, device=cur.x.device)
    if "r" in modes or "rc" in modes:
        r, _ = search_minimum(lambda r: sq_err_of(direction(r)), B, f_grid=torch.stack(grid_vals["r"]), **opts)
        v = direction(r)
        out.r, out.x_next = r, cur.x + v
        out.error = error(out.x_next)
    if "rc" in modes:
        c_at_r = best_scale(delta, v, c_bounds)
        x_at_r = cur.x + _per_sample(c_at_r, v) * v
        out.r_rc, out.c_rc, out.x_next_rc, out.error_rc = r, c_at_r, x_at_r, error(x_at_r)
    if "rc" in modes and joint_rc:
        # c* at every r; per sample keep the better of that search and (r*, c*(r*))
        err_at_r = out.error_rc
        r_j, _ = search_minimum(lambda r: sq_err_rc_of(direction(r)), B, f_grid=torch.stack(grid_vals["rc"]), **opts)
        v_j = direction(r_j)
        c_j = best_scale(delta, v_j, c_bounds)
        x_j = cur.x + _per_sample(c_j, v_j) * v_j
        err_j = error(x_j)
        # prefer (r*, c*(r*)) unless the joint search is clearly better: where every r is exact
        # (the step collinear with the target, e.g. a locally Gaussian model), c* stays near 1
        noise = 100 * torch.finfo(delta.dtype).eps * _flat(delta).norm(dim=-1)  # round-off level of the step
        use_j = err_j < 0.999 * err_at_r - noise
        out.r_rc, out.c_rc = torch.where(use_j, r_j, r), torch.where(use_j, c_j, c_at_r)
        out.x_next_rc = torch.where(_per_sample(use_j, v), x_j, x_at_r)
        out.error_rc = torch.where(use_j, err_j, err_at_r)
    if "shared" in modes:
        r_s, _ = search_minimum(lambda s: sq_err_of(direction(s.expand(B))).mean().reshape(1), 1,
                                f_grid=torch.stack(grid_vals["shared"]), **opts)
        out.r_shared = float(r_s)
        out.x_next_shared = cur.x + direction(r_s.expand(B))
        out.error_shared = error(out.x_next_shared)
    out.calls = model.calls
    return out


class OracleRule(StepRule):
    """The oracle as a step rule, so that the driver's walk (``Solver.steps``) runs it: each interval
    searches towards ``targets[:, -remaining]`` (``targets`` [B, N, ...]: the fine trajectory at the
    N grid points) and lands where ``mode`` (r, rc or shared; None: r) puts it. ``last`` is the
    interval's :class:`OracleStep`."""

    def __init__(self, targets: torch.Tensor, search: OracleSearch = OracleSearch(), modes: Sequence[str] = MODES,
                 mode: str | None = None) -> None:
        self.targets, self.modes, self.mode, self.search = targets, tuple(modes), mode or "r", search
        self.last: OracleStep | None = None

    def step(self, denoiser, cur, t_next, history, remaining):
        self.last = oracle_step(denoiser, cur, t_next, self.targets[:, -remaining], self.search, self.modes)
        x_next = {"r": self.last.x_next, "rc": self.last.x_next_rc, "shared": self.last.x_next_shared}[self.mode]
        return x_next, []

    def ratio(self):
        """The r of ``mode`` in the last interval ([B], or a float for the shared r)."""
        return {"r": self.last.r, "rc": self.last.r_rc, "shared": self.last.r_shared}[self.mode]
