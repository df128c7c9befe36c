"""Typed reads of the composed config, each a one-line named error: ``<key>=<value>: <why>; accepted:
<what>`` (:func:`fail`). Integers are bounded (:mod:`amedlab.limits`), unknown keys and ``_target_``
keys refused, the device and the writable folders checked; :func:`check_common` is what every stage
checks first."""
from __future__ import annotations

import difflib
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError, MissingFileError, UserError, user_errors  # noqa: F401 (user_errors: the checks' own)
from ..io import plain
from ..resources import CONF_DIR

log = logging.getLogger(__name__)

#: stage name -> module under ``amedlab.stages`` (the name itself)
STAGE_NAMES = ("compare", "train_teacher", "train_features", "distill", "evaluate", "table", "compare_cells",
               "analyze_trajectories", "export", "cache")


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


# ------------------------------------------------------------------------------------------------
# typed values
# ------------------------------------------------------------------------------------------------

def _get(cfg, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False) if OmegaConf.is_config(cfg) else cfg.get(key)


def int_at(cfg, key: str, lo: int | None = None, hi: int | None = None, null: bool = False):
    """An integer (not a float, not a bool) in [lo, hi]; ``hi`` defaults to the key's bound in
    :mod:`amedlab.limits`, so no integer setting is unbounded."""
    from ..limits import upper_bound

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
    from ..solvers import solver_family

    ref = OmegaConf.load(CONF_DIR / "config.yaml")
    ref = OmegaConf.create({k: v for k, v in OmegaConf.to_container(ref, resolve=False).items() if k not in ("defaults", "hydra")})
    for group, field in GROUPS.items():
        options = [OmegaConf.load(f) for f in sorted((CONF_DIR / group).glob("*.yaml"))]
        if field is not None:  # the options that configure the same thing (e.g. every solver file with name: amed)
            chosen = _get(cfg, f"{group}.{field}")
            # rules sharing one trained hook share its settings (amed and amed_plugin: one DistillSpec)
            kin = solver_family(chosen) if group == "solver" else (chosen,)
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


#: keys of earlier versions -> what replaced them (named in the error, not guessed)
RENAMED = {
    "eval.cache_dir": "cache_dir (one folder for every cache; default AMEDLAB_CACHE, else ~/.cache/amedlab)",
    "distill.cache_dir": "cache_dir (teacher trajectories go to <cache_dir>/trajectories)",
}


def renamed_key_error(path: str) -> ConfigError | None:
    """The error for a key an earlier version read, naming its replacement; None for any other key."""
    key = path.lstrip("+~")
    if key in RENAMED:
        return ConfigError(f"{key} is no longer read: it was replaced by {RENAMED[key]}", key)
    return None


def check_known_keys(cfg) -> None:
    """A key nothing reads (typically added with ``+``) is an error naming the nearest known key."""
    known = set(_paths(OmegaConf.to_container(_known_config(cfg), resolve=False)))
    known |= {path for path in ALLOWED_TARGETS if _get(cfg, path) is not None}
    # a user's model class takes its own keyword arguments (checked against its signature when built)
    open_nodes = OPEN_NODES + (("model",) if _get(cfg, "model._target_") is not None else ())
    given = _paths(OmegaConf.to_container(cfg, resolve=False))
    for path in given:
        if path in known or any(path == o or path.startswith(o + ".") for o in open_nodes):
            continue
        if (err := renamed_key_error(path)) is not None:
            raise err
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent and parent not in known:
            continue  # below a node already reported, or a value that is not a mapping in the reference
        near = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
        siblings = sorted(k.rsplit(".", 1)[-1] for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{path} is not a known key: nothing reads it{hint}; accepted under "
                          f"{parent or 'the top level'}: {', '.join(siblings)}", path)


#: the key paths where a ``_target_`` (a user's class) may appear: the documented extension points
#: (docs/extending.md). The class is imported and checked to subclass amedlab's ``Denoiser`` /
#: ``StepRule`` before anything is called (amedlab.targets); a ``_target_`` anywhere else is refused.
ALLOWED_TARGETS: tuple[str, ...] = ("model._target_", "solver._target_")


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
            raise ConfigError(f"{path}={value!r}: a _target_ key names code to import and run; accepted: no _target_ "
                              f"key (or only at {', '.join(ALLOWED_TARGETS)}: a Denoiser or StepRule subclass, "
                              "docs/extending.md); remove it from the experiment file or the overrides", path)


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


def cache_root(cfg) -> Path:
    """``cache_dir`` as a path: a non-empty folder name (nothing created)."""
    value = _get(cfg, "cache_dir")
    if not isinstance(value, str) or not value.strip():
        raise fail("cache_dir", value, "a folder for the caches (default: AMEDLAB_CACHE, else ~/.cache/amedlab)")
    return Path(value).expanduser()


def check_cache_dir(cfg) -> Path:
    """``cache_dir``: the one folder of every cache (amedlab.cache), writable. Said once, when this
    process first creates it, so that a user knows where the gigabytes go."""
    path = cache_root(cfg)
    new = not path.exists()
    path = check_writable("cache_dir", path)
    if new:
        log.info("caches go to %s (new; cache_dir= or AMEDLAB_CACHE moves it; amedlab stage=cache lists "
                 "and clears it)", path.resolve())
    return path


def _run_dir() -> Path:
    """The run directory; in a sweep it must lie inside ``hydra.sweep.dir`` (a cell's folder is named
    from its overrides: a swept path value must not choose where results are written)."""
    from ..io import run_dir

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


def check_common(cfg, stage: str) -> None:
    if stage not in STAGE_NAMES:
        raise fail("stage", stage, ", ".join(STAGE_NAMES))
    check_targets(cfg)  # before the unknown keys: a _target_ is refused as code, not as a typo
    check_known_keys(cfg)
    int_at(cfg, "seed", 0)
    if "AMEDLAB_CACHE" in os.environ and not os.environ["AMEDLAB_CACHE"].strip():
        raise fail("AMEDLAB_CACHE", os.environ["AMEDLAB_CACHE"], "a folder for the caches, or unset it (default ~/.cache/amedlab)",
                   "the environment variable is set but empty: the caches would go to the file system's root")
    from ..wandb_logger import check_logger_settings

    with user_errors("logger"):
        check_logger_settings(plain(_get(cfg, "logger") or {}))


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
    from ..evaluation.table import METRICS

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
    from ..evaluation.table import SOURCES

    level = float_at(cfg, "table.significance.level", 0.5, hi=1, hi_open=True)
    source = choice_at(cfg, "table.significance.source", SOURCES)
    return level, source


def check_out_dir(cfg, key: str, sweep: Path) -> None:
    """An output directory setting: a writable path, or null (the sweep directory)."""
    out_dir = _get(cfg, key)
    if out_dir is not None and not isinstance(out_dir, str):
        raise fail(key, out_dir, "a directory path, or null (the sweep directory)")
    check_writable(key, out_dir or sweep)
