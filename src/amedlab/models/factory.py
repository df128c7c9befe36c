"""Build a denoiser from its ``model`` config group (one entry per backend in ``conf/model/``).

Two ways in for a user's own model (docs/extending.md):

- ``register_model(name)`` from Python: a builder ``builder(node) -> Denoiser`` picked by ``model.name``;
- ``model._target_=mypkg.MyDenoiser`` in a config (the command line, a ``--config-dir`` yaml): the
  dotted path of a :class:`~amedlab.models.base.Denoiser` subclass, constructed with the node's other
  keys (all but ``name`` and ``_target_``) as keyword arguments. It is imported and checked to be
  such a class before anything is called, and the keys are checked against its signature.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from .base import Denoiser

# name -> builder(node) ; each builder validates its own keys (paths, options) before any compute.
_BUILDERS: dict[str, Callable[[Mapping], Denoiser]] = {}

#: the keys of a ``model`` node that are not constructor arguments of a ``_target_`` class
TARGET_RESERVED = ("name", "_target_")


def register_model(name: str):
    """Decorator adding a model builder under ``model.name``.

    The builder takes the ``model`` config node (a mapping: ``node["name"]`` and the model's own keys)
    and returns a :class:`~amedlab.models.base.Denoiser`; it should check its keys and raise a
    ValueError naming ``model.<key>`` before any expensive work. Registering a name again replaces
    the builder. docs/extending.md has a complete example.
    """

    def wrap(fn: Callable[[Mapping], Denoiser]):
        _BUILDERS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    _import_backends()
    return sorted(_BUILDERS)


def model_class(target) -> type[Denoiser]:
    """The :class:`Denoiser` subclass named by ``model._target_`` (imported, checked, not called)."""
    from ..targets import import_class

    return import_class(target, "model._target_", Denoiser)


def build_model(node: Mapping) -> Denoiser:
    """``node`` is the ``model`` config node; ``node["name"]`` picks the backend, or ``node["_target_"]``
    names a user's :class:`Denoiser` subclass built with the node's other keys as keyword arguments."""
    if node.get("_target_") is not None:
        return _build_target(node)
    _import_backends()
    name = node.get("name")
    if name not in _BUILDERS:
        raise ValueError(f"model.name={name!r} is not a known model; accepted: {', '.join(sorted(_BUILDERS))}, "
                         "or model._target_=<module.Class> (docs/extending.md)")
    return _BUILDERS[name](node)


def _build_target(node: Mapping) -> Denoiser:
    from ..targets import check_arguments

    target = node.get("_target_")
    cls = model_class(target)  # a Denoiser subclass, or a ValueError before anything is called
    from ..io import plain

    kwargs = {str(k): v for k, v in plain(dict(node)).items() if k not in TARGET_RESERVED}
    check_arguments(cls, kwargs, "model._target_", "model")
    model = cls(**kwargs)
    shape = getattr(model, "sample_shape", ())
    if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"model._target_={target!r}: the model's sample_shape is {shape!r}; accepted: the shape of one "
                         "sample without the batch dimension, e.g. (2,) or (1, 16, 16), set in its constructor")
    return model


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
