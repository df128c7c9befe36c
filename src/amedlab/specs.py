"""Typed specs between the composed Hydra config and the library: built once per stage, then passed on.

- :class:`ScheduleSpec`: a noise-level schedule (``conf/schedule/*.yaml``); ``.grid(n)`` is the one
  place a schedule becomes a sigma grid (:func:`amedlab.schedules.make_sigmas`).
- :class:`SolverSpec`: a ``solver`` node (``conf/solver/*.yaml``); ``.build()``, ``.num_points(nfe)``,
  ``.label`` (the paper's Table 2 row name).
- :class:`DistillSpec`: every setting of an AMED distillation (Sec. 3.4 of the paper); ``.key()`` is the
  content digest the evaluation caches predictors under.

The paper's recommended distillation settings live once, in ``conf/solver/amed.yaml`` and
``conf/solver/amed_plugin.yaml`` (teacher, M, s_dir, s_time, the plug-in's base) and
``conf/schedule/<name>.yaml`` (the grid): :func:`paper_defaults` reads those files, so the Python API
and the command line cannot drift apart.

Values are kept as the config gives them (an override ``schedule.rho=5`` stays the integer 5): the
digests of today's caches hash them that way, so converting them would orphan every cached file.
Conversion happens where a number is used (``grid``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from .io import plain
from .configs import CONF_DIR, load_group, solver_from_cfg
from .schedules import check_schedule_args, make_sigmas
from .solvers import Solver


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule t_0 = sigma_max > ... > t_{N-1} = sigma_min (``conf/schedule/<kind>.yaml``)."""

    kind: str = "polynomial"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    @classmethod
    def from_cfg(cls, node: Mapping) -> ScheduleSpec:
        return cls(node["kind"], node["sigma_min"], node["sigma_max"], node["rho"])

    @classmethod
    def named(cls, name: str) -> ScheduleSpec:
        """The schedule of ``conf/schedule/<name>.yaml`` (the package's own file)."""
        return cls.from_cfg(OmegaConf.load(CONF_DIR / "schedule" / f"{name}.yaml"))

    def check(self) -> None:
        check_schedule_args(self.kind, 2, float(self.sigma_min), float(self.sigma_max), float(self.rho))

    def grid(self, num_points: int) -> torch.Tensor:
        """The float64 grid of ``num_points`` noise levels, sigma_max -> sigma_min."""
        self.check()
        return make_sigmas(self.kind, num_points, float(self.sigma_min), float(self.sigma_max), float(self.rho))

    def as_dict(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho}


# ------------------------------------------------------------------------------------------------
# solver
# ------------------------------------------------------------------------------------------------

#: the paper's row names (Table 2)
ROW_NAMES = {"euler": "DDIM (Euler)", "heun": "EDM (Heun)", "midpoint": "Midpoint", "dpm2": "DPM-Solver-2",
             "dpmpp2m": "DPM-Solver++(2M)", "dpmpp3m": "DPM-Solver++(3M)", "dpmpp": "DPM-Solver++",
             "unipc": "UniPC", "ipndm": "iPNDM", "amed": "AMED-Solver"}
PLUGIN_BASE_NAMES = {"euler": "DDIM", "dpm2": "DPM-Solver-2", "ipndm": "iPNDM", "dpmpp": "DPM-Solver++"}


def _variant_tags(node: Mapping) -> list[str]:
    """What an AMED row does differently from the paper's recipe (variable-step base, AFS, objective)."""
    options, sdist = dict(node.get("options") or {}), dict(node.get("distill") or {})
    tags = ["variable-step"] if options.get("variable_step") else []
    if node.get("afs") == "mean":
        tags.append("AFS-mean")
    if sdist.get("objective", "interval") != "interval":
        tags.append(f"{sdist['objective']} objective")
    if sdist.get("learn_grid"):
        tags.append("learned grid")
    return tags


def solver_label(node: Mapping) -> str:
    """The paper's row name for a solver config (Table 2)."""
    name, afs = node["name"], node.get("afs", False)
    options = dict(node.get("options") or {})
    if name == "amed_plugin":
        base = str(options.get("base", "ipndm"))
        base_name = PLUGIN_BASE_NAMES.get(base, base)
        return f"AMED-Plugin (on {base_name}{''.join(', ' + t for t in _variant_tags(node))})"
    if name == "learned":  # what is learned (amedlab.learned)
        from .learned.settings import label as learned_label

        return learned_label(node)
    label = ROW_NAMES.get(name, name)
    if name == "amed" and _variant_tags(node):
        return f"{label} ({', '.join(_variant_tags(node))})"
    if options.get("variable_step"):
        label += " (variable-step)"
    if afs and name != "amed":
        tag = "AFS-mean" if afs == "mean" else "AFS"
        label = label[:-1] + f", {tag})" if label.endswith(")") else label + f" ({tag})"
    return label


