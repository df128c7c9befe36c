"""Sampling throughput (images/s) per solver at NFE 5 on the digits teacher, per precision.

    .venv/bin/python benchmarks/throughput.py --device cpu --batch 500 --precisions fp32,bf16
    python benchmarks/throughput.py --device cuda --batch 4096 --precisions fp32,bf16,fp16   # GPU
    python benchmarks/throughput.py --device cuda --batch 4096 --precisions fp32,bf16,fp16 --dry-run  # CPU check
"""
from __future__ import annotations

import argparse
import time

import torch

from amedlab.amed import AMEDPredictor
from amedlab.solvers.spec import solver_from_node
from amedlab.specs import load_group
from amedlab.schedules import grid_for
from amedlab.models.base import PRECISIONS, with_precision
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser
from amedlab.sampling import seeded_noise

SOLVERS = ["euler", "heun", "dpm2", "ipndm", "dpmpp3m", "unipc", "amed", "amed_plugin"]
SCHEDULE = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="check the arguments and build every solver's grid, on the CPU, without sampling")
    args = ap.parse_args(argv)
    args.device = str(torch.device(args.device))  # a malformed device string fails here
    args.precisions = args.precisions.split(",")
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown:
        ap.error(f"--precisions {','.join(unknown)}: accepted: {', '.join(PRECISIONS)}")
    if args.batch < 1 or args.repeats < 1:
        ap.error("--batch and --repeats must be >= 1")
    return args


def build_solvers(nfe: int, feature_dim: int, device: str) -> dict:
    """name -> (solver, sigmas) at ``nfe`` (an unreachable NFE fails here); AMED with an untrained predictor."""
    out = {}
    for name in SOLVERS:
        node = load_group("solver", name)
        extra = {"predictor": AMEDPredictor(feature_dim=feature_dim).to(device)} if name.startswith("amed") else {}
        solver = solver_from_node(node, **extra)
        out[name] = solver, grid_for(solver, nfe, SCHEDULE)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        build_solvers(args.nfe, load_denoiser(SHIPPED_TEACHER).feature_dim, "cpu")
        print(f"dry run: {len(SOLVERS)} solvers at NFE {args.nfe}, batch {args.batch}, precisions "
              f"{','.join(args.precisions)} on {args.device}: arguments and grids OK (nothing sampled)")
        return
    model = load_denoiser(SHIPPED_TEACHER).to(args.device)
    x = seeded_noise(range(args.batch), model.sample_shape, 80.0).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"batch {args.batch}, NFE {args.nfe}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| solver | " + " | ".join(f"{p} img/s" for p in args.precisions) + " |")
    print("|---" * (1 + len(args.precisions)) + "|")
    for name, (solver, sigmas) in build_solvers(args.nfe, model.feature_dim, args.device).items():
        cells = []
        for precision in args.precisions:
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
