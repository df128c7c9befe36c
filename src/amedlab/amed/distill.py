"""Distillation of g_phi against cached teacher trajectories (AMED, Sec. 3.4), through the shared fit.

Per batch of trajectories, one optimizer step per interval: the student takes one AMED step from
x_i and the loss is the batch mean of ||x_{i+1}^student - x_{i+1}^teacher||^2. Single-step students
restart each interval from the teacher state; multistep students continue from their own detached
output (their history must be their own). :class:`AMEDDistillation` is what
:func:`amedlab.training.fit.fit` trains (both objectives, learn_grid); :class:`PredictorCell` /
:func:`cell_predictor` the per-cell cache (:func:`amedlab.training.fit.train_cached`).
``distill(denoiser, spec)`` is the Python API; ``python -m amedlab stage=distill`` is
:mod:`amedlab.stages.distill`.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..solvers.spec import solver_from_node
from ..data.trajectories import TrajectoryDataModule, cached_trajectories
from ..amed.spec import DistillSpec
from ..solvers.base import Solver, check_afs
from ..training.fit import Update, fit, train_cached
from ..training.grid import LearnedGrid
from ..training.loss import divergence, trajectory_loss
from .objectives import (check_grid_lr, check_learn_grid, check_lr_schedule, check_objective, convergence, lr_factor,
                         warn_if_unconverged)
from .predictor import AMEDPredictor
from .solvers import AMED_SOLVERS, AMEDPlugin

log = logging.getLogger(__name__)


def student_intervals(denoiser, rule: AMEDPlugin, states: torch.Tensor, sigmas: torch.Tensor, afs):
    """Walk the student over teacher trajectories ``states`` [B, N, ...]; yield (i, loss_i) per interval.

    loss_i = batch mean of ||x_{i+1} - teacher_{i+1}||^2. The caller may take an optimizer step between
    yields (the paper's one update per interval). Single-step students restart from the teacher state;
    multistep students continue from their own detached output and history (``Solver.steps``).
    """
    rule.last_outputs = []
    walk = Solver(rule, afs=afs).steps(denoiser, states[:, 0], sigmas, restart=None if rule.multistep else states,
                                       detach=True)
    for interval in walk:
        i = interval.index
        yield i, (interval.x_next - states[:, i + 1]).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def interval_losses(denoiser, rule: AMEDPlugin, states: torch.Tensor, sigmas: torch.Tensor, afs) -> list[float]:
    """The per-interval distillation losses of ``rule`` on held-out trajectories (no update)."""
    return [loss.item() for _, loss in student_intervals(denoiser, rule, states, sigmas, afs)]


class _Trained(nn.Module):
    """What AMED's distillation trains: the predictor and, with learn_grid, the coarse grid; the
    schedule's grid rides along as a buffer (it moves to the training device with them)."""

    def __init__(self, predictor: AMEDPredictor, grid: LearnedGrid | None, sigmas: torch.Tensor) -> None:
        super().__init__()
        self.predictor, self.grid = predictor, grid
        self.register_buffer("sigmas", sigmas.clone())


class AMEDDistillation:
    """AMED's :class:`~amedlab.training.fit.TrainedMethod`: trains ``rule.predictor`` (and with
    ``learn_grid`` the coarse grid's inner times) against teacher trajectories; the denoiser is frozen
    (gradients flow through its input only). :func:`amedlab.training.fit.fit` runs it.

    ``objective``: ``interval`` (one update per interval: the student restarts from, or continues
    after, the teacher's state) or ``trajectory`` (one update per batch through the whole run)."""

    def __init__(self, denoiser, rule: AMEDPlugin, sigmas: torch.Tensor, afs, lr: float = 5e-3,
                 objective: str = "interval", intermediate_weight: float = 0.0, learn_grid: bool = False,
                 grid_lr: float | None = None, lr_schedule: str = "constant") -> None:
        check_learn_grid(learn_grid, objective, intermediate_weight)
        check_grid_lr(grid_lr, learn_grid)
        check_lr_schedule(lr_schedule)
        self.denoiser, self.rule, self.afs = denoiser, rule, afs
        self.objective, self.intermediate_weight = objective, float(intermediate_weight)
        self.lr_schedule, self.lr = lr_schedule, float(lr)
        self.grid_lr_given = grid_lr is not None
        self.grid_lr = self.lr if grid_lr is None else float(grid_lr)
        # learn_grid: the coarse grid's inner times are trained with the predictor (ends fixed, monotone)
        self.trained = _Trained(rule.predictor, LearnedGrid(sigmas) if learn_grid else None, sigmas)

    @property
    def predictor(self) -> AMEDPredictor:
        return self.trained.predictor

    @property
    def grid(self) -> LearnedGrid | None:
        return self.trained.grid

    @property
    def sigmas(self) -> torch.Tensor:
        return self.trained.sigmas

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.predictor.parameters()) + ([] if self.grid is None else list(self.grid.parameters()))

    def current_sigmas(self) -> torch.Tensor:
        """The grid the student runs on: the schedule's, or the learned one (differentiable)."""
        return self.sigmas if self.grid is None else self.grid.sigmas()

    # -- the TrainedMethod protocol --
    def parameters_module(self) -> nn.Module:
        return self.trained

    def optimizer_groups(self) -> list[dict]:
        groups = [{"params": list(self.predictor.parameters()), "lr": self.lr}]
        if self.grid is not None:
            groups.append({"params": list(self.grid.parameters()), "lr": self.grid_lr})
        return groups

    def lr_factor(self, progress: float) -> float:
        """distill.lr_schedule: the rate's factor at the training progress (stepped once per batch)."""
        return lr_factor(self.lr_schedule, progress)

    def rate_to_lower(self, grid_broken: bool) -> tuple[str, float]:
        """(key, value) of the learning rate a divergence is blamed on: ``solver.distill.grid_lr`` when it
        was given and the grid broke or it is the larger rate (Adam moves a parameter by about its rate
        per update); else ``distill.lr`` (which the grid also trains at when grid_lr is unset)."""
        if self.grid is not None and self.grid_lr_given and (grid_broken or self.grid_lr > self.lr):
            return "solver.distill.grid_lr", self.grid_lr
        return "distill.lr", self.lr

    def check(self, loss: float | None) -> tuple[str | None, str, float]:
        """A non-finite loss, non-finite or runaway predictor parameter, or an unusable learned grid."""
        grid_reason = None if self.grid is None else self.grid.problem()
        reason = divergence(loss, {"predictor": self.predictor}) or grid_reason
        return (reason, *self.rate_to_lower(grid_reason is not None))

    def _record(self, fit, i: int, loss: float) -> dict:
        rec = {"interval": i, "epoch": fit.current_epoch, "loss": loss, "lr": fit.optimizers().param_groups[0]["lr"]}
        for name, v in zip("rca", self.rule.last_outputs[i]):
            v = v.detach()
            rec[f"{name}_mean"], rec[f"{name}_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
        return rec

    def updates(self, batch, fit):
        (states,) = batch
        if self.objective == "trajectory":
            # one update per batch: backprop through the whole student run (training.loss.trajectory_loss)
            loss, errors = trajectory_loss(Solver(self.rule, afs=self.afs), self.denoiser, states,
                                           self.current_sigmas(), self.intermediate_weight)

            def records(value: float) -> list[dict]:
                # a learned grid's inner points are not the teacher's (those lie on the schedule's grid):
                # every interval records the final error, the objective, beside its own r statistics
                return [self._record(fit, i, (err if self.grid is None else errors[-1]).item())
                        for i, err in enumerate(errors)]

            yield Update(loss, len(states), records)
        else:
            for i, loss in student_intervals(self.denoiser, self.rule, states, self.sigmas, self.afs):
                yield Update(loss, len(states), lambda value, i=i: [self._record(fit, i, value)])


def distill(denoiser, spec: DistillSpec | None = None, *, logger=False, features=None, sample_shape=None,
            **settings) -> AMEDPredictor:
    """Distill an AMED predictor for ``denoiser``; returns it with its training settings in ``meta``.

    ``denoiser``: a :class:`~amedlab.models.base.Denoiser` exposing per-sample features, or any
    callable ``D(x, sigma) -> denoised`` with ``features=`` (``features(x, sigma) -> [N, F]``, called
    with each evaluation) and, for a plain callable, ``sample_shape=`` (one sample, no batch
    dimension); both are wrapped in :class:`amedlab.models.callable.CallableDenoiser`. Sample with the
    predictor on the same wrapper (build it yourself: docs/extending.md). A model without features is
    a ValueError that says how to add them.

    ``spec`` (:class:`amedlab.specs.DistillSpec`) holds every setting; keyword ``settings`` are its
    fields (``distill(model, solver="amed", nfe=5, num_trajectories=2000)``) and override ``spec``'s.
    Unset ones follow the paper's recommendations for the solver (:func:`amedlab.specs.paper_defaults`:
    ``conf/solver/<solver>.yaml``). ``seeds`` default to training replicate ``seed``'s own block,
    100000 + seed * num_trajectories .. (seed 0: 100000..; disjoint from evaluation seeds 0..): a
    replicate differs in its teacher trajectories as well as in its initialisation and batch order.
    ``devices``/``strategy`` are Lightning's (e.g. devices=2, strategy="ddp"): each process takes
    batch_size / devices of every global batch, so the result matches one process. Every rank returns
    the trained predictor. ``objective``: ``interval`` (the paper's one update per interval) or
    ``trajectory`` (backprop through the whole student run, loss on the final sample plus
    ``intermediate_weight`` x the inner grid points; :mod:`amedlab.amed.objectives`). ``learn_grid``
    (trajectory objective only): the coarse grid's inner times are trained jointly with the predictor
    (:class:`amedlab.training.grid.LearnedGrid`, ends fixed; Adam at ``grid_lr``, default ``lr``); the
    predictor then samples on that grid only (``meta["sigmas"]``, ``AMEDPlugin.own_grid()``).
    ``meta["convergence"]`` says whether every interval settled. ``logger``: Lightning's. A training that
    diverges (a non-finite loss or parameter, a collapsed learned grid) stops at that update with a
    :class:`amedlab.errors.ResultError` naming the learning rate to lower (``distill.lr`` or
    ``solver.distill.grid_lr``).
    """
    if spec is None:
        spec = DistillSpec.create(**settings)
    elif settings:
        spec = DistillSpec.create(**{**vars(spec), **settings})
    if spec.solver not in AMED_SOLVERS:
        raise ValueError(f"solver={spec.solver!r} cannot be distilled; accepted: {', '.join(AMED_SOLVERS)}")
    s = spec.resolved()
    schedule = s.schedule_spec
    schedule.check()
    check_afs(s.afs)
    check_objective(s.objective, s.intermediate_weight)
    check_learn_grid(s.learn_grid, s.objective, s.intermediate_weight)
    check_grid_lr(s.grid_lr, s.learn_grid)
    check_lr_schedule(s.lr_schedule)
    solver_from_node(s.teacher)  # validates the teacher's name and options before any compute
    s.check_trajectory_seeds()    # the replicate's trajectory seeds below 2^32 (the cell checks eval.seeds too)
    import dataclasses

    from ..models.callable import with_features

    wrapped = with_features(denoiser, features, sample_shape)  # the recipe in the error when there are none
    if wrapped is not denoiser and s.model_name is None:
        s = dataclasses.replace(s, model_name=wrapped.name)
    denoiser = wrapped
    feature_dim = int(denoiser.feature_dim)
    seeds = s.trajectory_seeds()

    torch.manual_seed(s.seed)  # the predictor's initialisation
    predictor = AMEDPredictor(feature_dim=feature_dim, s_dir=s.s_dir, s_time=s.s_time, **s.predictor_sizes)
    student = s.solver_spec.build(predictor=predictor)
    num_points = student.num_points(int(s.nfe))
    sigmas = schedule.grid(num_points)

    t0 = time.perf_counter()
    data, was_cached = cached_trajectories(denoiser, s.teacher, s.schedule, num_points, s.M, seeds, s.cache_dir, s.dtype,
                                           s.gen_batch_size)
    cache_seconds = time.perf_counter() - t0

    method = AMEDDistillation(denoiser, student.rule, sigmas, s.afs, s.lr, s.objective, s.intermediate_weight,
                              s.learn_grid, s.grid_lr, s.lr_schedule)
    # the data module shards itself under DDP (the same global batches as one process)
    batches = TrajectoryDataModule(data["states"], int(s.batch_size), s.seed)
    done = fit(method, denoiser, batches, epochs=int(s.epochs), accelerator=s.accelerator, devices=s.devices,
               strategy=s.strategy, logger=logger)
    predictor = predictor.cpu()
    trained_sigmas = method.current_sigmas().detach().cpu()
    predictor.meta = _meta(s, denoiser, done.records, sigmas, trained_sigmas, {
        "num_trajectories": len(seeds), "world_size": done.world_size, "trajectories_cached": was_cached,
        "trajectory_seconds": cache_seconds, "train_seconds": done.seconds})
    warn_if_unconverged(predictor.meta["convergence"], f"{s.solver} distillation for nfe={int(s.nfe)}")
    predictor.records = done.records
    return predictor


class PredictorCell:
    """A cell's predictor, cached (:func:`amedlab.training.fit.train_cached`): the
    :class:`~amedlab.training.fit.CachedTraining` of AMED. Its key is :meth:`DistillSpec.key`'s content
    (the model identity and :meth:`DistillSpec.settings`); new ones are :func:`distill`-ed."""

    what, folder = "cached predictor", "predictors"

    def __init__(self, model, spec: DistillSpec) -> None:
        self.model, self.spec = model, spec

    def stem(self) -> str:
        return f"{self.spec.solver}-nfe{int(self.spec.nfe)}"

    def settings(self) -> dict:
        return {"model_identity": self.model.identity(), **self.spec.settings()}  # what spec.key digests

    def load(self, blob: dict, path) -> AMEDPredictor:
        return AMEDPredictor.from_blob(blob, path)

    def train(self) -> tuple[AMEDPredictor, dict]:
        predictor = distill(self.model, self.spec)
        return predictor, {"settings": self.spec.settings(), "meta": predictor.meta, "records": predictor.records}


def cell_predictor(model, spec: DistillSpec, cache_dir, use_cache: bool = True):
    """(predictor, info): a cached predictor distilled with the same ``spec`` for the same model, or a
    new one (a predictor file given as ``solver.predictor`` is opened and checked by the validation).
    The cached file holds the settings it was distilled for (those of :meth:`DistillSpec.key`) and is
    used only if they are this cell's; a distillation that diverges is a ResultError, nothing cached."""
    return train_cached(PredictorCell(model, spec), cache_dir, use_cache, new_source="distilled")


def _meta(s: DistillSpec, denoiser, records: list[dict], schedule_sigmas: torch.Tensor, sigmas: torch.Tensor,
          run: dict) -> dict:
    """The predictor's metadata: what it was trained for and how the training went (``run``: trajectory
    count, world size, whether the trajectories were cached, timings). ``sigmas``: the grid it samples
    on (with learn_grid the learned one, ``learned_grid`` true, the schedule's kept as ``schedule_sigmas``)."""
    last = {}
    for rec in records:
        last[rec["interval"]] = rec
    meta = {
        "solver": s.solver, "solver_options": s.solver_options, "nfe": int(s.nfe), "num_points": len(sigmas),
        "sigmas": sigmas.tolist(), "schedule": s.schedule, "afs": s.afs,
        "teacher": s.teacher, "M": s.M, "s_dir": s.s_dir, "s_time": s.s_time,
        "model_identity": denoiser.identity() if hasattr(denoiser, "identity") else None,
        "model_name": s.model_name or type(denoiser).__name__,
        "num_trajectories": run["num_trajectories"], "batch_size": int(s.batch_size), "lr": float(s.lr),
        "epochs": int(s.epochs), "world_size": run["world_size"],
        "updates": len(records), "final_interval_loss": [last[i]["loss"] for i in sorted(last)],
        "trajectories_cached": run["trajectories_cached"], "trajectory_seconds": run["trajectory_seconds"],
        "train_seconds": run["train_seconds"], "convergence": convergence(records),
    }
    if s.lr_schedule != "constant":
        meta.update(lr_schedule=s.lr_schedule)
    if s.objective != "interval":  # the paper's default leaves the metadata as it was
        meta.update(objective=s.objective, intermediate_weight=float(s.intermediate_weight))
    if s.learn_grid:
        meta.update(learned_grid=True, schedule_sigmas=schedule_sigmas.tolist(),
                    grid_lr=float(s.lr if s.grid_lr is None else s.grid_lr))
    return meta
