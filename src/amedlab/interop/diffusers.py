"""An exported solver as a diffusers scheduler (needs ``amed-lab[diffusers]``).

``LearnedScheduler.from_pretrained(<export dir>)`` reads ``solver.json`` (exported from a cell of a
``model=diffusers`` VP UNet) and runs in the usual loop::

    scheduler.set_timesteps(scheduler.config.solver["nfe"])
    sample = torch.randn(shape) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(eps, t, sample).prev_sample

The sample lives on the EDM scale x = x_vp * sqrt(1 + sigma^2), as in diffusers' Euler/Karras
schedulers; the timesteps are the continuous ones amedlab's adapter gives the UNet (linear in
log sigma over the DDPM table, recorded in the file). With AFS the first step needs no model call:
``scale_model_input`` and ``step`` apply it to the first sample they are given.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..errors import ExportError, ParametrisationError, WrongNFEError
from ..models.adapters import PREDICTION_TYPES, vp_denoised, vp_sigma_to_t
from .solver_json import ExportedSolver

class LearnedScheduler(SchedulerMixin, ConfigMixin):
    """A ``solver.json`` (its record, verified) as a scheduler; ``prediction_type`` must be the model's."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, solver: dict | None = None, prediction_type: str | None = None) -> None:
        if solver is None:
            raise ExportError("LearnedScheduler needs an exported solver: LearnedScheduler.from_pretrained(<the folder "
                              "stage=export wrote>)")
        self.exported = exported = ExportedSolver.from_record(dict(solver), "LearnedScheduler(solver=...)")
        par = exported.model.get("parametrisation") or {}
        if "log_sigmas" not in par:
            raise ParametrisationError(
                f"this solver was trained on a {par.get('backend', 'non-diffusers')} model ({exported.model.get('name')!r}), "
                "not a diffusers VP UNet: a diffusers scheduler cannot call it the same way; use "
                "amedlab.interop.k_diffusion.sample_learned or the loop in docs/export.md")
        own = par["prediction_type"]
        if prediction_type is not None and prediction_type != own:
            raise ParametrisationError(f"prediction_type={prediction_type!r}: this solver was trained on a "
                                       f"{own}-prediction model; the model given predicts {prediction_type}")
        if own not in PREDICTION_TYPES:
            raise ParametrisationError(f"prediction_type={own!r}; accepted: {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = own
        self.log_sigmas = torch.tensor(par["log_sigmas"], dtype=torch.float32)
        self.init_noise_sigma = exported.sigmas[0]
        self.set_timesteps()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None, prediction_type=None,
                        **kwargs):
        """A folder with ``solver.json`` (what ``stage=export`` writes), or one saved by ``save_pretrained``."""
        folder = Path(str(pretrained_model_name_or_path)) / (subfolder or "")
        if (folder / "solver.json").is_file():
            return cls(solver=ExportedSolver.load(folder).record(), prediction_type=prediction_type)
        scheduler = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if prediction_type is not None and prediction_type != scheduler.prediction_type:
            raise ParametrisationError(f"prediction_type={prediction_type!r}: this solver was trained on a "
                                       f"{scheduler.prediction_type}-prediction model")
        return scheduler

    # -- the schedule --
    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        """The model's timesteps, one per model call. ``num_inference_steps`` (model calls) must be the NFE
        the solver was trained for (its grid and weights belong to it)."""
        nfe = self.exported.nfe
        if num_inference_steps is not None and int(num_inference_steps) != nfe:
            raise WrongNFEError(f"num_inference_steps={num_inference_steps}: this solver was trained for NFE {nfe} "
                                f"(export one trained for NFE {num_inference_steps})")
        self.num_inference_steps = nfe
        self.model_sigmas = list(self.exported.model_sigmas)
        self.timesteps = vp_sigma_to_t(self.log_sigmas, torch.tensor(self.model_sigmas, dtype=torch.float64)).to(device)
        self._step_index, self._slopes = 0, []

    # -- the loop --
    def _check_timestep(self, timestep) -> int:
        i = self._step_index
        if i >= len(self.model_sigmas):
            raise ExportError(f"step {i + 1} of a {len(self.model_sigmas)}-call solver: call set_timesteps() to start again")
        if not math.isclose(float(timestep), float(self.timesteps[i]), rel_tol=1e-6, abs_tol=1e-6):
            raise ExportError(f"timestep {float(timestep)} is not this scheduler's next one ({float(self.timesteps[i])}): "
                              "loop over scheduler.timesteps in order")
        return i

    def _current(self, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The state the i-th model call sees: under AFS the first is one step on from ``sample``."""
        if i == 0 and self.exported.afs:
            s0, s1 = self.exported.sigmas[0], self.exported.sigmas[1]
            return sample + (s1 - s0) * self.exported.weights[0][0] * (sample / math.sqrt(1 + s0 * s0))
        return sample

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet's input x / sqrt(1 + sigma^2) for the next call."""
        i = self._check_timestep(timestep) if timestep is not None else self._step_index
        s = torch.tensor(self.model_sigmas[i], dtype=sample.dtype, device=sample.device)
        return self._current(sample, i) / (s**2 + 1).sqrt()

    def _denoised(self, out: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.tensor(sigma, dtype=x.dtype, device=x.device)
        return vp_denoised(out.to(x.dtype), x, s, 1 / (s**2 + 1).sqrt(), self.prediction_type)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **kwargs):
        """One model call's step: x at the next sigma (or D at the end with ``final_step=denoise``)."""
        i = self._check_timestep(timestep)
        ex = self.exported
        if i == 0:
            self._slopes = [sample / math.sqrt(1 + ex.sigmas[0] ** 2)] if ex.afs else []
        x = self._current(sample, i)
        sigma = self.model_sigmas[i]
        denoised = self._denoised(model_output, x, sigma)
        if ex.final_step == "denoise" and i == len(self.model_sigmas) - 1:
            prev = denoised
        else:
            j = i + int(ex.afs)  # the step on the solver's grid
            self._slopes = [(x - denoised) / sigma, *self._slopes][: ex.max_order]
            prev = x + (ex.sigmas[j + 1] - ex.sigmas[j]) * sum(w * d for w, d in zip(ex.weights[j], self._slopes))
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.exported.nfe
