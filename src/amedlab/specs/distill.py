"""AMED's distillation settings from a config (:class:`~amedlab.amed.spec.DistillSpec`), checked: the
``distill``, ``solver.distill`` and ``predictor`` keys, a model's features, a predictor file; and
``stage=distill``'s spec."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..amed.spec import DistillSpec
from ..io import plain
from ..schedules import ScheduleSpec
from .solver import build_checked_model, check_schedule, check_solver_node
from .values import _get, check_cache_dir, check_common, check_device, check_writable, _run_dir, choice_at, fail, float_at, int_at, user_errors


def trajectory_dir(cfg) -> str | None:
    """Where teacher trajectories are cached: ``<cache_dir>/trajectories`` (None: not cached)."""
    root = _get(cfg, "cache_dir")
    return None if root in (None, "") else str(Path(str(root)).expanduser() / "trajectories")


def distill_spec(cfg, solver: Mapping | None = None, schedule: Mapping | None = None) -> DistillSpec:
    """The settings of ``cfg`` (``distill``, ``solver.distill``, ``predictor``, ``nfe``, ``seed``) for
    ``solver`` (default ``cfg.solver``) on ``schedule`` (default ``cfg.schedule``; an evaluation
    cell passes its own, ``eval.schedule_per_solver`` applied). The one translation from a config."""
    node = plain(solver if solver is not None else cfg.solver)
    sdist = dict(node.get("distill") or {})
    dcfg = cfg.distill
    return DistillSpec(
        solver=node["name"], nfe=int(cfg.nfe), schedule=plain(schedule if schedule is not None else cfg.schedule),
        afs=node.get("afs", True), solver_options=dict(node.get("options") or {}), teacher=sdist.get("teacher"),
        M=sdist.get("M"), s_dir=sdist.get("s_dir"), s_time=sdist.get("s_time"),
        num_trajectories=int(dcfg.num_trajectories), batch_size=int(dcfg.batch_size), lr=float(dcfg.lr),
        epochs=int(dcfg.epochs), lr_schedule=str(dcfg.get("lr_schedule", "constant")), predictor_sizes=plain(dict(cfg.get("predictor") or {})), seed=int(cfg.seed),
        objective=sdist.get("objective"), intermediate_weight=sdist.get("intermediate_weight"),
        learn_grid=sdist.get("learn_grid"), grid_lr=sdist.get("grid_lr"),
        cache_dir=trajectory_dir(cfg), gen_batch_size=int(dcfg.get("gen_batch_size", 500)),
        model_name=cfg.model.get("name") if cfg.get("model") is not None else None,
        accelerator=dcfg.get("accelerator", "auto"), devices=dcfg.get("devices", 1),
        strategy=dcfg.get("strategy", "auto"))



def check_distill_settings(cfg, model=None) -> None:
    """distill.*, solver.distill.*, predictor.* (what stage=distill and an AMED cell without a
    predictor file read), and, given the model, that it exposes AMED's features."""
    num = int_at(cfg, "distill.num_trajectories", 1)
    batch = int_at(cfg, "distill.batch_size", 1)
    if num < batch:
        raise fail("distill.num_trajectories", num, f"at least distill.batch_size={batch}",
                   "fewer trajectories than one batch: no update would be made")
    float_at(cfg, "distill.lr", 0, lo_open=True)
    int_at(cfg, "distill.epochs", 1)
    if _get(cfg, "distill.lr_schedule") is not None:
        from ..amed.objectives import LR_SCHEDULES

        choice_at(cfg, "distill.lr_schedule", LR_SCHEDULES)
    int_at(cfg, "distill.gen_batch_size", 1)
    devices = _get(cfg, "distill.devices")
    if devices is not None and not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1)):
        raise fail("distill.devices", devices, "an integer >= 1 or auto")
    if isinstance(devices, int) and batch % devices:
        raise fail("distill.batch_size", batch, f"a multiple of distill.devices={devices}")
    sdist = _get(cfg, "solver.distill") or {}
    if _get(sdist, "M") is not None:
        m = _get(sdist, "M")
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise fail("solver.distill.M", m, "an integer >= 0")
    for name in ("s_dir", "s_time"):
        v = _get(sdist, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1):
            raise fail(f"solver.distill.{name}", v, "a number in [0, 1)")
    if _get(sdist, "teacher") is not None:
        check_solver_node(_get(sdist, "teacher"), "solver.distill.teacher", untrained=True)
    from ..amed.objectives import check_grid_lr, check_learn_grid, check_objective

    objective, weight = _get(sdist, "objective") or "interval", _get(sdist, "intermediate_weight") or 0.0
    with user_errors("solver.distill.objective"):  # before the model is built (distill() checks it for API callers)
        check_objective(objective, weight)
    learn_grid = _get(sdist, "learn_grid")
    with user_errors("solver.distill.learn_grid"):
        check_learn_grid(False if learn_grid is None else learn_grid, objective, weight)
    with user_errors("solver.distill.grid_lr"):
        check_grid_lr(_get(sdist, "grid_lr"), bool(learn_grid))
    for name in ("hidden_dim", "bottleneck_dim", "time_dim"):
        if _get(cfg, f"predictor.{name}") is not None:
            int_at(cfg, f"predictor.{name}", 2 if name == "time_dim" else 1)
    if _get(cfg, "predictor.time_dim") is not None and int(_get(cfg, "predictor.time_dim")) % 2:
        raise fail("predictor.time_dim", _get(cfg, "predictor.time_dim"), "an even integer >= 2")
    if model is not None:
        check_features(cfg, model)


