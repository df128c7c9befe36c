"""``stage=compare``: every solver at every NFE on an analytic model, error against the exact solution.

Writes ``compare.json`` (and prints the table) in the run directory. Each solver keeps its own
settings from ``conf/solver/<name>.yaml`` (AFS, options); the schedule is the run's ``schedule``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .configs import grid_for, solver_from_cfg
from .evaluation.metrics import rmse
from .io import atomic_write_json, run_dir
from .models import counting
from .models.base import parse_dtype
from .solvers import Solver

log = logging.getLogger(__name__)


def final_errors(model, solvers: Mapping[str, Solver], nfes, schedule: Mapping, x_T: torch.Tensor,
                 reference: torch.Tensor, smin: float) -> dict:
    """{solver: {nfe: {"rmse", "nfe_counted", "num_points"} | None}}: each solver's final sample from
    ``x_T`` against ``reference`` (the solution at sigma_min); an unreachable NFE is None."""
    counter = counting(model)
    out = {}
    for name, solver in solvers.items():
        out[name] = {}
        for nfe in nfes:
            try:
                sigmas = grid_for(solver, nfe, schedule)
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


def compare(model, solver_cfgs: dict, nfes, schedule, num_samples: int, seed: int = 0, dtype=torch.float64) -> dict:
    """RMSE of the final sample against the reference solution, per solver and NFE (see final_errors)."""
    if not hasattr(model, "reference"):
        raise ValueError("stage=compare needs a model with a reference solution (model=gaussian or gaussian_mixture)")
    smax, smin = float(schedule["sigma_max"]), float(schedule["sigma_min"])
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, *model.sample_shape, generator=g, dtype=torch.float64).to(dtype) * smax
    model = model.to(dtype)
    solvers = {name: solver_from_cfg(node) for name, node in solver_cfgs.items()}
    return final_errors(model, solvers, nfes, schedule, x_T, model.reference(x_T, smax, smin), smin)


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


def run(cfg):
    from .validation import check_stage

    plan = check_stage(cfg, "compare")  # every check before any compute
    solver_cfgs, model = plan.solvers, plan.model
    dtype = parse_dtype(cfg.compare.dtype, "compare.dtype")
    nfes = [int(n) for n in cfg.compare.nfes]
    results = compare(model, solver_cfgs, nfes, cfg.schedule, int(cfg.compare.num_samples), int(cfg.seed), dtype)
    table = format_table(results, nfes)
    out = run_dir() / "compare.json"
    atomic_write_json(out, {"model": cfg.model.name, "schedule": dict(cfg.schedule), "metric": "rmse_vs_exact",
                            "num_samples": int(cfg.compare.num_samples), "results": results})
    print(f"RMSE against the exact solution, model={cfg.model.name}, schedule={cfg.schedule.kind} "
          f"rho={cfg.schedule.rho}, {cfg.compare.num_samples} samples (best per column in bold)\n{table}\n\nwritten: {out}")
    best = min(r[n]["rmse"] for r in results.values() for n in nfes if r.get(n))
    return best
