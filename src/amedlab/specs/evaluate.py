"""``stage=evaluate``'s spec, :class:`EvaluateSpec`: one Table 2 cell, built once from the config by
:func:`check_evaluate` (every key typed and bounded, every file opened, the real data checked against
the model and the extractor, every grid built), then passed to the library."""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..io import plain
from ..models.base import DTYPES
from ..schedules import ScheduleSpec
from ..solvers.spec import SolverSpec
from ..solvers.trained import TrainedCell, given_part
from .distill import config_reader
from .solver import DIGITS_NAME, build_checked_model, check_schedule, check_solver_node
from .values import _get, _run_dir, bool_at, check_cache_dir, check_common, check_device, check_writable, choice_at, fail, int_at, user_errors


def _check_cell_solver(cfg) -> tuple[dict, int, dict, int]:
    """solver.*, nfe, schedule and eval.schedule_per_solver: (solver node, nfe, the cell's schedule, grid points)."""
    from ..evaluation.evaluate import cell_schedule
    from ..io import plain
    from ..solvers import available_solvers

    nfe = int_at(cfg, "nfe", 1)
    solver_node = plain(cfg.solver)
    predictor_path = solver_node.get("predictor")
    if predictor_path is not None and not isinstance(predictor_path, str):
        raise fail("solver.predictor", predictor_path, "a file path or null")
    solver_node["predictor"] = str(Path(predictor_path).expanduser().resolve()) if predictor_path else None
    check_schedule(cfg.schedule)
    per_solver = _get(cfg, "eval.schedule_per_solver") or {}
    if not isinstance(per_solver, (dict, DictConfig)):
        raise fail("eval.schedule_per_solver", per_solver, "a mapping {solver name: {kind, rho, sigma_min, sigma_max}}")
    for name in per_solver:  # every entry, not only this cell's: a typo must not pass silently
        if name not in available_solvers():
            near = difflib.get_close_matches(str(name), available_solvers(), n=1)
            raise fail(f"eval.schedule_per_solver.{name}", per_solver[name], ", ".join(available_solvers()),
                       "not a solver name" + (f" (did you mean {near[0]}?)" if near else ""))
        with user_errors(f"eval.schedule_per_solver.{name}"):
            cell_schedule(plain(cfg.schedule), name, plain(per_solver))
    with user_errors(f"eval.schedule_per_solver.{solver_node.get('name')}"):
        schedule = cell_schedule(plain(cfg.schedule), solver_node.get("name"), plain(per_solver))
    _, num_points = check_solver_node(cfg.solver, "solver", nfe)
    name = solver_node.get("name")
    with user_errors(f"eval.schedule_per_solver.{name}" if name in per_solver else "schedule"):
        ScheduleSpec.from_cfg(schedule).grid(num_points)  # the grid the cell samples on: finite, decreasing
    return solver_node, nfe, schedule, num_points


def _check_eval_values(cfg) -> SimpleNamespace:
    """eval.seeds and the plain eval.* values (batch, dtype, precision, KID, flags, bootstrap)."""
    from ..evaluation.uncertainty import settings as bootstrap_settings
    from ..models.base import PRECISIONS
    from ..sampling import parse_seeds

    e = "eval"
    seeds_value = _get(cfg, "eval.seeds")
    if isinstance(seeds_value, bool) or seeds_value in (None, "") or (isinstance(seeds_value, (list, ListConfig)) and not len(seeds_value)):
        raise fail("eval.seeds", seeds_value, "a range like 0-1999, a list like 0-9,20, or a count N >= 1")
    with user_errors("eval.seeds"):
        seeds = parse_seeds(OmegaConf.to_container(seeds_value) if OmegaConf.is_config(seeds_value) else seeds_value)
    batch_size = int_at(cfg, f"{e}.batch_size", 1)
    int_at(cfg, f"{e}.num_threads", 1, null=True)
    dtype_name = choice_at(cfg, f"{e}.dtype", tuple(DTYPES))
    precision = choice_at(cfg, f"{e}.precision", tuple(PRECISIONS))
    kid_on = bool_at(cfg, f"{e}.kid")
    int_at(cfg, f"{e}.kid_subsets", 1)
    int_at(cfg, f"{e}.kid_subset_size", 2)
    int_at(cfg, f"{e}.sample_grid", 0)
    for flag in ("save_samples", "skip_finished", "predictor_cache"):
        bool_at(cfg, f"{e}.{flag}")
    with user_errors("eval.bootstrap"):
        bootstrap = bootstrap_settings(plain(_get(cfg, "eval.bootstrap")))
    return SimpleNamespace(seeds=seeds, batch_size=batch_size, precision=precision, kid=kid_on, bootstrap=bootstrap,
                           dtype=DTYPES[dtype_name])


