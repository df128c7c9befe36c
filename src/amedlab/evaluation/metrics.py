"""The numbers every cell reports: FID and KID (torch-fidelity) and the trajectory error.

Images are quantised as in the EDM and AMED reference code (generate.py): ``(x * 127.5 + 128).clip(0, 255)``
to uint8, then fed to a feature extractor (:mod:`.extractors`). FID and KID are torch-fidelity's
own functions on those features; the trajectory error is the RMSE, in data units, between a
cell's samples and a high-NFE solution of the same ODE from the same noise.
"""
from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] -> uint8 images, as EDM's generate.py and the paper's FID protocol."""
    return (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)


def dequantize(u: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (the inverse of :func:`quantize` up to rounding)."""
    return u.to(torch.float32) / 127.5 - 1.0


def feature_statistics(features: torch.Tensor) -> dict:
    """torch-fidelity's FID statistics ``{"mu", "sigma"}`` (float64) of features ``[N, D]``."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N >= 2, D]; got {tuple(features.shape)}")
    return fid_features_to_statistics(features.detach().cpu().double())


def fid_from_statistics(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two sets of statistics (torch-fidelity's implementation)."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in stats_a.items() if k in ("mu", "sigma")}
    b = {k: np.asarray(v, dtype=np.float64) for k, v in stats_b.items() if k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"feature dimensions differ: {a['mu'].shape} vs {b['mu'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return fid_from_statistics(feature_statistics(features_a), feature_statistics(features_b))


def kid_subset_size(requested: int, *set_sizes: int) -> int:
    """KID's subset size, clamped so that it is valid for every set (torch-fidelity refuses larger)."""
    return max(2, min(int(requested), *(int(n) for n in set_sizes)))


def kid(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> dict:
    """KID (polynomial kernel, torch-fidelity) with the subset size clamped to the set sizes."""
    size = kid_subset_size(subset_size, len(features_a), len(features_b))
    out = kid_features_to_metric(features_a.detach().cpu().double(), features_b.detach().cpu().double(),
                                 kid_subsets=int(subsets), kid_subset_size=size, rng_seed=int(seed), verbose=False)
    return {"kid_mean": float(out[KEY_METRIC_KID_MEAN]), "kid_std": float(out[KEY_METRIC_KID_STD]),
            "kid_subset_size": size, "kid_subsets": int(subsets)}


def per_sample_mse(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of each sample over its pixels ``[N]`` (float64); RMSE is the square
    root of their mean, and the uncertainty module's intervals and paired differences use them."""
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs reference {tuple(reference.shape)}")
    return (x.double() - reference.double()).pow(2).flatten(1).mean(1)


def rmse(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean squared difference over all samples and pixels (data units, [-1, 1] scale)."""
    return per_sample_mse(x, reference).mean().sqrt().item()
