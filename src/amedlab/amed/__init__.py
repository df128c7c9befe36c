"""AMED: the predictor g_phi, the interval plug-in, and the distillation that trains it."""
from .predictor import AMEDPredictor
from .solvers import AMEDPlugin


def __getattr__(name):
    # distillation pulls in Lightning; import it only when asked for
    if name == "distill":
        from .distill import distill

        return distill
    raise AttributeError(name)


__all__ = ["AMEDPredictor", "AMEDPlugin", "distill"]
