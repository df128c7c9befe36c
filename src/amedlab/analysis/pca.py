"""Geometry of sampling trajectories: per-trajectory PCA, distance from the chord and from the top-2 plane.

A trajectory is the sequence of states x_0 = x_T, ..., x_{T-1} (the sample) of one ODE solve,
flattened per sample to D numbers. For each trajectory separately (Zhou et al. 2024, sec. 3;
Chen et al. 2023, "A geometric perspective on diffusion models"):

- PCA of its T points (centred on their mean): cumulative explained variance of the top k
  components and the error of the trajectory rebuilt from them,
  ``rel_error[k] = ||X - X_k||_F / ||X||_F`` (X uncentred: relative to the trajectory itself);
  ``point_rel_error[k](t) = ||x_t - x_k,t|| / ||x_t||`` per point (the small-sigma end, where the
  points are small, counts as much as the start);
- deviation from the straight line through its end points (the chord x_T -> x_0) and from the
  affine plane of its top 2 components, per point, in units of the chord length ||x_T - x_0||;
- ``arc_to_chord``: polygonal path length over chord length (1 for a straight trajectory).

With k >= rank (e.g. D = 2), the rebuild is exact: explained variance 1 and error 0.
"""
from __future__ import annotations

import torch

#: quantiles reported for every per-trajectory quantity
QUANTILES = {"p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}


def flatten_trajectories(traj: torch.Tensor) -> torch.Tensor:
    """[B, T, *sample_shape] -> float64 [B, T, D]."""
    if traj.ndim < 3:
        raise ValueError(f"trajectories must have shape [B, T, ...], got {tuple(traj.shape)}")
    return traj.reshape(traj.shape[0], traj.shape[1], -1).to(torch.float64)


def _point_distance_to_line(X: torch.Tensor) -> torch.Tensor:
    """Distance of every point to the line through the first and last point: [B, T] (vector form, no
    cancellation, so a straight trajectory gives ~1e-16 of its size)."""
    a, b = X[:, :1], X[:, -1:]
    u = (b - a) / (b - a).norm(dim=-1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    w = X - a
    return (w - (w * u).sum(-1, keepdim=True) * u).norm(dim=-1)


def trajectory_geometry(traj: torch.Tensor, max_components: int = 4) -> dict[str, torch.Tensor]:
    """Per-trajectory geometry of ``traj`` [B, T, ...] (see the module docstring).

    Returns tensors (float64): ``explained_variance`` [B, K] (cumulative, k = 1..K),
    ``unexplained_variance`` [B, K] (1 - explained, computed from the tail so it is exact near 0),
    ``rel_error`` [B, K], ``point_rel_error`` [B, K, T], ``max_point_rel_error`` [B, K],
    ``line_deviation`` [B, T] and ``plane_deviation`` [B, T] (per point, over the chord length),
    ``max_line_deviation`` [B], ``max_plane_deviation`` [B], ``arc_to_chord`` [B] and
    ``plane_coords`` [B, T, 2] (each trajectory in its own top-2 PC coordinates, for plots).
    """
    X = flatten_trajectories(traj)
    B, T, D = X.shape
    K = int(max_components)
    if K < 1:
        raise ValueError(f"analysis.max_components={max_components!r} must be >= 1")
    Xc = X - X.mean(1, keepdim=True)
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)  # U [B, T, r], S [B, r], r = min(T, D)
    r = S.shape[-1]
    if r < K + 1:  # pad: components beyond the rank carry nothing
        U = torch.cat([U, U.new_zeros(B, T, K + 1 - r)], -1)
        S = torch.cat([S, S.new_zeros(B, K + 1 - r)], -1)
    var = S**2
    total = var.sum(-1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    tail = torch.stack([var[:, k:].sum(-1) for k in range(1, K + 1)], -1)  # [B, K] variance beyond top k
    coords = U * S[:, None, :]  # [B, T, r]: each point in the PC basis
    # squared residual of each point after keeping the top k components = its tail energy
    point_tail = torch.stack([coords[..., k:].pow(2).sum(-1) for k in range(1, K + 1)], 1)  # [B, K, T]
    point_norm = X.norm(dim=-1).clamp_min(torch.finfo(X.dtype).tiny)  # [B, T]
    chord = (X[:, -1] - X[:, 0]).norm(dim=-1).clamp_min(torch.finfo(X.dtype).tiny)  # [B]
    point_rel = point_tail.sqrt() / point_norm[:, None, :]
    line_dev = _point_distance_to_line(X) / chord[:, None]
    plane_tail = coords[..., 2:].pow(2).sum(-1)
    plane_dev = plane_tail.sqrt() / chord[:, None]
    arc = (X[:, 1:] - X[:, :-1]).norm(dim=-1).sum(-1)
    return {
        "explained_variance": 1.0 - tail / total,
        "unexplained_variance": tail / total,
        "rel_error": point_tail.sum(-1).sqrt() / X.pow(2).sum((1, 2)).sqrt()[:, None],
        "point_rel_error": point_rel,
        "max_point_rel_error": point_rel.amax(-1),
        "line_deviation": line_dev,
        "plane_deviation": plane_dev,
        "max_line_deviation": line_dev.amax(-1),
        "max_plane_deviation": plane_dev.amax(-1),
        "arc_to_chord": arc / chord,
        "plane_coords": coords[..., :2].clone(),
    }


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean, min, max and quantiles of a 1-D tensor of per-trajectory (or per-sample) values."""
    v = values.detach().reshape(-1).to(torch.float64)
    q = torch.quantile(v, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": v.mean().item(), "min": v.min().item(), **{k: x.item() for k, x in zip(QUANTILES, q)},
            "max": v.max().item()}


def summarize_geometry(geom: dict[str, torch.Tensor], sigmas: torch.Tensor) -> dict:
    """JSON-ready summary: distributions over trajectories per k, and mean profiles along sigma."""
    K = geom["explained_variance"].shape[1]
    per_k = {}
    for k in range(1, K + 1):
        per_k[str(k)] = {
            name: distribution(geom[name][:, k - 1])
            for name in ("explained_variance", "unexplained_variance", "rel_error", "max_point_rel_error")
        }
    profiles = {
        "sigma": [float(s) for s in sigmas],
        "line_deviation_mean": geom["line_deviation"].mean(0).tolist(),
        "plane_deviation_mean": geom["plane_deviation"].mean(0).tolist(),
        **{f"point_rel_error_k{k}_mean": geom["point_rel_error"][:, k - 1].mean(0).tolist() for k in range(1, K + 1)},
    }
    return {
        "components": per_k,
        "max_line_deviation": distribution(geom["max_line_deviation"]),
        "max_plane_deviation": distribution(geom["max_plane_deviation"]),
        "arc_to_chord": distribution(geom["arc_to_chord"]),
        "profiles": profiles,
    }
