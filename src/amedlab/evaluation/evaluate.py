"""``stage=evaluate``: one cell of Table 2 (a model, a solver, an NFE, a schedule).

Samples ``eval.seeds`` (one generator per seed), quantises them as the paper does, and writes to the
run directory ``metrics.json`` (FID and KID through torch-fidelity against cached real-data
statistics, the RMSE against a cached high-NFE solution from the same noise, the schedule and grid
actually used, the counted NFE, timings) and ``samples.png``. An AMED cell first loads its predictor
(``solver.predictor``), or reuses one distilled earlier for the same settings
(``<eval.cache_dir>/predictors``), or distills it (teacher trajectories cached in
``distill.cache_dir``, shared by all cells).

A run directory that already holds a complete ``metrics.json`` for the same cell (same key: the
settings that determine the numbers) is not recomputed: re-running a sweep skips finished cells
and a killed sweep resumes where it stopped. ``metrics.json`` is written atomically, last.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ..configs import check_schedule_cfg, solver_from_cfg
from ..io import atomic_write_json, run_dir
from ..models.base import PRECISIONS, with_precision
from ..sampling import parse_seeds
from ..schedules import make_sigmas
from .extractors import check_extractor_weights, create_extractor, extract_features, resolve_extractor_name
from .distributed import generate_sharded, world
from .metrics import feature_statistics, fid_from_statistics, kid, quantize, rmse
from .plots import sample_grid_png
from .reference import digest, locked, ode_reference, plain, real_reference, seeds_spec
from .wandb_logger import check_logger_cfg, make_logger

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 1
AMED_SOLVERS = ("amed", "amed_plugin")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------------
# What a cell is
# ------------------------------------------------------------------------------------------------

def cell_schedule(schedule: Mapping, solver_name: str, per_solver: Mapping | None) -> dict:
    """The run's schedule with ``eval.schedule_per_solver[solver_name]`` applied on top."""
    out = plain(dict(schedule))
    override = (per_solver or {}).get(solver_name)
    if override:
        unknown = set(override) - {"kind", "rho", "sigma_min", "sigma_max"}
        if unknown:
            raise ValueError(f"eval.schedule_per_solver.{solver_name} has unknown keys {sorted(unknown)}; "
                             "accepted: kind, rho, sigma_min, sigma_max")
        out.update(plain(dict(override)))
    check_schedule_cfg(out)
    return out


def solver_label(node: Mapping) -> str:
    """The paper's row name for a solver config (Table 2)."""
    name, afs = node["name"], node.get("afs", False)
    options = dict(node.get("options") or {})
    names = {"euler": "DDIM (Euler)", "heun": "EDM (Heun)", "midpoint": "Midpoint", "dpm2": "DPM-Solver-2",
             "dpmpp2m": "DPM-Solver++(2M)", "dpmpp3m": "DPM-Solver++(3M)", "dpmpp": "DPM-Solver++",
             "unipc": "UniPC", "ipndm": "iPNDM", "amed": "AMED-Solver"}
    if name == "amed_plugin":
        base = str(options.get("base", "ipndm"))
        base_name = {"euler": "DDIM", "dpm2": "DPM-Solver-2", "ipndm": "iPNDM", "dpmpp": "DPM-Solver++"}.get(base, base)
        return f"AMED-Plugin (on {base_name}{''.join(', ' + t for t in _variant_tags(node))})"
    label = names.get(name, name)
    if name == "amed" and _variant_tags(node):
        return f"{label} ({', '.join(_variant_tags(node))})"
    if dict(node.get("options") or {}).get("variable_step"):
        label += " (variable-step)"
    if afs and name != "amed":
        tag = "AFS-mean" if afs == "mean" else "AFS"
        label = label[:-1] + f", {tag})" if label.endswith(")") else label + f" ({tag})"
    return label


def _variant_tags(node: Mapping) -> list[str]:
    """What an AMED row does differently from the paper's recipe (variable-step base, AFS, objective)."""
    options, sdist = dict(node.get("options") or {}), dict(node.get("distill") or {})
    tags = ["variable-step"] if options.get("variable_step") else []
    if node.get("afs") == "mean":
        tags.append("AFS-mean")
    if sdist.get("objective", "interval") != "interval":
        tags.append(f"{sdist['objective']} objective")
    return tags


