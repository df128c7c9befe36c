"""``stage=analyze_trajectories``: how flat are sampling trajectories, and how good can one mean direction be?

1. Fine trajectories: ``num_samples`` noises x_T = sigma_max z (seeded), solved with a fine solver
   (Heun, ~120 steps, collected through the driver's callback) on the run's schedule family. The fine
   grid has a multiple of lcm(N - 1) steps, so every coarse grid (N points, NFE 3/5/7/9) is a subset
   of it and the fine states sit exactly on the coarse times.
2. Geometry (``analysis.pca``): per-trajectory PCA, distance from the chord and from the top-2 plane.
3. The mean-direction oracle (``analysis.oracle``) on each coarse grid with AFS (NFE = 2(N-1) - 1):
   - restart: each interval starts from the fine state (AFS slope on the first); per-interval RMSE of
     r*, (r*, c*), a batch-shared r, and the same-cost single-step rules (dpm2 = r 1/2, midpoint,
     heun, and AMED-Solver when a predictor is available) from the same point;
   - chained: the oracle applied interval after interval from its own output; final-sample RMSE
     against the fine trajectory's end, next to the classical solvers (``conf/solver/<name>.yaml``,
     each on its own grid for the same counted NFE) and AMED.
Writes ``analysis.json`` and PNG figures to the run directory.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch

from amedlab.compare import final_errors, rmse
from amedlab.configs import check_schedule_cfg, load_group, solver_from_cfg
from amedlab.io import atomic_write_json, run_dir
from amedlab.schedules import make_sigmas
from amedlab.solvers import Point, Solver, afs_point, evaluate, make_solver, num_points_for
from amedlab.specs import DistillSpec

from .oracle import MODES, oracle_step, ratio_of_mid_time
from .pca import distribution, summarize_geometry, trajectory_geometry

log = logging.getLogger(__name__)

ORACLE_NAMES = {"r": "oracle r*", "rc": "oracle r*,c*", "shared": "oracle shared r"}


# ----------------------------------------------------------------------------------------------
# fine trajectories
# ----------------------------------------------------------------------------------------------
def coarse_num_points(nfes: Sequence[int]) -> dict[int, int]:
    """NFE -> grid points of a 2-NFE-per-step solver with AFS (AMED-Solver's count), validated."""
    return {int(n): num_points_for("dpm2", int(n), afs=True) for n in nfes}


def fine_steps_for(num_points: Sequence[int], steps: int) -> int:
    """The smallest multiple of lcm(N - 1) that is >= ``steps``: every coarse grid is then a sub-grid."""
    lcm = 1
    for n in num_points:
        lcm = lcm * (n - 1) // math.gcd(lcm, n - 1)
    return lcm * max(1, math.ceil(int(steps) / lcm))


def sample_trajectories(denoiser, solver: Solver, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """All states of one solve, collected by the driver's callback: [B, len(sigmas), *sample_shape]."""
    states: list[torch.Tensor] = []
    with torch.no_grad():
        solver.sample(denoiser, x_T, sigmas, callback=lambda s: states.append(s.x.detach().clone()))
    if len(states) != len(sigmas):
        raise RuntimeError(f"expected {len(sigmas)} states from the callback, got {len(states)}")
    return torch.stack(states, 1)


def _rmse_from_norms(norms: torch.Tensor, dim: int) -> float:
    return (norms.pow(2).mean() / dim).sqrt().item()


# ----------------------------------------------------------------------------------------------
# the oracle on one coarse grid
# ----------------------------------------------------------------------------------------------
class _Recorder:
    """Wraps a denoiser and keeps the noise levels it was queried at (to read a rule's midpoint time)."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.sigmas = denoiser, []

    def __getattr__(self, name):  # identity, feature_dim, last_features, ... of the wrapped model
        return getattr(self.denoiser, name)

    def __call__(self, x, sigma):
        self.sigmas.append(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).clone())
        return self.denoiser(x, sigma)


def _start_point(denoiser, x: torch.Tensor, t: torch.Tensor, first: bool) -> Point:
    with torch.no_grad():
        return afs_point(x, t) if first else evaluate(denoiser, x, t)


def oracle_on_grid(
    denoiser,
    traj: torch.Tensor,
    fine_sigmas: torch.Tensor,
    stride: int,
    restart_rules: Mapping[str, Solver],
    grid_points: int = 9,
    iters: int = 8,
    c_bounds: Sequence[float] | None = None,
    chained: Sequence[str] = MODES,
    joint_rc: bool = False,
) -> tuple[dict, dict]:
    """Restart and chained oracle on the coarse grid ``fine_sigmas[::stride]`` (AFS on the first step).

    ``restart_rules``: single-step solvers run from the same restart points (e.g. dpm2, heun, amed).
    ``chained``: the oracle modes also run interval after interval from their own output.
    Returns (JSON-ready results, raw per-sample tensors for plots).
    """
    B = traj.shape[0]
    dim = traj[0, 0].numel()
    idx = list(range(0, len(fine_sigmas), stride))
    sigmas = fine_sigmas[idx]
    steps = len(sigmas) - 1
    ones = torch.ones(B, dtype=traj.dtype, device=traj.device)
    for solver in restart_rules.values():
        solver.rule.prepare(denoiser, sigmas, True)
    search = dict(grid_points=grid_points, iters=iters, c_bounds=c_bounds, joint_rc=joint_rc)
    intervals, raw_intervals, calls = [], [], 0
    # restart convention: every interval from the fine state
    for i in range(steps):
        t_cur, t_next = sigmas[i] * ones, sigmas[i + 1] * ones
        cur = _start_point(denoiser, traj[:, idx[i]], t_cur, i == 0)
        target = traj[:, idx[i + 1]]
        with torch.no_grad():
            o = oracle_step(denoiser, cur, t_next, target, **search)
        calls += o.calls
        errs = {ORACLE_NAMES["r"]: o.error, ORACLE_NAMES["rc"]: o.error_rc, ORACLE_NAMES["shared"]: o.error_shared}
        entry = {"interval": i, "t_cur": float(sigmas[i]), "t_next": float(sigmas[i + 1]),
                 "r_star": distribution(o.r), "r_rc": distribution(o.r_rc), "c_star": distribution(o.c_rc),
                 "r_shared": o.r_shared}
        raw = {"r_star": o.r.cpu(), "r_rc": o.r_rc.cpu(), "c_star": o.c_rc.cpu(), "r_shared": o.r_shared}
        for name, solver in restart_rules.items():
            rec = _Recorder(denoiser)
            with torch.no_grad():
                x_next, _ = solver.rule.step(rec, cur, t_next, [], steps - i)
            errs[name] = (x_next - target).reshape(B, -1).norm(dim=-1)
            outputs = getattr(solver.rule, "last_outputs", None)
            if outputs:  # AMED: the predictor's (r, c, a) for this interval
                r, c, a = (v.detach().to(torch.float64).cpu() for v in outputs[-1])
                entry[f"{name}_r"], entry[f"{name}_c"], entry[f"{name}_a"] = distribution(r), distribution(c), distribution(a)
                raw[f"{name}_r"] = r
            elif len(rec.sigmas) == 1:  # a mean-direction rule: the ratio of the time it queried
                entry[f"{name}_r"] = distribution(ratio_of_mid_time(t_cur, t_next, rec.sigmas[0]))
        entry["rmse"] = {name: _rmse_from_norms(e, dim) for name, e in errs.items()}
        base = errs.get("dpm2")
        if base is not None:
            entry["oracle_r_le_dpm2_fraction"] = (o.error <= base * (1 + 1e-9)).double().mean().item()
        intervals.append(entry)
        raw_intervals.append(raw)
    result = {"num_points": len(sigmas), "sigmas": sigmas.tolist(), "fine_indices": idx,
              "restart": intervals}
    raws = {"restart": raw_intervals}
    if chained:
        finals, chain_r = {}, {}
        for mode in chained:
            x = traj[:, 0]
            rs = []
            for i in range(steps):
                t_cur, t_next = sigmas[i] * ones, sigmas[i + 1] * ones
                cur = _start_point(denoiser, x, t_cur, i == 0)
                with torch.no_grad():
                    o = oracle_step(denoiser, cur, t_next, traj[:, idx[i + 1]], modes=(mode,), **search)
                calls += o.calls
                x = {"r": o.x_next, "rc": o.x_next_rc, "shared": o.x_next_shared}[mode]
                rs.append({"r": o.r, "rc": o.r_rc, "shared": o.r_shared}[mode])
            finals[ORACLE_NAMES[mode]] = rmse(x, traj[:, -1])
            chain_r[mode] = [r if isinstance(r, float) else distribution(r) for r in rs]
        result["chained"] = {"final_rmse": finals, "r": chain_r}
    result["search_calls"] = calls
    return result, raws


# ----------------------------------------------------------------------------------------------
# classical solvers and AMED at the same NFE (amedlab.compare.final_errors)
# ----------------------------------------------------------------------------------------------


def amed_mode(acfg: Mapping) -> str:
    """``analysis.amed.enabled`` as one of auto, true, false (YAML booleans accepted)."""
    value = str(acfg.get("enabled", "auto")).lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(f"analysis.amed.enabled={acfg.get('enabled')!r}; accepted: auto, true, false")
    return value


def amed_solvers(model, nfes, schedule: Mapping, acfg: Mapping, dtype) -> tuple[dict[int, Solver], str]:
    """AMED-Solver per NFE: predictors loaded from ``acfg.predictors[nfe]`` or distilled on ``schedule``.

    Returns ({nfe: solver}, status). ``acfg.enabled``: false (skip), true (errors propagate) or auto
    (any failure, e.g. the AMED package missing, is reported in the status and skipped).
    """
    enabled = amed_mode(acfg)
    if enabled == "false":
        return {}, "disabled (analysis.amed.enabled=false)"
    try:
        from amedlab.amed.distill import distill

        paths = dict(acfg.get("predictors") or {})
        kwargs = dict(acfg.get("distill") or {})
        out, made = {}, []
        for nfe in nfes:
            path = paths.get(nfe, paths.get(str(nfe)))
            if path:
                predictor = path
                made.append(f"nfe {nfe}: loaded {path}")
            else:
                t0 = time.perf_counter()
                spec = DistillSpec.create(solver="amed", nfe=int(nfe), schedule=dict(schedule), afs=True, dtype=dtype,
                                          **kwargs)
                predictor = distill(model, spec)
                made.append(f"nfe {nfe}: distilled in {time.perf_counter() - t0:.1f} s")
            out[int(nfe)] = make_solver("amed", afs=True, predictor=predictor)
        return out, "; ".join(made)
    except Exception as err:  # noqa: BLE001 - auto mode reports and skips
        if enabled != "auto":
            raise
        log.warning("AMED skipped: %s: %s", type(err).__name__, err)
        return {}, f"skipped: {type(err).__name__}: {err}"


# ----------------------------------------------------------------------------------------------
# the whole analysis
# ----------------------------------------------------------------------------------------------
def _dtype(name: str, model) -> torch.dtype:
    if name == "auto":
        return torch.float64 if hasattr(model, "reference") else torch.float32
    if name not in ("float32", "float64"):
        raise ValueError(f"analysis.dtype={name!r}; accepted: auto, float32, float64")
    return getattr(torch, name)


def analyze(model, acfg: Mapping, schedule: Mapping, seed: int = 0, device: str = "cpu") -> tuple[dict, dict]:
    """Run the analysis described in the module docstring. Returns (JSON-ready results, raw tensors)."""
    check_schedule_cfg(schedule)
    nfes = [int(n) for n in acfg["nfes"]]
    points = coarse_num_points(nfes)
    fine_cfg = acfg["fine"]
    fine_solver = make_solver(str(fine_cfg["solver"]))
    fine_steps = fine_steps_for(list(points.values()), int(fine_cfg["steps"]))
    kind, smin, smax, rho = schedule["kind"], float(schedule["sigma_min"]), float(schedule["sigma_max"]), float(schedule["rho"])
    fine_sigmas = make_sigmas(kind, fine_steps + 1, smin, smax, rho)
    restart_names = list(acfg["oracle"].get("restart_solvers") or [])
    restart = {name: make_solver(name, afs=True) for name in restart_names}
    for name, solver in restart.items():
        if solver.rule.history_size or solver.rule.nfe_per_step != 2:
            raise ValueError(f"analysis.oracle.restart_solvers: {name!r} is not a single-step 2-NFE rule; "
                             "accepted: heun, midpoint, dpm2")
    classical = {name: solver_from_cfg(load_group("solver", name)) for name in acfg.get("solvers") or []}
    chained = acfg["oracle"].get("chained", list(MODES))
    chained = list(MODES) if chained is True else [] if chained in (False, None) else [str(m) for m in chained]
    if set(chained) - set(MODES):
        raise ValueError(f"analysis.oracle.chained={chained!r}; accepted: true, false or a list of {', '.join(MODES)}")
    c_bounds = acfg["oracle"].get("c_bounds")
    if c_bounds is not None and (len(c_bounds) != 2 or not float(c_bounds[0]) < float(c_bounds[1])):
        raise ValueError(f"analysis.oracle.c_bounds={c_bounds!r}: null or [low, high] with low < high")
    amed_mode(acfg.get("amed") or {})
    dtype = _dtype(str(acfg.get("dtype", "auto")), model)
    model = model.to(device=device, dtype=dtype).eval()
    timings = {}

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(int(seed))
    n = int(acfg["num_samples"])
    x_T = (torch.randn(n, *model.sample_shape, generator=g, dtype=torch.float64) * smax).to(device=device, dtype=dtype)
    traj = sample_trajectories(model, fine_solver, x_T, fine_sigmas)
    timings["fine_trajectories"] = time.perf_counter() - t0
    fine = {"solver": fine_solver.name, "steps": fine_steps, "nfe": fine_solver.nfe(fine_steps + 1),
            "schedule": dict(schedule)}
    t0 = time.perf_counter()
    if hasattr(model, "reference"):
        fine["rmse_vs_reference"] = rmse(traj[:, -1], model.reference(x_T, smax, smin))
    elif fine_cfg.get("check_half_steps", True):
        half = make_sigmas(kind, fine_steps // 2 + 1, smin, smax, rho)
        with torch.no_grad():
            x_half = fine_solver.sample(model, x_T, half)
        # for a 2nd-order solver the fine run's own error is about a third of this difference
        fine["rmse_vs_half_steps"] = rmse(traj[:, -1], x_half)
    timings["fine_check"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    geom = trajectory_geometry(traj, int(acfg.get("max_components", 4)))
    pca = summarize_geometry(geom, fine_sigmas)
    timings["pca"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    amed, amed_status = amed_solvers(model, nfes, schedule, acfg.get("amed") or {}, dtype)
    timings["amed_distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    oracle, raw_oracle = {}, {}
    ocfg = acfg["oracle"]
    for nfe in nfes:
        stride = fine_steps // (points[nfe] - 1)
        rules = dict(restart)
        if nfe in amed:
            rules["amed"] = amed[nfe]
        oracle[nfe], raw_oracle[nfe] = oracle_on_grid(
            model, traj, fine_sigmas, stride, rules, int(ocfg.get("grid_points", 9)), int(ocfg.get("iters", 8)),
            c_bounds, chained, bool(ocfg.get("joint_rc", False)))
        oracle[nfe]["nfe"] = nfe
    timings["oracle"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    finals = final_errors(model, classical, nfes, schedule, x_T, traj[:, -1], smin)
    if amed:
        finals["amed"] = {nfe: final_errors(model, {"amed": amed[nfe]}, [nfe], schedule, x_T, traj[:, -1], smin)["amed"][nfe]
                          for nfe in nfes if nfe in amed}
    for mode, label in ORACLE_NAMES.items():
        if mode in chained:
            finals[label] = {nfe: {"rmse": oracle[nfe]["chained"]["final_rmse"][label], "nfe_counted": nfe,
                                   "num_points": points[nfe]} for nfe in nfes}
    timings["final_errors"] = time.perf_counter() - t0

    results = {
        "model": None, "schedule": dict(schedule), "num_samples": n, "dtype": str(dtype).replace("torch.", ""),
        "sample_shape": list(model.sample_shape), "seed": int(seed), "fine": fine, "pca": pca,
        "oracle": {"search": {"grid_points": int(ocfg.get("grid_points", 9)), "iters": int(ocfg.get("iters", 8)),
                              "c_bounds": None if c_bounds is None else [float(c) for c in c_bounds],
                              "joint_rc": bool(ocfg.get("joint_rc", False)), "chained": chained},
                   "nfe": oracle},
        "final_rmse": finals, "amed": amed_status, "seconds": timings,
    }
    raw = {"geometry": geom, "fine_sigmas": fine_sigmas, "oracle": raw_oracle}
    return results, raw


# ----------------------------------------------------------------------------------------------
# tables and the stage
# ----------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def format_report(results: dict) -> str:
    """Markdown tables: PCA per k, deviations, restart per interval, chained/final per NFE."""
    pca = results["pca"]
    lines = ["PCA of each fine trajectory (median [p05, p95] over trajectories)", "",
             "| k | explained variance | 1 - explained | rel. error of rebuilt trajectory | max point rel. error |",
             "|---|---|---|---|---|"]
    for k, d in pca["components"].items():
        cells = [f"{_fmt(d[m]['median'])} [{_fmt(d[m]['p05'])}, {_fmt(d[m]['p95'])}]"
                 for m in ("explained_variance", "unexplained_variance", "rel_error", "max_point_rel_error")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| deviation (max over the trajectory, / chord length) | median | p95 | max |", "|---|---|---|---|"]
    for key, label in (("max_line_deviation", "from the straight line x_T -> x_0"),
                       ("max_plane_deviation", "from the top-2 PCA plane"), ("arc_to_chord", "arc length / chord")):
        d = pca[key]
        lines.append(f"| {label} | {_fmt(d['median'])} | {_fmt(d['p95'])} | {_fmt(d['max'])} |")
    lines += ["", "Restart convention (each interval from the fine state, AFS on the first): RMSE per interval"]
    for nfe, o in results["oracle"]["nfe"].items():
        names = list(o["restart"][0]["rmse"])
        amed = "amed_r" in o["restart"][0]
        lines += ["", f"NFE {nfe} ({o['num_points']} points)", "",
                  "| interval | " + " | ".join(names) + " | r* median [p05, p95] | shared r | c* median |"
                  + (" AMED r median |" if amed else ""), "|---" * (len(names) + 4 + amed) + "|"]
        for e in o["restart"]:
            r = e["r_star"]
            lines.append(f"| {e['t_cur']:.4g} -> {e['t_next']:.4g} | " + " | ".join(_fmt(e["rmse"][n]) for n in names)
                         + f" | {r['median']:.3f} [{r['p05']:.3f}, {r['p95']:.3f}] | {e['r_shared']:.3f} | {e['c_star']['median']:.4f} |"
                         + (f" {e['amed_r']['median']:.3f} |" if amed else ""))
    finals = results["final_rmse"]
    nfes = list(results["oracle"]["nfe"])
    lines += ["", "Final sample RMSE against the fine trajectory's end (oracle chained from its own output)", "",
              "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for name, res in finals.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res[n]["rmse"]) if res.get(n) else "n/a" for n in nfes) + " |")
    return "\n".join(lines)


def analysis_config(cfg) -> Mapping:
    """``cfg.analysis``, or ``conf/analysis/default.yaml`` when the defaults list does not hold it."""
    node = cfg.get("analysis") if hasattr(cfg, "get") else None
    if node is None:
        log.info("no `analysis` config group in the defaults list: using conf/analysis/default.yaml "
                 "(add `- analysis: default` to conf/config.yaml or pass +analysis=default to override keys)")
        node = load_group("analysis", "default")
    return node


def run(cfg):
    from amedlab.models import build_model

    from .plots import plot_oracle, plot_pca

    from amedlab.validation import check_stage, user_errors

    check_stage(cfg, "analyze_trajectories")
    acfg = analysis_config(cfg)
    with user_errors("analysis.nfes"):
        coarse_num_points(acfg["nfes"])  # unreachable NFEs fail here, before any compute
    for name in acfg.get("solvers") or []:
        with user_errors("analysis.solvers"):
            solver_from_cfg(load_group("solver", name))
    threads = acfg.get("num_threads")
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"analysis.num_threads={threads!r} must be null or >= 1")
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    model = build_model(cfg.model)
    results, raw = analyze(model, acfg, cfg.schedule, int(cfg.seed), str(cfg.get("device", "cpu")))
    results["model"] = dict(cfg.model)
    out = run_dir()
    if acfg.get("plots", True):
        results["figures"] = [str(plot_pca(results, raw, out / "trajectory_pca.png")),
                              str(plot_oracle(results, raw, out / "oracle.png"))]
    results["seconds"]["total"] = time.perf_counter() - t0
    path = atomic_write_json(out / "analysis.json", results)
    report = format_report(results)
    print(f"model={cfg.model.name}, schedule={cfg.schedule.kind} rho={cfg.schedule.rho}, {results['num_samples']} "
          f"trajectories, fine {results['fine']['solver']} {results['fine']['steps']} steps; AMED: {results['amed']}\n\n"
          f"{report}\n\nwritten: {path}\ntotal {results['seconds']['total']:.1f} s")
    k2 = results["pca"]["components"].get("2")
    return k2["explained_variance"]["mean"] if k2 else results["pca"]["components"]["1"]["explained_variance"]["mean"]