def check_features(cfg, model) -> None:
    if int(getattr(model, "feature_dim", 0) or 0) < 1:
        raise fail("model", _get(cfg, "model.name"), "a model with per-sample features (digits_unet, gaussian_mixture, "
                   "diffusers, edm_pkl)", "AMED's predictor reads the model's features; this model exposes none")


def check_predictor_file(path_value, solver_node: Mapping, nfe: int, sigmas: torch.Tensor, model, key: str = "solver.predictor"):
    """Open ``solver.predictor`` (tensors only) and check it was trained for this solver, NFE, grid,
    AFS setting and model; returns the predictor."""
    from ..amed.predictor import AMEDPredictor

    path = Path(str(path_value)).expanduser()
    if not path.is_file():
        raise fail(key, str(path_value), "a predictor.pt written by stage=distill, or null (distill one)", "no such file",
                   missing=True)
    with user_errors(key):
        predictor = AMEDPredictor.load(path)
    meta = predictor.meta or {}
    trained = {"solver": meta.get("solver"), "nfe": meta.get("nfe"), "afs": meta.get("afs"),
               "base": (meta.get("solver_options") or {}).get("base")}
    asked = {"solver": solver_node["name"], "nfe": int(nfe), "afs": solver_node.get("afs", True),
             "base": (solver_node.get("options") or {}).get("base") if solver_node["name"] == "amed_plugin" else None}
    about = (f"trained for solver={trained['solver']}" + (f" (base {trained['base']})" if trained["base"] else "")
             + f", nfe={trained['nfe']}, afs={trained['afs']}, schedule {meta.get('schedule')}, model {meta.get('model_name')!r}")
    for field in ("solver", "base", "nfe", "afs"):
        if meta and trained[field] != asked[field] and not (field == "base" and asked["solver"] != "amed_plugin"):
            raise fail(key, str(path_value), f"a predictor trained for {field}={asked[field]}",
                       f"this predictor was {about}")
    if predictor.feature_dim != int(getattr(model, "feature_dim", 0) or 0):
        raise fail(key, str(path_value), f"a predictor for {getattr(model, 'feature_dim', 0)}-d features",
                   f"it reads {predictor.feature_dim}-d features; {about}")
    learned = predictor.learned_grid()
    if learned is not None:  # it samples on the grid it learned (AMEDPlugin.own_grid), of the same size
        if len(learned) != len(sigmas):
            raise fail(key, str(path_value), f"a predictor for a {len(sigmas)}-point grid",
                       f"it learned a {len(learned)}-point grid; {about}")
        sigmas = learned
    with user_errors(key):
        predictor.check_compatible(model.identity() if hasattr(model, "identity") else None, sigmas, asked["afs"])
    return predictor


def config_reader(cfg, solver_node: Mapping, schedule: Mapping, nfe: int, num_points: int, model):
    """``read(what)`` for a trained rule's hook (:class:`amedlab.solvers.trained.TrainedCell`): the
    checked reading of the parts of the config a hook may name, built only when it asks.

    - ``"distill"``: the ``distill`` group (with ``solver.distill`` and ``predictor``) as the cell's
      :class:`DistillSpec` (checked, its cache folder writable);
    - ``"solver.predictor"``: the predictor file, opened and checked against the cell.
    """
    def read(what: str):
        if what == "distill":
            check_distill_settings(cfg, model)
            check_cache_dir(cfg)
            return distill_spec(cfg, solver_node, schedule)  # also the predictor's cache key
        if what == "solver.predictor":
            sigmas = ScheduleSpec.from_cfg(schedule).grid(num_points)
            return check_predictor_file(_get(cfg, "solver.predictor"), solver_node, nfe, sigmas, model)
        raise ValueError(f"a trained rule asked to read {what!r}; accepted: distill, solver.predictor")

    return read


@dataclass(frozen=True)
class DistillStageSpec:
    """``stage=distill``: the model and the distillation's settings."""

    model: object
    distill: DistillSpec


def check_distill(cfg) -> DistillStageSpec:
    from ..solvers import trained_solvers

    check_common(cfg, "distill")
    name = _get(cfg, "solver.name")
    distilled = trained_solvers(reads="distill")  # the rules trained from the distill group (AMED's)
    if name not in distilled:
        raise fail("solver", name, ", ".join(distilled), "stage=distill needs solver=amed or solver=amed_plugin (a rule whose trained part is a distilled predictor)")
    check_device(cfg)
    nfe = int_at(cfg, "nfe", 1)
    schedule = check_schedule(cfg.schedule)
    _, num_points = check_solver_node(cfg.solver, "solver", nfe)
    with user_errors("schedule"):
        ScheduleSpec.from_cfg(schedule).grid(num_points)
    check_distill_settings(cfg)
    check_writable("hydra.run.dir", _run_dir())
    check_cache_dir(cfg)
    model = build_checked_model(cfg)
    check_features(cfg, model)
    return DistillStageSpec(model=model, distill=distill_spec(cfg))
