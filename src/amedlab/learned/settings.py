"""The settings of solver=learned (``solver.distill``): defaults, checks and the Table 2 row label.

Kept apart from the training (:mod:`.train`, which needs Lightning) so the checks and the label are
cheap to import (:mod:`amedlab.specs` builds a cell's settings with them).
"""
from __future__ import annotations

from collections.abc import Mapping

from ..resources import package_conf
from ..schedules import check_schedule_node
from ..limits import SEED_LIMIT, upper_bound

#: solver.distill.loss: final (x(sigma_min) vs the teacher's), denoised (D(x, sigma_min) vs D(teacher, sigma_min)),
#: teacher_features (the teacher's own feature-block output at sigma_min of both, :func:`amedlab.training.loss.
#: teacher_features`; never the evaluation's extractor), final+teacher_features (the sum, the feature term
#: scaled to the sample term by the ratio of the teacher solutions' total variances)
LOSSES = ("final", "denoised", "teacher_features", "final+teacher_features")
#: solver.distill defaults for solver=learned: the package's own conf/solver/learned.yaml (one source;
#: a user's --config-dir cannot change what the Python API assumes)
DEFAULTS = package_conf("solver", "learned")["distill"]


def label(node: Mapping) -> str:
    """The Table 2 row name: what is learned, over which base."""
    sdist = {**DEFAULTS, **dict(node.get("distill") or {})}
    what = " + ".join(w for w, on in (("grid", sdist["learn_grid"]), ("coefficients", sdist["learn_coefficients"])) if on)
    afs = node.get("afs")
    tags = ["iPNDM base"] + ([("AFS-mean" if afs == "mean" else "AFS")] if afs else []) + ([f"{sdist['loss']} loss"] if sdist["loss"] != "final" else [])
    return f"Learned {what or 'nothing'} ({', '.join(tags)})"


START_KEYS = ("kind", "rho")  # the ends (sigma_min, sigma_max) are the cell's: the teacher's solution is at sigma_min


def check_starts(starts) -> list[dict]:
    """``solver.distill.starts``: a non-empty list of schedule overrides (``{}`` or ``kind``/``rho``)."""
    accepted = "a non-empty list of {} or {kind, rho} overrides of the cell's schedule"
    if not isinstance(starts, (list, tuple)) or not starts:
        raise ValueError(f"solver.distill.starts={starts!r}; accepted: {accepted}")
    out = []
    for i, start in enumerate(starts):
        if not isinstance(start, Mapping) or set(start) - set(START_KEYS):
            raise ValueError(f"solver.distill.starts[{i}]={start!r}; accepted: {accepted}")
        out.append(dict(start))
    return out


def start_schedules(schedule: Mapping, starts) -> list[dict]:
    """The cell's ``schedule`` with each start's overrides applied, each checked (a ValueError naming it)."""
    out = []
    for i, start in enumerate(starts):
        merged = {**dict(schedule), **dict(start)}
        try:
            check_schedule_node(merged)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"solver.distill.starts[{i}]={dict(start)!r}: {err}") from None
        out.append(merged)
    return out


def check_learned_settings(sdist: Mapping | None, eval_seeds=None) -> dict:
    """``solver.distill`` of solver=learned, filled with the defaults; a bad value is a ValueError
    naming the key, the value and what is accepted (before any compute)."""
    sdist = dict(sdist or {})
    unknown = sorted(set(sdist) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"solver.distill has unknown keys {unknown} for solver=learned; accepted: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in sdist.items() if v is not None}}

    def integer(key, lo):
        v, hi = out[key], upper_bound(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"solver.distill.{key}={v!r}; accepted: an integer in [{lo}, {hi}]")

    for key, lo in (("num_trajectories", 1), ("first_seed", 0), ("batch_size", 1), ("epochs", 1)):
        integer(key, lo)
    if out["first_seed"] + out["num_trajectories"] > SEED_LIMIT:
        raise ValueError(f"solver.distill.first_seed={out['first_seed']}: the training seeds first_seed .. first_seed + "
                         f"num_trajectories - 1 must stay below 2^32; accepted: first_seed <= {SEED_LIMIT - out['num_trajectories']}")
    if out["batch_size"] > out["num_trajectories"]:
        raise ValueError(f"solver.distill.batch_size={out['batch_size']}; accepted: at most solver.distill.num_trajectories="
                         f"{out['num_trajectories']} (no update would be made)")
    lr = out["lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (lr > 0 and lr < float("inf")):
        raise ValueError(f"solver.distill.lr={lr!r}; accepted: a finite number > 0")
    out["lr"] = float(lr)
    if out["loss"] not in LOSSES:
        raise ValueError(f"solver.distill.loss={out['loss']!r}; accepted: {', '.join(LOSSES)}")
    for key in ("learn_grid", "learn_coefficients"):
        if not isinstance(out[key], bool):
            raise ValueError(f"solver.distill.{key}={out[key]!r}; accepted: true, false")
    out["starts"] = check_starts(out["starts"])
    if eval_seeds is not None:
        train = range(out["first_seed"], out["first_seed"] + out["num_trajectories"])
        overlap = sorted(s for s in eval_seeds if s in train)  # range membership: no set of the training seeds
        if overlap:
            raise ValueError(f"solver.distill.first_seed={out['first_seed']}: the training seeds {train.start}-{train.stop - 1} "
                             f"overlap the evaluation seeds (e.g. {overlap[0]}); accepted: a range disjoint from eval.seeds")
    return out
