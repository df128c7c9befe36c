"""The single Hydra entry point: ``python -m amedlab stage=<stage> ...``.

Each stage is a plain function ``run(cfg) -> float | dict`` in its own module; this file only
composes the config, checks it, and dispatches. The returned value is what sweepers optimise.
"""
from __future__ import annotations

import importlib
import logging

import hydra
from omegaconf import DictConfig

from .configs import CONF_DIR

log = logging.getLogger(__name__)

# stage name -> "module:function"
STAGES = {
    "compare": "amedlab.compare:run",
    "train_teacher": "amedlab.training.teacher:run",
    "train_features": "amedlab.training.features:run",
    "distill": "amedlab.amed.distill:run",
    "evaluate": "amedlab.evaluation.evaluate:run",
    "table": "amedlab.evaluation.table:run",
    "compare_cells": "amedlab.evaluation.compare_cells:run",
    "analyze_trajectories": "amedlab.analysis.trajectories:run",
}


def resolve_stage(name: str):
    if name not in STAGES:
        raise ValueError(f"stage={name!r} is not a known stage; accepted: {', '.join(STAGES)}")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig):
    return resolve_stage(cfg.stage)(cfg)


if __name__ == "__main__":
    main()
