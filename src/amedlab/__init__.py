"""amed-lab: fast few-step ODE sampling of diffusion models (AMED, CVPR 2024) and its baselines."""
__version__ = "0.1.0"


def __getattr__(name):
    # ``amedlab.distill(denoiser, solver="amed", nfe=5, ...) -> predictor``; the training entries pull
    # in Lightning: imported only when asked for
    if name == "distill":
        from .amed.distill import distill

        return distill
    if name == "train_learned":
        from .learned.train import train_learned

        return train_learned
    if name == "CallableDenoiser":  # a plain D(x, sigma) as a Denoiser (docs/extending.md)
        from .models.callable import CallableDenoiser

        return CallableDenoiser
    raise AttributeError(name)
