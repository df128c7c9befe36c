"""Every user input checked before any compute, one function per stage.

``check_stage(cfg, stage)`` is the first call of every stage's ``run(cfg)``. It checks each key the
stage reads (type, range, accepted values), keys nothing reads (``+eval.sedes=0-9``), the device, the
writability of the run and cache directories, and it opens and validates every file input (format,
kind, shape, what a predictor was trained for). Library errors raised while doing so are turned into
a :class:`ConfigError` that names the key, the value and what is accepted; the command line prints
that one message and exits non-zero (no traceback unless ``HYDRA_FULL_ERROR=1``).

The evaluate, distill and compare checks return what they built (model, predictor, seeds, and the
typed specs of :mod:`amedlab.specs`: the cell's ScheduleSpec and SolverSpec, the DistillSpec), so the
stage neither opens a file twice nor translates a config node a second time.
"""
from __future__ import annotations

import contextlib
import difflib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .amed.solvers import AMED_SOLVERS
from .configs import CONF_DIR, load_group
from .errors import ConfigError, MissingFileError, UserError
from .models.base import DTYPES
from .specs import DistillSpec, ScheduleSpec, SolverSpec
from .stages import STAGE_NAMES


def _fmt(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


def fail(key: str, value, accepted: str | None = None, why: str | None = None, missing: bool = False) -> UserError:
    msg = f"{key}={_fmt(value)}"
    if why:
        msg += f": {why}"
    if accepted:
        msg += f"; accepted: {accepted}"
    return (MissingFileError if missing else ConfigError)(msg, key)


@contextlib.contextmanager
def user_errors(key: str):
    """Turn a library's error about a user's value into a ConfigError naming ``key``."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, OSError, ModuleNotFoundError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, KeyError):
            msg = f"missing entry {msg}"
        if key not in msg:
            msg = f"{key}: {msg}"
        raise (MissingFileError if isinstance(err, FileNotFoundError) else ConfigError)(msg, key) from err


# ------------------------------------------------------------------------------------------------
# typed values
# ------------------------------------------------------------------------------------------------

def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False) if OmegaConf.is_config(cfg) else cfg.get(key)


def int_at(cfg, key: str, lo: int | None = None, hi: int | None = None, null: bool = False):
    """An integer (not a float, not a bool) in [lo, hi]; ``hi`` defaults to the key's bound in
    :mod:`amedlab.limits`, so no integer setting is unbounded."""
    from .limits import upper_bound

    value = _get(cfg, key)
    if value is None and null:
        return None
    hi = upper_bound(key) if hi is None else hi
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or value > hi:
        rng = f"an integer in [{lo if lo is not None else '-inf'}, {hi}]"
        raise fail(key, value, rng + (" or null" if null else ""))
    return int(value)


def float_at(cfg, key: str, lo: float | None = None, lo_open: bool = False, hi: float | None = None,
             hi_open: bool = False, null: bool = False):
    value = _get(cfg, key)
    if value is None and null:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        raise fail(key, value, "a finite number" + (f" {' and '.join(parts)}" if parts else "") + (" or null" if null else ""))
    return float(value)


def bool_at(cfg, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise fail(key, value, "true, false")
    return value


def choice_at(cfg, key: str, choices) -> str:
    value = _get(cfg, key)
    if not isinstance(value, str) or value not in choices:
        raise fail(key, value, ", ".join(map(str, choices)))
    return value


def list_at(cfg, key: str, nonempty: bool = True) -> list:
    value = _get(cfg, key)
    if not isinstance(value, (list, tuple, ListConfig)) or (nonempty and len(value) == 0):
        raise fail(key, value, "a non-empty list" if nonempty else "a list")
    return list(value)


# ------------------------------------------------------------------------------------------------
# keys nothing reads
# ------------------------------------------------------------------------------------------------

#: config nodes whose keys are free (a mapping the code iterates over, or options a builder checks)
OPEN_NODES = ("hydra", "eval.schedule_per_solver", "solver.options", "solver.distill.teacher.options",
              "eval.ode_reference.solver.options", "analysis.amed.predictors", "analysis.amed.distill")
#: group -> the field naming the option file that was chosen (None: one file, default.yaml)
GROUPS = {"model": "name", "schedule": "kind", "solver": "name", "dataset": "name", "logger": None, "train": None,
          "distill": None, "predictor": None, "eval": None, "analysis": None}


def _known_config(cfg) -> DictConfig:
    """conf/config.yaml with each group's chosen option (or the union of its options)."""
    ref = OmegaConf.load(CONF_DIR / "config.yaml")
    ref = OmegaConf.create({k: v for k, v in OmegaConf.to_container(ref, resolve=False).items() if k not in ("defaults", "hydra")})
    for group, field in GROUPS.items():
        options = [OmegaConf.load(f) for f in sorted((CONF_DIR / group).glob("*.yaml"))]
        if field is not None:  # the options that configure the same thing (e.g. every solver file with name: amed)
            chosen = _get(cfg, f"{group}.{field}")
            # the AMED solvers share one distillation (DistillSpec reads the same keys for each)
            kin = AMED_SOLVERS if group == "solver" and chosen in AMED_SOLVERS else (chosen,)
            same = [o for o in options if o.get(field) in kin]
            options = same or options
        elif group != "logger" and (CONF_DIR / group / "default.yaml").is_file():
            options = [OmegaConf.load(CONF_DIR / group / "default.yaml")]
        ref[group] = OmegaConf.merge(*options) if options else {}
    return ref


def _paths(node, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, (dict, DictConfig)):
            out.extend(_paths(v, path + "."))
    return out


def check_known_keys(cfg) -> None:
    """A key nothing reads (typically added with ``+``) is an error naming the nearest known key."""
    known = set(_paths(OmegaConf.to_container(_known_config(cfg), resolve=False)))
    given = _paths(OmegaConf.to_container(cfg, resolve=False))
    for path in given:
        if path in known or any(path == o or path.startswith(o + ".") for o in OPEN_NODES):
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent and parent not in known:
            continue  # below a node already reported, or a value that is not a mapping in the reference
        near = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
        siblings = sorted(k.rsplit(".", 1)[-1] for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{path} is not a known key: nothing reads it{hint}; accepted under "
                          f"{parent or 'the top level'}: {', '.join(siblings)}", path)


#: the key paths where a ``_target_`` (code for Hydra to import and call) may appear. None yet: the
#: project documents no ``_target_`` extension point, and a ``_target_`` in an experiment file or an
#: override would name code to run. Add an entry (e.g. "model._target_") only with the code that reads it.
ALLOWED_TARGETS: tuple[str, ...] = ()


def _targets(node, prefix: str = "") -> list[tuple[str, object]]:
    """(key path, value) of every ``_target_`` key in ``node``: mappings and lists, any depth."""
    if isinstance(node, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), k, v) for k, v in node.items()]
    elif isinstance(node, (list, tuple)):
        items = [(f"{prefix}[{i}]", None, v) for i, v in enumerate(node)]
    else:
        return []
    out = []
    for path, key, value in items:
        if key == "_target_":
            out.append((path, value))
        out.extend(_targets(value, path))
    return out


