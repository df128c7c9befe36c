"""Learned grid + multistep coefficients (iPNDM base), trained by backpropagating through the run.

:mod:`.solver` has the parameters and the step rule (``make_solver("learned", params=...)``);
:mod:`.train` the distillation against a high-accuracy teacher and the cached, per-cell training
(``cell_learned``) that ``stage=evaluate`` calls.
"""
from .settings import check_learned_settings, label
from .solver import LearnedIPNDM, LearnedSolverParams, learned, map_to_num_points


def __getattr__(name):
    # the training pulls in Lightning; import it only when asked for
    if name in ("train_learned", "cell_learned"):
        from . import train

        return getattr(train, name)
    raise AttributeError(name)


__all__ = ["LearnedIPNDM", "LearnedSolverParams", "learned", "map_to_num_points", "train_learned", "cell_learned",
           "check_learned_settings", "label"]
