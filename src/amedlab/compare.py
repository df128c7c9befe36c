"""Every solver at every NFE against a reference solution from the same noise: the library of
``stage=compare`` (:mod:`amedlab.stages.compare`, analytic models and their exact solution) and of the
trajectory analysis's final-sample errors (:mod:`amedlab.analysis.trajectories`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .models import counting
from .evaluation.metrics import rmse
from .solvers import Solver
from .schedules import ScheduleSpec
from .solvers.spec import SolverSpec

log = logging.getLogger(__name__)


def final_errors(model, solvers: Mapping[str, Solver], nfes, schedule: ScheduleSpec, x_T: torch.Tensor,
                 reference: torch.Tensor, smin: float) -> dict:
    """{solver: {nfe: {"rmse", "nfe_counted", "num_points"} | None}}: each solver's final sample from
    ``x_T`` against ``reference`` (the solution at sigma_min); an unreachable NFE is None."""
    counter = counting(model)
    out = {}
    for name, solver in solvers.items():
        out[name] = {}
        for nfe in nfes:
            try:
                sigmas = schedule.grid(solver.num_points(int(nfe)))
            except ValueError:
                out[name][nfe] = None
                continue
            counter.reset()
            with torch.no_grad():
                x = solver.sample(counter, x_T, sigmas)
            # a final denoise step ends on D(x, sigma_min): compare with the reference denoised the same way
            ref = model(reference, smin) if solver.final_step == "denoise" else reference
            out[name][nfe] = {"rmse": rmse(x, ref), "nfe_counted": counter.calls, "num_points": len(sigmas)}
    return out


def compare(model, solvers: Mapping[str, SolverSpec], nfes, schedule: ScheduleSpec, num_samples: int, seed: int = 0,
            dtype=torch.float64) -> dict:
    """RMSE of the final sample against the model's exact solution, per solver and NFE (see final_errors)."""
    if not hasattr(model, "reference"):
        raise ValueError("stage=compare needs a model with a reference solution (model=gaussian or gaussian_mixture)")
    smax, smin = float(schedule.sigma_max), float(schedule.sigma_min)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, *model.sample_shape, generator=g, dtype=torch.float64).to(dtype) * smax
    model = model.to(dtype)
    built = {name: spec.build() for name, spec in solvers.items()}
    return final_errors(model, built, nfes, schedule, x_T, model.reference(x_T, smax, smin), smin)


def format_table(results: dict, nfes) -> str:
    head = "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    rows = [head, "|---" * (len(nfes) + 1) + "|"]
    best = {n: min((r[n]["rmse"] for r in results.values() if r.get(n)), default=None) for n in nfes}
    for name, res in results.items():
        cells = []
        for n in nfes:
            if res.get(n) is None:
                cells.append("n/a")
            else:
                v = f"{res[n]['rmse']:.4g}"
                cells.append(f"**{v}**" if res[n]["rmse"] == best[n] else v)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
