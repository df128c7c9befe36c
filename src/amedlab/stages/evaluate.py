"""``stage=evaluate``: one cell of Table 2 (a model, a solver, an NFE, a schedule).

Samples ``eval.seeds`` (one generator per seed), quantises them as the paper does, and writes to the
run directory ``metrics.json`` (FID and KID against cached real-data statistics, the RMSE against a
cached high-NFE solution from the same noise, the schedule and grid used, the counted NFE, timings)
and ``samples.png``, and ``preview.npz`` (the first images and their seeds, for the sweep's picture). A
run directory holding a complete ``metrics.json`` for the same cell key is skipped; one from before
previews were kept only gains its preview (:func:`add_preview`), its metrics are not recomputed. A cell
whose sampler is exactly ``eval.ode_reference`` is the table's limit cell: it takes the cached reference
as its samples instead of sampling (:func:`amedlab.evaluation.evaluate.is_limit_cell`). The library part
is :mod:`amedlab.evaluation.evaluate`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..evaluation import uncertainty
from ..evaluation.distributed import generate_sharded, world
from ..evaluation.evaluate import (METRICS_FILE, METRICS_FORMAT, PREVIEW_COUNT, bits_environment, cell_grid, cell_solver,
                                   cell_spec, check_finite, extra_outputs, feature_metrics, finished_metrics, input_files,
                                   is_limit_cell, limit_label, limit_samples, preview_from_outputs, read_preview,
                                   save_samples, summary_line, trajectory_error, write_preview)
from ..evaluation.metrics import quantize
from ..sampling import generate
from ..cache import digest, seal, seeds_spec
from ..wandb_logger import make_logger
from ..io import atomic_write_json
from ..models.base import with_precision
from ..specs import check_stage

log = logging.getLogger(__name__)


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


def _skip(out_dir: Path, key: str, outputs) -> dict | None:
    done = finished_metrics(out_dir, key, outputs)
    if done is not None:
        print(f"{done['label']} NFE {done['nfe']}: finished already ({out_dir / METRICS_FILE}); skipped. "
              f"FID {done['fid']:.4g}, RMSE {done['rmse']:.4g}")
    return done


def _regenerated_preview(spec, files, metrics: dict):
    """(the first images, None) sampled again for a finished cell that kept none, or (None, why not).
    The first batch of ``eval.batch_size`` seeds, as the cell sampled it (the same batch, the same
    bits on the same machine); a trained part only from where the cell had it, never trained again."""
    info = metrics.get("predictor") or {}
    if spec.trained is not None and not (info.get("path") and Path(str(info["path"])).is_file()):
        return None, (f"its trained part ({info.get('path') or 'not recorded'}) is no longer there; re-run the cell "
                      "with eval.skip_finished=false for a preview")
    model = spec.model.to(spec.device).eval()
    solver, _ = cell_solver(spec, model, files, True)
    sigmas = cell_grid(spec, solver)
    if sigmas.tolist() != metrics.get("sigmas"):
        return None, "the grid its solver gives now is not the one metrics.json records"
    first = list(spec.seeds)[:max(PREVIEW_COUNT, spec.batch_size)]  # generate() batches them as the cell did
    samples, _ = generate(with_precision(model, spec.precision), solver, sigmas, first, spec.batch_size, spec.dtype,
                          spec.device)
    return quantize(samples), None


def add_preview(spec, files, done: dict) -> dict:
    """A finished cell without a usable preview gains one, its metrics untouched: from the files it wrote
    (``samples.npz``, ``samples.png``), else sampled again (:func:`_regenerated_preview`); then
    ``metrics.json`` records it and is sealed again (atomically). A cell that cannot have one is left as
    it is, with a warning (the table shows it blank)."""
    out_dir = spec.out_dir
    found = preview_from_outputs(out_dir, done, spec.seeds)
    if found is not None:
        images, source = found
    else:
        try:
            images, why = _regenerated_preview(spec, files, done)
        except Exception as err:  # noqa: BLE001 - the cell is finished: a preview it cannot have never fails it
            images, why = None, f"sampling it again failed: {type(err).__name__}: {err}"
        if images is None:
            log.warning("%s: no preview added (%s); its metrics stand", out_dir / METRICS_FILE, why)
            return done
        source = "regenerated"
    record = {k: v for k, v in done.items() if k != "digest"}
    record["preview"] = write_preview(out_dir, images, spec.seeds, source)
    atomic_write_json(out_dir / METRICS_FILE, seal(record))
    print(f"{done['label']} NFE {done['nfe']}: {out_dir / 'preview.npz'} added (from {source}); metrics unchanged")
    return record


def _finished(spec, files, key: str, outputs) -> dict | None:
    """The cell's metrics if it is finished (``eval.skip_finished``); one finished before previews were
    kept (or whose preview is lost) gains one first."""
    done = _skip(spec.out_dir, key, outputs) if spec.skip_finished else None
    if done is not None and read_preview(done, spec.out_dir)[0] is None:
        add_preview(spec, files, done)
    return done


def _samples(spec, model, solver, sigmas, label: str, limit: bool, timing: dict) -> tuple[torch.Tensor, int]:
    """(samples, counted NFE): sampled, or for the limit cell the cached ODE reference itself (the cell
    *is* the reference: sampling it again would only reproduce it, docs/evaluation.md)."""
    t0 = time.perf_counter()
    if limit:
        samples, counted = limit_samples(spec, model)
    else:  # seeds sharded over processes when a torch.distributed group is up (torchrun / SLURM tasks)
        samples, counted = generate_sharded(with_precision(model, spec.precision), solver, sigmas, spec.seeds,
                                            spec.batch_size, spec.dtype, spec.device, progress=f"{label} NFE {spec.nfe}")
    timing["sampling_s"] = time.perf_counter() - t0
    if counted != spec.nfe:
        raise RuntimeError(f"{label}: {counted} model calls counted, nfe={spec.nfe} asked")
    return samples, counted


def run(cfg):
    spec = check_stage(cfg, "evaluate")  # every check, every file opened, before any compute: the cell's spec
    nfe, seeds, out_dir = spec.nfe, spec.seeds, spec.out_dir
    files = input_files(spec, memo_dir=spec.cache_dir / "file_digests")
    key = digest(cell_spec(spec, files))
    outputs = extra_outputs(out_dir, spec.sample_grid, spec.save_samples)
    if (done := _finished(spec, files, key, outputs)) is not None:
        return done["fid"]
    overrides, group, run_name = _hydra_context()
    t_start, timing = time.perf_counter(), {}
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    limit = is_limit_cell(spec)  # the sampler is eval.ode_reference's: the table's limit row
    label = limit_label(spec.ode_reference) if limit else spec.solver.label
    model = spec.model.to(spec.device).eval()
    with make_logger(spec.logger, run_name, group, "evaluate", out_dir) as logger:
        logger.log_config(spec.config)
        solver, predictor_info = cell_solver(spec, model, files, spec.predictor_cache)
        if predictor_info is not None:
            logger.log_distillation(predictor_info.pop("records"), spec.trained.key)
        sigmas = cell_grid(spec, solver)  # the learned solver's own grid is the one recorded
        samples, counted = _samples(spec, model, solver, sigmas, label, limit, timing)
        images = quantize(samples)
        grid_path = save_samples(out_dir, images, seeds, spec.sample_grid, spec.save_samples)
        preview = write_preview(out_dir, images, seeds)  # the cell's part of the sweep's picture (stage=table)
        t0 = time.perf_counter()
        fm = feature_metrics(spec, images)  # FID / KID against the real data
        timing["metrics_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        traj_rmse, reference, ref_info = trajectory_error(spec, model, solver, samples)
        timing["reference_s"] = time.perf_counter() - t0
        # intervals (bootstrap over seeds and over the real set) and the per-sample data for paired comparisons
        unc = uncertainty.evaluate_cell(out_dir, seeds, fm["features"], fm["real"], samples.cpu(),
                                        reference.cpu(), spec.bootstrap, spec.device)
        timing.update(distill_s=(predictor_info or {}).get("distill_seconds", 0.0),
                      uncertainty_s=(unc or {}).get("seconds", 0.0), total_s=time.perf_counter() - t_start)
        metrics = {
            "complete": True, "format": METRICS_FORMAT, "cell_key": key, "label": label, "solver": spec.solver.name,
            **({"limit": True} if limit else {}),  # optional within format 2: absent is false
            "nfe": nfe, "nfe_counted": counted, "num_points": spec.num_points, "fid": fm["fid"], **fm["kid"],
            "rmse": traj_rmse, "num_samples": len(seeds), "seeds": seeds_spec(seeds), "seed": spec.seed,
            "schedule": spec.schedule, "sigmas": sigmas.tolist(), "solver_config": spec.solver_node,
            "model": {"name": spec.model_config.get("name"), "identity": model.identity() if hasattr(model, "identity") else None},
            "feature_extractor": spec.extractor, "feature_extractor_weights": spec.weights or "shipped",
            "real_data": fm["real"]["description"], "ode_reference": ref_info, "uncertainty": unc,
            "predictor": predictor_info, "overrides": overrides, "sample_grid": str(grid_path) if grid_path else None,
            "preview": preview, "timing": timing, "device": spec.device, "torch_threads": torch.get_num_threads(),
            "batch_size": spec.batch_size, "precision": spec.precision, "world_size": world()[1],
            "sample_shape": list(samples.shape[1:]), "real_shape": fm["real"]["description"].get("shape"),
            "environment": bits_environment(spec.device, spec.dtype),  # what decides the last bits (docs/reliability.md)
        }
        check_finite(metrics, f"{label} NFE {nfe}")
        path = atomic_write_json(out_dir / METRICS_FILE, seal(metrics))
        logger.log_metrics({"fid": fm["fid"], "kid_mean": metrics["kid_mean"], "rmse": traj_rmse, "nfe": nfe,
                            "timing": timing}, summary=True)
        logger.log_image("samples", grid_path, caption=f"{label}, NFE {nfe}")
    print(summary_line(metrics, unc, path))
    return fm["fid"]
