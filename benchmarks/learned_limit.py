"""How close is the learned solver to its limit? (a measurement, not a test)

The *limit* is the FID of the ODE reference's own samples: ``eval.ode_reference`` of
experiments/table2_digits.yaml (Heun, 40 NFE) from the evaluation seeds (0-1999), against the same
real set (digits train split) in the same features (``amedlab-digits``). The learned solver is
trained against that reference, so a perfect student reaches this FID, not 0.

For each learned-solver variant (Hydra overrides on ``experiments=table2_digits solver=learned``) and
NFE, the cell is run through the normal path (``stage=evaluate`` in a folder under ``--runs``;
its training is cached in ``<cache_dir>/learned/``, a finished cell is not recomputed) and its
metrics.json read: FID with its interval over seeds (real set fixed), RMSE with its interval, the
ratio to the limit (with the percentile interval of the paired replicate ratios: the limit's
bootstrap uses the same seed draws as every cell), the paired FID difference to the first variant
(the default) and the training's CPU seconds.

    AMEDLAB_CACHE=/tmp/limit_cache OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_limit.py
    .venv/bin/python benchmarks/learned_limit.py --nfes 3,5 --variants default teacher_features
    .venv/bin/python benchmarks/learned_limit.py --limit-only
    .venv/bin/python benchmarks/learned_limit.py --table          # the saved JSON as markdown

The ``*_seed<r>`` variants are training replicates (``seed=r``: another block of teacher seeds): the
spread of a cell's FID over trainings, which the per-cell interval (over evaluation seeds) does not
hold; on digits it is as large as every difference between the variants (docs/learned.md, "Closer to
the limit").

Writes benchmarks/results/learned_limit_digits.json (atomically; variants already in it and not run
again are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from amedlab.data.reference import ode_reference
from amedlab.evaluation import uncertainty as U
from amedlab.evaluation.extractors import create_extractor, extract_features
from amedlab.evaluation.metrics import feature_statistics, fid_from_statistics, quantize
from amedlab.evaluation.reference import real_reference
from amedlab.io import atomic_write_json, plain
from amedlab.models import build_model
from amedlab.sampling import parse_seeds
from amedlab.specs import CONF_DIR
from amedlab.specs.config import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "learned_limit_digits.json"
BASE = ["experiments=table2_digits", "solver=learned"]

#: name -> Hydra overrides on top of experiments=table2_digits solver=learned nfe=N
VARIANTS = {
    "default": [],
    "teacher_features": ["solver.distill.loss=teacher_features"],
    "final+teacher_features": ["solver.distill.loss='final+teacher_features'"],
    "denoised": ["solver.distill.loss=denoised"],
    "traj512": ["solver.distill.num_trajectories=512"],
    "epochs12": ["solver.distill.epochs=12"],
    "traj512_epochs12": ["solver.distill.num_trajectories=512", "solver.distill.epochs=12"],
    "lr0.01_epochs12": ["solver.distill.lr=0.01", "solver.distill.epochs=12"],
    "max_order2": ["solver.options.max_order=2"],
    "max_order3": ["solver.options.max_order=3"],
    "starts3": ["solver.distill.starts=[{},{kind:time_uniform,rho:1.0},{rho:3.0}]"],
    "no_afs": ["solver.afs=false"],
    "lr0.04": ["solver.distill.lr=0.04"],
    "batch16": ["solver.distill.batch_size=16"],
    "batch16_lr0.04": ["solver.distill.batch_size=16", "solver.distill.lr=0.04"],
    "batch8": ["solver.distill.batch_size=8"],
    "epochs12_max_order3": ["solver.distill.epochs=12", "solver.options.max_order=3"],
    # training replicates (seed=r: the teacher block first_seed + r * num_trajectories ..): the spread of
    # a cell's FID over trainings, which the per-cell interval (over evaluation seeds) does not hold
    "default_seed1": ["seed=1"],
    "default_seed2": ["seed=2"],
    "lr0.04_seed1": ["solver.distill.lr=0.04", "seed=1"],
    "batch16_seed1": ["solver.distill.batch_size=16", "seed=1"],
    "epochs12_max_order3_seed1": ["solver.distill.epochs=12", "solver.options.max_order=3", "seed=1"],
    "epochs12_max_order3_seed2": ["solver.distill.epochs=12", "solver.options.max_order=3", "seed=2"],
}


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*BASE, *overrides])


def measure_limit(nfe: int = 3) -> tuple[dict, np.ndarray]:
    """(summary, replicates) of the FID of the ODE reference's samples on eval.seeds."""
    cfg = compose_cfg([f"nfe={nfe}"])
    t0 = time.perf_counter()
    cache, batch = default_cache_dir(), int(cfg.eval.batch_size)
    model = build_model(cfg.model).eval()
    seeds = parse_seeds(cfg.eval.seeds)
    s = cfg.schedule
    ref_node = plain(cfg.eval.ode_reference)
    samples, info = ode_reference(model, ref_node, float(s.sigma_min), float(s.sigma_max), seeds, cache, batch)
    extractor = str(cfg.eval.feature_extractor)
    real = real_reference(cfg.eval.real, cfg.dataset, extractor, None, cache, "cpu", batch, need_features=True)
    fe = create_extractor(extractor, None, "cpu")
    feats = extract_features(fe, quantize(samples), batch)
    fid = fid_from_statistics(feature_statistics(feats), real)
    boot = plain(cfg.eval.bootstrap)
    summary, reps = U.cell_bootstrap(feats, real["mu"], real["sigma"], real["features"], boot)
    out = {"fid": fid, "ci": summary["fid"]["samples"]["ci"], "se": summary["fid"]["samples"]["se"],
           "ci_total": summary["fid"]["total"]["ci"], "what": "FID of the ODE reference's samples (eval.ode_reference) "
           "on eval.seeds against the real set, amedlab-digits features", "ode_reference": ref_node,
           "seeds": str(cfg.eval.seeds), "real": plain(cfg.eval.real), "extractor": extractor,
           "num_samples": len(seeds), "num_real": int(real["features"].shape[0]), "seconds": time.perf_counter() - t0,
           "bootstrap": boot}
    return out, reps["fid_samples"]


