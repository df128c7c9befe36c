"""The denoiser protocol every model follows, and the NFE counter that wraps any of them.

A denoiser is a callable ``D(x, sigma) -> x0_hat`` (EDM / VE parameterisation, Karras et al. 2022):
``x`` has shape ``[B, ...]`` and ``sigma`` has shape ``[B]`` (one noise level per sample). Solvers
only ever see this callable. A denoiser may also expose a per-sample feature vector captured during
the same forward pass (``last_features``, shape ``[B, feature_dim]``); AMED's predictor reads it, so
reading it must never cost an extra evaluation.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class Denoiser(nn.Module):
    """Base class for D(x, sigma).

    Subclasses implement :meth:`denoise` and, if they capture features, set ``self.last_features``
    inside it. ``feature_dim`` is the length of that vector (0 if none).
    """

    feature_dim: int = 0
    #: shape of one sample without the batch dimension, e.g. (1, 16, 16); solvers draw x_T from it
    sample_shape: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.last_features: torch.Tensor | None = None

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.denoise(x, as_batch_sigma(sigma, x))

    def identity(self) -> str:
        """A short stable hash of everything that determines the outputs (class, config, weights).

        Used to key caches (teacher trajectories, predictors) to the exact model.
        """
        h = hashlib.sha256(type(self).__qualname__.encode())
        h.update(repr(self.config()).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            # hashed in float32 so that one model in float32 and float64 has one identity
            h.update(tensor.detach().cpu().contiguous().to(torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]

    def config(self) -> dict:
        """The constructor arguments needed to rebuild the model (for checkpoints and identity)."""
        return {}


def device_of(model) -> torch.device:
    """The device of a denoiser's weights (its first parameter, else buffer); CPU for a plain callable.

    Sampling and distillation put their tensors there and never move the model: where the caller put
    it is where it stays.
    """
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(name, key: str, model=None) -> torch.dtype:
    """``float32`` or ``float64`` as a torch dtype; with ``model`` also ``auto`` (float64 for a model
    with an exact reference solution, the analytic ones, else float32). ``key`` names the setting in
    the error."""
    name = str(name)
    if model is not None and name == "auto":
        return torch.float64 if hasattr(model, "reference") else torch.float32
    if name not in DTYPES:
        accepted = ", ".join((["auto"] if model is not None else []) + list(DTYPES))
        raise ValueError(f"{key}={name!r}; accepted: {accepted}")
    return DTYPES[name]


def as_batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a tensor of shape [B] on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


class CountingDenoiser(nn.Module):
    """Wraps any denoiser and counts its calls: NFE is counted, never inferred.

    One call on a batch is one function evaluation. Features of the wrapped model pass through.
    """

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.inner = denoiser
        self.calls = 0

    @property
    def feature_dim(self) -> int:
        return getattr(self.inner, "feature_dim", 0)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.inner.sample_shape

    @property
    def last_features(self) -> torch.Tensor | None:
        return getattr(self.inner, "last_features", None)

    def identity(self) -> str:
        return self.inner.identity()

    def reset(self) -> None:
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, sigma)


def data_mean(denoiser, sigma: float, like: torch.Tensor, num: int = 64) -> torch.Tensor:
    """E[x0] of the model's data, for the mean-aware AFS.

    The model's own ``data_mean`` if it defines one (analytic models: exact); otherwise the mean of
    D(sigma z, sigma) over ``num`` fixed noises (D tends to E[x0] as sigma grows), computed once per
    model object and cached on it. That one calibration call is not a per-sample evaluation and is
    not counted in any sampling NFE.
    """
    model = denoiser
    while isinstance(model, CountingDenoiser):
        model = model.inner
    known = getattr(model, "data_mean", None)
    if known is None:
        known = getattr(model, "_estimated_data_mean", None)
    if known is None:
        # a plain callable D(x, sigma) has no sample_shape: one sample of ``like`` [B, ...] has the shape
        shape = tuple(getattr(model, "sample_shape", None) or like.shape[1:])
        z = torch.randn(num, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        z = z.to(device=like.device, dtype=like.dtype) * sigma
        with torch.no_grad():
            known = model(z, torch.full((num,), float(sigma), device=like.device, dtype=like.dtype)).mean(0)
        try:
            model._estimated_data_mean = known
        except AttributeError:  # an object that takes no attributes (a bound method): computed each time
            pass
    return known.to(device=like.device, dtype=like.dtype)


def counting(denoiser) -> CountingDenoiser:
    """Wrap ``denoiser`` in a :class:`CountingDenoiser` unless it already is one."""
    return denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastDenoiser(CountingDenoiser):
    """Runs the wrapped denoiser under torch.autocast (bf16/fp16) and returns x's dtype.

    For sampling only (mixed precision on GPU; bf16 also runs on CPU). The solver's own arithmetic
    stays in x's dtype; the model identity is the wrapped model's (precision is a sampling option).
    """

    def __init__(self, denoiser, precision: str = "bf16") -> None:
        super().__init__(denoiser)
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; accepted: {', '.join(PRECISIONS)}")
        self.precision = precision

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return self.inner(x, sigma)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = self.inner(x, sigma)
        return out.to(x.dtype)


def with_precision(denoiser, precision: str = "fp32"):
    """``denoiser`` itself for fp32, else wrapped in :class:`AutocastDenoiser`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; accepted: {', '.join(PRECISIONS)}")
    return denoiser if precision == "fp32" else AutocastDenoiser(denoiser, precision)
