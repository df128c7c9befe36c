"""The config layer: one spec per stage, built once from the composed Hydra config, that checks itself.

``check_stage(cfg, stage)`` is the first call of every stage's ``run(cfg)``: it checks each key the
stage reads (type, bound, accepted values), refuses keys nothing reads and ``_target_`` keys, opens
and validates every file, and returns the stage's spec (:class:`EvaluateSpec`, :class:`DistillStageSpec`,
:class:`CompareSpec`, ...). A bad value is a :class:`~amedlab.errors.ConfigError` naming the key, the
value and what is accepted; the command line prints it as one line with exit status 2.

Only this package and :mod:`amedlab.stages` read the config; the library below receives specs and
plain values (``tests/test_architecture.py`` holds it so). Modules: :mod:`.values` (typed reads,
known keys, device, folders), :mod:`.solver` (schedule, solver node, model), :mod:`.distill`,
:mod:`.evaluate`, :mod:`.stages`, :mod:`.config` (config folders and resolvers).
"""
from ..amed.spec import DistillSpec, paper_defaults
from ..resources import CONF_DIR
from ..schedules import ScheduleSpec
from ..solvers.spec import SolverSpec, solver_label
from .config import load_group
from .distill import DistillStageSpec, check_distill_settings, check_predictor_file, distill_spec
from .evaluate import EvaluateSpec, check_data_fits, learned_settings
from .stages import CHECKS, CompareSpec, check_stage
from .values import ALLOWED_TARGETS, check_known_keys, check_targets, fail, user_errors

__all__ = ["CHECKS", "CONF_DIR", "ALLOWED_TARGETS", "CompareSpec", "DistillSpec", "DistillStageSpec", "EvaluateSpec",
           "ScheduleSpec", "SolverSpec", "check_data_fits", "check_distill_settings", "check_known_keys",
           "check_predictor_file", "check_stage", "check_targets", "distill_spec", "fail", "learned_settings",
           "load_group", "paper_defaults", "solver_label", "user_errors"]
