"""Seeded sampling: sample i depends on seed i only, never on batch size or how seeds are split."""
from __future__ import annotations

import re

import torch


def parse_seeds(spec) -> list[int]:
    """``"0-49999"``, ``"0-9,20,30-31"``, an int N (= 0..N-1) or a list of ints -> list of seeds."""
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"seeds={spec!r}: a count must be >= 1")
        return list(range(spec))
    if isinstance(spec, str):
        seeds = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"seeds={spec!r}: expected ranges like '0-49999' or '0-9,20'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"seeds={spec!r}: range {part} is empty")
            seeds.extend(range(lo, hi + 1))
        return seeds
    return [int(s) for s in spec]


def seeded_noise(seeds, shape, sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """x_T = sigma * z with z drawn from one torch.Generator per seed (as EDM's generate.py)."""
    out = torch.empty(len(seeds), *shape, dtype=dtype, device=device)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return out * sigma
