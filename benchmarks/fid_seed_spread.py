"""Is a cell's FID interval honest? (a measurement, not a test)

One cell of the digits Table 2 (a solver at an NFE, the shipped teacher, 2000 seeds) is evaluated on
``--sets`` disjoint sets of seeds (0-1999, 2000-3999, ...). The standard deviation of their FIDs is
the actual seed-to-seed spread; next to it, the bootstrap standard error that each set's interval
uses (``amedlab.evaluation.uncertainty``, 500 resamples, real set fixed). A ratio near 1 means the
per-cell +- is the right size; above 1, conservative.

    PYTHONPATH=src python benchmarks/fid_seed_spread.py                 # iPNDM, NFE 5, 16 sets: ~4 min on 2 cores
    PYTHONPATH=src python benchmarks/fid_seed_spread.py --solver dpmpp3m --nfe 7 --sets 8
    PYTHONPATH=src python benchmarks/fid_seed_spread.py --versus dpmpp3m --sets 12     # paired: ~7 min

With ``--versus B`` each set is also sampled with solver B (same seeds) and the paired difference
A - B is formed as stage=table does (the same resampled seeds in both cells): the spread of the
difference over the sets against its paired bootstrap standard error.

Writes benchmarks/results/fid_seed_spread_<solver>_nfe<N>.json (atomically) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from amedlab.specs.config import default_cache_dir
from amedlab.specs import CONF_DIR
from amedlab.solvers.spec import solver_from_node
from amedlab.evaluation import uncertainty as U
from amedlab.evaluation.extractors import DIGITS, create_extractor, extract_features
from amedlab.sampling import generate
from amedlab.evaluation.metrics import feature_statistics, fid_from_statistics, quantize
from amedlab.evaluation.reference import real_reference
from amedlab.io import plain
from amedlab.io import atomic_write_json
from amedlab.models import build_model
from amedlab.schedules import make_sigmas


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--solver", default="ipndm", help="a conf/solver name (classical solvers)")
    p.add_argument("--nfe", type=int, default=5)
    p.add_argument("--sets", type=int, default=16, help="disjoint sets of seeds")
    p.add_argument("--samples", type=int, default=2000, help="seeds per set")
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--versus", default=None, help="a second solver: the paired difference per set")
    args = p.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=digits_unet", f"solver={args.solver}", f"nfe={args.nfe}",
                                           "schedule=polynomial"])
    model = build_model(cfg.model).eval()
    solver = solver_from_node(plain(cfg.solver))
    s = cfg.schedule
    sigmas = make_sigmas(s.kind, solver.num_points(args.nfe), float(s.sigma_min), float(s.sigma_max), float(s.rho))
    other = None
    if args.versus:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            ocfg = compose("config", overrides=["model=digits_unet", f"solver={args.versus}", f"nfe={args.nfe}"])
        osolver = solver_from_node(plain(ocfg.solver))
        other = (osolver, make_sigmas(s.kind, osolver.num_points(args.nfe), float(s.sigma_min), float(s.sigma_max), float(s.rho)))
    cache = default_cache_dir()
    real = real_reference(cfg.eval.real, cfg.dataset, DIGITS, None, cache, "cpu", 1000)
    fe = create_extractor(DIGITS, None)
    sets = []
    for k in range(args.sets):
        t0 = time.perf_counter()
        seeds = list(range(args.samples * k, args.samples * (k + 1)))
        x, nfe = generate(model, solver, sigmas, seeds, 1000)
        assert nfe == args.nfe, (nfe, args.nfe)
        f = extract_features(fe, quantize(x), 1000)
        fid = fid_from_statistics(feature_statistics(f), real)
        t1 = time.perf_counter()
        boot = {"resamples": args.resamples, "kid": False, "real": False}
        summary, reps = U.cell_bootstrap(f, real["mu"], real["sigma"], real["features"], boot)
        sets.append({"seeds": f"{seeds[0]}-{seeds[-1]}", "fid": fid, "bootstrap_se": summary["fid"]["samples"]["se"],
                     "sample_s": t1 - t0, "bootstrap_s": time.perf_counter() - t1})
        if other is not None:
            xo, _ = generate(model, other[0], other[1], seeds, 1000)
            fo = extract_features(fe, quantize(xo), 1000)
            fid_o = fid_from_statistics(feature_statistics(fo), real)
            _, reps_o = U.cell_bootstrap(fo, real["mu"], real["sigma"], real["features"], boot)
            d = U.diff_from_replicates(fid, fid_o, reps["fid_samples"], reps_o["fid_samples"])
            sets[-1].update(fid_versus=fid_o, diff=d["diff"], diff_lo=d["lo"], diff_hi=d["hi"], diff_se=d["se"])
        print(sets[-1], flush=True)
    fids = np.array([r["fid"] for r in sets])
    se = float(np.mean([r["bootstrap_se"] for r in sets]))
    result = {"solver": args.solver, "nfe": args.nfe, "samples_per_set": args.samples, "resamples": args.resamples,
              "fid_mean": float(fids.mean()), "fid_sd_over_sets": float(fids.std(ddof=1)), "mean_bootstrap_se": se,
              "ratio_bootstrap_to_actual": se / float(fids.std(ddof=1)), "sets": sets,
              "machine": "2 CPU cores shared with other jobs, 1 torch thread"}
    if other is not None:
        diffs = np.array([r["diff"] for r in sets])
        mean_diff = float(diffs.mean())
        result.update(versus=args.versus, diff_mean=mean_diff, diff_sd_over_sets=float(diffs.std(ddof=1)),
                      mean_paired_se=float(np.mean([r["diff_se"] for r in sets])),
                      intervals_covering_the_mean_diff=int(sum(r["diff_lo"] <= mean_diff <= r["diff_hi"] for r in sets)))
        result["ratio_paired_se_to_actual"] = result["mean_paired_se"] / result["diff_sd_over_sets"]
    tag = f"_vs_{args.versus}" if args.versus else ""
    path = Path(__file__).parent / "results" / f"fid_seed_spread_{args.solver}{tag}_nfe{args.nfe}.json"
    atomic_write_json(path, result)
    print(json.dumps({k: v for k, v in result.items() if k != "sets"}, indent=1))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
