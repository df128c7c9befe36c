"""Training the learned grid + coefficients (:mod:`.solver`) against a high-accuracy teacher.

The objective is the trajectory objective of :mod:`amedlab.training.loss` (``trajectory_loss``):
the whole student run from the noise through the one driver loop, backpropagated into every grid
time and coefficient; the loss is the squared error of the final sample against the teacher's
solution of the ODE from the same noise (as in LD3, Tong et al., ICLR 2025, Sec. 3). The teacher is
the project's cached high-NFE reference (:func:`amedlab.data.reference.ode_reference`, the
solution every cell's RMSE is measured against), on a seed range disjoint from the evaluation seeds.
Intermediate terms are not offered: the student's grid moves, so the teacher has no state there.

``loss``: ``final`` (x at sigma_min), ``denoised`` (D(x, sigma_min) against D(teacher, sigma_min);
one more model call per training batch, none at sampling), ``teacher_features`` (the output of the
*teacher's* feature block, :func:`amedlab.training.loss.teacher_features`, at sigma_min of the student's
final sample against that of the teacher's solution: a perceptual loss in the sampled network's own
bottleneck, never in the evaluation's extractor) or ``final+teacher_features`` (the sum, the feature
term scaled by ``feature_scale``: the total variance of the teacher solutions over that of their
features, so both terms are in the same units). Measured on digits in docs/learned.md "Closer to the
limit".

:class:`LearnedDistillation` is what the shared fit trains (:func:`amedlab.training.fit.fit`);
``cell_learned`` (the learned rule's ``prepare``, what ``stage=evaluate`` calls) the parameters for a
cell's settings from the digest-verified cache (``<cache_dir>/learned/``), or trained and stored
there with what they were trained for (model identity, nfe, schedule, afs, teacher, trajectories,
seeds) through :func:`amedlab.training.fit.train_cached`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..training.fit import Update, fit, train_cached
from ..training.loss import divergence, feature_block_of, squared_error, teacher_features, trajectory_loss
from ..models.base import device_of
from ..solvers.base import Solver
from .settings import DEFAULTS, LOSSES, start_schedules
from .solver import LearnedIPNDM, LearnedSolverParams

log = logging.getLogger(__name__)


class LearnedDistillation:
    """The learned solver's :class:`~amedlab.training.fit.TrainedMethod`: trains ``params`` (grid
    logits, coefficient corrections) through the whole student run; the denoiser is frozen.
    ``loss``: ``final`` (the trajectory objective with the two ends only) or ``denoised``."""

    def __init__(self, denoiser, params: LearnedSolverParams, afs, lr: float, loss: str = "final",
                 feature_scale: float = 1.0) -> None:
        self.denoiser, self.params, self.afs, self.lr, self.loss_kind = denoiser, params, afs, float(lr), loss
        self.feature_scale = float(feature_scale)  # the feature term's weight (teacher_features losses)
        self.rule = LearnedIPNDM(params, params.max_order)

    def parameters_module(self) -> LearnedSolverParams:
        return self.params

    def optimizer_groups(self) -> list[dict]:
        return [{"params": [p for p in self.params.parameters() if p.requires_grad], "lr": self.lr}]

    def check(self, loss: float | None) -> tuple[str | None, str, float]:
        """A non-finite loss, non-finite or runaway grid or coefficient parameter, or an unusable
        learned grid: ``solver.distill.lr`` is the rate to lower."""
        return divergence(loss, {"grid/coefficient": self.params}, self.params), "solver.distill.lr", self.lr

    def updates(self, batch, fit):
        noise, target = batch[0], batch[1]
        sigmas = self.params.sigmas()
        solver = Solver(self.rule, afs=self.afs)
        if self.loss_kind == "final":
            # the trajectory objective with the two ends only: the loss on the final sample
            loss, _ = trajectory_loss(solver, self.denoiser, torch.stack([noise, target], 1), sigmas)
        elif self.loss_kind in ("teacher_features", "final+teacher_features"):
            x = solver.sample(self.denoiser, noise, sigmas)
            _, feats = teacher_features(self.denoiser, x, float(sigmas[-1]))
            loss = self.feature_scale * squared_error(feats, batch[2])
            if self.loss_kind == "final+teacher_features":
                loss = loss + squared_error(x, target)
        else:
            x = solver.sample(self.denoiser, noise, sigmas)
            smin = sigmas[-1].to(dtype=x.dtype, device=x.device) * torch.ones(len(x), dtype=x.dtype, device=x.device)
            loss = squared_error(self.denoiser(x, smin), target)
        yield Update(loss, len(noise))  # one update per batch, recorded as {"interval": 0, "loss": ...}


#: train_learned's settings: the solver's own options, the shuffling seed, and solver.distill's training
#: keys (the number and first seed of the teacher trajectories are the caller's: it passes them in)
SOLVER_SETTINGS = {"afs": False, "max_order": 4, "seed": 0}
TRAINING_KEYS = ("batch_size", "epochs", "lr", "loss", "learn_grid", "learn_coefficients")


def train_learned(denoiser, noise: torch.Tensor, target: torch.Tensor, base_sigmas: torch.Tensor,
                  meta: Mapping | None = None, logger=False, **settings) -> LearnedSolverParams:
    """Train the grid + coefficients starting from ``base_sigmas`` (the schedule's grid) so that the
    run from ``noise`` lands on ``target`` (the teacher's solution at sigma_min); returns the
    parameters with their training record in ``meta`` (seconds, CPU seconds, losses).

    ``settings``: ``afs``, ``max_order``, ``seed`` and the ``solver.distill`` keys of solver=learned
    (batch_size, epochs, lr, loss, learn_grid, learn_coefficients); unset ones take their defaults.
    A training that diverges (a non-finite loss or parameter, a collapsed grid) stops at that update
    with a :class:`amedlab.errors.ResultError` naming ``solver.distill.lr``.

    ``denoiser``: a :class:`~amedlab.models.base.Denoiser` or any callable ``D(x, sigma) -> denoised``
    (no features needed); a plain callable is wrapped in
    :class:`amedlab.models.callable.CallableDenoiser` with the sample shape of ``noise`` [N, ...].
    """
    unknown = sorted(set(settings) - {*SOLVER_SETTINGS, *TRAINING_KEYS})
    if unknown:
        raise ValueError(f"train_learned: unknown settings {unknown}; accepted: {', '.join([*SOLVER_SETTINGS, *TRAINING_KEYS])}")
    if not torch.is_tensor(noise) or noise.ndim < 2:
        got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise ValueError(f"train_learned: noise {got}; accepted: a tensor [N, *sample_shape]")
    from ..models.callable import as_denoiser

    denoiser = as_denoiser(denoiser, tuple(noise.shape[1:]))  # a plain callable gets the noise's sample shape
    s = {**SOLVER_SETTINGS, **{k: DEFAULTS[k] for k in TRAINING_KEYS}, **settings}
    afs, max_order, batch_size, epochs, lr, loss = s["afs"], s["max_order"], s["batch_size"], s["epochs"], s["lr"], s["loss"]
    learn_grid, learn_coefficients, seed = s["learn_grid"], s["learn_coefficients"], s["seed"]
    if loss not in LOSSES:
        raise ValueError(f"solver.distill.loss={loss!r}; accepted: {', '.join(LOSSES)}")
    if len(noise) != len(target) or len(noise) < int(batch_size):
        raise ValueError(f"{len(noise)} noise / {len(target)} target trajectories for batches of {batch_size}")
    params = LearnedSolverParams(base_sigmas, max_order, learn_grid, learn_coefficients)
    extra, feature_scale = (), 1.0
    if loss in ("teacher_features", "final+teacher_features"):
        feature_block_of(denoiser)  # a ValueError before any compute for a denoiser without a feature block
        with torch.no_grad():
            smin = float(base_sigmas[-1])
            feats = torch.cat([teacher_features(denoiser, t, smin)[1] for t in target.split(500)])
        # the feature term in the units of the sample term: total variance of the solutions / of their features
        feature_scale = float(target.flatten(1).var(0).sum() / feats.var(0).sum().clamp_min(1e-30))
        extra = (feats,)
    if loss == "denoised":
        with torch.no_grad():
            smin = float(base_sigmas[-1])
            target = torch.cat([denoiser(t, torch.full((len(t),), smin, dtype=t.dtype, device=t.device))
                                for t in target.split(500)])
    method = LearnedDistillation(denoiser, params, afs, lr, loss, feature_scale)
    order = torch.randperm(len(noise), generator=torch.Generator().manual_seed(int(seed)))
    loader = DataLoader(TensorDataset(noise[order], target[order], *(e[order] for e in extra)), batch_size=int(batch_size),
                        shuffle=False, drop_last=True)
    done = fit(method, denoiser, loader, epochs=int(epochs), logger=logger)
    params = params.cpu()
    losses = [r["loss"] for r in done.records]
    tail = max(1, len(losses) // 10)
    params.meta = {**dict(meta or {}), "afs": afs, "max_order": int(max_order), "num_trajectories": len(noise),
                   "batch_size": int(batch_size), "epochs": int(epochs), "lr": float(lr), "loss": loss,
                   "learn_grid": bool(learn_grid), "learn_coefficients": bool(learn_coefficients), "seed": int(seed),
                   **({"feature_scale": feature_scale} if extra else {}),
                   "updates": len(losses), "loss_first": losses[0], "loss_end": sum(losses[-tail:]) / tail,
                   "train_seconds": done.seconds, "train_cpu_seconds": done.cpu_seconds,
                   "base_sigmas": [float(s) for s in base_sigmas], **params.summary()}
    params.records = done.records
    return params


def final_error(denoiser, params: LearnedSolverParams, noise: torch.Tensor, target: torch.Tensor, afs,
                batch_size: int = 500) -> float:
    """Mean squared error per sample of the final sample against ``target`` (what ``solver.distill.starts``
    picks by; over the training trajectories: the choice never sees an evaluation seed)."""
    solver = Solver(LearnedIPNDM(params.to(noise.device), params.max_order), afs=afs)
    total = 0.0
    with torch.no_grad():
        sigmas = params.sigmas()
        for i in range(0, len(noise), batch_size):
            total += squared_error(solver.sample(denoiser, noise[i:i + batch_size], sigmas), target[i:i + batch_size]).item() \
                * len(noise[i:i + batch_size])
    params.cpu()
    return total / len(noise)


def teacher_solutions(model, reference: Mapping, sigma_min: float, sigma_max: float, seeds, cache_dir,
                      batch_size: int = 500, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(noise, the teacher's x(sigma_min), info) for ``seeds``: the high-NFE reference of
    :func:`amedlab.data.reference.ode_reference`, cached per chunk of seeds like every cell's."""
    from ..data.reference import ode_reference
    from ..sampling import seeded_noise

    t0 = time.perf_counter()
    target, info = ode_reference(model, reference, sigma_min, sigma_max, seeds, cache_dir, batch_size, dtype)  # on the model's device
    noise = seeded_noise(list(seeds), tuple(model.sample_shape), float(sigma_max), dtype=dtype)
    return noise, target, {**info, "seconds": time.perf_counter() - t0}


class LearnedCell:
    """A cell's learned solver, cached (:func:`amedlab.training.fit.train_cached`): the
    :class:`~amedlab.training.fit.CachedTraining` of solver=learned. Its key is the model identity and
    the cell's ``settings``; new ones are trained from every start and the best one kept."""

    what, folder = "cached learned solver", "learned"

    def __init__(self, model, settings: Mapping, ode_reference: Mapping, batch_size: int, model_name: str | None,
                 cache_dir) -> None:
        self.model, self.cell, self.ode_reference = model, settings, ode_reference
        self.batch_size, self.model_name, self.cache_dir = batch_size, model_name, cache_dir
        self.identity = model.identity() if hasattr(model, "identity") else type(model).__name__

    def stem(self) -> str:
        return f"learned-nfe{self.cell['nfe']}"

    def settings(self) -> dict:
        return {"model_identity": self.identity, **self.cell}  # the cache key's content, stored in the cached file

    def load(self, blob: dict, path) -> LearnedSolverParams:
        return LearnedSolverParams.from_blob(blob, path)

    def train(self) -> tuple[LearnedSolverParams, dict]:
        from ..models.base import DTYPES
        from ..schedules import ScheduleSpec
        from ..solvers import make_solver

        settings, model, schedule = self.cell, self.model, self.cell["schedule"]
        rule_solver = make_solver("learned", afs=settings["afs"], max_order=settings["max_order"])
        num_points = rule_solver.num_points(settings["nfe"])
        seeds = list(range(settings["first_seed"], settings["first_seed"] + settings["num_trajectories"]))
        dtype = DTYPES[settings["dtype"]]
        device = str(device_of(model))
        noise, target, tinfo = teacher_solutions(model, self.ode_reference, float(schedule["sigma_min"]),
                                                 float(schedule["sigma_max"]), seeds, self.cache_dir,
                                                 int(self.batch_size), dtype)
        meta = {"solver": "learned", "model_identity": self.identity, "model_name": self.model_name,
                "nfe": settings["nfe"], "num_points": num_points, "schedule": settings["schedule"],
                "teacher": settings["teacher"], "seeds": f"{seeds[0]}-{seeds[-1]}", "teacher_cached": tinfo["cached"],
                "teacher_seconds": tinfo["seconds"]}
        noise, target = noise.to(device), target.to(device)
        tried = []
        for start in start_schedules(schedule, settings["starts"]):
            base = ScheduleSpec.from_cfg(start).grid(num_points)
            candidate = train_learned(model, noise, target, base, meta,
                                      **{k: settings[k] for k in (*SOLVER_SETTINGS, *TRAINING_KEYS)})
            tried.append((final_error(model, candidate, noise, target, settings["afs"]), start, candidate))
        _, chosen, params = min(tried, key=lambda t: t[0])  # the first of equals: the order of solver.distill.starts
        params.meta.update(start_schedule=chosen,
                           starts_tried=[{"schedule": start, "final_error": err} for err, start, _ in tried],
                           train_seconds_all_starts=sum(c.meta["train_seconds"] for _, _, c in tried),
                           train_cpu_seconds_all_starts=sum(c.meta["train_cpu_seconds"] for _, _, c in tried))
        log.info("learned solver for nfe=%d: %d trajectories, %d updates per start, %.1f s (%.1f CPU s) over the starts; grid %s",
                 settings["nfe"], settings["num_trajectories"], params.meta["updates"], params.meta["train_seconds_all_starts"],
                 params.meta["train_cpu_seconds_all_starts"], [round(s, 4) for s in params.meta["sigmas"]])
        return params, {"settings": settings, "meta": params.meta, "records": params.records}


def cell_learned(model, settings: Mapping, ode_reference: Mapping, batch_size: int, model_name: str | None, cache_dir,
                 use_cache: bool = True):
    """(params, info) for a ``stage=evaluate`` cell: cached parameters trained for the same ``settings``
    (the learned rule's ``cell_settings``, :func:`amedlab.specs.evaluate.cell_settings`, built once by the
    checks) and model, or new ones (teacher solutions from the cached high-NFE reference), stored
    (:class:`LearnedCell`). New ones are trained from every grid of ``solver.distill.starts``; the one
    with the lowest :func:`final_error` on the training trajectories is kept. A cached file is used only
    if it holds these settings (and this model's identity); a training that diverges is a ResultError
    naming ``solver.distill.lr``, nothing cached."""
    params, info = train_cached(LearnedCell(model, settings, ode_reference, batch_size, model_name, cache_dir),
                                cache_dir, use_cache)
    return params, {**info, "meta": params.meta}
