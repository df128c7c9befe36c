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
import importlib

from . import config as _config  # noqa: F401 -- registers the resolvers conf/config.yaml uses

#: name -> the module defining it (imported on first use: the command line imports this package for the
#: resolvers of :mod:`.config` before any stage runs, and should not pay for the rest at start-up)
_WHERE = {
    "DistillSpec": "..amed.spec", "paper_defaults": "..amed.spec", "ConfigError": "..errors", "UserError": "..errors",
    "CONF_DIR": "..resources", "ScheduleSpec": "..schedules", "SolverSpec": "..solvers.spec", "solver_label": "..solvers.spec",
    "load_group": ".config", "DistillStageSpec": ".distill", "check_distill_settings": ".distill",
    "check_predictor_file": ".distill", "config_reader": ".distill", "distill_spec": ".distill",
    "EvaluateSpec": ".evaluate", "cell_settings": ".evaluate", "check_data_fits": ".evaluate",
"trained_cell": ".evaluate", "CHECKS": ".stages", "CompareSpec": ".stages",
    "check_stage": ".stages", "ALLOWED_TARGETS": ".values", "check_known_keys": ".values", "check_targets": ".values",
    "fail": ".values", "user_errors": ".values",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
