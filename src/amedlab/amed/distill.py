"""Distillation of g_phi against cached teacher trajectories (AMED, Sec. 3.4), on Lightning.

Per batch of trajectories, one optimizer step per interval: the student takes one AMED step from
x_i and the loss is the batch mean of ||x_{i+1}^student - x_{i+1}^teacher||^2. Single-step students
restart each interval from the teacher state; multistep students continue from their own detached
output (their history must be their own). ``distill(denoiser, spec)`` is the Python API;
``python -m amedlab stage=distill`` is :mod:`amedlab.stages.distill`.
"""
from __future__ import annotations

import logging
import time
import warnings

import pytorch_lightning as pl
import torch

from ..solvers.spec import solver_from_node
from ..data.trajectories import TrajectoryDataModule, cached_trajectories
from ..sampling import parse_seeds
from ..amed.spec import DistillSpec
from ..solvers.base import Solver, check_afs
from ..training.grid import LearnedGrid
from ..training.loss import any_rank, divergence, diverged, trajectory_loss
from ..training.placement import held_teacher, lightning_placement, teacher_to
from .objectives import (check_grid_lr, check_learn_grid, check_lr_schedule, check_objective, convergence, lr_factor,
                         warn_if_unconverged)
from .predictor import AMEDPredictor
from .solvers import AMED_SOLVERS, AMEDPlugin

log = logging.getLogger(__name__)


