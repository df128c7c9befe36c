"""``stage=analyze_trajectories``: how flat are sampling trajectories, and how good can one mean direction be?

PCA of fine sampling trajectories and the mean-direction oracle next to the classical solvers and
AMED-Solver (the method: :mod:`amedlab.analysis.trajectories`). Writes ``analysis.json`` and PNG
figures to the run directory and prints the tables of :mod:`amedlab.analysis.report`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from ..analysis.plots import plot_oracle, plot_pca
from ..analysis.report import format_report
from ..analysis.trajectories import analyze, coarse_num_points
from ..specs import load_group
from ..io import plain, atomic_write_json, run_dir
from ..solvers.spec import SolverSpec
from ..specs import check_stage, user_errors

log = logging.getLogger(__name__)


def analysis_config(cfg) -> Mapping:
    """``cfg.analysis``, or ``conf/analysis/default.yaml`` when the defaults list does not hold it."""
    node = cfg.get("analysis") if hasattr(cfg, "get") else None
    if node is None:
        log.info("no `analysis` config group in the defaults list: using conf/analysis/default.yaml "
                 "(add `- analysis: default` to conf/config.yaml or pass +analysis=default to override keys)")
        node = load_group("analysis", "default")
    return node


def run(cfg):
    from ..models import build_model

    check_stage(cfg, "analyze_trajectories")
    acfg = analysis_config(cfg)
    with user_errors("analysis.nfes"):
        coarse_num_points(acfg["nfes"])  # unreachable NFEs fail here, before any compute
    for name in acfg.get("solvers") or []:
        with user_errors("analysis.solvers"):
            SolverSpec.named(name).build()
    threads = acfg.get("num_threads")
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"analysis.num_threads={threads!r} must be null or >= 1")
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    model = build_model(plain(cfg.model))
    results, raw = analyze(model, plain(acfg), plain(cfg.schedule), int(cfg.seed), str(cfg.get("device", "cpu")))
    results["model"] = dict(cfg.model)
    out = run_dir()
    if acfg.get("plots", True):
        results["figures"] = [str(plot_pca(results, raw, out / "trajectory_pca.png")),
                              str(plot_oracle(results, raw, out / "oracle.png"))]
    results["seconds"]["total"] = time.perf_counter() - t0
    path = atomic_write_json(out / "analysis.json", results)
    print(f"model={cfg.model.name}, schedule={cfg.schedule.kind} rho={cfg.schedule.rho}, {results['num_samples']} "
          f"trajectories, fine {results['fine']['solver']} {results['fine']['steps']} steps; AMED: {results['amed']}\n\n"
          f"{format_report(results)}\n\nwritten: {path}\ntotal {results['seconds']['total']:.1f} s")
    k2 = results["pca"]["components"].get("2")
    return k2["explained_variance"]["mean"] if k2 else results["pca"]["components"]["1"]["explained_variance"]["mean"]
