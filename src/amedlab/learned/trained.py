"""The learned solver's ``trained`` hook (:mod:`amedlab.solvers.trained`): what ``stage=evaluate``
asks of solver=learned. Light to import (the training, on Lightning, is imported when a cell needs
it); the rule names it by ``"amedlab.learned.trained:TRAINING"`` (:func:`amedlab.solvers.trained_hook`)."""
from __future__ import annotations


class LearnedTraining:
    """The ``trained`` hook of solver=learned (:mod:`amedlab.solvers.trained`): the grid + coefficients
    trained for the cell's settings (``solver.distill`` checked and filled, the NFE, schedule, AFS,
    order, teacher = ``eval.ode_reference``, dtype, seed), cached under them
    (:func:`amedlab.learned.train.cell_learned`)."""

    key = "learned"   # the cell key's entry: these settings
    reads = ()        # the solver node and the cell only

    def cell_settings(self, cell) -> dict:
        from ..errors import user_errors
        from ..schedules import ScheduleSpec
        from .settings import check_learned_settings, start_schedules

        settings = check_learned_settings(dict(cell.solver.get("distill") or {}), cell.eval_seeds)
        starts = start_schedules(cell.schedule, settings["starts"])  # every starting grid is a valid schedule
        ref = {k: v for k, v in cell.ode_reference.items() if k != "chunk_size"}
        out = {"nfe": int(cell.nfe), "schedule": dict(cell.schedule), "afs": cell.solver.get("afs", False),
               "max_order": int((cell.solver.get("options") or {}).get("max_order", 4)), "teacher": ref,
               "dtype": str(cell.dtype), "seed": int(cell.seed), **settings}
        for i, start in enumerate(starts):  # every starting grid training builds, before any compute
            with user_errors(f"solver.distill.starts[{i}]"):
                ScheduleSpec.from_cfg(start).grid(cell.num_points)
        return out

    def prepare(self, model, settings, cell, use_cache: bool):
        from .train import cell_learned

        return cell_learned(model, settings, cell.ode_reference, cell.batch_size, cell.model_name, cell.cache_dir,
                            use_cache)

    def build_kwargs(self, part, device: str) -> dict:
        return {"params": part}


TRAINING = LearnedTraining()
