"""Teacher trajectories for AMED distillation: generated once, cached on disk, verified on load.

The teacher runs on the student's schedule family with M extra points in every interval,
(M + 1)(N - 1) + 1 points in all, so the student's grid points are every (M + 1)-th teacher point
(all schedules here are uniform in a warped variable). Stored: the starting noise and the teacher
states at the student's grid points. The cache key hashes everything that determines them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ..cache import digest, load_verified, save_verified, seeds_spec
from ..solvers.spec import solver_from_node
from ..models.base import device_of
from ..progress import progress
from ..sampling import seeded_noise
from ..schedules import ScheduleSpec

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def student_grid(schedule: Mapping, num_points: int) -> torch.Tensor:
    return ScheduleSpec.from_cfg(schedule).grid(num_points)


def teacher_grid(schedule: Mapping, num_points: int, M: int) -> torch.Tensor:
    if int(M) < 0:
        raise ValueError(f"distill.M={M!r} must be >= 0")
    return student_grid(schedule, (M + 1) * (num_points - 1) + 1)


def trajectory_key(spec: dict) -> str:
    """The cache key of a :func:`trajectory_spec`: its :func:`amedlab.cache.digest`."""
    return digest(spec)


def trajectory_spec(model_identity: str, teacher: Mapping, schedule: Mapping, num_points: int, M: int,
                    seeds: list[int], dtype: torch.dtype) -> dict:
    seeds = list(seeds)
    return {
        "format": CACHE_FORMAT,
        "model_identity": model_identity,
        "teacher": {"name": teacher["name"], "afs": teacher.get("afs", False), "options": dict(teacher.get("options") or {})},
        "schedule": {k: (float(schedule[k]) if k != "kind" else schedule[k]) for k in ("kind", "sigma_min", "sigma_max", "rho")},
        "num_points": int(num_points),
        "M": int(M),
        # no "list:" prefix for a non-contiguous list: these keys predate it, and existing caches stay valid
        "seeds": seeds_spec(seeds, list_prefix=""),
        "num_trajectories": len(seeds),
        "dtype": str(dtype),
    }


@torch.no_grad()
def generate_trajectories(denoiser, teacher: Mapping, schedule: Mapping, num_points: int, M: int, seeds,
                          dtype=torch.float32, batch_size: int = 500) -> dict:
    """Run the teacher; return {"noise": [n, ...], "states": [n, num_points, ...]} (states[:, 0] = x_T).

    The teacher runs where its weights are (each batch of noise is moved there); the returned tensors
    are on the CPU (they are cached and served in batches). The noise is drawn on the CPU, one
    generator per seed, so it is the same on any device.
    """
    solver = solver_from_node(teacher)
    sigmas = teacher_grid(schedule, num_points, M)
    shape = tuple(denoiser.sample_shape)
    seeds = list(seeds)
    device = device_of(denoiser)
    noise = seeded_noise(seeds, shape, float(schedule["sigma_max"]), dtype)
    states = torch.empty(len(seeds), num_points, *shape, dtype=dtype)
    desc = f"teacher trajectories {teacher['name']}, {len(sigmas)} points"
    with progress(total=len(seeds), desc=desc, unit="traj") as bar:  # on a terminal only
        for lo in range(0, len(seeds), batch_size):
            kept = []

            def keep(state, stride=M + 1):
                if state.index % stride == 0:
                    kept.append(state.x)

            solver.sample(denoiser, noise[lo : lo + batch_size].to(device), sigmas, callback=keep)
            states[lo : lo + batch_size] = torch.stack(kept, dim=1).cpu()
            bar.update(len(kept[0]))
    return {"noise": noise, "states": states}


class TrajectoryCache:
    """Files ``<root>/<key>.pt`` holding the spec, the tensors and their digest
    (:func:`amedlab.cache.save_verified`; the same verification as every other cache)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, spec: dict) -> dict | None:
        """The cached trajectories for ``spec``, or None if absent; a corrupt file is removed."""
        blob = load_verified(self.path(trajectory_key(spec)), spec, what="trajectory cache")
        return None if blob is None else {"noise": blob["noise"], "states": blob["states"]}

    def save(self, spec: dict, data: dict) -> Path:
        return save_verified(self.path(trajectory_key(spec)), {"spec": spec, "noise": data["noise"], "states": data["states"]})


def cached_trajectories(denoiser, teacher: Mapping, schedule: Mapping, num_points: int, M: int, seeds,
                        cache_dir: str | Path | None, dtype=torch.float32, batch_size: int = 500) -> tuple[dict, bool]:
    """Load or generate (and store) the teacher trajectories. Returns (data, was_cached)."""
    spec = trajectory_spec(denoiser.identity(), teacher, schedule, num_points, M, list(seeds), dtype)
    cache = TrajectoryCache(cache_dir) if cache_dir else None
    if cache is not None:
        data = cache.load(spec)
        if data is not None:
            return data, True
    data = generate_trajectories(denoiser, teacher, schedule, num_points, M, seeds, dtype, batch_size)
    if cache is not None:
        cache.save(spec, data)
    return data, False


class TrajectoryDataModule(pl.LightningDataModule):
    """Serves teacher trajectories [n, num_points, ...] in batches; the same global batches on any
    number of processes.

    The order is one seeded permutation, read sequentially with incomplete batches dropped; under DDP
    each rank reads every world_size-th trajectory with batch_size / world_size per batch (an
    unshuffled DistributedSampler; the Trainer must not inject its own), so the union of the ranks'
    batch b is the one-process batch b and averaged gradients match one process.
    """

    def __init__(self, states: torch.Tensor, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = int(batch_size), int(seed)
        order = torch.randperm(len(states), generator=torch.Generator().manual_seed(self.seed))
        self.states = states[order]

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(f"distill.batch_size={self.batch_size} must be divisible by the number of processes ({world})")
        if len(self.states) < self.batch_size:
            raise ValueError(f"distill.num_trajectories={len(self.states)} is smaller than distill.batch_size={self.batch_size}")
        dataset = TensorDataset(self.states)
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, batch_size=self.batch_size // world, sampler=sampler, shuffle=False, drop_last=True)
