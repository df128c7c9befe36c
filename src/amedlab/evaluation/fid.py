"""Fréchet distance between two feature sets (Heusel et al. 2017):
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, computed in float64 as in torch-fidelity."""
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


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise, as torch-fidelity does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features_a, features_b) -> float:
    """FID between two sets of features ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))
