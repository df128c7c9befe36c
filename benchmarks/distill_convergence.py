"""Is `make run`'s distillation budget converged? Each AMED row of the digits Table 2 distilled with the
sweep's own settings (experiments/table2_digits.yaml, composed as a sweep cell composes them), then:
the convergence signal (``meta.convergence``, amedlab.amed.objectives.convergence) and the final
sample's RMSE against a Heun reference (129 points, same noise as benchmarks/amed_quality.py).
Extra Hydra overrides change the budget, e.g. ``distill.epochs=8`` or ``distill.lr_schedule=cosine``.

    .venv/bin/python benchmarks/distill_convergence.py --out benchmarks/results/distill_convergence_constant.json
    .venv/bin/python benchmarks/distill_convergence.py distill.lr_schedule=cosine
    .venv/bin/python benchmarks/distill_convergence.py --solvers amed_plugin --nfes 5 distill.epochs=16
"""
from __future__ import annotations

import argparse
import os
import json
import logging
import warnings

import torch
from hydra import compose, initialize_config_dir

from amed_quality import reference

from amedlab.specs.config import default_cache_dir
from amedlab.amed.distill import distill
from amedlab.specs import CONF_DIR
from amedlab.solvers.spec import solver_from_node
from amedlab.models import build_model
from amedlab.evaluation.evaluate import cell_schedule
from amedlab.specs import DistillSpec, distill_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--solvers", default="amed,amed_plugin,amed_plugin_vs,amed_plugin_vs_grid")
    ap.add_argument("--nfes", default="3,5,7,9")
    ap.add_argument("--samples", type=int, default=500, help="evaluation seeds 0..samples-1")
    ap.add_argument("--cache", default=os.path.join(default_cache_dir(), "trajectories"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiments=table2_digits")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    results, model = {}, None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for name in args.solvers.split(","):
            for nfe in [int(n) for n in args.nfes.split(",")]:
                cfg = compose("config", overrides=["experiments=table2_digits", f"solver={name}", f"nfe={nfe}",
                                                   f"cache_dir={os.path.dirname(args.cache)}", *args.overrides])
                if model is None:
                    model = build_model(cfg.model).float()
                    noise, ref, _ = reference(model, list(range(args.samples)), 129, args.cache, 500)
                schedule = cell_schedule(cfg.schedule, name, cfg.eval.schedule_per_solver)  # AMED-Solver: time-uniform
                pred = distill(model, distill_spec(cfg, schedule=schedule))
                sigmas = torch.tensor(pred.meta["sigmas"], dtype=torch.float64)
                with torch.no_grad():
                    x = solver_from_node(cfg.solver, predictor=pred).sample(model, noise, sigmas)
                rmse = (x - ref).pow(2).flatten(1).mean(1).sqrt().mean().item()
                conv = pred.meta["convergence"]
                results[f"{name}/{nfe}"] = {"rmse": rmse, "converged": conv["converged"], "intervals": conv["intervals"],
                                            "train_seconds": pred.meta["train_seconds"], "updates": pred.meta["updates"]}
                moving = [e["interval"] for e in conv["intervals"] if e["converged"] is False]
                print(f"{name} nfe={nfe}: RMSE {rmse:.4f}, converged {conv['converged']}"
                      + (f" (still moving: intervals {moving})" if moving else "")
                      + f", {pred.meta['train_seconds']:.0f} s", flush=True)
    passed = sum(bool(v["converged"]) for v in results.values())
    print(f"{passed} of {len(results)} predictors converged by the signal ({' '.join(args.overrides) or 'the sweep budget'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
