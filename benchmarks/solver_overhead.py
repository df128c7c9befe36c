"""Solver overhead: time spent outside the denoiser, relative to the denoiser's own time.

At NFE 5 and batch 256 every solver samples with a cheap denoiser (one multiply) whose own time is
measured and subtracted; what remains is the solver's work (driver loop, step rules, AFS, AMED's
predictor). It is reported as a fraction of NFE x the forward time of the digits U-Net (~1.2M
parameters, the project's teacher size) at the same batch. Target: under 2% for every solver.

    .venv/bin/python benchmarks/solver_overhead.py
"""
from __future__ import annotations

import time

import torch

from amedlab.amed import AMEDPredictor
from amedlab.solvers.spec import solver_from_node
from amedlab.specs import load_group
from amedlab.schedules import grid_for
from amedlab.models.base import Denoiser
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser, make_digits_denoiser

NFE, BATCH, REPEATS = 5, 256, 20
SCHEDULE = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
SOLVERS = ["euler", "heun", "midpoint", "dpm2", "ipndm", "dpmpp2m", "dpmpp3m", "unipc", "amed", "amed_plugin"]


class TimedCheap(Denoiser):
    """D(x, sigma) = 0.5 x, timing itself; exposes a 128-d feature like the U-Net's."""

    feature_dim = 128
    sample_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def denoise(self, x, sigma):
        t = time.perf_counter()
        out = 0.5 * x
        self.last_features = x.flatten(1)[:, :1].expand(-1, self.feature_dim)
        self.seconds += time.perf_counter() - t
        return out


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)  # one thread: the figures are per core, and a shared 2-core box oversubscribes
    # the shipped teacher when present, else an untrained U-Net of about the same size
    unet = load_denoiser(SHIPPED_TEACHER) if SHIPPED_TEACHER.is_file() else make_digits_denoiser({"img_resolution": 8, "model_channels": 32}).eval()
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(BATCH, *unet.sample_shape) * 80.0
    sigma = torch.full((BATCH,), 1.0)
    unet_time = best_of(lambda: unet(x, sigma), 10)
    print(f"digits U-Net: {params / 1e6:.2f}M parameters, forward at batch {BATCH}: {unet_time * 1e3:.2f} ms "
          f"({torch.get_num_threads()} threads)\n")
    print(f"| solver | NFE | overhead per batch (ms) | overhead / denoiser time at NFE {NFE} |")
    print("|---|---|---|---|")
    cheap = TimedCheap()
    for name in SOLVERS:
        node = load_group("solver", name)
        extra = {"predictor": AMEDPredictor(feature_dim=TimedCheap.feature_dim)} if name.startswith("amed") else {}
        solver = solver_from_node(node, **extra)
        sigmas = grid_for(solver, NFE, SCHEDULE)
        overheads = []
        for _ in range(REPEATS):
            cheap.seconds = 0.0
            t = time.perf_counter()
            solver.sample(cheap, x, sigmas)
            overheads.append(time.perf_counter() - t - cheap.seconds)
        overhead = min(overheads)
        print(f"| {name} | {NFE} | {overhead * 1e3:.3f} | {overhead / (NFE * unet_time):.2%} |")


if __name__ == "__main__":
    main()
