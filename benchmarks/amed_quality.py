"""AMED against the classical solvers: final-sample RMSE against a high-NFE reference, same noise.

For each NFE in 3/5/7/9 every classical solver (its conf/solver settings, polynomial rho=7 and
time-uniform rho=1 by default, the better reported) and every AMED config in ``--amed`` (conf/solver
names: the paper's AMED-Solver and AMED-Plugin(iPNDM), and the corrected variable-step / trajectory-
objective plug-ins; ``amed_plugin_vs_grid`` adds the learned coarse grid, with its ``grid_lr``) distilled
for that NFE (trajectories cached on disk, generation timed apart from distillation). Same seeds for
all. The summary gives best AMED / iPNDM and best AMED / best classical.

    .venv/bin/python benchmarks/amed_quality.py --model digits_unet
    .venv/bin/python benchmarks/amed_quality.py --model gaussian_mixture
    .venv/bin/python benchmarks/amed_quality.py --model gaussian_mixture --model-opt dim=64
    .venv/bin/python benchmarks/amed_quality.py --model gaussian_mixture --trajectories 4096 --batch-size 32 \
        --epochs 2 --amed amed_plugin_vs_grid --out benchmarks/results/amed_variants_mixture2d_grid.json
"""
from __future__ import annotations

import argparse
import os
import json
import logging
import time
import warnings

import torch
from omegaconf import OmegaConf

from _models import add_model_args, model_from_args

from amedlab.specs.config import default_cache_dir
from amedlab.amed.distill import distill
from amedlab.solvers.spec import solver_from_node
from amedlab.specs import load_group
from amedlab.schedules import grid_for
from amedlab.data.trajectories import cached_trajectories

