"""Sampling sharded over processes by seed: the set of images is the same for any process count.

Rank r of W takes seeds[r::W] (each sample depends on its own seed only), samples them with
:func:`amedlab.sampling.generate`, and the shards are gathered back into seed order on
every rank. Works under torchrun / Lightning / SLURM (any initialised torch.distributed group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..sampling import generate


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def generate_sharded(denoiser, solver, sigmas: torch.Tensor, seeds, batch_size: int = 500, dtype=torch.float32,
                     device: str = "cpu", progress: str | None = None) -> tuple[torch.Tensor, int]:
    """Like ``generate`` (same arguments and result), with the seeds split over the processes."""
    seeds = list(seeds)
    rank, size = world()
    if size == 1:
        return generate(denoiser, solver, sigmas, seeds, batch_size, dtype, device, progress)
    if len(seeds) < size:
        raise ValueError(f"eval.seeds has {len(seeds)} seeds for {size} processes: at least one per process is needed")
    mine, nfe = generate(denoiser, solver, sigmas, seeds[rank::size], batch_size, dtype, device, progress)
    shards = [None] * size
    dist.all_gather_object(shards, (mine, nfe))
    if len({n for _, n in shards}) != 1:
        raise RuntimeError(f"processes counted different NFE: {[n for _, n in shards]}")
    out = torch.empty(len(seeds), *mine.shape[1:], dtype=mine.dtype)
    for r, (part, _) in enumerate(shards):
        out[r::size] = part
    return out, nfe
