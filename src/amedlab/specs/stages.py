"""The specs of the other stages (compare, table, compare_cells, the training stages, the trajectory
analysis) and :func:`check_stage`, the first call of every stage's ``run(cfg)``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from ..errors import UserError
from ..io import plain
from ..models.base import DTYPES
from ..schedules import ScheduleSpec
from ..solvers.spec import SolverSpec
from .config import load_group
from .distill import check_distill
from .evaluate import check_evaluate, check_export
from .solver import build_checked_model, check_schedule, check_solver_node
from .values import (STAGE_NAMES, _get, cache_root, _run_dir, check_common, check_device, check_metric_names, check_out_dir, check_significance,
                     check_sweep_dir, check_writable, choice_at, fail, float_at, int_at, list_at, user_errors)


@dataclass(frozen=True)
class CompareSpec:
    """``stage=compare``: solvers x NFEs against a model's exact solution."""

    model: object
    solvers: dict
    nfes: list
    schedule: ScheduleSpec
    num_samples: int
    dtype: str
    seed: int


def check_compare(cfg) -> CompareSpec:
    check_common(cfg, "compare")
    schedule = ScheduleSpec.from_cfg(check_schedule(cfg.schedule))
    solvers = list_at(cfg, "compare.solvers")
    nodes = {}
    for name in solvers:
        with user_errors("compare.solvers"):
            nodes[name] = load_group("solver", str(name))
        check_solver_node(nodes[name], f"compare.solvers[{name}]", untrained=True)
    nfes = list_at(cfg, "compare.nfes")
    from ..limits import MAX_NFE

    for n in nfes:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NFE:
            raise fail("compare.nfes", _get(cfg, "compare.nfes"), f"a list of integers in [1, {MAX_NFE}]")
    for name, node in nodes.items():  # every grid the comparison builds: finite, strictly decreasing
        for n in nfes:
            try:
                _, points = check_solver_node(node, f"compare.solvers[{name}]", n)
            except UserError:  # an NFE a solver cannot reach is skipped by the stage
                continue
            with user_errors("schedule"):
                schedule.grid(points)
    int_at(cfg, "compare.num_samples", 1)
    choice_at(cfg, "compare.dtype", tuple(DTYPES))
    check_writable("hydra.run.dir", _run_dir())
    model = build_checked_model(cfg)
    if not hasattr(model, "reference"):
        raise fail("model", _get(cfg, "model.name"), "gaussian, gaussian_mixture",
                   "stage=compare needs a model with an exact reference solution")
    return CompareSpec(model=model, solvers={name: SolverSpec.from_node(plain(node)) for name, node in nodes.items()},
                       nfes=[int(n) for n in nfes], schedule=schedule, num_samples=int(cfg.compare.num_samples),
                       dtype=str(cfg.compare.dtype), seed=int(cfg.seed))


def check_table(cfg) -> None:
    """stage=table: the keys it reads, the sweep directory, the output directory (the sweep's files
    are classified by the stage before anything is written: amedlab.evaluation.table)."""
    check_common(cfg, "table")
    sweep = check_sweep_dir(cfg)
    check_metric_names(cfg, "table.metrics")
    check_significance(cfg)
    check_out_dir(cfg, "table.out_dir", sweep)


def check_compare_cells(cfg) -> None:
    """stage=compare_cells: the keys it reads, the sweep directory, the two rows, the output directory
    (row names are matched against the sweep's rows by the stage, before anything is written)."""
    check_common(cfg, "compare_cells")
    sweep = check_sweep_dir(cfg)
    rows = _get(cfg, "compare_cells.rows")
    accepted = "two rows (distinct strings), by table label or solver name, e.g. compare_cells.rows=[ipndm,amed_plugin]"
    if not isinstance(rows, (list, tuple, ListConfig)) or len(rows) != 2:
        raise fail("compare_cells.rows", rows, accepted)
    if not all(isinstance(r, str) and r.strip() for r in rows):
        raise fail("compare_cells.rows", rows, accepted, "each row is a non-empty string")
    if rows[0] == rows[1]:
        raise fail("compare_cells.rows", rows, accepted, "both name the same row")
    check_metric_names(cfg, "compare_cells.metrics")
    check_significance(cfg)
    check_out_dir(cfg, "compare_cells.out_dir", sweep)


@dataclass(frozen=True)
class TrainSpec:
    """``stage=train_teacher`` / ``train_features``: the training node, the data set, where it runs."""

    node: dict          # train.teacher or train.features, plain values
    dataset: dict
    device: str
    logger: dict
    seed: int


