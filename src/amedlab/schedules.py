"""Noise-level grids t_0 = sigma_max > ... > t_{N-1} = sigma_min.

Polynomial: EDM (Karras et al. 2022), Eq. 5; time-uniform: the VP schedule (Song et al. 2021)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SCHEDULES = ("polynomial", "time_uniform", "logsnr")
VP_EPS_T = 1e-3  # VP time at sigma_min for the time-uniform schedule (as in DPM-Solver / the AMED code)


def check_schedule_args(kind: str, num_points: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    """Raise a ValueError that names the key and the accepted values."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule.kind={kind!r} is not a known schedule; accepted: {', '.join(SCHEDULES)}")
    if int(num_points) != num_points or num_points < 2:
        raise ValueError(f"num_points={num_points!r}: a grid needs an integer number of points >= 2")
    if not sigma_min > 0:
        raise ValueError(f"schedule.sigma_min={sigma_min!r} must be > 0")
    if not sigma_max > sigma_min:
        raise ValueError(
            f"schedule.sigma_min={sigma_min!r} must be smaller than schedule.sigma_max={sigma_max!r}"
        )
    if not rho > 0:
        raise ValueError(f"schedule.rho={rho!r} must be > 0")


def make_sigmas(
    kind: str, num_points: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Descending float64 grid of ``num_points`` noise levels from sigma_max to sigma_min.

    - ``polynomial``: EDM (Karras et al. 2022, eq. 5), uniform in sigma^(1/rho).
    - ``time_uniform``: uniform in VP time t^(1/rho) on [1, 1e-3], mapped through
      sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) with beta_d, beta_min fitted to the ends.
    - ``logsnr``: uniform in log sigma (DPM-Solver's logSNR steps; rho unused).
    """
    check_schedule_args(kind, num_points, sigma_min, sigma_max, rho)
    try:
        sigmas = _grid(kind, num_points, sigma_min, sigma_max, rho)
    except (OverflowError, ZeroDivisionError) as err:  # an extreme rho or sigma: Python floats overflow
        raise ValueError(f"the {kind} grid of {int(num_points)} points (sigma_min={sigma_min}, sigma_max={sigma_max}, "
                         f"rho={rho}) cannot be computed ({err}); accepted: e.g. rho between 1 and 10") from None
    check_grid(sigmas, f"the {kind} grid of {int(num_points)} points (sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho})")
    return sigmas


def _grid(kind: str, num_points: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    u = torch.linspace(0.0, 1.0, int(num_points), dtype=torch.float64)
    if kind == "polynomial":
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (a + u * (b - a)) ** rho
    elif kind == "logsnr":
        sigmas = torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))
    else:
        # log(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t, linear in (beta_d, beta_min): solve at both ends.
        big, small = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
        eps = VP_EPS_T
        beta_d = 2 * (small / eps - big) / (eps - 1)
        beta_min = big - 0.5 * beta_d
        t = (1 + u * (eps ** (1 / rho) - 1)) ** rho
        sigmas = torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))
    # Pin the ends exactly: the solvers' contract is "from sigma_max to sigma_min".
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def check_grid(sigmas: torch.Tensor, what: str) -> None:
    """Every grid a solver runs on is finite and strictly decreasing (an extreme rho can round interior
    points onto each other or to inf): else a ValueError naming ``what`` and showing the grid."""
    s = sigmas.detach().double().cpu()
    if s.ndim != 1 or len(s) < 2 or not bool(torch.isfinite(s).all()) or not bool((s[1:] < s[:-1]).all()) or not bool(s[-1] > 0):
        shown = ", ".join(f"{v:.6g}" for v in s.reshape(-1)[:12].tolist())
        raise ValueError(f"{what} is not finite, positive and strictly decreasing: [{shown}]; accepted: a setting "
                         "whose grid points are distinct (e.g. rho between 1 and 10)")


def check_schedule_node(node: Mapping) -> None:
    """A ``schedule`` mapping (kind, sigma_min, sigma_max, rho) whose ends and rho are valid."""
    check_schedule_args(node["kind"], 2, float(node["sigma_min"]), float(node["sigma_max"]), float(node["rho"]))


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule t_0 = sigma_max > ... > t_{N-1} = sigma_min (``conf/schedule/<kind>.yaml``).

    Values are kept as the config gives them (an override ``schedule.rho=5`` stays the integer 5):
    cache keys hash them that way. Conversion happens where a number is used (:meth:`grid`)."""

    kind: str = "polynomial"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    @classmethod
    def from_cfg(cls, node: Mapping) -> ScheduleSpec:
        return cls(node["kind"], node["sigma_min"], node["sigma_max"], node["rho"])

    @classmethod
    def named(cls, name: str) -> ScheduleSpec:
        """The schedule of ``conf/schedule/<name>.yaml`` (the package's own file)."""
        from .resources import package_conf

        return cls.from_cfg(package_conf("schedule", name))

    def check(self) -> None:
        check_schedule_args(self.kind, 2, float(self.sigma_min), float(self.sigma_max), float(self.rho))

    def grid(self, num_points: int) -> torch.Tensor:
        """The float64 grid of ``num_points`` noise levels, sigma_max -> sigma_min (checked: finite, decreasing)."""
        self.check()
        return make_sigmas(self.kind, num_points, float(self.sigma_min), float(self.sigma_max), float(self.rho))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}


def grid_for(solver, nfe: int, schedule: Mapping) -> torch.Tensor:
    """The sigma grid giving exactly ``nfe`` counted evaluations for ``solver`` on ``schedule`` (a mapping)."""
    return ScheduleSpec.from_cfg(schedule).grid(solver.num_points(int(nfe)))