CLASSICAL = ["euler", "heun", "dpm2", "ipndm", "dpmpp3m", "unipc"]
AMED = "amed,amed_plugin,amed_plugin_vs,amed_plugin_vs_traj"
SCHEDULES = {
    "poly7": {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
    "tu1": {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 1.0},
}


def reference(model, seeds, points, cache_dir, batch):
    """Heun on a fine polynomial grid from the same noise, cached like teacher trajectories."""
    heun = {"name": "heun", "afs": False, "options": {}}
    data, cached = cached_trajectories(model, heun, SCHEDULES["poly7"], 2, points - 2, seeds, cache_dir, torch.float32, batch)
    return data["noise"], data["states"][:, -1], cached


def with_afs(node, mode):
    """The solver config with its AFS replaced by ``mode`` where it uses AFS at all."""
    if mode is not None and node.afs:
        node.afs = True if mode == "true" else mode
    return node


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "digits_unet")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--nfes", default="3,5,7,9")
    ap.add_argument("--trajectories", type=int, default=10000, help="distillation trajectories per predictor")
    ap.add_argument("--amed", default=AMED, help="AMED configs (conf/solver names) to distill and evaluate")
    ap.add_argument("--batch-size", type=int, default=128, help="distillation batch size")
    ap.add_argument("--epochs", type=int, default=1, help="distillation epochs")
    ap.add_argument("--reference-points", type=int, default=129)
    ap.add_argument("--teacher-M", type=int, default=None, help="override the paper's M (1 for AMED, 2 for the plug-in)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--cache", default=os.path.join(default_cache_dir(), "trajectories"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--afs", default=None, choices=["true", "mean"],
                    help="override the AFS mode of the solvers that use AFS (heun, dpm2, amed, amed_plugin)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared 2-core box)")
    ap.add_argument("--classical-schedules", default="poly7,tu1", help="schedules tried for the classical solvers (best kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)

    model = model_from_args(args)
    seeds = list(range(args.samples))
    t = time.perf_counter()
    noise, ref, cached = reference(model, seeds, args.reference_points, args.cache, args.batch)
    print(f"reference: Heun, {args.reference_points} points, {args.samples} samples, "
          f"{'cached' if cached else f'{time.perf_counter() - t:.0f} s'}")

    def rmse(x):
        return (x - ref).pow(2).flatten(1).mean(1).sqrt().mean().item()

    results = {}
    for nfe in [int(n) for n in args.nfes.split(",")]:
        row = {}
        for name in CLASSICAL:
            node = with_afs(load_group("solver", name), args.afs)
            solver = solver_from_node(node)
            best = None
            for sname in args.classical_schedules.split(","):
                sched = SCHEDULES[sname]
                try:
                    sigmas = grid_for(solver, nfe, sched)
                except ValueError:
                    continue
                with torch.no_grad():
                    err = rmse(torch.cat([solver.sample(model, noise[i:i + args.batch], sigmas) for i in range(0, len(noise), args.batch)]))
                if best is None or err < best[0]:
                    best = (err, sname)
            row[name] = {"rmse": best[0], "schedule": best[1]}
        amed_names = args.amed.split(",")
        for name in amed_names:
            sname = "tu1" if name == "amed" else "poly7"  # the paper's schedules (AMED-Solver: time-uniform)
            node = with_afs(load_group("solver", name), args.afs)
            dist = node.distill
            t = time.perf_counter()
            pred = distill(model, solver=node.name, nfe=nfe, schedule=SCHEDULES[sname], afs=node.afs,
                           solver_options=dict(node.options), teacher=OmegaConf.to_container(dist.teacher),
                           M=args.teacher_M if args.teacher_M is not None else dist.M, s_dir=dist.s_dir, s_time=dist.s_time,
                           num_trajectories=args.trajectories, cache_dir=args.cache, gen_batch_size=args.batch,
                           model_name=args.model, batch_size=args.batch_size, epochs=args.epochs,
                           objective=dist.get("objective", "interval"),
                           intermediate_weight=float(dist.get("intermediate_weight", 0.0)),
                           learn_grid=bool(dist.get("learn_grid", False)), grid_lr=dist.get("grid_lr"))
            solver = solver_from_node(node, predictor=pred)
            sigmas = torch.tensor(pred.meta["sigmas"], dtype=torch.float64)
            with torch.no_grad():
                err = rmse(torch.cat([solver.sample(model, noise[i:i + args.batch], sigmas) for i in range(0, len(noise), args.batch)]))
            m = pred.meta
            row[name] = {"rmse": err, "schedule": sname, "distill_seconds": m["train_seconds"],
                         "trajectory_seconds": m["trajectory_seconds"], "trajectories_cached": m["trajectories_cached"],
                         "updates": m["updates"], "converged": m["convergence"]["converged"],
                         "r_final": [e["r_end"] for e in m["convergence"]["intervals"]]}
            print(f"  nfe={nfe} {name}: distilled in {m['train_seconds']:.1f} s ({m['updates']} updates); trajectories "
                  f"{'cached' if m['trajectories_cached'] else 'generated'} in {m['trajectory_seconds']:.1f} s", flush=True)
        results[nfe] = row
        best_classical = min(v["rmse"] for k, v in row.items() if k in CLASSICAL)
        best_amed = min(row[k]["rmse"] for k in amed_names)
        row["ratios"] = {"best_amed_over_ipndm": best_amed / row["ipndm"]["rmse"],
                         "best_amed_over_best_classical": best_amed / best_classical}
        print(f"NFE {nfe}: " + ", ".join(f"{k} {row[k]['rmse']:.4f}" for k in CLASSICAL + amed_names)
              + f" | best AMED / iPNDM = {row['ratios']['best_amed_over_ipndm']:.2f},"
              f" / best classical = {row['ratios']['best_amed_over_best_classical']:.2f}", flush=True)

    nfes = list(results)
    print(f"\nRMSE against the reference ({args.model}, {args.samples} samples; classical: better of poly7/tu1)")
    print("| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---" * (len(nfes) + 1) + "|")
    for name in CLASSICAL + amed_names:
        print(f"| {name} | " + " | ".join(f"{results[n][name]['rmse']:.4f}" for n in nfes) + " |")
    for key in ("best_amed_over_ipndm", "best_amed_over_best_classical"):
        print(f"| {key} | " + " | ".join(f"{results[n]['ratios'][key]:.2f}" for n in nfes) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