def run_cell(name: str, overrides, nfe: int, runs: Path) -> Path:
    out = runs / name.replace("+", "_plus_") / f"nfe{nfe}"
    if (out / "metrics.json").is_file() and json.loads((out / "metrics.json").read_text()).get("complete"):
        return out
    cmd = [sys.executable, "-m", "amedlab", "stage=evaluate", *BASE, f"nfe={nfe}", "eval.num_threads=1", "logger=none",
           f"hydra.run.dir='{out}'", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} nfe={nfe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def cell_row(cell_dir: Path, limit: dict, limit_reps: np.ndarray, base_dir: Path | None) -> dict:
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    unc = metrics["uncertainty"]
    data, why = U.load_cell(metrics, cell_dir)
    row = {"fid": metrics["fid"], "fid_ci": unc["fid"]["samples"]["ci"],
           "fid_half_width": (unc["fid"]["samples"]["ci"][1] - unc["fid"]["samples"]["ci"][0]) / 2,
           "ratio_to_limit": metrics["fid"] / limit["fid"], "rmse": metrics["rmse"], "rmse_ci": unc["rmse"]["ci"],
           "cell_dir": str(cell_dir)}
    meta = (metrics.get("predictor") or {}).get("meta") or {}
    row["train_cpu_seconds"] = meta.get("train_cpu_seconds_all_starts")
    row["sigmas"] = meta.get("sigmas")
    if data is not None:
        reps = data.reps("fid", "samples")
        ratio = reps / limit_reps
        row["ratio_ci"] = [float(v) for v in np.quantile(ratio, [0.025, 0.975])]
        row["minus_limit"] = U.diff_from_replicates(metrics["fid"], limit["fid"], reps, limit_reps)
        if base_dir is not None and base_dir != cell_dir:
            bm = json.loads((base_dir / "metrics.json").read_text())
            bdata, _ = U.load_cell(bm, base_dir)
            if bdata is not None:
                row["minus_default"], _ = U.paired_diff(data, bdata, "fid", source="samples")
                row["rmse_minus_default"], _ = U.paired_diff(data, bdata, "rmse")
    else:
        row["no_intervals"] = why
    return row


def print_table(result: dict) -> None:
    """The saved variants as markdown: FID ± half-width (ratio to the limit [interval]), paired
    difference to the default, RMSE, training CPU s, per NFE."""
    lim = result["limit"]
    print(f"limit: FID {lim['fid']:.2f} [{lim['ci'][0]:.2f}, {lim['ci'][1]:.2f}]\n")
    nfes = sorted({n for v in result["variants"].values() for n in v["nfe"]}, key=int)
    head = "| variant | overrides | " + " | ".join(f"NFE {n}: FID (ratio) | vs default | RMSE | train CPU s" for n in nfes) + " |"
    print(head)
    print("|" + "---|" * (2 + 4 * len(nfes)))
    for name, v in result["variants"].items():
        cells = []
        for n in nfes:
            r = v["nfe"].get(n)
            if r is None:
                cells += ["", "", "", ""]
                continue
            rc = r.get("ratio_ci") or [float("nan")] * 2
            d = r.get("minus_default")
            cells += [f"{r['fid']:.2f} ± {r['fid_half_width']:.2f} ({r['ratio_to_limit']:.2f} [{rc[0]:.2f}, {rc[1]:.2f}])",
                      f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else "-",
                      f"{r['rmse']:.4f}", f"{r['train_cpu_seconds'] or 0:.0f}"]
        print(f"| {name} | {' '.join(v['overrides']) or '-'} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfes", default="3,5")
    p.add_argument("--variants", nargs="*", default=["default", "teacher_features", "final+teacher_features"],
                   help=f"names from {', '.join(VARIANTS)} (the first is what the others are paired against)")
    p.add_argument("--runs", default="/tmp/learned_limit_runs", help="the cells' folders")
    p.add_argument("--limit-only", action="store_true")
    p.add_argument("--table", action="store_true", help="print the saved JSON as a markdown table, run nothing")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.table:
        print_table(json.loads(Path(args.out).read_text()))
        return
    torch.set_num_threads(1)
    limit, limit_reps = measure_limit()
    lo, hi = limit["ci"]
    print(f"limit (ODE reference's samples, Heun 40 NFE): FID {limit['fid']:.3f} [{lo:.2f}, {hi:.2f}] "
          f"({limit['num_samples']} samples vs {limit['num_real']} real)", flush=True)
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.update(limit=limit, machine="2 CPU cores shared with other jobs, 1 torch thread per cell")
    result.setdefault("variants", {})
    if not args.limit_only:
        runs = Path(args.runs)
        nfes = [int(n) for n in args.nfes.split(",")]
        base = args.variants[0]
        for name in args.variants:
            overrides = VARIANTS.get(name)
            if overrides is None:
                raise SystemExit(f"unknown variant {name!r}; accepted: {', '.join(VARIANTS)}")
            entry = result["variants"].setdefault(name, {"overrides": overrides, "nfe": {}})
            entry["overrides"] = overrides
            for nfe in nfes:
                cell = run_cell(name, overrides, nfe, runs)
                base_dir = run_cell(base, VARIANTS[base], nfe, runs) if name != base else None
                row = cell_row(cell, limit, limit_reps, base_dir)
                row["paired_against"] = base
                entry["nfe"][str(nfe)] = row
                d = row.get("minus_default")
                vs = f" | vs {base} {d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d else ""
                rc = row.get("ratio_ci", [float("nan")] * 2)
                print(f"{name:>24} NFE {nfe}: FID {row['fid']:.2f} ± {row['fid_half_width']:.2f}  ratio {row['ratio_to_limit']:.2f} "
                      f"[{rc[0]:.2f}, {rc[1]:.2f}]  RMSE {row['rmse']:.4f}  train {row['train_cpu_seconds'] or 0:.0f} CPU s{vs}",
                      flush=True)
            atomic_write_json(out_path, result)
    atomic_write_json(out_path, result)
    print(f"written: {out_path}")


if __name__ == "__main__":
    main()
