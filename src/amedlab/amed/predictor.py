"""g_phi: the tiny network that picks, per sample and interval, where the mean direction is taken.

AMED (Zhou et al., CVPR 2024, Sec. 3.3): input = the channel-mean of the U-Net's lowest-resolution
feature map h (zeros on an AFS step) and sinusoidal embeddings of t_cur and t_next through a shared
Linear + SiLU; feature branch Linear(F, 128) - SiLU - Linear(128, 4); heads Linear(4 + 2E, 1) with a
sigmoid for r in (0, 1), the direction scale c in [1 - s_dir, 1 + s_dir] and the time scale
a in [1 - s_time, 1 + s_time]. About 9k parameters at the paper's sizes (F = 64, E = 8).

A saved predictor carries everything it was trained for (``meta``): sampling with another model,
grid, schedule or AFS setting is an error, not a silent mismatch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..cache import read_tensors, save_verified, verified

FORMAT_VERSION = 1


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """EDM's positional embedding (endpoint=True) of c_noise = log(sigma) / 4, shape [B, dim]."""
    half = dim // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=t.dtype, device=t.device) / max(half - 1, 1))
    arg = (torch.log(t) / 4)[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class AMEDPredictor(nn.Module):
    def __init__(
        self,
        feature_dim: int = 64,
        hidden_dim: int = 128,
        bottleneck_dim: int = 4,
        time_dim: int = 8,
        s_dir: float = 0.0,
        s_time: float = 0.0,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("feature_dim", feature_dim), ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim)):
            if int(value) < 1:
                raise ValueError(f"predictor.{key}={value!r} must be a positive integer")
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"predictor.time_dim={time_dim!r} must be an even integer >= 2")
        for key, value in (("s_dir", s_dir), ("s_time", s_time)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"predictor.{key}={value!r} must be in [0, 1)")
        self.hparams = dict(feature_dim=int(feature_dim), hidden_dim=int(hidden_dim), bottleneck_dim=int(bottleneck_dim),
                            time_dim=int(time_dim), s_dir=float(s_dir), s_time=float(s_time))
        self.meta = dict(meta or {})
        self.feature_dim, self.time_dim, self.s_dir, self.s_time = int(feature_dim), int(time_dim), float(s_dir), float(s_time)
        self.time_layer = nn.Linear(time_dim, time_dim)
        self.enc = nn.Linear(feature_dim, hidden_dim)
        self.bottleneck = nn.Linear(hidden_dim, bottleneck_dim)
        joint = bottleneck_dim + 2 * time_dim
        self.head_r = nn.Linear(joint, 1)
        self.head_c = nn.Linear(joint, 1) if s_dir > 0 else None
        self.head_a = nn.Linear(joint, 1) if s_time > 0 else None

    def forward(self, features: torch.Tensor | None, t_cur: torch.Tensor, t_next: torch.Tensor):
        """Return (r, c, a), each of shape [B]; features None (an AFS step) counts as zeros."""
        batch = t_cur.shape[0]
        dtype = self.enc.weight.dtype
        if features is None:
            features = torch.zeros(batch, self.feature_dim, dtype=dtype, device=t_cur.device)
        if features.shape != (batch, self.feature_dim):
            raise ValueError(f"predictor expects features of shape [{batch}, {self.feature_dim}], got {tuple(features.shape)}")
        emb = [F.silu(self.time_layer(sinusoidal_embedding(t.to(dtype), self.time_dim))) for t in (t_cur, t_next)]
        h = self.bottleneck(F.silu(self.enc(features.to(dtype))))
        z = torch.cat([h, *emb], dim=1)
        r = torch.sigmoid(self.head_r(z)).reshape(batch)
        one = torch.ones_like(r)
        c = one if self.head_c is None else 1 + self.s_dir * (2 * torch.sigmoid(self.head_c(z)).reshape(batch) - 1)
        a = one if self.head_a is None else 1 + self.s_time * (2 * torch.sigmoid(self.head_a(z)).reshape(batch) - 1)
        return r, c, a

    # -- persistence: plain tensors and builtins only, so loading works with weights_only=True --
    def save(self, path: str | Path, spec: dict | None = None, records: list | None = None) -> Path:
        """Written atomically with a digest of its content (:func:`amedlab.cache.save_verified`).
        ``spec`` / ``records``: what it was trained for and the training records, stored (under the digest)
        by the cache (:func:`amedlab.cache.trained_once`), which uses a cached file only for the same spec."""
        blob = {"format": FORMAT_VERSION, "hparams": self.hparams, "meta": self.meta,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        blob.update({k: v for k, v in (("spec", spec), ("records", records)) if v is not None})
        return save_verified(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> "AMEDPredictor":
        """Tensors only (``weights_only=True``); a file carrying a digest must match it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"solver.predictor={str(path)!r}: no such predictor file")
        try:
            blob = read_tensors(path)
        except ValueError as err:
            raise ValueError(f"{str(path)!r} is not a predictor file: {err}") from None
        return cls.from_blob(blob, path)

    @classmethod
    def from_blob(cls, blob, path: str | Path) -> "AMEDPredictor":
        """The predictor in a blob read from ``path`` (named in the errors) by :meth:`load`."""
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"{str(path)!r}: predictor format {found!r}, expected {FORMAT_VERSION} "
                             "(a predictor.pt written by stage=distill)")
        if "digest" in blob and not verified(blob):
            raise ValueError(f"{str(path)!r}: the predictor's content does not match its digest (the file is corrupted)")
        try:
            model = cls(**blob["hparams"], meta=blob["meta"])
            model.load_state_dict(blob["state_dict"])
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"{str(path)!r}: not a valid predictor ({str(err).splitlines()[0]})") from None
        return model

    def learned_grid(self) -> torch.Tensor | None:
        """The grid it was trained on if it learned that grid (``solver.distill.learn_grid``: its
        ``meta["sigmas"]``), float64; None for a predictor trained on the schedule's grid."""
        meta = self.meta or {}
        return torch.tensor(meta["sigmas"], dtype=torch.float64) if meta.get("learned_grid") else None

    def check_compatible(self, model_identity: str | None, sigmas: torch.Tensor, afs) -> None:
        """Raise if sampling differs from what the predictor was trained for (meta keys absent = untrained)."""
        meta = self.meta
        if not meta:
            return
        if model_identity is not None and meta.get("model_identity") not in (None, model_identity):
            raise ValueError(
                f"this predictor was distilled for model {meta.get('model_name')!r} (identity {meta['model_identity']}), "
                f"not for the model given (identity {model_identity}); distill one for this model")
        trained = torch.tensor(meta["sigmas"], dtype=torch.float64)
        if len(trained) != len(sigmas) or not torch.allclose(trained, sigmas.detach().double().cpu(), rtol=1e-6, atol=0):
            if meta.get("learned_grid"):
                raise ValueError(
                    f"this predictor learned its own {len(trained)}-point grid {[round(v, 4) for v in trained.tolist()]} "
                    f"(solver.distill.learn_grid), not the {len(sigmas)}-point grid given "
                    f"{[round(v, 4) for v in sigmas.detach().double().tolist()]}: sample on its own grid (own_grid())")
            raise ValueError(
                f"this predictor was distilled for a {len(trained)}-point {meta.get('schedule')} grid "
                f"{[round(v, 4) for v in trained.tolist()]}, not for the {len(sigmas)}-point grid given "
                f"{[round(v, 4) for v in sigmas.double().tolist()]}: use the schedule, rho and nfe it was trained for")
        if meta.get("afs", False) != afs:
            raise ValueError(f"this predictor was distilled with afs={meta.get('afs')}, sampling asks afs={afs}")


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

