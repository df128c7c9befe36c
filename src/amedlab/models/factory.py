"""Build a denoiser from its ``model`` config group (one entry per backend in ``conf/model/``)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .base import Denoiser

# name -> builder(cfg) ; each builder validates its own keys (paths, options) before any compute.
_BUILDERS: dict[str, Callable[[Mapping], Denoiser]] = {}


def register_model(name: str):
    """Decorator adding a model builder under ``model.name``."""

    def wrap(fn: Callable[[Mapping], Denoiser]):
        _BUILDERS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    _import_backends()
    return sorted(_BUILDERS)


def build_model(cfg: Mapping) -> Denoiser:
    """``cfg`` is the ``model`` config node; ``cfg["name"]`` picks the backend."""
    _import_backends()
    name = cfg.get("name")
    if name not in _BUILDERS:
        raise ValueError(f"model.name={name!r} is not a known model; accepted: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](cfg)


def _import_backends() -> None:
    # Importing the modules registers their builders; optional backends import their heavy
    # dependencies lazily inside the builder.
    import importlib

    for module in ("analytic", "digits", "adapters"):
        try:
            importlib.import_module(f"amedlab.models.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"amedlab.models.{module}":
                raise