def check_train(cfg, stage: str) -> TrainSpec:
    check_common(cfg, stage)
    device = check_device(cfg)
    if _get(cfg, "dataset.name") != "digits":
        raise fail("dataset.name", _get(cfg, "dataset.name"), "digits", f"stage={stage} trains on the built-in digits only")
    int_at(cfg, "dataset.image_size", 8)
    if int(_get(cfg, "dataset.image_size")) % 8:
        raise fail("dataset.image_size", _get(cfg, "dataset.image_size"), "a multiple of 8")
    float_at(cfg, "dataset.held_out_fraction", 0, lo_open=True, hi=1, hi_open=True)
    node = "train.teacher" if stage == "train_teacher" else "train.features"
    for key in ("steps", "batch_size", "val_every_steps"):
        int_at(cfg, f"{node}.{key}", 1)
    float_at(cfg, f"{node}.lr", 0, lo_open=True)
    float_at(cfg, f"{node}.max_minutes", 0, lo_open=True, null=True)
    int_at(cfg, f"{node}.num_threads", 1, null=True)
    if stage == "train_teacher":
        for key in ("sigma_data", "p_std", "ema_halflife_steps"):
            float_at(cfg, f"{node}.{key}", 0, lo_open=True)
        int_at(cfg, f"{node}.warmup_steps", 0)
        res, mult = int(_get(cfg, "dataset.image_size")), list_at(cfg, f"{node}.net.channel_mult")
        if res % 2 ** (len(mult) - 1) or res >> (len(mult) - 1) < 2:
            raise fail(f"{node}.net.channel_mult", mult, "a lowest resolution of at least 2x2",
                       f"{len(mult)} levels are too many for dataset.image_size={res}")
    else:
        for key in ("channels", "feature_dim"):
            int_at(cfg, f"{node}.{key}", 1)
        float_at(cfg, f"{node}.dropout", 0, hi=1, hi_open=True)
        int_at(cfg, f"{node}.max_shift", 0)
    check_writable("hydra.run.dir", _run_dir())
    return TrainSpec(node=plain(_get(cfg, node)), dataset=plain(cfg.dataset), device=device,
                     logger=plain(cfg.get("logger") or {}), seed=int(cfg.seed))


def check_analyze(cfg) -> None:
    check_common(cfg, "analyze_trajectories")
    check_device(cfg)
    check_schedule(cfg.schedule)
    int_at(cfg, "analysis.num_samples", 2)
    int_at(cfg, "analysis.max_components", 1)
    choice_at(cfg, "analysis.dtype", ("auto", *DTYPES))
    for n in list_at(cfg, "analysis.nfes"):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise fail("analysis.nfes", _get(cfg, "analysis.nfes"), "a list of odd integers >= 3 (NFE of a 2-NFE-per-step solver with AFS)")
    int_at(cfg, "analysis.fine.steps", 1)
    int_at(cfg, "analysis.num_threads", 1, null=True)
    predictors = _get(cfg, "analysis.amed.predictors") or {}
    if not isinstance(predictors, (dict, DictConfig)):
        raise fail("analysis.amed.predictors", predictors, "a mapping {nfe: predictor file}")
    for nfe, path in predictors.items():
        from ..amed.predictor import AMEDPredictor

        with user_errors(f"analysis.amed.predictors.{nfe}"):
            AMEDPredictor.load(str(path))  # tensors only; a missing or bad file fails here
    check_writable("hydra.run.dir", _run_dir())
    build_checked_model(cfg)


@dataclass(frozen=True)
class CacheSpec:
    """``stage=cache``: the cache folder, and the kind to clear (None: list only)."""

    root: Path
    clear: str | None


def check_cache(cfg) -> CacheSpec:
    from ..cache import cache_kinds

    check_common(cfg, "cache")
    root = cache_root(cfg)
    clear = _get(cfg, "cache.clear")
    kinds = [r["kind"] for r in cache_kinds(root)]
    if clear is not None and (not isinstance(clear, str) or clear not in ("all", *kinds)):
        raise fail("cache.clear", clear, ", ".join(["all", *kinds]),
                   f"no such kind in {root}" if isinstance(clear, str) else None)
    return CacheSpec(root=root, clear=clear)


CHECKS = {"evaluate": check_evaluate, "distill": check_distill, "compare": check_compare, "table": check_table,
          "compare_cells": check_compare_cells,
          "train_teacher": lambda cfg: check_train(cfg, "train_teacher"),
          "train_features": lambda cfg: check_train(cfg, "train_features"),
          "analyze_trajectories": check_analyze, "export": check_export, "cache": check_cache}


def check_stage(cfg, stage: str):
    """Run ``stage``'s checks (the first call of its ``run``); returns what they built, if anything."""
    if stage not in CHECKS:
        raise fail("stage", stage, ", ".join(STAGE_NAMES))
    return CHECKS[stage](cfg)
