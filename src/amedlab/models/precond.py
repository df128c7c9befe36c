"""EDM preconditioning (Karras et al. 2022, Table 1) and feature capture around a raw network.

``D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` with
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` and ``sd = sigma_data``.

Features for AMED: a forward hook on one named block of the raw network keeps that block's output
during the very forward pass that computes D(x, sigma); ``last_features`` is its channel-mean,
flattened (``[B, H_low * W_low]``), as in the official AMED code. No extra evaluation is made.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Denoiser


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class FeatureHook:
    """Keeps the output of ``module`` from the latest forward pass; ``pop()`` returns the
    channel-mean ``[B, H*W]`` (detached) and clears it."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.output = output[0] if isinstance(output, tuple) else output

    def clear(self) -> None:
        self.output = None

    def pop(self) -> torch.Tensor | None:
        out, self.output = self.output, None
        if out is None:
            return None
        return out.detach().mean(dim=1).flatten(1)


def feature_dim_of(net: nn.Module, block: str, forward) -> int:
    """Length of the captured feature vector: run ``forward()`` once (shape probe, not sampling)."""
    hook = FeatureHook(net.get_submodule(block))
    try:
        with torch.no_grad():
            forward()
        feats = hook.pop()
    finally:
        hook.handle.remove()
    if feats is None:
        raise RuntimeError(f"feature block {block!r} did not run during a forward pass")
    return feats.shape[1]


class EDMPrecond(Denoiser):
    """Denoiser around a raw network ``net(x_in, c_noise) -> F_x`` trained with EDM's loss.

    ``feature_block`` names a submodule of ``net`` (dotted path, e.g. ``'enc.4x4_block1'``) whose
    output is captured as AMED's feature vector; ``None`` disables capture.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sample_shape: tuple[int, ...] = (1, 8, 8),
                 feature_block: str | None = None) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data!r} must be > 0")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.feature_block = feature_block
        self._hook = FeatureHook(net.get_submodule(feature_block)) if feature_block else None
        self.feature_dim = 0
        if feature_block:
            x = torch.zeros(1, *self.sample_shape)
            self.feature_dim = feature_dim_of(net, feature_block, lambda: net(x, torch.zeros(1)))

    def config(self) -> dict:
        net_config = self.net.config() if callable(getattr(self.net, "config", None)) else {}
        return dict(sigma_data=self.sigma_data, sample_shape=list(self.sample_shape),
                    feature_block=self.feature_block, net=net_config)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        if self._hook is not None:
            self._hook.clear()
        # the network runs in its own precision (float32 weights); sampling may be float64:
        # the preconditioning and the solver stay in x's dtype
        weight = next(self.net.parameters(), None)
        net_dtype = x.dtype if weight is None or not weight.is_floating_point() else weight.dtype
        f_x = self.net((c_in * x).to(net_dtype), c_noise.flatten().to(net_dtype))
        if self._hook is not None:
            self.last_features = self._hook.pop().to(x.dtype)
        return c_skip * x + c_out * f_x.to(x.dtype)


def lognormal_sigma(batch: int, p_mean: float, p_std: float, generator=None, device=None) -> torch.Tensor:
    """EDM's training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
    return torch.exp(torch.randn(batch, generator=generator, device=device) * p_std + p_mean)


def edm_loss(denoiser: EDMPrecond, y: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2,
             generator=None) -> torch.Tensor:
    """EDM training loss: E[lambda(sigma) ||D(y + n, sigma) - y||^2] with n ~ N(0, sigma^2 I).

    Mean over the batch and the pixels (EDM sums over pixels; the scale only changes the learning
    rate).
    """
    sigma = lognormal_sigma(y.shape[0], p_mean, p_std, generator=generator, device=y.device).to(y.dtype)
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    s = sigma.reshape(-1, *([1] * (y.ndim - 1)))
    d = denoiser(y + s * noise, sigma)
    weight = edm_loss_weight(s, denoiser.sigma_data)
    return (weight * (d - y) ** 2).mean()


__all__ = ["EDMPrecond", "FeatureHook", "edm_coefficients", "edm_loss", "edm_loss_weight", "lognormal_sigma"]