@dataclass(frozen=True)
class SolverSpec:
    """A ``solver`` config: the step rule's name and options, AFS, the final step, and for AMED the
    predictor file and ``distill`` settings (teacher, M, s_dir, s_time, objective, learn_grid)."""

    name: str
    afs: bool | str = False
    final_step: str = "sigma_min"
    options: Mapping = field(default_factory=dict)
    predictor: str | None = None
    distill: Mapping = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, node: Mapping) -> SolverSpec:
        return cls(node["name"], node.get("afs", False), node.get("final_step", "sigma_min"),
                   dict(plain(node.get("options")) or {}), node.get("predictor"), dict(plain(node.get("distill")) or {}))

    @classmethod
    def named(cls, name: str) -> SolverSpec:
        """``solver/<name>.yaml`` from the config folders (a ``--config-dir`` may add solvers)."""
        return cls.from_cfg(load_group("solver", name))

    def node(self) -> dict:
        """What the solver builder reads: name, afs, final_step, options."""
        return {"name": self.name, "afs": self.afs, "final_step": self.final_step, "options": dict(self.options)}

    def as_dict(self) -> dict:
        return {**self.node(), "predictor": self.predictor, "distill": dict(self.distill)}

    def build(self, predictor=None) -> Solver:
        """The solver; AMED solvers need ``predictor`` (an :class:`~amedlab.amed.AMEDPredictor`)."""
        return solver_from_cfg(self.node(), **({} if predictor is None else {"predictor": predictor}))

    def num_points(self, nfe: int) -> int:
        """Grid points giving exactly ``nfe`` counted evaluations (an error lists the reachable NFEs)."""
        from .amed.solvers import AMED_SOLVERS

        stand_in = None
        if self.name in AMED_SOLVERS:  # the count does not depend on the predictor's weights
            from .amed.predictor import AMEDPredictor

            stand_in = AMEDPredictor(feature_dim=1)
        return self.build(stand_in).num_points(int(nfe))

    @property
    def label(self) -> str:
        return solver_label(self.as_dict())


# ------------------------------------------------------------------------------------------------
# distillation
# ------------------------------------------------------------------------------------------------

#: the paper's grid per AMED solver, by ``conf/schedule`` option (AMED, arXiv 2312.00094, Sec. 4)
PAPER_SCHEDULE = {"amed": "time_uniform", "amed_plugin": "polynomial"}


@functools.lru_cache(maxsize=None)
def _paper_defaults(solver: str) -> dict:
    node = plain(OmegaConf.load(CONF_DIR / "solver" / f"{solver}.yaml"))
    sdist = node.get("distill") or {}
    return {"afs": node.get("afs", True), "solver_options": dict(node.get("options") or {}),
            "teacher": sdist["teacher"], "M": sdist["M"], "s_dir": sdist["s_dir"], "s_time": sdist["s_time"],
            "schedule": ScheduleSpec.named(PAPER_SCHEDULE[solver]).as_dict()}


def paper_defaults(solver: str) -> dict:
    """The paper's recommended distillation settings for ``solver`` (amed | amed_plugin), read from the
    package's ``conf/solver/<solver>.yaml`` and ``conf/schedule/<name>.yaml``."""
    if solver not in PAPER_SCHEDULE:
        raise ValueError(f"solver={solver!r} cannot be distilled; accepted: {', '.join(PAPER_SCHEDULE)}")
    return copy.deepcopy(_paper_defaults(solver))


