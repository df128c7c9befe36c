"""The learned solver's ``trained`` hook (:mod:`amedlab.solvers.trained`): what ``stage=evaluate``
asks of solver=learned. Light to import (the training, on Lightning, is imported when a cell needs
it); the rule names it by ``"amedlab.learned.trained:TRAINING"`` (:func:`amedlab.solvers.trained_hook`)."""
from __future__ import annotations


def replicate_settings(sdist: dict, seed: int, eval_seeds=None) -> dict:
    """``solver.distill`` checked and filled for training replicate r = ``seed``: its teacher solutions
    are the block first_seed + r * num_trajectories .. (r = 0: first_seed.., the settings and cache key
    from before replicates), so replicates differ in their data as well as in the shuffling. A block
    beyond 2^32 or overlapping ``eval_seeds`` is a ConfigError naming ``seed``, before any compute."""
    from ..errors import ConfigError
    from ..limits import SEED_LIMIT
    from .settings import check_learned_settings

    if not seed:
        return check_learned_settings(sdist, eval_seeds)
    base = check_learned_settings(sdist)  # the defaults filled in, every value checked
    n, first = base["num_trajectories"], base["first_seed"] + seed * base["num_trajectories"]
    block = f"solver.distill.first_seed + seed * solver.distill.num_trajectories = {first} .. {first + n - 1}"
    if first + n > SEED_LIMIT:
        raise ConfigError(f"seed={seed}: training replicate {seed} trains on the teacher solutions of seeds {block}, "
                          f"beyond 2^32; accepted: seed <= {(SEED_LIMIT - n - base['first_seed']) // n}", "seed")
    overlap = next((s for s in eval_seeds or () if first <= s < first + n), None)
    if overlap is not None:
        raise ConfigError(f"seed={seed}: training replicate {seed} trains on the teacher solutions of seeds {block}, "
                          f"which overlap the evaluation seeds (e.g. {overlap}); accepted: a seed whose block is "
                          "disjoint from eval.seeds (or another solver.distill.first_seed)", "seed")
    return check_learned_settings({**sdist, "first_seed": first}, eval_seeds)


class LearnedTraining:
    """The ``trained`` hook of solver=learned (:mod:`amedlab.solvers.trained`): the grid + coefficients
    trained for the cell's settings (``solver.distill`` checked and filled, with training replicate
    ``seed``'s own first_seed, :func:`replicate_settings`; the NFE, schedule, AFS, order, teacher =
    ``eval.ode_reference``, dtype, seed), cached under them
    (:func:`amedlab.learned.train.cell_learned`)."""

    key = "learned"   # the cell key's entry: these settings
    reads = ()        # the solver node and the cell only

    def cell_settings(self, cell) -> dict:
        from ..errors import user_errors
        from ..schedules import ScheduleSpec
        from .settings import start_schedules

        settings = replicate_settings(dict(cell.solver.get("distill") or {}), int(cell.seed), cell.eval_seeds)
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
