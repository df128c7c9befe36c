"""Denoisers: the protocol, NFE counting, analytic models, the digits U-Net and checkpoint adapters."""
from .base import CountingDenoiser, Denoiser, counting
from .factory import available_models, build_model, register_model

__all__ = ["Denoiser", "CountingDenoiser", "counting", "build_model", "available_models", "register_model"]
