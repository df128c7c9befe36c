"""``stage=compare``: every solver at every NFE on an analytic model, error against the exact solution.

Writes ``compare.json`` (and prints the table) in the run directory. Each solver keeps its own
settings from ``conf/solver/<name>.yaml`` (AFS, options); the schedule is the run's ``schedule``.
The library part is :mod:`amedlab.compare`.
"""
from __future__ import annotations

import torch

from ..compare import compare, format_table
from ..io import atomic_write_json, run_dir
from ..specs import check_stage


def run(cfg):
    spec = check_stage(cfg, "compare")  # every check before any compute
    nfes, num_samples = spec.nfes, spec.num_samples
    results = compare(spec.model, spec.solvers, nfes, spec.schedule, num_samples, spec.seed, getattr(torch, spec.dtype))
    table = format_table(results, nfes)
    out = run_dir() / "compare.json"
    atomic_write_json(out, {"model": cfg.model.name, "schedule": dict(cfg.schedule), "metric": "rmse_vs_exact",
                            "num_samples": num_samples, "results": results})
    print(f"RMSE against the exact solution, model={cfg.model.name}, schedule={cfg.schedule.kind} "
          f"rho={cfg.schedule.rho}, {cfg.compare.num_samples} samples (best per column in bold)\n{table}\n\nwritten: {out}")
    return min(r[n]["rmse"] for r in results.values() for n in nfes if r.get(n))