def _average_gradients(module: torch.nn.Module) -> None:
    """Mean of the gradients over processes (no-op on one). Explicit, because the distillation takes
    several backward passes per training step (one per interval) and DDP's reducer syncs only one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


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


class AMEDDistillation(pl.LightningModule):
    """Trains ``rule.predictor``; the denoiser is frozen (gradients flow through its input only).

    The denoiser is held, not registered as a submodule: Lightning moves its module to the CPU when
    ``fit`` ends, and the denoiser is the caller's model. Freeze it around ``fit`` with
    ``placement.held_teacher`` (as :func:`distill` does), which also restores it afterwards.
    """

    def __init__(self, denoiser, rule: AMEDPlugin, sigmas: torch.Tensor, afs, lr: float = 5e-3,
                 objective: str = "interval", intermediate_weight: float = 0.0, learn_grid: bool = False,
                 grid_lr: float | None = None, lr_schedule: str = "constant") -> None:
        super().__init__()
        check_learn_grid(learn_grid, objective, intermediate_weight)
        check_grid_lr(grid_lr, learn_grid)
        check_lr_schedule(lr_schedule)
        self.lr_schedule = lr_schedule
        object.__setattr__(self, "denoiser", denoiser)  # bypasses nn.Module's registration
        self.objective, self.intermediate_weight = objective, float(intermediate_weight)
        self.rule, self.predictor = rule, rule.predictor
        self.register_buffer("sigmas", sigmas.clone())
        # learn_grid: the coarse grid's inner times are trained with the predictor (ends fixed, monotone)
        self.grid = LearnedGrid(sigmas) if learn_grid else None
        self.afs, self.lr = afs, float(lr)
        self.grid_lr_given = grid_lr is not None
        self.grid_lr = self.lr if grid_lr is None else float(grid_lr)
        self.automatic_optimization = False
        self.records: list[dict] = []  # per interval and batch: loss and r/c/a statistics
        self.updates = 0  # optimizer steps taken

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.predictor.parameters()) + ([] if self.grid is None else list(self.grid.parameters()))

    def current_sigmas(self) -> torch.Tensor:
        """The grid the student runs on: the schedule's, or the learned one (differentiable)."""
        return self.sigmas if self.grid is None else self.grid.sigmas()

    def configure_optimizers(self):
        groups = [{"params": list(self.predictor.parameters()), "lr": self.lr}]
        if self.grid is not None:
            groups.append({"params": list(self.grid.parameters()), "lr": self.grid_lr})
        return torch.optim.Adam(groups)

    def on_fit_start(self):
        teacher_to(self.denoiser, self.device)  # a DDP rank's own GPU; held_teacher moves it back

    def on_train_start(self):
        # distill.lr_schedule: one step per batch over every batch of every epoch (stepped in training_step)
        batches = max(int(self.trainer.estimated_stepping_batches), 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizers().optimizer, lambda done: lr_factor(self.lr_schedule, done / batches))
        # DDP's reducer syncs one backward per forward; we take one per interval and average ourselves.
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def _record(self, i: int, loss: float, batch_size: int) -> None:
        rec = {"interval": i, "epoch": self.current_epoch, "loss": loss, "lr": self.optimizers().param_groups[0]["lr"]}
        for name, v in zip("rca", self.rule.last_outputs[i]):
            v = v.detach()
            rec[f"{name}_mean"], rec[f"{name}_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
        self.records.append(rec)
        self.log_dict({f"interval_{i}/{k}": v for k, v in rec.items() if k != "interval"}, on_step=True, batch_size=batch_size)

    def rate_to_lower(self, grid_broken: bool) -> tuple[str, float]:
        """(key, value) of the learning rate a divergence is blamed on: ``solver.distill.grid_lr`` when it
        was given and the grid broke or it is the larger rate (Adam moves a parameter by about its rate
        per update); else ``distill.lr`` (which the grid also trains at when grid_lr is unset)."""
        if self.grid is not None and self.grid_lr_given and (grid_broken or self.grid_lr > self.lr):
            return "solver.distill.grid_lr", self.grid_lr
        return "distill.lr", self.lr

    def check_update(self, loss: float | None, collective: bool = True) -> None:
        """After an optimizer step: stop (a ResultError naming the rate to lower) at the first non-finite
        loss, non-finite predictor parameter or unusable learned grid; with ``collective`` every process
        stops together (after ``fit`` the parameters are the same on every process: no collective)."""
        grid_reason = None if self.grid is None else self.grid.problem()
        reason = divergence(loss, {"predictor": self.predictor}) or grid_reason
        if any_rank(reason is not None, self.device) if collective else reason is not None:
            key, value = self.rate_to_lower(grid_reason is not None)
            raise diverged(key, value, self.updates, reason or "on another process")

    def training_step(self, batch, batch_idx):
        (states,) = batch
        opt = self.optimizers()
        if self.objective == "trajectory":
            # one update per batch: backprop through the whole student run (objectives.trajectory_loss)
            opt.zero_grad()
            loss, errors = trajectory_loss(Solver(self.rule, afs=self.afs), self.denoiser, states,
                                           self.current_sigmas(), self.intermediate_weight)
            self.manual_backward(loss)
            _average_gradients(self)
            opt.step()
            self.updates += 1
            self.check_update(loss.item())
            for i, err in enumerate(errors):
                # a learned grid's inner points are not the teacher's (those lie on the schedule's grid):
                # every interval records the final error, the objective, beside its own r statistics
                self._record(i, (err if self.grid is None else errors[-1]).item(), len(states))
        else:
            for i, loss in student_intervals(self.denoiser, self.rule, states, self.sigmas, self.afs):
                opt.zero_grad()
                self.manual_backward(loss)
                _average_gradients(self.predictor)
                opt.step()
                self.updates += 1
                value = loss.item()
                self.check_update(value)
                self._record(i, value, len(states))
        self.schedule.step()  # once per batch


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
    ``conf/solver/<solver>.yaml``). ``seeds`` default to 100000.. (disjoint from evaluation seeds 0..).
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
    import dataclasses

    from ..models.callable import with_features

    wrapped = with_features(denoiser, features, sample_shape)  # the recipe in the error when there are none
    if wrapped is not denoiser and s.model_name is None:
        s = dataclasses.replace(s, model_name=wrapped.name)
    denoiser = wrapped
    feature_dim = int(denoiser.feature_dim)
    seeds = parse_seeds(s.seeds if s.seeds is not None else f"100000-{100000 + int(s.num_trajectories) - 1}")

    torch.manual_seed(s.seed)  # the predictor's initialisation
    predictor = AMEDPredictor(feature_dim=feature_dim, s_dir=s.s_dir, s_time=s.s_time, **s.predictor_sizes)
    student = s.solver_spec.build(predictor=predictor)
    num_points = student.num_points(int(s.nfe))
    sigmas = schedule.grid(num_points)

    t0 = time.perf_counter()
    data, was_cached = cached_trajectories(denoiser, s.teacher, s.schedule, num_points, s.M, seeds, s.cache_dir, s.dtype,
                                           s.gen_batch_size)
    cache_seconds = time.perf_counter() - t0

    module = AMEDDistillation(denoiser, student.rule, sigmas, s.afs, s.lr, s.objective, s.intermediate_weight,
                              s.learn_grid, s.grid_lr, s.lr_schedule)
    trainer, train_seconds = _fit(module, denoiser, s, data["states"], logger)
    module.check_update(None, collective=False)  # the trained parameters once more, whatever the loop checked
    predictor = predictor.cpu()
    trained_sigmas = module.current_sigmas().detach().cpu()
    predictor.meta = _meta(s, denoiser, module.records, sigmas, trained_sigmas, {
        "num_trajectories": len(seeds), "world_size": trainer.world_size, "trajectories_cached": was_cached,
        "trajectory_seconds": cache_seconds, "train_seconds": train_seconds})
    warn_if_unconverged(predictor.meta["convergence"], f"{s.solver} distillation for nfe={int(s.nfe)}")
    predictor.records = module.records
    return predictor


def _fit(module: AMEDDistillation, denoiser, s: DistillSpec, states: torch.Tensor, logger) -> tuple[pl.Trainer, float]:
    """Lightning's fit of ``module`` on the teacher ``states``; returns (trainer, seconds)."""
    # the frozen teacher is in eval mode on purpose; Lightning's banner and tips are noise here
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    accelerator, devices = lightning_placement(denoiser, s.accelerator, s.devices)  # where the teacher is
    trainer = pl.Trainer(max_epochs=int(s.epochs), logger=logger, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, accelerator=accelerator, devices=devices, strategy=s.strategy,
                         use_distributed_sampler=False)  # the data module shards itself (same batches as one process)
    t1 = time.perf_counter()
    with held_teacher(denoiser):  # the caller's model comes back as it was: mode, flags, device
        trainer.fit(module, datamodule=TrajectoryDataModule(states, int(s.batch_size), s.seed))
    return trainer, time.perf_counter() - t1


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
