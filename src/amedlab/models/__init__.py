"""Denoisers: the protocol, NFE counting, analytic models, the digits U-Net and checkpoint adapters."""
from .base import CountingDenoiser, Denoiser, counting
from .callable import CallableDenoiser
from .factory import available_models, build_model, model_class, register_model

__all__ = ["Denoiser", "CountingDenoiser", "CallableDenoiser", "counting", "build_model", "available_models",
           "register_model", "model_class"]