@dataclass
class DistillSpec:
    """Every setting of an AMED distillation (Sec. 3.4). ``None``: the paper's value for ``solver``
    (:func:`paper_defaults`, applied by :meth:`resolved`). The fields up to ``intermediate_weight``
    determine the predictor (:meth:`settings`, :meth:`key`); the rest say how it is computed."""

    solver: str = "amed"
    nfe: int = 5
    schedule: Mapping | None = None
    afs: bool | str | None = True
    solver_options: Mapping | None = None
    teacher: Mapping | None = None
    M: int | None = None
    s_dir: float | None = None
    s_time: float | None = None
    num_trajectories: int = 10000
    batch_size: int = 128
    lr: float = 5e-3
    epochs: int = 1
    lr_schedule: str = "constant"           # the paper's; "cosine" (ours) enters the key, "constant" does not
    predictor_sizes: Mapping | None = None
    seed: int = 0
    objective: str | None = None            # None: "interval", the paper's; left out of the key
    intermediate_weight: float | None = None
    learn_grid: bool | None = None          # None/false: the schedule's grid; left out of the key
    grid_lr: float | None = None            # None: lr; the learned grid's learning rate
    # -- how, not what: not part of the key --
    seeds: Any = None                       # None: 100000.. (disjoint from evaluation seeds 0..)
    cache_dir: Any = None                   # teacher trajectories (None: the default cache)
    dtype: torch.dtype = torch.float32
    gen_batch_size: int = 500
    model_name: str | None = None
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"

    #: in the key only when given and not at their neutral value (learn_grid false, the paper's constant
    #: rate), so that the paper's default keeps its cache key
    OPTIONAL_KEYS = {"objective": None, "intermediate_weight": None, "learn_grid": False, "grid_lr": None,
                     "lr_schedule": "constant"}

    @classmethod
    def create(cls, **fields) -> DistillSpec:
        """A spec from keyword fields; an unknown name is a ValueError listing the accepted ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise ValueError(f"distill() has no setting {', '.join(unknown)}; accepted: {', '.join(names)}")
        return cls(**fields)

    @classmethod
    def from_cfg(cls, cfg, solver: Mapping | None = None, schedule: Mapping | None = None) -> DistillSpec:
        """The settings of ``cfg`` (``distill``, ``solver.distill``, ``predictor``, ``nfe``, ``seed``) for
        ``solver`` (default ``cfg.solver``) on ``schedule`` (default ``cfg.schedule``; an evaluation
        cell passes its own, ``eval.schedule_per_solver`` applied). The one translation from a config."""
        node = plain(solver if solver is not None else cfg.solver)
        sdist = dict(node.get("distill") or {})
        dcfg = cfg.distill
        return cls(
            solver=node["name"], nfe=int(cfg.nfe), schedule=plain(schedule if schedule is not None else cfg.schedule),
            afs=node.get("afs", True), solver_options=dict(node.get("options") or {}), teacher=sdist.get("teacher"),
            M=sdist.get("M"), s_dir=sdist.get("s_dir"), s_time=sdist.get("s_time"),
            num_trajectories=int(dcfg.num_trajectories), batch_size=int(dcfg.batch_size), lr=float(dcfg.lr),
            epochs=int(dcfg.epochs), lr_schedule=str(dcfg.get("lr_schedule", "constant")), predictor_sizes=plain(dict(cfg.get("predictor") or {})), seed=int(cfg.seed),
            objective=sdist.get("objective"), intermediate_weight=sdist.get("intermediate_weight"),
            learn_grid=sdist.get("learn_grid"), grid_lr=sdist.get("grid_lr"),
            cache_dir=dcfg.get("cache_dir"), gen_batch_size=int(dcfg.get("gen_batch_size", 500)),
            model_name=cfg.model.get("name") if cfg.get("model") is not None else None,
            accelerator=dcfg.get("accelerator", "auto"), devices=dcfg.get("devices", 1),
            strategy=dcfg.get("strategy", "auto"))

    def settings(self) -> dict:
        """What determines the predictor (the cache key's content; also written beside a cached one)."""
        out = {"solver": self.solver, "nfe": int(self.nfe), "schedule": self.schedule, "afs": self.afs,
               "solver_options": dict(self.solver_options or {}), "teacher": self.teacher, "M": self.M,
               "s_dir": self.s_dir, "s_time": self.s_time, "num_trajectories": int(self.num_trajectories),
               "batch_size": int(self.batch_size), "lr": float(self.lr), "epochs": int(self.epochs),
               "predictor_sizes": dict(self.predictor_sizes or {}), "seed": int(self.seed)}
        for k, neutral in self.OPTIONAL_KEYS.items():
            value = getattr(self, k)
            if value is not None and value != neutral:
                out[k] = value
        return out

    def key(self, model_identity) -> str:
        """The predictor cache key: a digest of the model identity and :meth:`settings`."""
        from .cache import digest

        return digest({"model_identity": model_identity, **self.settings()})

    def resolved(self) -> DistillSpec:
        """A copy with every unset setting taken from the paper's (:func:`paper_defaults`), config
        nodes made plain and numbers typed: what :func:`amedlab.amed.distill` trains with."""
        d = paper_defaults(self.solver)
        return dataclasses.replace(
            self, schedule=plain(self.schedule or d["schedule"]), teacher=plain(self.teacher or d["teacher"]),
            afs=d["afs"] if self.afs is None else self.afs,
            solver_options=plain(self.solver_options or d["solver_options"]),
            M=d["M"] if self.M is None else int(self.M), s_dir=d["s_dir"] if self.s_dir is None else float(self.s_dir),
            s_time=d["s_time"] if self.s_time is None else float(self.s_time),
            objective=self.objective or "interval", intermediate_weight=float(self.intermediate_weight or 0.0),
            learn_grid=False if self.learn_grid is None else self.learn_grid,
            predictor_sizes=dict(self.predictor_sizes or {}))

    @property
    def schedule_spec(self) -> ScheduleSpec:
        return ScheduleSpec.from_cfg(self.schedule)

    @property
    def solver_spec(self) -> SolverSpec:
        return SolverSpec(self.solver, self.afs, "sigma_min", dict(self.solver_options or {}))


def grid_for(solver: Solver, nfe: int, schedule: Mapping) -> torch.Tensor:
    """The sigma grid giving exactly ``nfe`` counted evaluations for ``solver`` on ``schedule`` (a config node)."""
    spec = ScheduleSpec.from_cfg(schedule)
    spec.check()
    return spec.grid(solver.num_points(int(nfe)))
