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
import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ..amed.solvers import AMED_SOLVERS
from ..configs import check_schedule_cfg, solver_from_cfg
from ..io import atomic_write_json
from ..models.base import with_precision
from ..schedules import make_sigmas
from .extractors import create_extractor, extract_features
from .distributed import generate_sharded, world
from .metrics import feature_statistics, fid_from_statistics, kid, quantize, rmse
from .plots import sample_grid_png
from .reference import digest, locked, ode_reference, plain, real_reference, seeds_spec
from . import uncertainty
from .wandb_logger import make_logger

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 1


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
    if name == "learned":  # what is learned (amedlab.learned)
        from ..learned.train import label as learned_label

        return learned_label(node)
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


def input_files(cfg, solver_node: Mapping, weights: str | None, memo_dir=None) -> dict:
    """Content digests of the files a cell reads (model, predictor, extractor weights, real data):
    replacing a file at the same path makes another cell, never a skipped one."""
    from ..cache import file_digest
    from ..models.digits import SHIPPED_TEACHER

    model_path = cfg.model.get("path")
    if model_path in (None, "") and cfg.model.get("name") == "digits_unet":
        model_path = SHIPPED_TEACHER
    real_path = cfg.eval.real.get("path") if cfg.eval.real.get("source") == "path" else None
    return {"model": file_digest(model_path, memo_dir), "predictor": file_digest(solver_node.get("predictor"), memo_dir),
            "extractor_weights": file_digest(weights, memo_dir), "real": file_digest(real_path, memo_dir)}


def cell_spec(cfg, solver_node: Mapping, schedule: Mapping, seeds, extractor: str, weights: str | None,
              files: dict) -> dict:
    """Everything that determines a cell's numbers (not the batch size, threads or logger), files by content."""
    e = cfg.eval
    spec = {
        "files": files,  # input_files(): the inputs by content
        "format": METRICS_FORMAT, "model": plain(cfg.model), "solver": solver_node, "nfe": int(cfg.nfe),
        "schedule": schedule, "seeds": seeds_spec(seeds), "dtype": str(e.dtype), "precision": str(e.get("precision", "fp32")),
        "extractor": extractor, "extractor_weights": weights, "real": plain(e.real),
        "dataset": plain(cfg.dataset) if e.real.source == "dataset" else None,
        "kid": [bool(e.kid), int(e.kid_subsets), int(e.kid_subset_size)], "ode_reference": {k: v for k, v in plain(e.ode_reference).items() if k != "chunk_size"},
    }
    boot = uncertainty.settings(e.get("bootstrap"))  # the intervals' settings (not what is kept on disk)
    spec["bootstrap"] = {"format": uncertainty.FORMAT, **{k: boot[k] for k in uncertainty.NUMERIC_KEYS}}
    if solver_node["name"] in AMED_SOLVERS and not solver_node.get("predictor"):
        spec["distill"] = distill_settings(cfg, solver_node, schedule)
    if solver_node["name"] == "learned":  # its training settings (defaults filled) and teacher
        from ..learned.train import learned_settings

        spec["learned"] = learned_settings(cfg, solver_node, schedule)
    return spec