def _check_real_and_extractor(cfg) -> tuple[str, str | None, str]:
    """eval.real.* and the feature extractor, its weights file opened: (extractor, weights, the value given)."""
    from ..evaluation.extractors import check_extractor_weights, create_extractor, resolve_extractor_name
    from ..evaluation.reference import DIGITS_SPLITS, real_source_from_path

    e = "eval"
    source = choice_at(cfg, f"{e}.real.source", ("dataset", "path"))
    if source == "dataset":
        if _get(cfg, "dataset.name") != "digits":
            raise fail("eval.real.source", source, "path (with eval.real.path)",
                       f"dataset={_get(cfg, 'dataset.name')!r} has no built-in images; only dataset=digits does")
        choice_at(cfg, f"{e}.real.split", DIGITS_SPLITS)
        real = ("dataset", {"shape": [1, int(_get(cfg, "dataset.image_size")), int(_get(cfg, "dataset.image_size"))]})
    else:
        with user_errors("eval.real.path"):
            real = real_source_from_path(_get(cfg, "eval.real.path"))
    fe_name = _get(cfg, f"{e}.feature_extractor")
    with user_errors("eval.feature_extractor"):
        extractor = resolve_extractor_name(str(fe_name), source, _get(cfg, "dataset.name"))
    weights_key = "eval.inception_weights" if extractor != DIGITS_NAME else "eval.digits_classifier"
    with user_errors(weights_key):
        weights = check_extractor_weights(extractor, _get(cfg, "eval.inception_weights"), _get(cfg, "eval.digits_classifier"))
        fe = create_extractor(extractor, weights, "cpu")  # opens the weights file (tensors only) and loads it
    return extractor, weights, fe_name, real, fe


