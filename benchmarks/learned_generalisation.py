"""The learned grid + coefficients (solver=learned) on the digits teacher: the checks LD3 / S4S skip.

1. Seeds: trained on seeds 200000-200255, measured on those, on the Table 2 seeds 0-1999 and on
   another unseen range 300000-301999 (RMSE against the high-NFE reference, FID in the digits
   classifier's features), next to iPNDM and untrained variable-step iPNDM + AFS on the same seeds.
2. NFE: the grid trained at NFE 5 carried to NFE 4 and 6 (log sigma interpolated linearly over the
   normalised index, ends fixed; the coefficients back to the variable-step AB weights of that grid:
   ``amedlab.learned.map_to_num_points``), against one trained at that NFE and the baselines.
3. Teacher trajectories: RMSE / FID at NFE 5 after training on 16 .. 1024 trajectories (the same
   number of updates, ~60, for every size: batch min(64, n), epochs to match).

Everything goes through the cells' own cache (``cell_learned``: the same parameters a
``stage=evaluate`` cell would use), so cached pieces are reused.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/learned_generalisation.py
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from amedlab.specs import CONF_DIR
from amedlab.evaluation.extractors import DIGITS, create_extractor, extract_features
from amedlab.sampling import generate
from amedlab.evaluation.metrics import feature_statistics, fid_from_statistics, quantize, rmse
from amedlab.data.reference import ode_reference
from amedlab.evaluation.reference import real_reference
from amedlab.io import plain
from amedlab.learned import map_to_num_points
from amedlab.specs import cell_settings
from amedlab.learned.train import cell_learned
from amedlab.sampling import parse_seeds
from amedlab.models import build_model
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver

RESULTS = Path(__file__).resolve().parent / "results"
SEED_SETS = {"train 200000-200255": range(200000, 200256), "eval 0-1999": range(2000), "unseen 300000-301999": range(300000, 302000)}


def cfg_for(nfe: int, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["stage=evaluate", "experiments=table2_digits", "solver=learned", f"nfe={nfe}", *extra])


class Measure:
    """RMSE against the cached high-NFE reference and FID against the digits' training split."""

    def __init__(self, cfg, cache_dir: Path) -> None:
        self.cfg, self.cache_dir = cfg, cache_dir
        self.model = build_model(cfg.model).eval().requires_grad_(False)
        self.fe = create_extractor(DIGITS, None, "cpu")
        self.real = real_reference(cfg.eval.real, cfg.dataset, DIGITS, None, cache_dir, need_features=False)
        self.refs: dict = {}

    def reference(self, seeds):
        key = (seeds.start, seeds.stop)
        if key not in self.refs:
            self.refs[key], _ = ode_reference(self.model, self.cfg.eval.ode_reference, 0.002, 80.0, list(seeds), self.cache_dir, 1000)
        return self.refs[key]

    def __call__(self, solver, sigmas, seeds, fid: bool = True) -> dict:
        samples, nfe = generate(self.model, solver, sigmas, list(seeds), 1000)
        out = {"rmse": rmse(samples, self.reference(seeds)), "nfe": nfe}
        if fid:
            features = extract_features(self.fe, quantize(samples), 1000)
            out["fid"] = fid_from_statistics(feature_statistics(features), self.real)
        return out


def learned_for(meas: Measure, nfe: int, *extra: str):
    cfg = cfg_for(nfe, *extra)
    settings = cell_settings(cfg, plain(cfg.solver), plain(cfg.schedule), parse_seeds(cfg.eval.seeds))
    params, info = cell_learned(meas.model, settings, plain(cfg.eval.ode_reference), int(cfg.eval.batch_size),
                                cfg.model.name, meas.cache_dir)
    return params, info


def baselines(meas: Measure, nfe: int, seeds) -> dict:
    poly = lambda n: make_sigmas("polynomial", n, 0.002, 80.0, 7.0)  # noqa: E731
    ipndm = make_solver("ipndm", max_order=4)
    vs_afs = make_solver("ipndm", afs=True, max_order=4, variable_step=True)
    return {"iPNDM": meas(ipndm, poly(ipndm.num_points(nfe)), seeds),
            "iPNDM variable-step + AFS (= untrained)": meas(vs_afs, poly(vs_afs.num_points(nfe)), seeds)}


def fmt(r: dict) -> str:
    return f"RMSE {r['rmse']:.4f}" + (f", FID {r['fid']:.2f}" if "fid" in r else "")


