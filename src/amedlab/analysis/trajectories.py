"""How flat are sampling trajectories, and how good can one mean direction be? The library of
``stage=analyze_trajectories`` (:mod:`amedlab.stages.analyze_trajectories`; tables: :mod:`.report`).

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
The stage writes ``analysis.json`` and PNG figures to the run directory.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch

from amedlab.compare import final_errors
from amedlab.evaluation.metrics import rmse
from amedlab.models.base import parse_dtype
from amedlab.solvers import Solver, make_solver, num_points_for
from amedlab.amed.spec import DistillSpec
from amedlab.schedules import ScheduleSpec
from amedlab.solvers.spec import SolverSpec

from .oracle import MODES, OracleRule, OracleSearch, ratio_of_mid_time
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


def oracle_on_grid(
    denoiser,
    traj: torch.Tensor,
    fine_sigmas: torch.Tensor,
    stride: int,
    restart_rules: Mapping[str, Solver],
    search: OracleSearch = OracleSearch(),
    chained: Sequence[str] = MODES,
) -> tuple[dict, dict]:
    """Restart and chained oracle on the coarse grid ``fine_sigmas[::stride]`` (AFS on the first step).

    ``restart_rules``: single-step solvers run from the same restart points (e.g. dpm2, heun, amed).
    ``search``: the oracle's search settings (:class:`.oracle.OracleSearch`).
    ``chained``: the oracle modes also run interval after interval from their own output.
    Returns (JSON-ready results, raw per-sample tensors for plots).
    """
    B = traj.shape[0]
    dim = traj[0, 0].numel()
    idx = list(range(0, len(fine_sigmas), stride))
    sigmas = fine_sigmas[idx]
    targets = traj[:, idx]  # the fine states on the coarse grid
    for solver in restart_rules.values():
        solver.rule.prepare(denoiser, sigmas, True)
    intervals, raw_intervals, calls = [], [], 0
    # restart convention: every interval from the fine state
    oracle = OracleRule(targets, search)
    with torch.no_grad():
        for interval in Solver(oracle, afs=True).steps(denoiser, targets[:, 0], sigmas, restart=targets):
            i, cur, t_next, o = interval.index, interval.cur, interval.t_next, oracle.last
            target = targets[:, i + 1]
            calls += o.calls
            errs = {ORACLE_NAMES["r"]: o.error, ORACLE_NAMES["rc"]: o.error_rc, ORACLE_NAMES["shared"]: o.error_shared}
            entry = {"interval": i, "t_cur": float(sigmas[i]), "t_next": float(sigmas[i + 1]),
                     "r_star": distribution(o.r), "r_rc": distribution(o.r_rc), "c_star": distribution(o.c_rc),
                     "r_shared": o.r_shared}
            raw = {"r_star": o.r.cpu(), "r_rc": o.r_rc.cpu(), "c_star": o.c_rc.cpu(), "r_shared": o.r_shared}
            for name, solver in restart_rules.items():
                rec = _Recorder(denoiser)
                x_next, _ = solver.rule.step(rec, cur, t_next, [], interval.remaining)
                errs[name] = (x_next - target).reshape(B, -1).norm(dim=-1)
                outputs = getattr(solver.rule, "last_outputs", None)
                if outputs:  # AMED: the predictor's (r, c, a) for this interval
                    r, c, a = (v.detach().to(torch.float64).cpu() for v in outputs[-1])
                    entry[f"{name}_r"], entry[f"{name}_c"], entry[f"{name}_a"] = distribution(r), distribution(c), distribution(a)
                    raw[f"{name}_r"] = r
                elif len(rec.sigmas) == 1:  # a mean-direction rule: the ratio of the time it queried
                    entry[f"{name}_r"] = distribution(ratio_of_mid_time(cur.t, t_next, rec.sigmas[0]))
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
            # the oracle interval after interval from its own output
            oracle = OracleRule(targets, search, modes=(mode,), mode=mode)
            rs = []
            with torch.no_grad():
                for interval in Solver(oracle, afs=True).steps(denoiser, targets[:, 0], sigmas):
                    calls += oracle.last.calls
                    rs.append(oracle.ratio())
                    x = interval.x_next
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
def analysis_settings(acfg: Mapping, schedule: Mapping, model) -> SimpleNamespace:
    """``analysis.*`` checked and built (solvers, grids, oracle options) before any compute; a bad value
    is a ValueError naming the key and what is accepted."""
    sched = ScheduleSpec.from_cfg(schedule)
    sched.check()
    nfes = [int(n) for n in acfg["nfes"]]
    points = coarse_num_points(nfes)
    fine_cfg, ocfg = acfg["fine"], acfg["oracle"]
    fine_steps = fine_steps_for(list(points.values()), int(fine_cfg["steps"]))
    restart = {name: make_solver(name, afs=True) for name in list(ocfg.get("restart_solvers") or [])}
    for name, solver in restart.items():
        if solver.rule.history_size or solver.rule.nfe_per_step != 2:
            raise ValueError(f"analysis.oracle.restart_solvers: {name!r} is not a single-step 2-NFE rule; "
                             "accepted: heun, midpoint, dpm2")
    classical = {name: SolverSpec.named(name).build() for name in acfg.get("solvers") or []}
    chained = ocfg.get("chained", list(MODES))
    chained = list(MODES) if chained is True else [] if chained in (False, None) else [str(m) for m in chained]
    if set(chained) - set(MODES):
        raise ValueError(f"analysis.oracle.chained={chained!r}; accepted: true, false or a list of {', '.join(MODES)}")
    c_bounds = ocfg.get("c_bounds")
    if c_bounds is not None and (len(c_bounds) != 2 or not float(c_bounds[0]) < float(c_bounds[1])):
        raise ValueError(f"analysis.oracle.c_bounds={c_bounds!r}: null or [low, high] with low < high")
    amed_mode(acfg.get("amed") or {})
    search = OracleSearch(int(ocfg.get("grid_points", 9)), int(ocfg.get("iters", 8)),
                          None if c_bounds is None else [float(c) for c in c_bounds], bool(ocfg.get("joint_rc", False)))
    return SimpleNamespace(schedule=sched, nfes=nfes, points=points, fine_solver=make_solver(str(fine_cfg["solver"])),
                           fine_steps=fine_steps, fine_sigmas=sched.grid(fine_steps + 1), restart=restart,
                           classical=classical, search=search, chained=chained,
                           dtype=parse_dtype(acfg.get("dtype", "auto"), "analysis.dtype", model),
                           check_half_steps=fine_cfg.get("check_half_steps", True), num_samples=int(acfg["num_samples"]),
                           max_components=int(acfg.get("max_components", 4)))


def fine_trajectories(model, st: SimpleNamespace, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T = sigma_max z, seeded by ``seed``; the fine trajectories from it, [B, steps + 1, ...])."""
    g = torch.Generator().manual_seed(int(seed))
    x_T = (torch.randn(st.num_samples, *model.sample_shape, generator=g, dtype=torch.float64)
           * float(st.schedule.sigma_max)).to(device=device, dtype=st.dtype)
    return x_T, sample_trajectories(model, st.fine_solver, x_T, st.fine_sigmas)


