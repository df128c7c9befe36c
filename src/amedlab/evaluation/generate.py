"""Seeded sampling: sample i depends on seed i only, never on the batch size or the split of seeds."""
from __future__ import annotations

import logging
import time

import torch

from ..models import counting
from ..sampling import seeded_noise

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(denoiser, solver, sigmas: torch.Tensor, seeds, batch_size: int = 500, dtype=torch.float32,
             device: str = "cpu", progress: str | None = None) -> tuple[torch.Tensor, int]:
    """Run ``solver`` from x_T = sigma_max * z(seed) for every seed; returns (samples on CPU, NFE).

    The noise of each sample comes from its own generator (:func:`amedlab.sampling.seeded_noise`);
    NFE is counted per batch (every batch must make the same number of model calls).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("eval.seeds is empty")
    if int(batch_size) < 1:
        raise ValueError(f"eval.batch_size={batch_size!r} must be >= 1")
    model = counting(denoiser)
    shape = tuple(model.sample_shape)
    out = torch.empty(len(seeds), *shape, dtype=dtype)
    nfe, t0 = None, time.perf_counter()
    for lo in range(0, len(seeds), int(batch_size)):
        chunk = seeds[lo : lo + int(batch_size)]
        x_T = seeded_noise(chunk, shape, float(sigmas[0]), dtype=dtype, device=device)
        model.reset()
        out[lo : lo + len(chunk)] = solver.sample(model, x_T, sigmas).to("cpu", dtype)
        if nfe is None:
            nfe = model.calls
        elif model.calls != nfe:
            raise RuntimeError(f"batches made different numbers of model calls ({nfe} vs {model.calls})")
        if progress:
            done = lo + len(chunk)
            log.info("%s: %d/%d samples (%.1f s)", progress, done, len(seeds), time.perf_counter() - t0)
    return out, int(nfe)
