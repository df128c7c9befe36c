"""An exported solver as a k-diffusion sampler: ``sample_learned(model, x, sigmas, extra_args, callback,
disable, *, solver)``, the signature of ``k_diffusion.sampling.sample_*`` that ComfyUI and many UIs
call. ``model(x, sigma, **extra_args)`` returns the denoised image (a k-diffusion denoiser, e.g.
``k_diffusion.external.CompVisDenoiser``); nothing of k-diffusion is imported here."""
from __future__ import annotations

import math

import torch

from ..errors import ExportError
from .solver_json import ExportedSolver


def _solver(solver) -> ExportedSolver:
    return solver if isinstance(solver, ExportedSolver) else ExportedSolver.load(solver)


def check_sigmas(exported: ExportedSolver, sigmas) -> None:
    """``sigmas``, if given, must be the solver's own grid (k-diffusion's trailing 0 allowed): its
    weights belong to those times, so another grid would silently be another solver."""
    if sigmas is None:
        return
    given = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
    if given and given[-1] == 0.0:
        given = given[:-1]
    own = exported.sigmas
    if len(given) != len(own) or any(not math.isclose(a, b, rel_tol=1e-5) for a, b in zip(given, own)):
        raise ExportError(f"sigmas: this solver samples on its own {len(own)}-point grid "
                          f"{[round(s, 4) for s in own]} (NFE {exported.nfe}), not on the {len(given)} sigmas given; "
                          "pass sigmas=None", "sigmas")


@torch.no_grad()
def sample_learned(model, x, sigmas=None, extra_args=None, callback=None, disable=None, *, solver):
    """Sample with an exported solver (``solver``: an :class:`ExportedSolver`, or the path of its
    ``solver.json`` / folder). ``x`` is the noise times sigma_0, as for every k-diffusion sampler; the
    callback gets k-diffusion's dict (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``)."""
    from tqdm.auto import tqdm

    exported = _solver(solver)
    check_sigmas(exported, sigmas)
    extra_args = {} if extra_args is None else extra_args
    bar = tqdm(total=len(exported.sigmas) - 1, disable=disable)

    def denoiser(xt, sigma):
        return model(xt, sigma, **extra_args)

    def on_point(i, sigma, xt, denoised):
        bar.update(1)
        if callback is not None:
            if denoised is None:  # AFS: no model call; the D its slope implies
                denoised = xt - sigma * xt / math.sqrt(1 + sigma * sigma)
            s = xt.new_tensor(sigma)
            callback({"x": xt, "i": i, "sigma": s, "sigma_hat": s, "denoised": denoised})

    try:
        return exported.sample(denoiser, x, on_point)
    finally:
        bar.close()