def plot(results: dict, path: Path) -> None:
    """Left: learned grids relative to the polynomial (rho 7) grids they start from, over the normalised index.
    Right: RMSE and FID at NFE 5 against the number of teacher trajectories."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for k, (nfe, g) in enumerate(sorted(results["grids"].items(), key=lambda kv: int(kv[0]))):
        u = [i / (len(g["learned"]) - 1) for i in range(len(g["learned"]))]
        a.plot(u, [x / y for x, y in zip(g["learned"], g["polynomial"])], "o-", color=f"C{k}",
               label=f"NFE {nfe} ({len(g['learned'])} points)")
    a.axhline(1.0, color="k", linewidth=0.8)
    a.set_yscale("log")
    a.set_xlabel("grid index / (N - 1)")
    a.set_ylabel("learned sigma / polynomial (rho 7) sigma")
    a.set_title("digits: where the learned grids move the time steps")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    traj = sorted((int(n), r) for n, r in results["trajectories"].items())
    ns = [n for n, _ in traj]
    b.plot(ns, [r["rmse"] for _, r in traj], "o-", color="C0", label="learned, RMSE")
    ipndm = results["seeds"]["eval 0-1999"]["iPNDM"]
    b.axhline(ipndm["rmse"], color="C0", linestyle=":", label=f"iPNDM RMSE {ipndm['rmse']:.3f}")
    b.set_xscale("log", base=2)
    b.set_xlabel("teacher trajectories")
    b.set_ylabel("RMSE vs high-NFE (seeds 0-1999)")
    b2 = b.twinx()
    b2.plot(ns, [r["fid"] for _, r in traj], "s--", color="C3", label="learned, FID")
    b2.axhline(ipndm["fid"], color="C3", linestyle=":", label=f"iPNDM FID {ipndm['fid']:.2f}")
    b2.set_ylabel("FID (digits features)")
    lines = b.get_legend_handles_labels()
    lines2 = b2.get_legend_handles_labels()
    b.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
    b.set_title("NFE 5 vs number of teacher trajectories")
    b.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trajectories", default="16,32,64,128,256,512,1024")
    ap.add_argument("--updates", type=int, default=60, help="updates per training in the trajectory sweep")
    ap.add_argument("--out", default=str(RESULTS / "learned_generalisation_digits.json"))
    ap.add_argument("--plot", default=str(RESULTS / "learned_grid_digits.png"))
    ap.add_argument("--grid-nfes", default="3,5,7,9")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = ap.parse_args()
    if args.plot_only:
        return plot(json.loads(Path(args.out).read_text()), Path(args.plot))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    cfg = cfg_for(5)
    cache_dir = Path(str(cfg.cache_dir))
    meas = Measure(cfg, cache_dir)
    results: dict = {"teacher": plain(cfg.eval.ode_reference), "settings": plain(cfg.solver)}
    t_start = time.perf_counter()

    # 1. seeds
    params5, info5 = learned_for(meas, 5)
    learned5 = make_solver("learned", afs=True, params=params5)
    results["seeds"] = {}
    print("1. Trained on seeds 200000-200255 (NFE 5); measured on:")
    for name, seeds in SEED_SETS.items():
        row = {"learned": meas(learned5, params5.sigmas().detach(), seeds), **baselines(meas, 5, seeds)}
        results["seeds"][name] = row
        print(f"  {name}: " + "; ".join(f"{k} {fmt(v)}" for k, v in row.items()), flush=True)

    # 2. NFE transfer
    eval_seeds = SEED_SETS["eval 0-1999"]
    results["nfe_transfer"] = {}
    print("2. The NFE-5 grid carried to NFE 4 and 6 (log-sigma interpolation, AB weights), seeds 0-1999:")
    for nfe in (4, 6):
        n = make_solver("learned", afs=True).num_points(nfe)
        mapped = map_to_num_points(params5, n)
        direct, _ = learned_for(meas, nfe)
        row = {"mapped from NFE 5": meas(make_solver("learned", afs=True, params=mapped), mapped.sigmas().detach(), eval_seeds),
               f"trained at NFE {nfe}": meas(make_solver("learned", afs=True, params=direct), direct.sigmas().detach(), eval_seeds),
               **baselines(meas, nfe, eval_seeds)}
        row["mapped_sigmas"] = mapped.sigmas().tolist()
        results["nfe_transfer"][nfe] = row
        print(f"  NFE {nfe}: " + "; ".join(f"{k} {fmt(v)}" for k, v in row.items() if isinstance(v, dict)), flush=True)

    # 3. teacher trajectories
    results["trajectories"] = {}
    print(f"3. NFE 5 after training on n teacher trajectories (~{args.updates} updates each), seeds 0-1999:")
    for n in [int(v) for v in args.trajectories.split(",")]:
        batch = min(64, n)
        epochs = max(1, round(args.updates / (n // batch)))
        params, info = learned_for(meas, 5, f"solver.distill.num_trajectories={n}", f"solver.distill.batch_size={batch}",
                                   f"solver.distill.epochs={epochs}")
        r = meas(make_solver("learned", afs=True, params=params), params.sigmas().detach(), eval_seeds)
        m = params.meta
        r.update(updates=m["updates"], train_cpu_seconds=m["train_cpu_seconds"], teacher_seconds=m.get("teacher_seconds"),
                 batch_size=batch, epochs=epochs, source=info["source"])
        results["trajectories"][n] = r
        print(f"  n={n:5d} (batch {batch}, {epochs} epochs, {m['updates']} updates, {m['train_cpu_seconds']:.0f} CPU s "
              f"training): {fmt(r)}", flush=True)
    # the learned grids of the Table 2 cells (the same cache) beside the schedule's, for the plot
    results["grids"] = {}
    for nfe in [int(v) for v in args.grid_nfes.split(",")]:
        params, _ = learned_for(meas, nfe)
        results["grids"][nfe] = {"learned": params.sigmas().tolist(), "polynomial": params.base_sigmas.tolist(),
                                 "weights": params.meta["weights"]}
    plot(results, Path(args.plot))
    results["seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written: {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