def fine_check(model, st: SimpleNamespace, x_T: torch.Tensor, traj: torch.Tensor) -> dict:
    """The fine run's own error: against the exact solution if the model has one, else against the
    same solver with half the steps."""
    smin, smax = float(st.schedule.sigma_min), float(st.schedule.sigma_max)
    if hasattr(model, "reference"):
        return {"rmse_vs_reference": rmse(traj[:, -1], model.reference(x_T, smax, smin))}
    if st.check_half_steps:
        with torch.no_grad():
            x_half = st.fine_solver.sample(model, x_T, st.schedule.grid(st.fine_steps // 2 + 1))
        # for a 2nd-order solver the fine run's own error is about a third of this difference
        return {"rmse_vs_half_steps": rmse(traj[:, -1], x_half)}
    return {}


def final_rmse(model, st: SimpleNamespace, amed: dict, oracle: dict, x_T: torch.Tensor, traj: torch.Tensor) -> dict:
    """Final-sample RMSE against the fine trajectory's end: the classical solvers, AMED, the chained oracle."""
    smin = float(st.schedule.sigma_min)
    finals = final_errors(model, st.classical, st.nfes, st.schedule, x_T, traj[:, -1], smin)
    if amed:
        finals["amed"] = {nfe: final_errors(model, {"amed": amed[nfe]}, [nfe], st.schedule, x_T, traj[:, -1], smin)["amed"][nfe]
                          for nfe in st.nfes if nfe in amed}
    for mode, label in ORACLE_NAMES.items():
        if mode in st.chained:
            finals[label] = {nfe: {"rmse": oracle[nfe]["chained"]["final_rmse"][label], "nfe_counted": nfe,
                                   "num_points": st.points[nfe]} for nfe in st.nfes}
    return finals


def analyze(model, acfg: Mapping, schedule: Mapping, seed: int = 0, device: str = "cpu") -> tuple[dict, dict]:
    """Run the analysis described in the module docstring. Returns (JSON-ready results, raw tensors)."""
    st = analysis_settings(acfg, schedule, model)
    model = model.to(device=device, dtype=st.dtype).eval()
    timings, t0 = {}, time.perf_counter()
    x_T, traj = fine_trajectories(model, st, seed, device)
    timings["fine_trajectories"], t0 = time.perf_counter() - t0, time.perf_counter()
    fine = {"solver": st.fine_solver.name, "steps": st.fine_steps, "nfe": st.fine_solver.nfe(st.fine_steps + 1),
            "schedule": dict(schedule), **fine_check(model, st, x_T, traj)}
    timings["fine_check"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    geom = trajectory_geometry(traj, st.max_components)
    pca = summarize_geometry(geom, st.fine_sigmas)
    timings["pca"], t0 = time.perf_counter() - t0, time.perf_counter()
    amed, amed_status = amed_solvers(model, st.nfes, st.schedule.as_dict(), acfg.get("amed") or {}, st.dtype)
    timings["amed_distill"], t0 = time.perf_counter() - t0, time.perf_counter()

    oracle, raw_oracle = {}, {}
    for nfe in st.nfes:
        rules = {**st.restart, **({"amed": amed[nfe]} if nfe in amed else {})}
        oracle[nfe], raw_oracle[nfe] = oracle_on_grid(
            model, traj, st.fine_sigmas, st.fine_steps // (st.points[nfe] - 1), rules, st.search, st.chained)
        oracle[nfe]["nfe"] = nfe
    timings["oracle"], t0 = time.perf_counter() - t0, time.perf_counter()
    finals = final_rmse(model, st, amed, oracle, x_T, traj)
    timings["final_errors"] = time.perf_counter() - t0

    results = {
        "model": None, "schedule": dict(schedule), "num_samples": st.num_samples, "dtype": str(st.dtype).replace("torch.", ""),
        "sample_shape": list(model.sample_shape), "seed": int(seed), "fine": fine, "pca": pca,
        "oracle": {"search": {"grid_points": st.search.grid_points, "iters": st.search.iters,
                              "c_bounds": st.search.c_bounds, "joint_rc": st.search.joint_rc, "chained": st.chained},
                   "nfe": oracle}, "final_rmse": finals, "amed": amed_status, "seconds": timings,
    }
    return results, {"geometry": geom, "fine_sigmas": st.fine_sigmas, "oracle": raw_oracle}
