"""Analytic data distributions with exact denoisers: ground truth for solver correctness.

For data x0 ~ N(mu, s^2 I), x = x0 + sigma n is N(mu, (s^2 + sigma^2) I), so
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and the probability-flow ODE dx/dsigma = (x - D)/sigma
has the closed form x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (x(sigma_0) - mu):
a straight line towards mu. A mixture of such Gaussians has an exact D (posterior-weighted
component denoisers) but no closed-form trajectory; its reference comes from an adaptive
8th-order Runge-Kutta (scipy DOP853) at tight tolerance.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .base import Denoiser
from .factory import register_model


class GaussianMixture(Denoiser):
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) in ``dim`` dimensions.

    Features (for AMED's predictor): the posterior component responsibilities p(k | x, sigma),
    computed in the same call; ``feature_dim`` = number of components.
    """

    def __init__(self, means, stds, weights=None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"model.means must be a [K, dim] list, got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (stds <= 0).any() or (weights <= 0).any() or weights.shape != (k,):
            raise ValueError("model.stds and model.weights must be positive, one per component")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.feature_dim = k
        self.sample_shape = (means.shape[1],)

    def config(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}

    @property
    def data_mean(self) -> torch.Tensor:
        """E[x0] = sum_k w_k mu_k (exact)."""
        return (self.weights[:, None] * self.means).sum(0)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        means, var0 = self.means.to(x.dtype), (self.stds**2).to(x.dtype)  # [K, d], [K]
        var = var0[None] + sigma[:, None] ** 2  # [B, K]
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # [B, K]
        d = x.shape[-1]
        logp = torch.log(self.weights.to(x.dtype))[None] - 0.5 * sq / var - 0.5 * d * torch.log(var)
        resp = torch.softmax(logp, dim=-1)
        self.last_features = resp
        shrink = (var0[None] / var)[..., None]  # [B, K, 1]
        comp = means[None] + shrink * (x[:, None, :] - means[None])
        return (resp[..., None] * comp).sum(1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.sample_shape[0], dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * noise

    def reference(self, x: torch.Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
        """Accurate ODE solution from sigma_from to sigma_to (DOP853 in log sigma, float64)."""
        shape, dtype = x.shape, x.dtype
        # In s = log sigma the ODE is dx/ds = x - D(x, e^s): smooth over 5 decades of sigma.
        def rhs(s, y):
            xt = torch.from_numpy(y).reshape(shape)
            sig = torch.full((shape[0],), math.exp(s), dtype=torch.float64)
            return (xt - self.denoise(xt, sig)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(sigma_from), math.log(sigma_to)), x.detach().double().reshape(-1).numpy(),
                        method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference integration failed: {sol.message}")
        return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape).to(dtype)


class Gaussian(GaussianMixture):
    """A single isotropic Gaussian N(mu, s^2 I): exact denoiser and exact ODE solution.

    Feature: the per-sample normalised distance |x - mu| / sqrt(dim (s^2 + sigma^2)) (1 number).
    """

    def __init__(self, dim: int = 2, mean: float | list = 0.0, std: float = 0.5) -> None:
        mu = torch.as_tensor(mean, dtype=torch.float64).expand(dim).clone()
        super().__init__(mu[None], [std])

    def config(self) -> dict:
        return {"dim": self.sample_shape[0], "mean": self.means[0].tolist(), "std": float(self.stds[0])}

    def denoise(self, x, sigma):
        mu, var0 = self.means[0].to(x.dtype), float(self.stds[0]) ** 2
        var = var0 + sigma[:, None] ** 2
        self.last_features = ((x - mu) ** 2).sum(-1, keepdim=True).div(var * x.shape[-1]).sqrt()
        return mu + var0 / var * (x - mu)

    def reference(self, x, sigma_from, sigma_to, rtol=None, atol=None):
        """Exact: x(sigma) = mu + sqrt((s^2 + sigma^2)/(s^2 + sigma_0^2)) (x(sigma_0) - mu)."""
        mu, var0 = self.means[0].to(x.dtype), float(self.stds[0]) ** 2
        return mu + math.sqrt((var0 + sigma_to**2) / (var0 + sigma_from**2)) * (x - mu)


def default_mixture(dim: int = 2, num_components: int = 4, std: float = 0.3, seed: int = 0) -> GaussianMixture:
    """A reproducible mixture: component means drawn N(0, I) with a fixed seed, unequal weights.

    The means are centred so that E[x0] = 0, as for normalised image data; AFS assumes it (its slope
    x_T / sqrt(1 + sigma^2) is exact for zero-mean unit-variance data).
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    weights = torch.linspace(1.0, 2.0, num_components, dtype=torch.float64)
    means = means - (weights[:, None] * means).sum(0) / weights.sum()
    return GaussianMixture(means, std, weights)


@register_model("gaussian")
def _build_gaussian(node) -> Gaussian:
    return Gaussian(dim=int(node.get("dim", 2)), mean=node.get("mean", 0.0), std=float(node.get("std", 0.5)))


@register_model("gaussian_mixture")
def _build_mixture(node) -> GaussianMixture:
    return default_mixture(int(node.get("dim", 2)), int(node.get("num_components", 4)),
                           float(node.get("std", 0.3)), int(node.get("seed", 0)))