def _validate_solver(node: Mapping, nfe: int):
    """Build the solver once (with a stand-in predictor for AMED) to check its name, options and NFE."""
    extra = {}
    if node["name"] in AMED_SOLVERS:
        from ..amed.predictor import AMEDPredictor

        extra["predictor"] = AMEDPredictor(feature_dim=1)
    solver = solver_from_cfg(node, **extra)
    return solver.num_points(int(nfe))


def _checked_predictor_path(path) -> str | None:
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"solver.predictor={str(path)!r}: no such predictor file (null: distill one)")
    return str(p.resolve())


def distill_settings(cfg, solver_node: Mapping, schedule: Mapping) -> dict:
    """The arguments of :func:`amedlab.amed.distill` for this cell (also the predictor's cache key)."""
    sdist = plain(dict(cfg.solver.get("distill") or {}))
    dcfg = cfg.distill
    return {
        "solver": solver_node["name"], "nfe": int(cfg.nfe), "schedule": schedule, "afs": solver_node.get("afs", True),
        "solver_options": dict(solver_node.get("options") or {}), "teacher": sdist.get("teacher"), "M": sdist.get("M"),
        "s_dir": sdist.get("s_dir"), "s_time": sdist.get("s_time"), "num_trajectories": int(dcfg.num_trajectories),
        "batch_size": int(dcfg.batch_size), "lr": float(dcfg.lr), "epochs": int(dcfg.epochs),
        "predictor_sizes": plain(dict(cfg.get("predictor") or {})), "seed": int(cfg.seed),
        # only when set, so the paper's default keeps its cache key
        **{k: sdist[k] for k in ("objective", "intermediate_weight") if k in sdist},
    }


def cell_spec(cfg, solver_node: Mapping, schedule: Mapping, seeds, extractor: str, weights: str | None) -> dict:
    """Everything that determines a cell's numbers (not the batch size, threads or logger)."""
    e = cfg.eval
    spec = {
        "format": METRICS_FORMAT, "model": plain(cfg.model), "solver": solver_node, "nfe": int(cfg.nfe),
        "schedule": schedule, "seeds": seeds_spec(seeds), "dtype": str(e.dtype), "precision": str(e.get("precision", "fp32")),
        "extractor": extractor, "extractor_weights": weights, "real": plain(e.real),
        "dataset": plain(cfg.dataset) if e.real.source == "dataset" else None,
        "kid": [bool(e.kid), int(e.kid_subsets), int(e.kid_subset_size)], "ode_reference": {k: v for k, v in plain(e.ode_reference).items() if k != "chunk_size"},
    }
    if solver_node["name"] in AMED_SOLVERS and not solver_node.get("predictor"):
        spec["distill"] = distill_settings(cfg, solver_node, schedule)
    return spec


def finished_metrics(out_dir: Path, key: str) -> dict | None:
    """The cell's metrics if ``out_dir`` holds a complete metrics.json for the same key."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("complete") is True and metrics.get("cell_key") == key:
        return metrics
    return None


# ------------------------------------------------------------------------------------------------
# AMED: the predictor of a cell
# ------------------------------------------------------------------------------------------------

def cell_predictor(model, cfg, solver_node: Mapping, schedule: Mapping, cache_dir: Path, use_cache: bool):
    """(predictor, info): the given file, a cached predictor with the same settings, or a new one."""
    from ..amed.distill import distill
    from ..amed.predictor import AMEDPredictor

    given = solver_node.get("predictor")
    if given:
        predictor = AMEDPredictor.load(given)
        return predictor, {"source": "file", "path": str(given), "records": []}
    settings = distill_settings(cfg, solver_node, schedule)
    identity = model.identity()
    key = digest({"model_identity": identity, **settings})
    path = cache_dir / "predictors" / f"{solver_node['name']}-nfe{int(cfg.nfe)}-{key}.pt"
    records_path = path.with_suffix(".json")
    with locked(path):
        if use_cache and path.is_file():
            predictor = AMEDPredictor.load(path)
            records = json.loads(records_path.read_text()).get("records", []) if records_path.is_file() else []
            return predictor, {"source": "cache", "path": str(path), "records": records, "distill_seconds": 0.0}
        import inspect

        accepted = inspect.signature(distill).parameters
        lightning = {k: cfg.distill[k] for k in ("accelerator", "devices", "strategy") if k in cfg.distill and k in accepted}
        t0 = time.perf_counter()
        predictor = distill(
            model, solver=settings["solver"], nfe=settings["nfe"], schedule=schedule, afs=settings["afs"],
            solver_options=settings["solver_options"], teacher=settings["teacher"], M=settings["M"],
            s_dir=settings["s_dir"], s_time=settings["s_time"], num_trajectories=settings["num_trajectories"],
            batch_size=settings["batch_size"], lr=settings["lr"], epochs=settings["epochs"],
            predictor_sizes=settings["predictor_sizes"], cache_dir=cfg.distill.cache_dir,
            gen_batch_size=int(cfg.distill.gen_batch_size), seed=settings["seed"], model_name=cfg.model.name, **lightning,
            **{k: settings[k] for k in ("objective", "intermediate_weight") if k in settings})
        seconds = time.perf_counter() - t0
        predictor.save(path)
        atomic_write_json(records_path, {"settings": settings, "meta": predictor.meta, "records": predictor.records})
    return predictor, {"source": "distilled", "path": str(path), "records": predictor.records, "distill_seconds": seconds}


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def _hydra_context() -> tuple[list[str], str | None, str]:
    """(task overrides, sweep group or None, a run name) of the current Hydra job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        multirun = hc.mode == RunMode.MULTIRUN
        group = Path(hc.sweep.dir).name if multirun else None
        return overrides, group, (hc.job.override_dirname or hc.job.name)
    except ValueError:
        return [], None, "evaluate"


