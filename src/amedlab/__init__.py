"""amed-lab: fast few-step ODE sampling of diffusion models (AMED, CVPR 2024) and its baselines."""
__version__ = "0.1.0"


def __getattr__(name):
    # ``amedlab.distill(denoiser, solver="amed", nfe=5, ...) -> predictor``
    if name == "distill":
        from .amed.distill import distill

        return distill
    raise AttributeError(name)
