"""Fréchet distance between two feature sets (Heusel et al. 2017):
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64.

``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD
matrix ``S2^(1/2) S1 S2^(1/2)`` (same eigenvalues as ``S1 S2``): stable when a covariance is singular,
as it is for ReLU features with dead units, where ``scipy.linalg.sqrtm(S1 @ S2)`` warns. One
implementation, batched, serves this module and the bootstrap of :mod:`.uncertainty`; the cells'
reported FID is torch-fidelity's (:func:`.metrics.fid_from_statistics`).
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import feature_statistics as _statistics


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with the unbiased 1/(N-1) normalisation) of ``[N, D]`` features
    (:func:`.metrics.feature_statistics`; numpy arrays are accepted too)."""
    if not isinstance(features, torch.Tensor):
        features = torch.from_numpy(np.asarray(features, np.float64))
    stats = _statistics(features)
    return stats["mu"], stats["sigma"]


def psd_root(s: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of PSD matrices ``[..., d, d]`` (negative eigenvalues clipped to 0)."""
    e, v = torch.linalg.eigh(s)
    return (v * e.clamp_min(0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


def frechet(mu1, s1, mu2, root2, tr2):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S2^1/2 S1 S2^1/2)^1/2, given S2^1/2 and tr S2 (reused
    across bootstrap replicates); any of the arguments may carry a leading batch dimension."""
    eig = torch.linalg.eigvalsh(root2 @ s1 @ root2)
    d = mu1 - mu2
    return (d * d).sum(-1) + torch.diagonal(s1, dim1=-2, dim2=-1).sum(-1) + tr2 - 2 * eig.clamp_min(0).sqrt().sum(-1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of two (mean, covariance) pairs, in float64."""
    mu1, mu2 = (torch.atleast_1d(torch.as_tensor(np.asarray(m, np.float64))) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(torch.as_tensor(np.asarray(s, np.float64))) for s in (sigma1, sigma2))
    # the formula is symmetric; the square root is taken of the first covariance
    return float(frechet(mu2, sigma2, mu1, psd_root(sigma1), torch.trace(sigma1)))


def fid_from_features(features_a, features_b) -> float:
    """FID between two sets of features ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
