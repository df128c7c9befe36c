"""The stages of ``python -m amedlab stage=<name>``: one module per stage, each with ``run(cfg)``.

A stage is the only place a composed config meets the library: ``run(cfg)`` checks the config
(:func:`amedlab.validation.check_stage`, which also builds the typed specs of :mod:`amedlab.specs`),
calls library functions with those specs, writes its files to the run directory and returns the
number a sweeper optimises. Library modules hold no ``run(cfg)``.
"""
#: stage name -> module under ``amedlab.stages`` (the name itself)
STAGE_NAMES = ("compare", "train_teacher", "train_features", "distill", "evaluate", "table", "compare_cells",
               "analyze_trajectories")