def check_targets(cfg) -> None:
    """A ``_target_`` key anywhere in the task config, outside ALLOWED_TARGETS, is an error naming it.
    (The hydra node, where present, is Hydra's own: its callbacks are refused by the command line.)"""
    tree = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    tree = {k: v for k, v in tree.items() if k != "hydra"}
    for path, value in _targets(tree):
        if path not in ALLOWED_TARGETS:
            allowed = f" (or only at {', '.join(ALLOWED_TARGETS)})" if ALLOWED_TARGETS else ""
            raise ConfigError(f"{path}={value!r}: a _target_ key names code to import and run, and nothing in this "
                              f"project instantiates it; accepted: no _target_ key{allowed}; remove it from the "
                              "experiment file or the overrides", path)


# ------------------------------------------------------------------------------------------------
# environment: device, writable directories
# ------------------------------------------------------------------------------------------------

def check_device(cfg) -> str:
    device = _get(cfg, "device")
    if not isinstance(device, str) or not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise fail("device", device, "cpu, cuda, cuda:<index>")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise fail("device", device, "cpu", "CUDA is not available on this machine")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise fail("device", device, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}", "no such GPU")
    return device


def check_writable(key: str, directory) -> Path:
    """``directory`` can be created and written (a probe file is created and removed at once)."""
    path = Path(str(directory)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise fail(key, str(directory), "a directory this process can create and write",
                   f"cannot write there ({err.strerror or err})") from None
    return path


def _run_dir() -> Path:
    """The run directory; in a sweep it must lie inside ``hydra.sweep.dir`` (a cell's folder is named
    from its overrides: a swept path value must not choose where results are written)."""
    from .io import run_dir

    path = run_dir()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hc = HydraConfig.get()
        sweep, cell = Path(hc.sweep.dir).expanduser().resolve(), path.expanduser().resolve()
        if not cell.is_relative_to(sweep):
            raise fail("hydra.sweep.subdir", hc.sweep.subdir, "a folder inside hydra.sweep.dir "
                       "(${amedlab.cell_dir:${hydra:job.override_dirname}})",
                       f"the cell would be written to {cell}, outside the sweep folder {sweep}")
    return path


# ------------------------------------------------------------------------------------------------
# pieces shared by the stages
# ------------------------------------------------------------------------------------------------

def check_schedule(node, key: str = "schedule") -> dict:
    from .schedules import SCHEDULES, check_schedule_args

    kind = _get(node, "kind")
    if kind not in SCHEDULES:
        raise fail(f"{key}.kind", kind, ", ".join(SCHEDULES))
    out = {"kind": kind}
    for name in ("sigma_min", "sigma_max", "rho"):
        value = _get(node, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
            raise fail(f"{key}.{name}", value, "a finite number > 0")
        out[name] = float(value)
    with user_errors(key):
        check_schedule_args(kind, 2, out["sigma_min"], out["sigma_max"], out["rho"])
    return out


def check_solver_node(node, key: str = "solver", nfe: int | None = None, predictor=None):
    """Build the solver (a stand-in predictor for AMED) to check name, afs, final_step and options;
    with ``nfe``, also that the NFE is reachable. Returns (solver, num_points or None)."""
    from .configs import solver_from_cfg
    from .solvers.base import check_afs

    if not isinstance(_get(node, "name"), str):
        raise fail(f"{key}.name", _get(node, "name"), "a solver name (conf/solver/*.yaml)")
    with user_errors(f"{key}.afs"):
        check_afs(_get(node, "afs") if _get(node, "afs") is not None else False)
    options = _get(node, "options")
    if options is not None and not isinstance(options, (dict, DictConfig)):
        raise fail(f"{key}.options", options, "a mapping of the solver's options")
    extra = {}
    if _get(node, "name") in AMED_SOLVERS:
        from .amed.predictor import AMEDPredictor

        extra["predictor"] = predictor if predictor is not None else AMEDPredictor(feature_dim=1)
    plain_node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    with user_errors(key):
        solver = solver_from_cfg(plain_node, **extra)
    num_points = None
    if nfe is not None:
        with user_errors("nfe"):
            num_points = solver.num_points(int(nfe))
    return solver, num_points


DIGITS_NAME = "amedlab-digits"  # the digits extractor (amedlab.evaluation.extractors.DIGITS)


def build_checked_model(cfg):
    """The model, built from its config: a missing, unreadable or wrong file is a ConfigError."""
    from .models import build_model

    key = "model.path" if _get(cfg, "model.path") not in (None, "") else "model"
    with user_errors(key):
        return build_model(cfg.model)


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
        from .amed.objectives import LR_SCHEDULES

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
        check_solver_node(_get(sdist, "teacher"), "solver.distill.teacher")
    from .amed.objectives import check_grid_lr, check_learn_grid, check_objective

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
    from .amed.predictor import AMEDPredictor

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


# ------------------------------------------------------------------------------------------------
# the stages
# ------------------------------------------------------------------------------------------------

def check_common(cfg, stage: str) -> None:
    if stage not in STAGE_NAMES:
        raise fail("stage", stage, ", ".join(STAGE_NAMES))
    check_targets(cfg)  # before the unknown keys: a _target_ is refused as code, not as a typo
    check_known_keys(cfg)
    int_at(cfg, "seed", 0)
    if "AMEDLAB_CACHE" in os.environ and not os.environ["AMEDLAB_CACHE"].strip():
        raise fail("AMEDLAB_CACHE", os.environ["AMEDLAB_CACHE"], "a folder for the caches, or unset it (default .cache/amedlab)",
                   "the environment variable is set but empty: the caches would go to the file system's root")
    from .evaluation.wandb_logger import check_logger_cfg

    with user_errors("logger"):
        check_logger_cfg(_get(cfg, "logger") or {})


def _check_cell_solver(cfg) -> tuple[dict, int, dict, int]:
    """solver.*, nfe, schedule and eval.schedule_per_solver: (solver node, nfe, the cell's schedule, grid points)."""
    from .evaluation.evaluate import cell_schedule
    from .io import plain
    from .solvers import available_solvers

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
            cell_schedule(cfg.schedule, name, per_solver)
    with user_errors(f"eval.schedule_per_solver.{solver_node.get('name')}"):
        schedule = cell_schedule(cfg.schedule, solver_node.get("name"), per_solver)
    _, num_points = check_solver_node(cfg.solver, "solver", nfe)
    name = solver_node.get("name")
    with user_errors(f"eval.schedule_per_solver.{name}" if name in per_solver else "schedule"):
        ScheduleSpec.from_cfg(schedule).grid(num_points)  # the grid the cell samples on: finite, decreasing
    return solver_node, nfe, schedule, num_points


def _check_eval_values(cfg) -> SimpleNamespace:
    """eval.seeds and the plain eval.* values (batch, dtype, precision, KID, flags, bootstrap)."""
    from .evaluation.uncertainty import settings as bootstrap_settings
    from .models.base import PRECISIONS
    from .sampling import parse_seeds

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
        bootstrap = bootstrap_settings(_get(cfg, "eval.bootstrap"))
    return SimpleNamespace(seeds=seeds, batch_size=batch_size, precision=precision, kid=kid_on, bootstrap=bootstrap,
                           dtype=DTYPES[dtype_name])


def _check_real_and_extractor(cfg) -> tuple[str, str | None, str]:
    """eval.real.* and the feature extractor, its weights file opened: (extractor, weights, the value given)."""
    from .evaluation.extractors import check_extractor_weights, create_extractor, resolve_extractor_name
    from .evaluation.reference import DIGITS_SPLITS, real_source_from_path

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
            from .evaluation.extractors import extract_features

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
    from .io import plain

    ref = _get(cfg, "eval.ode_reference")
    int_at(cfg, "eval.ode_reference.nfe", 1)
    int_at(cfg, "eval.ode_reference.chunk_size", 1, null=True)
    ref_solver = dict(plain(_get(ref, "solver") or {}))
    ref_solver["final_step"] = "sigma_min"
    _, ref_points = check_solver_node(ref_solver, "eval.ode_reference.solver", int(_get(ref, "nfe")))
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


def check_evaluate(cfg) -> SimpleNamespace:
    """stage=evaluate: every key of the cell, its files opened; returns what was built, the specs included."""
    check_common(cfg, "evaluate")
    device = check_device(cfg)
    solver_node, nfe, schedule, num_points = _check_cell_solver(cfg)
    values = _check_eval_values(cfg)
    learned = None
    if solver_node["name"] == "learned":  # its training settings (also its cache key), seeds disjoint from eval's
        from .learned.settings import learned_settings

        from .learned.settings import start_schedules

        with user_errors("solver.distill"):
            learned = learned_settings(cfg, solver_node, schedule, values.seeds)
        for i, start in enumerate(start_schedules(schedule, learned["starts"])):  # every starting grid training builds
            with user_errors(f"solver.distill.starts[{i}]"):
                ScheduleSpec.from_cfg(start).grid(num_points)
    extractor, weights, fe_name, real, fe = _check_real_and_extractor(cfg)
    _check_ode_reference(cfg, schedule)
    model = _check_image_model(cfg, extractor, fe_name)
    real_key = "eval.real.path" if real[0] != "dataset" else "dataset.image_size"
    check_data_fits(real, model.sample_shape, fe, extractor, real_key, _get(cfg, real_key))
    predictor = distill = None
    if solver_node["name"] in AMED_SOLVERS:  # the predictor file, or the settings to distill one
        if solver_node["predictor"]:
            sigmas = ScheduleSpec.from_cfg(schedule).grid(num_points)
            predictor = check_predictor_file(_get(cfg, "solver.predictor"), solver_node, nfe, sigmas, model)
        else:
            check_distill_settings(cfg, model)
            check_writable("distill.cache_dir", _get(cfg, "distill.cache_dir"))
            distill = DistillSpec.from_cfg(cfg, solver_node, schedule)  # also the predictor's cache key
    # where results and caches go (last: a bad value above leaves no directory behind)
    out_dir = check_writable("hydra.run.dir", _run_dir())
    cache_dir = check_writable("eval.cache_dir", _get(cfg, "eval.cache_dir"))
    return SimpleNamespace(model=model, solver_node=solver_node, solver=SolverSpec.from_cfg(solver_node), nfe=nfe,
                           schedule=schedule, schedule_spec=ScheduleSpec.from_cfg(schedule), num_points=num_points,
                           extractor=extractor, weights=weights, device=device, out_dir=out_dir, cache_dir=cache_dir,
                           predictor=predictor, distill=distill, learned=learned, **vars(values))


def check_distill(cfg) -> SimpleNamespace:
    check_common(cfg, "distill")
    name = _get(cfg, "solver.name")
    if name not in AMED_SOLVERS:
        raise fail("solver", name, "amed, amed_plugin", "stage=distill needs solver=amed or solver=amed_plugin")
    check_device(cfg)
    nfe = int_at(cfg, "nfe", 1)
    schedule = check_schedule(cfg.schedule)
    _, num_points = check_solver_node(cfg.solver, "solver", nfe)
    with user_errors("schedule"):
        ScheduleSpec.from_cfg(schedule).grid(num_points)
    check_distill_settings(cfg)
    check_writable("hydra.run.dir", _run_dir())
    check_writable("distill.cache_dir", _get(cfg, "distill.cache_dir"))
    model = build_checked_model(cfg)
    check_features(cfg, model)
    return SimpleNamespace(model=model, nfe=nfe, num_points=num_points, distill=DistillSpec.from_cfg(cfg))


def check_compare(cfg) -> SimpleNamespace:
    check_common(cfg, "compare")
    schedule = ScheduleSpec.from_cfg(check_schedule(cfg.schedule))
    solvers = list_at(cfg, "compare.solvers")
    nodes = {}
    for name in solvers:
        with user_errors("compare.solvers"):
            nodes[name] = load_group("solver", str(name))
        check_solver_node(nodes[name], f"compare.solvers[{name}]")
    nfes = list_at(cfg, "compare.nfes")
    from .limits import MAX_NFE

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
    return SimpleNamespace(model=model, solvers={name: SolverSpec.from_cfg(node) for name, node in nodes.items()},
                           nfes=[int(n) for n in nfes], schedule=schedule)


def check_sweep_dir(cfg) -> Path:
    """``sweep_dir``: set, and an existing directory (its files are read by the stage, before any output)."""
    sweep = _get(cfg, "sweep_dir")
    if sweep in (None, "") or not isinstance(sweep, str):
        raise fail("sweep_dir", sweep, "a sweep directory (e.g. sweep_dir=outputs/table2_digits)")
    path = Path(sweep).expanduser()
    if path.exists() and not path.is_dir():
        raise fail("sweep_dir", sweep, "an existing sweep directory", "is a file, not a directory")
    if not path.is_dir():
        raise fail("sweep_dir", sweep, "an existing sweep directory", "no such directory", missing=True)
    return path


def check_metric_names(cfg, key: str) -> list[str]:
    """``key``: a non-empty list of distinct metric names (amedlab.evaluation.table.METRICS)."""
    from .evaluation.table import METRICS

    accepted = f"a non-empty list of distinct names from {', '.join(METRICS)}"
    value = _get(cfg, key)
    if not isinstance(value, (list, tuple, ListConfig)) or len(value) == 0:
        raise fail(key, value, accepted)
    for m in value:
        if not isinstance(m, str) or m not in METRICS:
            raise fail(key, value, accepted, f"{m!r} is not a metric")
    if len(set(value)) != len(value):
        raise fail(key, value, accepted, "a metric is named twice")
    return [str(m) for m in value]


def check_significance(cfg) -> tuple[float, str]:
    """``table.significance``: the level of the intervals and what is resampled (stage=table and compare_cells)."""
    from .evaluation.table import SOURCES

    level = float_at(cfg, "table.significance.level", 0.5, hi=1, hi_open=True)
    source = choice_at(cfg, "table.significance.source", SOURCES)
    return level, source


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


def check_out_dir(cfg, key: str, sweep: Path) -> None:
    """An output directory setting: a writable path, or null (the sweep directory)."""
    out_dir = _get(cfg, key)
    if out_dir is not None and not isinstance(out_dir, str):
        raise fail(key, out_dir, "a directory path, or null (the sweep directory)")
    check_writable(key, out_dir or sweep)


def check_train(cfg, stage: str) -> None:
    check_common(cfg, stage)
    check_device(cfg)
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
    else:
        for key in ("channels", "feature_dim"):
            int_at(cfg, f"{node}.{key}", 1)
        float_at(cfg, f"{node}.dropout", 0, hi=1, hi_open=True)
        int_at(cfg, f"{node}.max_shift", 0)
    check_writable("hydra.run.dir", _run_dir())


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
        from .amed.predictor import AMEDPredictor

        with user_errors(f"analysis.amed.predictors.{nfe}"):
            AMEDPredictor.load(str(path))  # tensors only; a missing or bad file fails here
    check_writable("hydra.run.dir", _run_dir())
    build_checked_model(cfg)


CHECKS = {"evaluate": check_evaluate, "distill": check_distill, "compare": check_compare, "table": check_table,
          "compare_cells": check_compare_cells,
          "train_teacher": lambda cfg: check_train(cfg, "train_teacher"),
          "train_features": lambda cfg: check_train(cfg, "train_features"),
          "analyze_trajectories": check_analyze}


def check_stage(cfg, stage: str):
    """Run ``stage``'s checks (the first call of its ``run``); returns what they built, if anything."""
    if stage not in CHECKS:
        raise fail("stage", stage, ", ".join(STAGE_NAMES))
    return CHECKS[stage](cfg)
