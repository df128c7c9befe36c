"""Fréchet distance between two feature sets (Heusel et al. 2017):
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64.

``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD
matrix ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues as ``S1 S2``): stable when a covariance is singular,
as it is for ReLU features with dead units, where ``scipy.linalg.sqrtm(S1 @ S2)`` warns.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with the unbiased 1/(N-1) normalisation) of ``[N, D]`` features."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D]; got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    root1 = _psd_sqrt(sigma1)
    eig = scipy.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(features_a, features_b) -> float:
    """FID between two sets of features ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
