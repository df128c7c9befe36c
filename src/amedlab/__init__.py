"""amed-lab: fast few-step ODE sampling of diffusion models (AMED, CVPR 2024) and its baselines."""
__version__ = "0.1.0"
