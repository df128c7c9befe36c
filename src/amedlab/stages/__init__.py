"""The stages of ``python -m amedlab stage=<name>``: one module per stage, each with ``run(cfg)``.

A stage is the only place a composed config meets the library: ``run(cfg)`` checks the config
(:func:`amedlab.specs.check_stage`, which also builds the typed specs of :mod:`amedlab.specs`),
calls library functions with those specs, writes its files to the run directory and returns the
number a sweeper optimises. Library modules hold no ``run(cfg)``.
"""
from ..specs.values import STAGE_NAMES  # noqa: F401 -- the stage names, declared with their checks
