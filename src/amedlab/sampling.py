"""Seeded sampling: sample i depends on seed i only, never on batch size or how seeds are split."""
from __future__ import annotations

import logging
import re
import time

import torch

from .progress import enabled as bars_shown, progress as progress_bar

log = logging.getLogger(__name__)


def parse_seeds(spec) -> list[int]:
    """``"0-49999"``, ``"0-9,20,30-31"``, an int N (= 0..N-1) or a list of ints -> list of seeds.

    Seeds are distinct integers in [0, 2^32) (duplicates would count one sample several times), at
    most :data:`~amedlab.limits.MAX_SEEDS` of them; the count is checked before the list is built."""
    from .limits import MAX_SEEDS, SEED_LIMIT

    accepted = f"distinct integer seeds in [0, 2^32), at most {MAX_SEEDS}: a range like 0-1999, a list like 0-9,20, or a count N"
    if isinstance(spec, bool) or spec is None:
        raise ValueError(f"seeds={spec!r}; accepted: {accepted}")
    if isinstance(spec, int):
        if not 1 <= spec <= MAX_SEEDS:
            raise ValueError(f"seeds={spec!r}: a count must be in [1, {MAX_SEEDS}]; accepted: {accepted}")
        return list(range(spec))
    if isinstance(spec, str):
        ranges = []
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"seeds={spec!r}: expected ranges like '0-49999' or '0-9,20'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise ValueError(f"seeds={spec!r}: range {part} is empty")
            ranges.append((lo, hi))
        if sum(hi - lo + 1 for lo, hi in ranges) > MAX_SEEDS:
            raise ValueError(f"seeds={spec!r}: more than {MAX_SEEDS} seeds; accepted: {accepted}")
        seeds = [s for lo, hi in ranges for s in range(lo, hi + 1)]
    elif isinstance(spec, (list, tuple)):
        if len(spec) > MAX_SEEDS:
            raise ValueError(f"seeds: a list of {len(spec)}; accepted: {accepted}")
        bad = [s for s in spec if not isinstance(s, int) or isinstance(s, bool)]
        if bad:
            raise ValueError(f"seeds: {bad[0]!r} is not an integer; accepted: {accepted}")
        seeds = [int(s) for s in spec]
    else:
        raise ValueError(f"seeds={spec!r}; accepted: {accepted}")
    if not seeds:
        raise ValueError(f"seeds={spec!r}: empty; accepted: {accepted}")
    if any(s < 0 or s >= SEED_LIMIT for s in seeds):
        raise ValueError(f"seeds: {next(s for s in seeds if s < 0 or s >= SEED_LIMIT)} is outside [0, 2^32); accepted: {accepted}")
    if len(set(seeds)) != len(seeds):
        seen, dup = set(), None
        for s in seeds:
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise ValueError(f"seeds: {dup} appears more than once (one sample would count several times); accepted: {accepted}")
    return seeds


def seeded_noise(seeds, shape, sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """x_T = sigma * z with z drawn from one torch.Generator per seed (as EDM's generate.py)."""
    out = torch.empty(len(seeds), *shape, dtype=dtype, device=device)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return out * sigma


@torch.no_grad()
def generate(denoiser, solver, sigmas: torch.Tensor, seeds, batch_size: int = 500, dtype=torch.float32,
             device: str = "cpu", progress: str | None = None, *, bar=None) -> tuple[torch.Tensor, int]:
    """Run ``solver`` from x_T = sigma_max * z(seed) for every seed; returns (samples on CPU, NFE).

    The noise of each sample comes from its own generator (:func:`amedlab.sampling.seeded_noise`);
    NFE is counted per batch (every batch must make the same number of model calls). ``progress``: a
    label ("euler NFE 5") for a bar "sampling <label>" on a terminal (:mod:`amedlab.progress`) and,
    off a terminal, a log line per batch; ``bar``: a caller's bar, advanced by the samples done instead.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("eval.seeds is empty")
    if int(batch_size) < 1:
        raise ValueError(f"eval.batch_size={batch_size!r} must be >= 1")
    from .models import counting

    model = counting(denoiser)
    shape = tuple(model.sample_shape)
    out = torch.empty(len(seeds), *shape, dtype=dtype)
    nfe, t0 = None, time.perf_counter()
    own = progress_bar(total=len(seeds), desc=f"sampling {progress}", unit="img") if progress and bar is None else None
    shown = bar if bar is not None else own
    log_lines = bool(progress) and not bars_shown()  # a log line would break a bar on the terminal
    try:
        for lo in range(0, len(seeds), int(batch_size)):
            chunk = seeds[lo : lo + int(batch_size)]
            x_T = seeded_noise(chunk, shape, float(sigmas[0]), dtype=dtype, device=device)
            model.reset()
            out[lo : lo + len(chunk)] = solver.sample(model, x_T, sigmas).to("cpu", dtype)
            if nfe is None:
                nfe = model.calls
            elif model.calls != nfe:
                raise RuntimeError(f"batches made different numbers of model calls ({nfe} vs {model.calls})")
            if shown is not None:
                shown.update(len(chunk))
            if log_lines:
                done = lo + len(chunk)
                log.info("%s: %d/%d samples (%.1f s)", progress, done, len(seeds), time.perf_counter() - t0)
    finally:
        if own is not None:
            own.close()
    return out, int(nfe)