def _real_shapes(kind: str, payload: dict, key: str, value) -> list[list[int]]:
    """The [C, H, W] shapes of the real images (a folder: up to 256 files spread over it, headers only)."""
    if kind == "dataset":
        return [payload["shape"]]
    if kind == "images":
        return [list(payload["images"].shape[1:])]
    from PIL import Image

    files = payload["files"]
    picked = files if len(files) <= 256 else [files[i * (len(files) - 1) // 255] for i in range(256)]
    shapes = set()
    for f in picked:
        try:
            with Image.open(f) as im:
                shapes.add((len(im.getbands()), im.height, im.width))
        except OSError as err:
            raise fail(key, value, "a folder of readable images", f"{f} is not a readable image ({err})") from None
    return [list(s) for s in sorted(shapes)]


def check_data_fits(real: tuple[str, dict], sample_shape, fe, extractor: str, key: str, value) -> None:
    """The real data and the samples are the same kind of image, and precomputed statistics live in the
    extractor's feature space: else FID compares unlike things (e.g. 32x32 samples with 64x64 images)."""
    kind, payload = real
    sample_shape = [int(v) for v in sample_shape]
    if kind == "stats":
        mu, sigma = payload["mu"], payload["sigma"]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise fail(key, value, "mu of shape [d] and sigma of shape [d, d]",
                       f"mu has shape {list(mu.shape)}, sigma {list(sigma.shape)}")
        with torch.no_grad():  # one dummy image of the model's shape: the extractor's feature dimension
            from ..evaluation.extractors import extract_features

            dim = extract_features(fe, torch.zeros(1, *sample_shape, dtype=torch.uint8), 1).shape[1]
        if len(mu) != dim:
            raise fail(key, value, f"statistics of {dim}-d {extractor} features",
                       f"its mu is {len(mu)}-dimensional: the statistics come from another feature extractor")
        return
    shapes = _real_shapes(kind, payload, key, value)
    if shapes != [sample_shape]:
        raise fail(key, value, f"real images of the model's sample shape {sample_shape} [C, H, W]",
                   f"the real images have shape {' and '.join(map(str, shapes))}: FID would compare unlike images")


def _check_ode_reference(cfg, schedule: Mapping) -> None:
    """eval.ode_reference.*: its solver reaches its NFE, its schedule is valid between the cell's ends."""
    from ..io import plain

    ref = _get(cfg, "eval.ode_reference")
    int_at(cfg, "eval.ode_reference.nfe", 1)
    int_at(cfg, "eval.ode_reference.chunk_size", 1, null=True)
    ref_solver = dict(plain(_get(ref, "solver") or {}))
    ref_solver["final_step"] = "sigma_min"
    _, ref_points = check_solver_node(ref_solver, "eval.ode_reference.solver", int(_get(ref, "nfe")), untrained=True)
    ref_sched = plain(_get(ref, "schedule") or {})
    ref_sched = check_schedule({**ref_sched, "sigma_min": schedule["sigma_min"], "sigma_max": schedule["sigma_max"]},
                               "eval.ode_reference.schedule")
    with user_errors("eval.ode_reference.schedule"):
        ScheduleSpec.from_cfg(ref_sched).grid(ref_points)


def _check_image_model(cfg, extractor: str, fe_name):
    """The model, built: an image model whose samples the extractor can read."""
    model = build_checked_model(cfg)
    shape = tuple(getattr(model, "sample_shape", ()))
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise fail("model", _get(cfg, "model.name"), "an image model (samples [C, H, W], C = 1 or 3): digits_unet, "
                   "diffusers, edm_pkl", f"stage=evaluate measures FID on images; this model's samples have shape {list(shape)}")
    if extractor == DIGITS_NAME and (shape[0] != 1 or shape[1] % 8 or shape[2] % 8):
        raise fail("eval.feature_extractor", fe_name, "inception-v3-compat (with eval.inception_weights)",
                   f"the digits classifier reads 1-channel images of a multiple of 8 pixels; the model's are {list(shape)}")
    return model


@dataclass
class EvaluateSpec:
    """``stage=evaluate``: one cell, every setting checked and typed, every file opened. What the
    library below the stage reads (it never sees the config)."""

    model: object                   # the denoiser, built
    model_config: dict              # ``model`` as plain values (the cell key's part)
    model_path: str | None          # the checkpoint whose content enters the key (the shipped teacher's too)
    solver_node: dict               # ``solver`` as plain values, the predictor path resolved
    solver: SolverSpec
    nfe: int
    schedule: dict                  # the cell's schedule (``eval.schedule_per_solver`` applied)
    num_points: int
    seeds: list
    seed: int
    device: str
    dtype: torch.dtype
    dtype_name: str
    precision: str
    batch_size: int
    num_threads: int | None
    kid: bool
    kid_subsets: int
    kid_subset_size: int
    bootstrap: dict
    sample_grid: int
    save_samples: bool
    skip_finished: bool
    predictor_cache: bool
    real: dict                      # ``eval.real`` as plain values
    real_path: str | None           # its file or folder when ``eval.real.source=path``
    dataset: dict
    extractor: str
    weights: str | None
    ode_reference: dict             # ``eval.ode_reference`` as plain values
    out_dir: Path
    cache_dir: Path
    logger: dict                    # ``logger`` as plain values
    config: dict                    # the whole config as plain values (what the logger records)
    trained: object = None          # a trained rule's hook (amedlab.solvers.trained); None: no trained part
    trained_settings: object = None  # what its part is trained for (None: the part is given as a file)
    trained_part: object = None     # the part given as a file (``solver.predictor``), opened and checked
    trained_cell: TrainedCell | None = None  # the cell as the hook sees it (plain values)

    @property
    def schedule_spec(self) -> ScheduleSpec:
        return ScheduleSpec.from_cfg(self.schedule)


def trained_cell(cfg, solver_node: Mapping, schedule: Mapping, eval_seeds, model=None,
                 device: str = "cpu") -> TrainedCell:
    """The cell as a trained rule's hook sees it: plain values, and ``read`` for the parts of the config
    it may name (:func:`amedlab.specs.distill.config_reader`)."""
    nfe = int(cfg.nfe)
    num_points = SolverSpec.from_node(solver_node).num_points(nfe)
    return TrainedCell(solver=plain(dict(solver_node)), nfe=nfe, num_points=num_points, schedule=plain(dict(schedule)),
                       seed=int(cfg.seed), eval_seeds=eval_seeds, dtype=str(cfg.eval.dtype),
                       ode_reference=plain(cfg.eval.ode_reference), batch_size=int(cfg.eval.batch_size),
                       model_name=cfg.model.get("name"), device=device,
                       read=config_reader(cfg, solver_node, schedule, nfe, num_points, model))


def cell_settings(cfg, solver_node: Mapping, schedule: Mapping, eval_seeds, model=None):
    """What the cell's trained part is trained for (its cache key, with the model identity), asked of the
    rule's ``trained`` hook; None for a rule without one or a part given as a file. A bad value is a
    ConfigError naming its key (``solver.distill.*``, ``distill.*``), before any compute."""
    from ..solvers import trained_hook

    hook = trained_hook(solver_node["name"], solver_node.get("_target_"))
    if hook is None:
        return None
    with user_errors("solver.distill"):
        return hook.cell_settings(trained_cell(cfg, solver_node, schedule, eval_seeds, model))



def _check_trained(cfg, solver_node: Mapping, schedule: Mapping, values, model, device: str):
    """(hook, settings, given part, cell) of a rule that needs a trained part, all None for one that
    does not: the rule's ``trained`` hook is asked, never its name (:mod:`amedlab.solvers.trained`)."""
    from ..solvers import trained_hook

    with user_errors("solver._target_" if solver_node.get("_target_") is not None else "solver.name"):
        hook = trained_hook(solver_node["name"], solver_node.get("_target_"))
    if hook is None:
        return None, None, None, None
    cell = trained_cell(cfg, solver_node, schedule, values.seeds, model, device)
    with user_errors("solver.distill"):  # a hook's own errors name their keys
        settings = hook.cell_settings(cell)
        given = given_part(hook, cell)
    return hook, settings, given, cell


def check_evaluate(cfg) -> EvaluateSpec:
    """stage=evaluate: every key of the cell, its files opened; the spec the stage runs."""
    from ..models.digits import SHIPPED_TEACHER

    check_common(cfg, "evaluate")
    device = check_device(cfg)
    solver_node, nfe, schedule, num_points = _check_cell_solver(cfg)
    values = _check_eval_values(cfg)
    extractor, weights, fe_name, real, fe = _check_real_and_extractor(cfg)
    _check_ode_reference(cfg, schedule)
    model = _check_image_model(cfg, extractor, fe_name)
    real_key = "eval.real.path" if real[0] != "dataset" else "dataset.image_size"
    check_data_fits(real, model.sample_shape, fe, extractor, real_key, _get(cfg, real_key))
    # a rule that needs a trained part: its settings (also its cache key) or the file that holds it
    trained, settings, given, cell = _check_trained(cfg, solver_node, schedule, values, model, device)
    # where results and caches go (last: a bad value above leaves no directory behind)
    out_dir = check_writable("hydra.run.dir", _run_dir())
    cache_dir = check_cache_dir(cfg)
    e = cfg.eval
    model_path = cfg.model.get("path")
    if model_path in (None, "") and cfg.model.get("name") == "digits_unet":
        model_path = SHIPPED_TEACHER
    return EvaluateSpec(
        model=model, model_config=plain(cfg.model), model_path=None if model_path in (None, "") else str(model_path),
        solver_node=solver_node, solver=SolverSpec.from_node(solver_node), nfe=nfe, schedule=schedule,
        num_points=num_points, seeds=values.seeds, seed=int(cfg.seed), device=device, dtype=values.dtype,
        dtype_name=str(e.dtype), precision=values.precision, batch_size=values.batch_size,
        num_threads=None if e.get("num_threads") is None else int(e.num_threads), kid=values.kid,
        kid_subsets=int(e.kid_subsets), kid_subset_size=int(e.kid_subset_size), bootstrap=values.bootstrap,
        sample_grid=int(e.sample_grid), save_samples=bool(e.save_samples), skip_finished=bool(e.skip_finished),
        predictor_cache=bool(e.predictor_cache), real=plain(e.real),
        real_path=str(e.real.path) if e.real.get("source") == "path" else None, dataset=plain(cfg.dataset),
        extractor=extractor, weights=weights, ode_reference=plain(e.ode_reference), out_dir=out_dir,
        cache_dir=cache_dir, logger=plain(cfg.get("logger") or {}), config=plain(cfg), trained=trained,
        trained_settings=settings, trained_part=given,
        trained_cell=None if cell is None else dataclasses.replace(cell, cache_dir=cache_dir, read=None))


@dataclass
class ExportSpec:
    """``stage=export``: the cell of ``stage=evaluate`` (model, solver, NFE, schedule, the trained part's
    settings) without its evaluation, and where the export goes. Field names as in :class:`EvaluateSpec`
    where they mean the same (``cell_solver`` reads either)."""

    model: object
    model_name: str | None
    solver_node: dict
    solver: SolverSpec
    nfe: int
    schedule: dict
    num_points: int
    device: str
    out_dir: Path
    cache_dir: Path
    predictor_cache: bool
    trained: object
    trained_settings: object
    trained_part: object
    trained_cell: TrainedCell | None
    command: dict                   # the overrides and config, for the provenance


def check_export(cfg) -> ExportSpec:
    """stage=export: the evaluate cell's solver keys, the model (with features for an AMED rule), the
    trained part's settings or file, and a writable ``export.dir``."""
    from ..solvers import trained_solvers

    check_common(cfg, "export")
    device = check_device(cfg)
    solver_node, nfe, schedule, num_points = _check_cell_solver(cfg)
    values = _check_eval_values(cfg)       # the evaluation seeds: training seeds stay disjoint from them
    _check_ode_reference(cfg, schedule)    # the learned solver's teacher
    model = build_checked_model(cfg)
    trained, settings, given, cell = _check_trained(cfg, solver_node, schedule, values, model, device)
    if trained is None:
        raise fail("solver", solver_node.get("name"), ", ".join(trained_solvers()),
                   "stage=export writes a trained solver (its grid and weights, or its predictor); this rule has no "
                   "trained part: its formulas are the ones in amedlab.solvers")
    if trained.key == "distill":
        from ..interop.export import FEATURE_BACKENDS, feature_block

        if feature_block(model) is None:
            raise fail("model", _get(cfg, "model.name"), "; ".join(FEATURE_BACKENDS.values()),
                       "an AMED rule's predictor reads per-sample features from a block of the model's network; "
                       "this model exposes none another program could hook")
    bool_at(cfg, "eval.predictor_cache")
    folder = _get(cfg, "export.dir")
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        raise fail("export.dir", folder, "a folder, or null (the run directory)")
    out_dir = check_writable("export.dir" if folder else "hydra.run.dir", folder or _run_dir())
    cache_dir = check_cache_dir(cfg)
    return ExportSpec(model=model, model_name=cfg.model.get("name"), solver_node=solver_node,
                      solver=SolverSpec.from_node(solver_node), nfe=nfe, schedule=schedule, num_points=num_points,
                      device=device, out_dir=out_dir, cache_dir=cache_dir,
                      predictor_cache=bool(cfg.eval.predictor_cache), trained=trained, trained_settings=settings,
                      trained_part=given,
                      trained_cell=None if cell is None else dataclasses.replace(cell, cache_dir=cache_dir, read=None),
                      command={"config": plain(cfg)})
