"""The schedule, the solver node and the model of a config, checked by building them."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from ..io import plain
from .values import _get, fail, user_errors


#: the noise levels and rho a schedule may take (inclusive): sigma_max far above any published model's
#: (EDM 80, VP about 157) and far from float32's overflow once squared; sigma_min far below any
#: published one (EDM 0.002) but not a denormal that makes the last step divide by ~0; rho beyond
#: these only rounds the grid's points onto each other
SCHEDULE_RANGE = {"sigma_min": (1e-6, 1e3), "sigma_max": (1e-6, 1e6), "rho": (1e-3, 1e3)}


def check_schedule(node, key: str = "schedule") -> dict:
    from ..schedules import SCHEDULES, check_schedule_args

    kind = _get(node, "kind")
    if kind not in SCHEDULES:
        raise fail(f"{key}.kind", kind, ", ".join(SCHEDULES))
    out = {"kind": kind}
    for name in ("sigma_min", "sigma_max", "rho"):
        value, (lo, hi) = _get(node, name), SCHEDULE_RANGE[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
            raise fail(f"{key}.{name}", value, f"a number in [{lo:g}, {hi:g}]")
        out[name] = float(value)
    with user_errors(key):
        check_schedule_args(kind, 2, out["sigma_min"], out["sigma_max"], out["rho"])
    return out


def check_solver_node(node, key: str = "solver", nfe: int | None = None, predictor=None, untrained: bool = False):
    """Build the solver (a stand-in predictor for AMED) to check name, afs, final_step and options;
    with ``nfe``, also that the NFE is reachable. ``untrained``: where no trained part can be given (a
    reference or teacher solver, ``stage=compare``), a rule that needs one is refused. Returns
    (solver, num_points or None)."""
    from ..solvers import available_solvers, trained_hook, trained_solvers
    from ..solvers.spec import solver_from_node
    from ..solvers.base import check_afs

    if not isinstance(_get(node, "name"), str):
        raise fail(f"{key}.name", _get(node, "name"), "a solver name (conf/solver/*.yaml)")
    if untrained:
        with user_errors(f"{key}.name"):
            needs_training = trained_hook(_get(node, "name"), _get(node, "_target_")) is not None
        if needs_training:
            plain_rules = [n for n in available_solvers() if n not in trained_solvers()]
            raise fail(f"{key}.name", _get(node, "name"), ", ".join(plain_rules),
                       "this rule needs a trained part, which only a stage=evaluate cell provides")
    label = _get(node, "label")
    if label is not None and not (isinstance(label, str) and label.strip() and "\n" not in label and len(label) <= 200):
        raise fail(f"{key}.label", label, "a one-line row name (at most 200 characters), or null to derive it")
    with user_errors(f"{key}.afs"):
        check_afs(_get(node, "afs") if _get(node, "afs") is not None else False)
    options = _get(node, "options")
    if options is not None and not isinstance(options, (dict, DictConfig)):
        raise fail(f"{key}.options", options, "a mapping of the solver's options")
    extra = {}
    if predictor is not None:
        extra["predictor"] = predictor
    else:  # a rule that needs a trained part is built with its stand-in (only the grid size matters here)
        from ..solvers import rule_factory

        with user_errors(f"{key}._target_" if _get(node, "_target_") is not None else f"{key}.name"):
            stand_in = getattr(rule_factory(_get(node, "name"), _get(node, "_target_")), "stand_in", None)
        extra = stand_in() if stand_in else {}
    plain_node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    with user_errors(key):
        solver = solver_from_node(plain_node, **extra)
    num_points = None
    if nfe is not None:
        with user_errors("nfe"):
            num_points = solver.num_points(int(nfe))
    return solver, num_points


DIGITS_NAME = "amedlab-digits"  # the digits extractor (amedlab.evaluation.extractors.DIGITS)


def build_checked_model(cfg):
    """The model, built from its config: a missing, unreadable or wrong file is a ConfigError."""
    from ..models import build_model

    key = "model._target_" if _get(cfg, "model._target_") is not None else \
        "model.path" if _get(cfg, "model.path") not in (None, "") else "model"
    with user_errors(key):
        return build_model(plain(cfg.model))
