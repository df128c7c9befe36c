"""Every setting of an AMED distillation (Sec. 3.4 of the paper) as one typed object, :class:`DistillSpec`;
``.key()`` is the content digest the evaluation caches predictors under.

The paper's recommended settings live once, in ``conf/solver/amed.yaml`` and
``conf/solver/amed_plugin.yaml`` (teacher, M, s_dir, s_time, the plug-in's base) and
``conf/schedule/<name>.yaml`` (the grid): :func:`paper_defaults` reads those files, so the Python API
and the command line cannot drift apart. :mod:`amedlab.specs.distill` builds a spec from a config.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..io import plain
from ..resources import package_conf
from ..schedules import ScheduleSpec
from ..solvers.spec import SolverSpec


#: the paper's grid per AMED solver, by ``conf/schedule`` option (AMED, arXiv 2312.00094, Sec. 4)
PAPER_SCHEDULE = {"amed": "time_uniform", "amed_plugin": "polynomial"}
#: the first teacher-trajectory seed of training replicate 0: far above the evaluation seeds 0..
TRAJECTORY_SEED0 = 100000


@functools.lru_cache(maxsize=None)
def _paper_defaults(solver: str) -> dict:
    node = package_conf("solver", solver)
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
    seeds: Any = None                       # None: replicate seed's own block, 100000 + seed * num_trajectories ..
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
        if self.seeds is None and int(self.seed) != 0:
            # replicate r > 0 trains on its own trajectories: in the key, so that a predictor cached for this
            # seed before replicates had their own trajectories (100000.. for every seed) is not reused;
            # seed 0 leaves it out and keeps its key
            first, last = self.trajectory_block()
            out["trajectory_seeds"] = f"{first}-{last}"
        return out

    def trajectory_block(self) -> tuple[int, int]:
        """(first, last) default teacher-trajectory seed of training replicate r = :attr:`seed`:
        100000 + r * num_trajectories .. (r = 0: 100000.., the seeds before replicates existed), so that
        each replicate is trained on other trajectories, not only from another initialisation."""
        n = int(self.num_trajectories)
        first = TRAJECTORY_SEED0 + int(self.seed) * n
        return first, first + n - 1

    def check_trajectory_seeds(self, eval_seeds=None) -> None:
        """The default trajectory block stays below 2^32 and, given ``eval_seeds``, disjoint from them
        (an explicit ``seeds`` too): else a ConfigError naming ``seed`` (or ``seeds``), before any compute."""
        from ..errors import ConfigError
        from ..limits import SEED_LIMIT

        if self.seeds is None:
            first, last = self.trajectory_block()
            if last >= SEED_LIMIT:
                raise ConfigError(
                    f"seed={int(self.seed)}: training replicate {int(self.seed)} distils from the teacher trajectories of "
                    f"seeds {TRAJECTORY_SEED0} + seed * distill.num_trajectories = {first} .. {last}, beyond 2^32; "
                    f"accepted: seed <= {(SEED_LIMIT - TRAJECTORY_SEED0) // int(self.num_trajectories) - 1} at "
                    f"distill.num_trajectories={int(self.num_trajectories)}", "seed")
            block, key = range(first, last + 1), "seed"
        else:
            block, key = self.trajectory_seeds(), "seeds"
        if eval_seeds is not None:
            inside = set(block) if not isinstance(block, range) else block
            overlap = next((s for s in eval_seeds if s in inside), None)
            if overlap is not None:
                value, accepted = ((int(self.seed), f"a training replicate (seed) whose trajectory seeds {TRAJECTORY_SEED0} "
                                    "+ seed * distill.num_trajectories .. are disjoint from eval.seeds")
                                   if key == "seed" else (self.seeds, "teacher-trajectory seeds disjoint from eval.seeds"))
                raise ConfigError(f"{key}={value!r}: the teacher trajectories of the distillation ({_span(block)}) overlap "
                                  f"the evaluation seeds (e.g. {overlap}); accepted: {accepted}", key)

    def trajectory_seeds(self) -> list[int]:
        """The teacher trajectories' seeds: ``seeds`` as given, else :meth:`trajectory_block`."""
        from ..sampling import parse_seeds

        if self.seeds is not None:
            return parse_seeds(self.seeds)
        first, last = self.trajectory_block()
        return parse_seeds(f"{first}-{last}")

    def key(self, model_identity) -> str:
        """The predictor cache key: a digest of the model identity and :meth:`settings`."""
        from ..cache import digest

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

    @property
    def num_points(self) -> int:
        """Grid points of the student at :attr:`nfe`."""
        return self.solver_spec.num_points(int(self.nfe))


def _span(seeds) -> str:
    seeds = list(seeds)
    return f"seeds {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + len(seeds))) else f"{len(seeds)} seeds"
