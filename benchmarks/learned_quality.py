"""The learned grid + coefficients on the other models of the AMED comparison (benchmarks/amed_quality.py).

Same reference and metric as ``amed_quality.py`` (Heun on a fine polynomial grid from the same noise,
seeds 0..N-1; mean per-sample RMSE), so the learned solver's numbers sit beside that script's saved
classical and AMED rows (``--against``, its JSON). Trained per NFE with ``solver=learned``'s settings
(conf/solver/learned.yaml: 256 trajectories, batch 32, 6 epochs, lr 0.02, AFS) on seeds
200000.. (disjoint), teacher = that same reference. ``--train-seeds 0,1,2`` trains each NFE from
three replicates (their own teacher blocks and shuffling, as the table's ``seed=r``) and reports the
mean and the spread.

    PYTHONPATH=src python benchmarks/learned_quality.py --model gaussian_mixture \
        --against benchmarks/results/amed_variants_mixture2d.json
    PYTHONPATH=src python benchmarks/learned_quality.py --model gaussian_mixture --model-opt dim=64 \
        --against benchmarks/results/amed_variants_mixture64d.json
"""
from __future__ import annotations

import argparse
import os
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import add_model_args, model_from_args  # noqa: E402
from amed_quality import CLASSICAL, reference  # noqa: E402  (the same reference, same cache)

from amedlab.specs.config import default_cache_dir
from amedlab.specs.config import load_group  # noqa: E402
from amedlab.learned.train import TRAINING_KEYS, train_learned  # noqa: E402
from amedlab.schedules import make_sigmas  # noqa: E402
from amedlab.solvers import make_solver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "gaussian_mixture")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--nfes", default="3,5,7,9")
    ap.add_argument("--reference-points", type=int, default=129)
    ap.add_argument("--against", required=True, help="amed_quality.py's JSON for this model (classical and AMED rows)")
    ap.add_argument("--cache", default=os.path.join(default_cache_dir(), "trajectories"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--train-seeds", default="0", help="training replicates r (as the table's seed=r): teacher seeds "
                    "first_seed + r * num_trajectories .., shuffling from r; the ratios use their mean")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    model = model_from_args(args)
    node = load_group("solver", "learned")
    s = OmegaConf.to_container(node.distill)
    noise, ref, _ = reference(model, list(range(args.samples)), args.reference_points, args.cache, 500)
    replicates = [int(r) for r in args.train_seeds.split(",")]
    blocks = {}
    for r in replicates:  # each replicate's own teacher block (src/amedlab/learned/trained.py, replicate_settings)
        first = s["first_seed"] + r * s["num_trajectories"]
        blocks[r] = reference(model, list(range(first, first + s["num_trajectories"])), args.reference_points, args.cache, 500)[:2]
    against = json.loads(Path(args.against).read_text())

    def rmse(x):  # amed_quality.py's metric: the mean over samples of each sample's RMSE
        return (x - ref).pow(2).flatten(1).mean(1).sqrt().mean().item()

    results = {}
    for nfe in [int(n) for n in args.nfes.split(",")]:
        n = make_solver("learned", afs=node.afs).num_points(nfe)
        base = make_sigmas("polynomial", n, 0.002, 80.0, 7.0)
        t0, per_seed = time.process_time(), []
        for r in replicates:
            t_noise, t_ref = blocks[r]
            params = train_learned(model, t_noise, t_ref, base, afs=node.afs, max_order=node.options.max_order, seed=r,
                                   **{k: s[k] for k in TRAINING_KEYS})
            with torch.no_grad():
                per_seed.append(rmse(make_solver("learned", afs=node.afs, params=params).sample(model, noise, params.sigmas())))
        cpu = (time.process_time() - t0) / len(replicates)
        learned = sum(per_seed) / len(per_seed)
        with torch.no_grad():
            untrained = rmse(make_solver("learned", afs=node.afs).sample(model, noise, base))
        row = against[str(nfe)]
        classical = {k: row[k]["rmse"] for k in CLASSICAL if k in row}
        amed = {k: v["rmse"] for k, v in row.items() if k.startswith("amed") and isinstance(v, dict) and "rmse" in v}
        bc, ba = min(classical, key=classical.get), min(amed, key=amed.get)
        results[nfe] = {"learned": learned, "learned_per_train_seed": dict(zip(replicates, per_seed)),
                        "train_spread": [min(per_seed), max(per_seed)], "untrained_vs_ipndm_afs": untrained, "train_cpu_seconds": cpu,
                        "updates": params.meta["updates"], "sigmas": params.sigmas().tolist(),
                        "best_classical": [bc, classical[bc]], "best_amed": [ba, amed[ba]], "ipndm": classical.get("ipndm"),
                        "learned_over_best_classical": learned / classical[bc], "learned_over_best_amed": learned / amed[ba],
                        "learned_over_ipndm": learned / classical["ipndm"]}
        r = results[nfe]
        spread = f" [{min(per_seed):.4f}, {max(per_seed):.4f} over seeds {args.train_seeds}]" if len(per_seed) > 1 else ""
        print(f"NFE {nfe}: learned {learned:.4f}{spread} (untrained {untrained:.4f}, {cpu:.1f} CPU s) | best classical "
              f"{bc} {classical[bc]:.4f} -> ratio {r['learned_over_best_classical']:.2f} | best AMED {ba} {amed[ba]:.4f} "
              f"-> ratio {r['learned_over_best_amed']:.2f} | / iPNDM {r['learned_over_ipndm']:.2f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