def run(cfg):
    e = cfg.eval
    # -- every check before any compute --
    check_logger_cfg(cfg.get("logger") or {})
    solver_node = plain(cfg.solver)
    solver_node["predictor"] = _checked_predictor_path(solver_node.get("predictor"))
    nfe = int(cfg.nfe)
    schedule = cell_schedule(cfg.schedule, solver_node["name"], e.get("schedule_per_solver"))
    num_points = _validate_solver(solver_node, nfe)
    seeds = parse_seeds(e.seeds)
    if str(e.dtype) not in DTYPES:
        raise ValueError(f"eval.dtype={e.dtype!r}; accepted: {', '.join(DTYPES)}")
    dtype = DTYPES[str(e.dtype)]
    extractor = resolve_extractor_name(str(e.feature_extractor), str(e.real.source), cfg.dataset.get("name"))
    weights = check_extractor_weights(extractor, e.get("inception_weights"), e.get("digits_classifier"))
    if e.real.source == "path":
        from .reference import real_source_from_path

        real_source_from_path(e.real.path)  # a missing or unreadable path fails here, not after sampling
    out_dir = run_dir()
    spec = cell_spec(cfg, solver_node, schedule, seeds, extractor, weights)
    key = digest(spec)
    if bool(e.skip_finished):
        done = finished_metrics(out_dir, key)
        if done is not None:
            print(f"{done['label']} NFE {done['nfe']}: finished already ({out_dir / METRICS_FILE}); skipped. "
                  f"FID {done['fid']:.4g}, RMSE {done['rmse']:.4g}")
            return done["fid"]

    overrides, group, run_name = _hydra_context()
    t_start = time.perf_counter()
    if e.get("num_threads"):
        torch.set_num_threads(int(e.num_threads))
    device = str(cfg.get("device", "cpu"))
    precision = str(e.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ValueError(f"eval.precision={precision!r}; accepted: {', '.join(PRECISIONS)}")
    cache_dir = Path(str(e.cache_dir))
    label = solver_label(solver_node)

    from ..models import build_model

    model = build_model(cfg.model).to(device).eval()
    with make_logger(cfg.get("logger"), run_name, group, "evaluate", out_dir) as logger:
        logger.log_config(cfg)
        predictor_info = None
        extra = {}
        if solver_node["name"] in AMED_SOLVERS:
            predictor, predictor_info = cell_predictor(model, cfg, solver_node, schedule, cache_dir, bool(e.predictor_cache))
            extra["predictor"] = predictor.to(device)
            logger.log_distillation(predictor_info.pop("records"))
        node = {k: v for k, v in solver_node.items() if k in ("name", "afs", "final_step", "options")}
        solver = solver_from_cfg(node, **extra)
        sigmas = make_sigmas(schedule["kind"], num_points, float(schedule["sigma_min"]), float(schedule["sigma_max"]),
                             float(schedule["rho"]))

        t0 = time.perf_counter()
        # seeds sharded over processes when a torch.distributed group is up (torchrun / SLURM tasks)
        samples, counted = generate_sharded(with_precision(model, precision), solver, sigmas, seeds, int(e.batch_size),
                                            dtype, device, progress=f"{label} NFE {nfe}")
        sampling_seconds = time.perf_counter() - t0
        if counted != nfe:
            raise RuntimeError(f"{label}: {counted} model calls counted, nfe={nfe} asked")
        images = quantize(samples)
        grid_path = None
        if int(e.sample_grid) > 0:
            grid_path = sample_grid_png(images[: int(e.sample_grid)], out_dir / "samples.png")
        if bool(e.get("save_samples", False)):
            import io

            import numpy as np

            from ..io import atomic_write_bytes

            buf = io.BytesIO()
            np.savez_compressed(buf, images=images.numpy(), seeds=np.asarray(seeds))
            atomic_write_bytes(out_dir / "samples.npz", buf.getvalue())

        # -- FID / KID against the real data (torch-fidelity) --
        t0 = time.perf_counter()
        real = real_reference(e.real, cfg.dataset, extractor, weights, cache_dir, device, int(e.batch_size),
                              need_features=bool(e.kid))
        fe = create_extractor(extractor, weights, device)
        features = extract_features(fe, images, int(e.batch_size))
        fid = fid_from_statistics(feature_statistics(features), real)
        kid_out = {"kid_mean": None, "kid_std": None, "kid_subset_size": None, "kid_subsets": None}
        if bool(e.kid) and real["features"] is not None:
            kid_out = kid(features, real["features"], int(e.kid_subsets), int(e.kid_subset_size), seed=int(cfg.seed))
        metric_seconds = time.perf_counter() - t0

        # -- trajectory error against the high-NFE solution from the same noise --
        t0 = time.perf_counter()
        reference, ref_info = ode_reference(model, e.ode_reference, float(schedule["sigma_min"]), float(schedule["sigma_max"]),
                                            seeds, cache_dir, int(e.batch_size), dtype, device)
        if solver.final_step == "denoise":  # the cell ends on D(x, sigma_min): compare like with like
            with torch.no_grad():
                reference = torch.cat([model(r.to(device), float(schedule["sigma_min"])).cpu()
                                       for r in reference.split(int(e.batch_size))])
        traj_rmse = rmse(samples, reference)
        reference_seconds = time.perf_counter() - t0

        metrics = {
            "complete": True, "cell_key": key, "label": label, "solver": solver_node["name"],
            "nfe": nfe, "nfe_counted": counted, "num_points": num_points, "fid": fid, **kid_out, "rmse": traj_rmse,
            "num_samples": len(seeds), "seeds": seeds_spec(seeds),
            "schedule": schedule, "sigmas": sigmas.tolist(), "solver_config": solver_node,
            "model": {"name": cfg.model.name, "identity": model.identity() if hasattr(model, "identity") else None},
            "feature_extractor": extractor, "feature_extractor_weights": weights or "shipped",
            "real_data": real["description"], "ode_reference": ref_info,
            "predictor": predictor_info, "overrides": overrides, "sample_grid": str(grid_path) if grid_path else None,
            "timing": {"sampling_s": sampling_seconds, "metrics_s": metric_seconds, "reference_s": reference_seconds,
                       "distill_s": (predictor_info or {}).get("distill_seconds", 0.0),
                       "total_s": time.perf_counter() - t_start},
            "device": device, "torch_threads": torch.get_num_threads(), "batch_size": int(e.batch_size),
            "precision": precision, "world_size": world()[1],
        }
        path = atomic_write_json(out_dir / METRICS_FILE, metrics)
        logger.log_metrics({"fid": fid, "kid_mean": kid_out["kid_mean"], "rmse": traj_rmse, "nfe": nfe,
                            "timing": metrics["timing"]}, summary=True)
        logger.log_image("samples", grid_path, caption=f"{label}, NFE {nfe}")
    kid_text = f", KID {kid_out['kid_mean']:.4g}" if kid_out["kid_mean"] is not None else ""
    print(f"{label} NFE {nfe} ({schedule['kind']} rho={schedule['rho']}, {len(seeds)} samples): FID {fid:.4g}{kid_text}, "
          f"RMSE vs high-NFE {traj_rmse:.4g}  [{metrics['timing']['total_s']:.1f} s]\nwritten: {path}")
    return fid
