"""Sampling throughput (images/s) per solver at NFE 5 on the digits teacher, per precision.

    .venv/bin/python benchmarks/throughput.py --device cpu --batch 500 --precisions fp32,bf16
    python benchmarks/throughput.py --device cuda --batch 4096 --precisions fp32,bf16,fp16   # GPU
"""
from __future__ import annotations

import argparse
import time

import torch

from amedlab.amed import AMEDPredictor
from amedlab.configs import grid_for, load_group, solver_from_cfg
from amedlab.models.base import with_precision
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser
from amedlab.sampling import seeded_noise

SOLVERS = ["euler", "heun", "dpm2", "ipndm", "dpmpp3m", "unipc", "amed", "amed_plugin"]
SCHEDULE = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_denoiser(SHIPPED_TEACHER).to(args.device)
    x = seeded_noise(range(args.batch), model.sample_shape, 80.0).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"batch {args.batch}, NFE {args.nfe}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| solver | " + " | ".join(f"{p} img/s" for p in args.precisions.split(",")) + " |")
    print("|---" * (1 + len(args.precisions.split(","))) + "|")
    for name in SOLVERS:
        node = load_group("solver", name)
        extra = {"predictor": AMEDPredictor(feature_dim=model.feature_dim).to(args.device)} if name.startswith("amed") else {}
        solver = solver_from_cfg(node, **extra)
        sigmas = grid_for(solver, args.nfe, SCHEDULE)
        cells = []
        for precision in args.precisions.split(","):
            den = with_precision(model, precision)
            with torch.no_grad():
                solver.sample(den, x, sigmas)  # warm-up
                sync()
                t = time.perf_counter()
                for _ in range(args.repeats):
                    solver.sample(den, x, sigmas)
                sync()
            cells.append(f"{args.batch * args.repeats / (time.perf_counter() - t):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