def check_finite(metrics: Mapping, what: str) -> None:
    """A complete metrics.json never holds NaN or inf (anywhere in it): such a result is an error,
    and nothing is written."""
    from ..validation import ResultError

    bad = {}

    def walk(node, path):
        if isinstance(node, float) and not math.isfinite(node):
            bad[path] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(metrics, "")
    if bad:
        raise ResultError(f"{what}: non-finite values {bad}; metrics.json is not written (the samples or the real "
                          "statistics hold NaN/inf: check the model, eval.dtype and eval.precision)")


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
    """(predictor, info): a cached predictor with the same settings, or a new one (a predictor file
    given as ``solver.predictor`` is opened and checked by the validation, not here)."""
    from ..amed.distill import distill
    from ..amed.predictor import AMEDPredictor
    from ..cache import load_verified

    settings = distill_settings(cfg, solver_node, schedule)
    identity = model.identity()
    key = digest({"model_identity": identity, **settings})
    path = cache_dir / "predictors" / f"{solver_node['name']}-nfe{int(cfg.nfe)}-{key}.pt"
    records_path = path.with_suffix(".json")
    with locked(path):
        # a cached predictor is used only if its digest matches (a corrupt one is logged, removed, re-distilled)
        blob = load_verified(path, what="cached predictor") if use_cache else None
        if blob is not None:
            predictor = AMEDPredictor.from_blob(blob, path)
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
    from ..validation import check_stage

    plan = check_stage(cfg, "evaluate")  # every check and every file opened, before any compute
    e = cfg.eval
    solver_node, nfe, schedule, num_points, seeds = plan.solver_node, plan.nfe, plan.schedule, plan.num_points, plan.seeds
    dtype, extractor, weights, out_dir, boot = plan.dtype, plan.extractor, plan.weights, plan.out_dir, plan.bootstrap
    files = input_files(cfg, solver_node, weights, memo_dir=plan.cache_dir / "file_digests")
    spec = cell_spec(cfg, solver_node, schedule, seeds, extractor, weights, files)
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
    device, precision, cache_dir = plan.device, plan.precision, plan.cache_dir
    label = solver_label(solver_node)
    model = plan.model.to(device).eval()
    with make_logger(cfg.get("logger"), run_name, group, "evaluate", out_dir) as logger:
        logger.log_config(cfg)
        predictor_info = None
        extra = {}
        if solver_node["name"] in AMED_SOLVERS:
            if plan.predictor is not None:  # solver.predictor, opened and checked by the validation
                predictor, predictor_info = plan.predictor, {"source": "file", "path": solver_node["predictor"],
                                                             "sha256": files["predictor"], "records": []}
            else:
                predictor, predictor_info = cell_predictor(model, cfg, solver_node, schedule, cache_dir, bool(e.predictor_cache))
            extra["predictor"] = predictor.to(device)
            logger.log_distillation(predictor_info.pop("records"))
        elif solver_node["name"] == "learned":  # learned grid + coefficients: trained or from the cache
            from ..learned.train import cell_learned

            extra["params"], predictor_info = cell_learned(model, cfg, solver_node, schedule, cache_dir, bool(e.predictor_cache))
            logger.log_distillation(predictor_info.pop("records"), prefix="learned")
        node = {k: v for k, v in solver_node.items() if k in ("name", "afs", "final_step", "options")}
        solver = solver_from_cfg(node, **extra)
        sigmas = make_sigmas(schedule["kind"], num_points, float(schedule["sigma_min"]), float(schedule["sigma_max"]),
                             float(schedule["rho"]))
        if "params" in extra:  # the learned grid, recorded in metrics.json as the grid used
            sigmas = extra["params"].sigmas().detach()

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
                              need_features=bool(e.kid) or (boot["enabled"] and boot["real"]))
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
        # -- intervals (bootstrap over seeds and over the real set) and the per-sample data for paired comparisons --
        unc = uncertainty.evaluate_cell(out_dir, seeds, seeds_spec(seeds), features, real, samples.cpu(), reference.cpu(),
                                        boot, device)

        metrics = {
            "complete": True, "cell_key": key, "label": label, "solver": solver_node["name"],
            "nfe": nfe, "nfe_counted": counted, "num_points": num_points, "fid": fid, **kid_out, "rmse": traj_rmse,
            "num_samples": len(seeds), "seeds": seeds_spec(seeds),
            "schedule": schedule, "sigmas": sigmas.tolist(), "solver_config": solver_node,
            "model": {"name": cfg.model.name, "identity": model.identity() if hasattr(model, "identity") else None},
            "feature_extractor": extractor, "feature_extractor_weights": weights or "shipped",
            "real_data": real["description"], "ode_reference": ref_info,
            "uncertainty": unc, "predictor": predictor_info, "overrides": overrides, "sample_grid": str(grid_path) if grid_path else None,
            "timing": {"sampling_s": sampling_seconds, "metrics_s": metric_seconds, "reference_s": reference_seconds,
                       "distill_s": (predictor_info or {}).get("distill_seconds", 0.0), "uncertainty_s": (unc or {}).get("seconds", 0.0),
                       "total_s": time.perf_counter() - t_start},
            "device": device, "torch_threads": torch.get_num_threads(), "batch_size": int(e.batch_size),
            "precision": precision, "world_size": world()[1],
        }
        check_finite(metrics, f"{label} NFE {nfe}")
        path = atomic_write_json(out_dir / METRICS_FILE, metrics)
        logger.log_metrics({"fid": fid, "kid_mean": kid_out["kid_mean"], "rmse": traj_rmse, "nfe": nfe,
                            "timing": metrics["timing"]}, summary=True)
        logger.log_image("samples", grid_path, caption=f"{label}, NFE {nfe}")
    kid_text = f", KID {kid_out['kid_mean']:.4g}" if kid_out["kid_mean"] is not None else ""
    pm = {k: "" for k in ("fid", "rmse")}
    if unc:
        pm = {"fid": f" ± {unc['z'] * unc['fid']['samples']['se']:.2g}", "rmse": f" ± {unc['z'] * unc['rmse']['se']:.2g}"}
    print(f"{label} NFE {nfe} ({schedule['kind']} rho={schedule['rho']}, {len(seeds)} samples): FID {fid:.4g}{pm['fid']}{kid_text}, "
          f"RMSE vs high-NFE {traj_rmse:.4g}{pm['rmse']}  [{metrics['timing']['total_s']:.1f} s]\nwritten: {path}")
    return fid
