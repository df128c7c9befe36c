"""AMED's ``trained`` hook (:mod:`amedlab.solvers.trained`): what ``stage=evaluate`` asks of amed and
amed_plugin. Light to import (the distillation, on Lightning, is imported when a cell needs it);
the rules name it by ``"amedlab.amed.trained:TRAINING"`` (:func:`amedlab.solvers.trained_hook`)."""
from __future__ import annotations


class AMEDTraining:
    """The ``trained`` hook of amed and amed_plugin (:mod:`amedlab.solvers.trained`): a predictor given
    as a file (``solver.predictor``, opened and checked by the config layer), else one distilled for the
    cell's :class:`~amedlab.amed.spec.DistillSpec` (the ``distill`` group, read by the config layer),
    cached under its key (:func:`amedlab.amed.distill.cell_predictor`). Both rules share it: one
    distillation reads the same settings for each."""

    key = "distill"                          # the cell key's entry: DistillSpec.settings()
    reads = ("distill", "solver.predictor")  # what the config layer reads for it (stage=distill trains it)

    def cell_settings(self, cell):
        if cell.solver.get("predictor"):
            return None
        spec = cell.read("distill")
        spec.check_trajectory_seeds(cell.eval_seeds)  # training replicate seed's trajectories: < 2^32, not eval seeds
        return spec

    def given(self, cell):
        return cell.read("solver.predictor") if cell.solver.get("predictor") else None

    def key_content(self, spec) -> dict:
        return spec.settings()

    def prepare(self, model, spec, cell, use_cache: bool):
        from .distill import cell_predictor

        return cell_predictor(model, spec, cell.cache_dir, use_cache)

    def build_kwargs(self, part, device: str) -> dict:
        return {"predictor": part.to(device)}


TRAINING = AMEDTraining()
