"""A plain callable ``D(x, sigma) -> denoised`` as a :class:`~amedlab.models.base.Denoiser`.

Sampling runs on any callable; what else the library needs from a model is what this wrapper adds:
``sample_shape`` (solvers draw x_T from it), optional per-sample ``features(x, sigma) -> [N, F]``
computed in the same call (``last_features``, what AMED's predictor reads), and an ``identity()``
that keys caches and ties a trained predictor to its model. :func:`amedlab.distill` and
:func:`amedlab.learned.train.train_learned` wrap a plain callable themselves; wrap it yourself to
sample with the predictor afterwards (docs/extending.md).
"""
from __future__ import annotations

import hashlib
import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from .base import Denoiser

#: the recipe of the error when AMED meets a model without features
NO_FEATURES = ("the model exposes no per-sample features (feature_dim = 0); AMED's predictor needs them: pass "
               "features=lambda x, sigma: ... returning [N, F], or use a Denoiser with a feature hook "
               "(docs/extending.md)")

#: attributes of an analytic model that pass through the wrapper when the wrapped callable has them
_PASSED_THROUGH = ("reference", "data_mean")


class CallableDenoiser(Denoiser):
    """``fn(x, sigma) -> denoised`` as a Denoiser.

    ``fn`` receives ``x`` [N, *sample_shape] and ``sigma`` [N] (one noise level per sample; a float is
    expanded) and returns the denoised batch, same shape. ``features(x, sigma) -> [N, F]`` (optional)
    is called right after ``fn`` on the same inputs and stored as ``last_features``; ``feature_dim``
    is F (probed once on a zero batch at sigma = 1 when not given). ``sigma_min``/``sigma_max``
    record the noise levels the function was trained for (informational, as a pretrained adapter's).
    ``identity``: a string naming this exact function; without it the identity is a digest of the
    code of ``fn`` and ``features`` (module, name, bytecode, constants, default arguments, closure
    values, and the values of the globals they read: numbers, strings, tensors, containers, functions;
    a wrapped ``Denoiser`` by its own identity, another ``nn.Module`` by its weights), computed when asked.
    Give one when the function reads state that digest cannot see (weights loaded elsewhere) and you
    keep caches (``cache_dir``) across runs.
    """

    def __init__(self, fn: Callable, sample_shape, features: Callable | None = None, feature_dim: int | None = None,
                 sigma_min: float | None = None, sigma_max: float | None = None, name: str | None = None,
                 identity: str | None = None) -> None:
        super().__init__()
        if not callable(fn):
            raise ValueError(f"CallableDenoiser: fn={fn!r} is not callable; accepted: a function D(x, sigma) -> denoised")
        if features is not None and not callable(features):
            raise ValueError(f"CallableDenoiser: features={features!r} is not callable; accepted: a function "
                             "features(x, sigma) -> [N, F], or None")
        self.sample_shape = _shape(sample_shape)
        self.fn = fn  # an nn.Module is registered (moves, eval mode and weights with the wrapper)
        self.features = features
        self.sigma_min = None if sigma_min is None else float(sigma_min)
        self.sigma_max = None if sigma_max is None else float(sigma_max)
        self.name = str(name) if name is not None else _name_of(fn)
        self._given_identity = None if identity is None else str(identity)
        if features is None:
            if feature_dim not in (None, 0):
                raise ValueError(f"CallableDenoiser: feature_dim={feature_dim!r} without features=; accepted: "
                                 "a features callable, or no feature_dim")
            self.feature_dim = 0
        elif feature_dim is None:
            self.feature_dim = self._probe_feature_dim()
        else:
            if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
                raise ValueError(f"CallableDenoiser: feature_dim={feature_dim!r}; accepted: a positive integer (F)")
            self.feature_dim = int(feature_dim)

    def _probe_feature_dim(self) -> int:
        x = torch.zeros(2, *self.sample_shape)
        try:
            with torch.no_grad():
                out = self.features(x, torch.ones(2))
        except Exception as err:
            raise ValueError(f"features(x, sigma) failed on a zero batch of shape {tuple(x.shape)} at sigma = 1 "
                             f"({type(err).__name__}: {err}); pass feature_dim=F to skip this probe") from err
        return self._checked_features(out, 2, probing=True).shape[1]

    def _checked_features(self, out, batch: int, probing: bool = False) -> torch.Tensor:
        if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != batch or out.shape[1] < 1:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"features(x, sigma) returned {got} for a batch of {batch}; accepted: a tensor [N, F] "
                             f"with N = {batch} (one row per sample) and F >= 1")
        if not probing and out.shape[1] != self.feature_dim:
            raise ValueError(f"features(x, sigma) returned {out.shape[1]} features per sample, "
                             f"feature_dim is {self.feature_dim}")
        return out

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, sigma)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"the denoiser {self.name} returned {got} for x of shape {tuple(x.shape)}; accepted: "
                             "the denoised batch, the shape of x")
        if self.features is not None:
            self.last_features = self._checked_features(self.features(x, sigma), x.shape[0])
        else:
            self.last_features = getattr(self.fn, "last_features", None) if isinstance(self.fn, Denoiser) else None
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _PASSED_THROUGH:
                fn = self._modules.get("fn", self.__dict__.get("fn"))
                if fn is not None and hasattr(fn, name):
                    return getattr(fn, name)
            raise

    def config(self) -> dict:
        return {"name": self.name, "sample_shape": list(self.sample_shape), "feature_dim": self.feature_dim,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def identity(self) -> str:
        h = hashlib.sha256(b"CallableDenoiser")
        h.update(repr(self.config()).encode())
        if self._given_identity is not None:
            h.update(b"given:" + self._given_identity.encode())
        else:
            _fingerprint(h, self.fn, 0, set())
            _fingerprint(h, self.features, 0, set())
        return h.hexdigest()[:16]


def as_denoiser(model, sample_shape=None, features: Callable | None = None, **kwargs):
    """``model`` itself when it already is a denoiser with a ``sample_shape`` and nothing is added;
    else a :class:`CallableDenoiser` around it (``sample_shape`` defaults to the model's own)."""
    shape = getattr(model, "sample_shape", None)
    if features is None and not kwargs and shape is not None and tuple(shape):
        return model
    if sample_shape is None:
        if shape is None or not tuple(shape):
            raise ValueError("a plain callable D(x, sigma) needs sample_shape= (the shape of one sample without the "
                             "batch dimension, e.g. sample_shape=(2,) or (3, 32, 32))")
        sample_shape = shape
    return CallableDenoiser(model, sample_shape, features=features, **kwargs)


def with_features(model, features: Callable | None = None, sample_shape=None):
    """The denoiser AMED distills on: ``model`` when it has features, else wrapped with ``features``;
    a model with neither is a ValueError giving the recipe (:data:`NO_FEATURES`)."""
    if features is None:
        if int(getattr(model, "feature_dim", 0) or 0) < 1:
            raise ValueError(NO_FEATURES)
        return as_denoiser(model, sample_shape)
    return as_denoiser(model, sample_shape, features)


def _shape(sample_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in sample_shape)
        ok = len(shape) > 0 and all(n > 0 for n in shape) and all(not isinstance(n, bool) for n in sample_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sample_shape={sample_shape!r}; accepted: the shape of one sample without the batch "
                         "dimension, positive integers, e.g. (2,) or (3, 32, 32)")
    return shape


def _name_of(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


_MAX_DEPTH = 6


def _fingerprint(h, obj, depth: int, seen: set) -> None:
    """Feed what determines ``obj``'s behaviour into the hash ``h`` (see :class:`CallableDenoiser`)."""
    if depth > _MAX_DEPTH:
        h.update(b"<deep>")
        return
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
        return
    if torch.is_tensor(obj):
        h.update(f"tensor:{obj.dtype}:{tuple(obj.shape)};".encode())
        h.update(obj.detach().cpu().contiguous().to(torch.float64 if obj.is_floating_point() else obj.dtype)
                 .numpy().tobytes())
        return
    if id(obj) in seen:
        h.update(b"<seen>")
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}]".encode())
        for item in obj:
            _fingerprint(h, item, depth + 1, seen)
        return
    if isinstance(obj, dict):
        h.update(f"dict[{len(obj)}]".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _fingerprint(h, obj[key], depth + 1, seen)
        return
    if isinstance(obj, types.ModuleType):
        h.update(f"module:{obj.__name__};".encode())
        return
    if isinstance(obj, Denoiser):
        h.update(f"denoiser:{obj.identity()};".encode())
        return
    if isinstance(obj, nn.Module):
        h.update(f"module:{type(obj).__module__}.{type(obj).__qualname__};".encode())
        for key, tensor in sorted(obj.state_dict().items()):
            h.update(key.encode())
            _fingerprint(h, tensor, depth + 1, seen)
        return
    if isinstance(obj, types.MethodType):
        _fingerprint(h, obj.__func__, depth + 1, seen)
        _fingerprint(h, obj.__self__, depth + 1, seen)
        return
    if isinstance(obj, types.FunctionType):
        h.update(f"function:{obj.__module__}.{obj.__qualname__};".encode())
        _fingerprint_code(h, obj.__code__, obj.__globals__, depth, seen)
        _fingerprint(h, obj.__defaults__, depth + 1, seen)
        _fingerprint(h, obj.__kwdefaults__, depth + 1, seen)
        for cell in obj.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = None
            _fingerprint(h, value, depth + 1, seen)
        return
    if isinstance(obj, type) or inspect.isbuiltin(obj):
        h.update(f"named:{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)!s};".encode())
        return
    # another object (a callable instance): its class and its attributes
    h.update(f"object:{type(obj).__module__}.{type(obj).__qualname__};".encode())
    call = getattr(type(obj), "__call__", None)
    if isinstance(call, types.FunctionType):
        _fingerprint(h, call, depth + 1, seen)
    _fingerprint(h, dict(getattr(obj, "__dict__", {})), depth + 1, seen)


def _fingerprint_code(h, code: types.CodeType, globals_: dict, depth: int, seen: set) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _fingerprint_code(h, const, globals_, depth + 1, seen)
        else:
            h.update(repr(const).encode())
    for name in code.co_names:  # the values of the globals it reads: numbers, strings, tensors, functions
        if name in globals_:
            value = globals_[name]
            if isinstance(value, (types.FunctionType, nn.Module)) or torch.is_tensor(value) or \
                    value is None or isinstance(value, (bool, int, float, complex, str, bytes, tuple, list, dict)):
                _fingerprint(h, value, depth + 1, seen)
