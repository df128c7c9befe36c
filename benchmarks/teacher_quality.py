"""Teacher quality on the built-in digits (a measurement, not a test).

FID in the digits classifier's feature space (penultimate layer, 64-d) of N teacher samples drawn
with Heun at NFE >= 35 (EDM's sampler: 18 points, final denoising step) against all 1797 real digits,
next to the floor: the FID between two disjoint random halves of the real set (mean over splits).
Target: teacher FID within 2x of the floor.

    PYTHONPATH=src python benchmarks/teacher_quality.py            # ~1-2 min on 2 CPU cores
    PYTHONPATH=src python benchmarks/teacher_quality.py --teacher outputs/.../digits_teacher.safetensors

Writes benchmarks/teacher_quality.json (atomically) and prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from amedlab.data.digits import digits_split, load_digits_tensors
from amedlab.models.digits_features import digits_features, load_digits_classifier
from amedlab.evaluation.fid import fid_from_features
from amedlab.models import build_model, counting
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver, num_points_for


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="digits classifier checkpoint (default: the shipped one)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=35, help="Heun evaluations, final denoising step included")
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor-splits", type=int, default=20, help="random half/half splits of the real set")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=str(Path(__file__).with_name("teacher_quality.json")))
    return p.parse_args()


@torch.no_grad()
def sample_teacher(teacher, num_samples: int, nfe: int, sigma_min: float, sigma_max: float, rho: float,
                   seed: int, batch_size: int) -> tuple[torch.Tensor, int]:
    """Heun (EDM) samples; returns (samples, counted NFE per batch)."""
    solver = make_solver("heun", final_step="denoise")
    num_points = num_points_for("heun", nfe, final_step="denoise")
    sigmas = make_sigmas("polynomial", num_points, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    den = counting(teacher)
    gen = torch.Generator().manual_seed(seed)
    out, nfe_counted = [], set()
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x = torch.randn(n, *teacher.sample_shape, generator=gen) * sigma_max
        den.reset()
        out.append(solver.sample(den, x, sigmas))
        nfe_counted.add(den.calls)
    if len(nfe_counted) != 1:
        raise RuntimeError(f"NFE differed between batches: {nfe_counted}")
    return torch.cat(out), nfe_counted.pop()


@torch.no_grad()
def denoising_mse(teacher, images: torch.Tensor, sigma: float, seed: int = 0) -> tuple[float, float]:
    """(MSE of D(x + sigma n, sigma), MSE of the identity map) against clean held-out images."""
    gen = torch.Generator().manual_seed(seed)
    noisy = images + sigma * torch.randn(images.shape, generator=gen)
    return float((teacher(noisy, sigma) - images).square().mean()), float((noisy - images).square().mean())


def nearest_neighbour_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """L2 distance (pixel space) from each query image to its nearest reference image."""
    return torch.cdist(queries.flatten(1).double(), references.flatten(1).double()).min(dim=1).values


def main() -> dict:
    args = parse_args()
    torch.manual_seed(args.seed)
    teacher = build_model({"name": "digits_unet", "path": args.teacher})
    classifier = load_digits_classifier(args.classifier)
    res = teacher.sample_shape[-1]
    real, labels = load_digits_tensors(image_size=res)
    train, held_out = digits_split()

    start = time.time()
    samples, nfe = sample_teacher(teacher, args.num_samples, args.nfe, args.sigma_min, args.sigma_max, args.rho,
                                  args.seed, args.batch_size)
    sampling_s = time.time() - start

    real_feats = digits_features(real, classifier)
    sample_feats = digits_features(samples, classifier)
    fid_teacher = fid_from_features(sample_feats, real_feats)
    gen = torch.Generator().manual_seed(args.seed)
    floors = []
    for _ in range(args.floor_splits):
        perm = torch.randperm(len(real), generator=gen)
        half = len(real) // 2
        floors.append(fid_from_features(real_feats[perm[:half]], real_feats[perm[half:]]))
    floors_t = torch.tensor(floors)
    # teacher subsets of the floor's size, for a like-for-like comparison (FID is biased upward at small N)
    fid_teacher_half = fid_from_features(sample_feats[: len(real) // 2], real_feats[perm[:half]])

    predicted = classifier(samples.clamp(-1, 1)).softmax(1)
    mse, mse_identity = denoising_mse(teacher, real[held_out], sigma=0.5)
    # memorisation check: are samples closer to the training images than unseen real digits are?
    nn_samples = nearest_neighbour_distances(samples.clamp(-1, 1), real[train])
    nn_held_out = nearest_neighbour_distances(real[held_out], real[train])
    near_copy = float(nn_held_out.quantile(0.05))
    result = {
        "teacher": str(args.teacher or "shipped"),
        "teacher_identity": teacher.identity(),
        "num_samples": args.num_samples,
        "num_real": len(real),
        "solver": "heun (EDM), polynomial schedule, final denoising step",
        "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho,
        "nfe_counted": nfe,
        "seed": args.seed,
        "fid_teacher_vs_real": round(fid_teacher, 4),
        "fid_floor_half_vs_half_mean": round(float(floors_t.mean()), 4),
        "fid_floor_half_vs_half_std": round(float(floors_t.std()), 4),
        "fid_floor_splits": args.floor_splits,
        "ratio_teacher_to_floor": round(fid_teacher / float(floors_t.mean()), 3),
        "fid_teacher_898_vs_real_half_898": round(fid_teacher_half, 4),
        "sample_class_histogram": torch.bincount(predicted.argmax(1), minlength=10).tolist(),
        "sample_mean_max_class_probability": round(float(predicted.max(1).values.mean()), 4),
        "real_mean_max_class_probability": round(float(classifier(real).softmax(1).max(1).values.mean()), 4),
        "nn_distance_to_train_samples_median": round(float(nn_samples.median()), 4),
        "nn_distance_to_train_held_out_median": round(float(nn_held_out.median()), 4),
        "fraction_samples_closer_than_5th_percentile_of_held_out": round(float((nn_samples < near_copy).double().mean()), 4),
        "held_out_denoising_mse_sigma_0.5": round(mse, 5),
        "held_out_identity_mse_sigma_0.5": round(mse_identity, 5),
        "sampling_wall_s": round(sampling_s, 1),
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
