"""The high-NFE solution of the probability-flow ODE from seeded noise, computed once and cached on disk:
every cell's trajectory error is measured against it, and it is the teacher the learned solver is
trained on. ``<cache_dir>/ode_references/<key>.pt``, per chunk of seeds; the key hashes the model's
identity, the reference solver, its NFE and schedule, the dtype and the seeds. Files are written
atomically and verified on load; a lock makes concurrent cells compute a chunk once
(:mod:`amedlab.cache`)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ..cache import digest, load_verified, locked, save_verified, seeds_spec
from ..io import plain
from ..models.base import device_of
from ..progress import enabled as bars_shown, progress
from ..schedules import ScheduleSpec
from ..solvers.spec import solver_from_node
from ..sampling import generate

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def ode_reference(denoiser, ref: Mapping, sigma_min: float, sigma_max: float, seeds, cache_dir,
                  batch_size: int = 500, dtype=torch.float32) -> tuple[torch.Tensor, dict]:
    """The high-NFE solution x(sigma_min) from x_T = sigma_max * z(seed), cached per chunk of seeds.

    ``ref``: {solver: {name, afs, final_step, options}, nfe, schedule: {kind, rho}, chunk_size}.
    Chunks (``chunk_size`` seeds each, default 250) are cached separately; processes running side by
    side (a parallel launcher) each take chunks nobody holds, then wait for the rest. It is computed on
    the denoiser's device.
    """
    solver_node = plain(dict(ref["solver"]))
    solver_node["final_step"] = "sigma_min"  # the reference is the ODE solution at sigma_min
    solver = solver_from_node(solver_node)
    schedule = {"kind": str(ref["schedule"]["kind"]), "rho": float(ref["schedule"]["rho"]),
                "sigma_min": float(sigma_min), "sigma_max": float(sigma_max)}
    nfe = int(ref["nfe"])
    sigmas = ScheduleSpec.from_cfg(schedule).grid(solver.num_points(nfe))
    identity = denoiser.identity() if hasattr(denoiser, "identity") else type(denoiser).__name__
    base = {"format": CACHE_FORMAT, "model_identity": identity, "solver": solver_node, "nfe": nfe,
            "schedule": schedule, "dtype": str(dtype)}
    seeds = list(seeds)
    chunk = max(1, int(ref.get("chunk_size", 250) or 250))
    chunks = [seeds[i : i + chunk] for i in range(0, len(seeds), chunk)]
    specs = [plain({**base, "seeds": seeds_spec(c), "num_samples": len(c)}) for c in chunks]
    paths = [Path(cache_dir) / "ode_references" / f"{digest(s)}.pt" for s in specs]
    parts: list[torch.Tensor | None] = [None] * len(chunks)
    computed = 0

    def load_or_compute(k: int) -> None:
        nonlocal computed
        blob = load_verified(paths[k], specs[k], what="cache file")
        if blob is None:
            samples, counted = generate(denoiser, solver, sigmas, chunks[k], batch_size, dtype,
                                        str(device_of(denoiser)), bar=bar)
            if counted != nfe:
                raise RuntimeError(f"reference solver made {counted} calls, expected {nfe}")
            save_verified(paths[k], {"spec": specs[k], "samples": samples})
            computed += 1
            if not bars_shown():  # the bar says it on a terminal; a log line would break it
                log.info("high-NFE reference: chunk %d/%d (%d seeds) computed", k + 1, len(chunks), len(chunks[k]))
        else:
            samples = blob["samples"]
            bar.update(len(chunks[k]))
        parts[k] = samples

    # one bar over every seed, advanced per batch (a cached chunk at once); on a terminal only
    with progress(total=len(seeds), desc=f"ODE reference {solver_node['name']} {nfe} NFE", unit="img") as bar:
        for k in range(len(chunks)):  # first the chunks nobody else is computing
            with locked(paths[k], wait=False) as got:
                if got:
                    load_or_compute(k)
        for k in range(len(chunks)):  # then wait for the others
            if parts[k] is None:
                with locked(paths[k]):
                    load_or_compute(k)
    desc = {"solver": solver_node, "nfe": nfe, "schedule": schedule, "cache_dir": str(Path(cache_dir) / "ode_references"),
            "chunks": len(chunks), "cached": computed == 0}
    return torch.cat(parts), desc
