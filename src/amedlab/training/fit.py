"""The one fit every trained solver goes through: the Lightning module, its Trainer, the device
placement and the cached training.

A trained method (AMED's predictor, the learned grid + coefficients, a user's) provides two small
things, each a protocol below:

- :class:`TrainedMethod`, what :func:`fit` trains: the module holding the trained parameters, the
  optimizer's parameter groups (learning rates), the losses of one batch (one optimizer update each,
  :class:`Update`) and what a divergence is blamed on (:meth:`TrainedMethod.check`).
- :class:`CachedTraining`, what :func:`train_cached` stores: the settings the trained part is trained
  for (the cache key's content), how a cached file is read back (the part writes itself with
  ``save(path, spec=, records=)``), and the training itself (typically a :func:`fit`).

:func:`fit` is the loop: Adam over the method's groups (or the method's own ``optimizer(groups)``),
manual optimization (a method may take several updates per batch: AMED's interval objective takes
one per interval), gradients averaged over processes, the divergence check after every update
(:mod:`amedlab.training.loss`: a non-finite loss, non-finite or runaway parameters, a collapsed
learned grid stop the training with a ResultError naming the learning rate to lower, before anything
is stored), an optional per-batch learning-rate factor (``lr_factor(progress)``), the per-update
records and their mean over each epoch (``train/epoch_loss``, a torchmetrics ``MeanMetric``). The
Trainer runs where the frozen teacher is (:mod:`amedlab.training.placement`), with no checkpoints,
Lightning's progress bar on a terminal only (:func:`amedlab.progress.enabled`) and the logger the
caller passes (none by default).
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from ..cache import digest, trained_once
from ..progress import enabled as bars_shown
from .loss import any_rank, diverged
from .placement import held_teacher, lightning_placement, teacher_to

log = logging.getLogger(__name__)


def _one_loss_record(value: float) -> list[dict]:
    return [{"interval": 0, "loss": value}]


@dataclass
class Update:
    """One optimizer update: its ``loss`` (a differentiable scalar), the number of samples it saw, and
    ``records(value)`` -> the records it leaves (called after the step, with ``loss.item()``; by
    default one ``{"interval": 0, "loss": value}``)."""

    loss: torch.Tensor
    batch_size: int = 1
    records: Callable[[float], list[dict]] = field(default=_one_loss_record)


@runtime_checkable
class TrainedMethod(Protocol):
    """What :func:`fit` trains. The frozen teacher (the denoiser) is the fit's, not the method's."""

    def parameters_module(self) -> nn.Module:
        """The module holding every trained parameter (moved to the training device by Lightning and
        back to the CPU afterwards; its gradients are averaged over processes)."""

    def optimizer_groups(self) -> list[dict]:
        """The optimizer's parameter groups, each with its learning rate (``{"params": [...], "lr": ...}``)."""

    def updates(self, batch, fit: Fit) -> Iterable[Update]:
        """The losses of one batch, one optimizer update each, in order (a generator: the loss of an
        update may depend on the parameters the previous one left). ``fit`` is the running module
        (its ``denoiser``, ``current_epoch``, ``optimizers()``)."""

    def check(self, loss: float | None) -> tuple[str | None, str, float]:
        """(why the training has diverged or None, the learning-rate setting to lower, its value):
        after every update, with its loss, and once after the fit without one."""


@runtime_checkable
class CachedTraining(Protocol):
    """What :func:`train_cached` stores: ``<cache_dir>/<folder>/<stem()>-<digest(settings())>.pt``."""

    what: str       # names the cache in log lines ("cached predictor")
    folder: str     # the cache's sub-folder

    def stem(self) -> str:
        """The start of the file name (the key's digest follows)."""

    def settings(self) -> dict:
        """What the trained part is trained for (the model identity included): the cache key's content,
        stored in the file and compared on every use."""

    def load(self, blob: dict, path) -> Any:
        """The trained part of a cached file, written by the part's ``save(path, spec=, records=)``."""

    def train(self) -> tuple[Any, dict]:
        """Train now: (the trained part, the sidecar: its settings, meta and per-update records)."""


def average_gradients(module: nn.Module) -> None:
    """Mean of the gradients over processes (no-op on one). Explicit, because a method may take several
    backward passes per training step (one per update) and DDP's reducer syncs only one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


class Fit(pl.LightningModule):
    """The Lightning module of every trained method: ``method.parameters_module()`` registered (the
    only trained parameters), the denoiser held, not registered (Lightning moves its modules to the
    CPU when ``fit`` ends, and the denoiser is the caller's model; :func:`fit` freezes it around the
    training with :func:`~amedlab.training.placement.held_teacher`, which restores it afterwards)."""

    def __init__(self, method: TrainedMethod, denoiser) -> None:
        super().__init__()
        object.__setattr__(self, "denoiser", denoiser)  # bypasses nn.Module's registration
        object.__setattr__(self, "method", method)
        self.trained = method.parameters_module()
        self.automatic_optimization = False
        self.records: list[dict] = []  # per update: the method's records (loss, ...)
        self.updates = 0  # optimizer steps taken
        self.schedule = None
        # the epoch's mean update loss, weighted by samples (synced over processes): logged, never trained on
        self.epoch_loss = torchmetrics.MeanMetric()

    def configure_optimizers(self):
        groups = self.method.optimizer_groups()
        make = getattr(self.method, "optimizer", None)  # a method's own optimizer; Adam otherwise
        return make(groups) if make is not None else torch.optim.Adam(groups)

    def on_fit_start(self):
        teacher_to(self.denoiser, self.device)  # a DDP rank's own GPU; held_teacher moves it back

    def on_train_start(self):
        factor = getattr(self.method, "lr_factor", None)
        if factor is not None:  # one scheduler step per batch over every batch of every epoch
            batches = max(int(self.trainer.estimated_stepping_batches), 1)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizers().optimizer,
                                                              lambda done: factor(done / batches))
        # DDP's reducer syncs one backward per forward; a method may take several: we average ourselves
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def check_update(self, loss: float | None, collective: bool = True) -> None:
        """After an optimizer step: stop (a ResultError naming the rate to lower) at the first divergence
        the method reports; with ``collective`` every process stops together (after ``fit`` the
        parameters are the same on every process: no collective)."""
        reason, key, value = self.method.check(loss)
        if any_rank(reason is not None, self.device) if collective else reason is not None:
            raise diverged(key, value, self.updates, reason or "on another process")

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for update in self.method.updates(batch, self):
            opt.zero_grad()
            self.manual_backward(update.loss)
            average_gradients(self.trained)
            opt.step()
            self.updates += 1
            value = update.loss.item()
            self.check_update(value)
            self.epoch_loss.update(value, weight=update.batch_size)
            for rec in update.records(value):
                self.records.append(rec)
                self.log_dict({f"interval_{rec.get('interval', 0)}/{k}": v for k, v in rec.items() if k != "interval"},
                              on_step=True, batch_size=update.batch_size)
        if self.schedule is not None:
            self.schedule.step()  # once per batch
        # Lightning computes and resets the metric at the epoch's end (the progress bar shows it)
        self.log("train/epoch_loss", self.epoch_loss, on_step=False, on_epoch=True, prog_bar=True)


@dataclass
class Fitted:
    """What :func:`fit` leaves: the per-update records, the number of updates, the processes, the
    wall and CPU seconds of the training."""

    records: list[dict]
    updates: int
    world_size: int
    seconds: float
    cpu_seconds: float


def _quiet() -> None:
    # the frozen teacher is in eval mode on purpose; Lightning's banner and tips are noise here
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # the driver's callback reads float(sigma) of a differentiable grid: harmless here
    warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def fit(method: TrainedMethod, denoiser, data, *, epochs: int, accelerator: str = "auto", devices=1,
        strategy: str = "auto", logger=False) -> Fitted:
    """Train ``method`` on ``data`` (a LightningDataModule or a DataLoader, which must shard itself
    under DDP: the Trainer injects no sampler) for ``epochs``, the frozen ``denoiser`` put back as it
    was afterwards (mode, flags, device). ``accelerator``/``devices``/``strategy``: Lightning's; "auto"
    on one device is the teacher's device. The trained parameters are checked once more at the end."""
    _quiet()
    accelerator, devices = lightning_placement(denoiser, accelerator, devices)  # where the teacher is
    module = Fit(method, denoiser)
    # Lightning's bar writes to stdout: shown when that is a terminal (the same policy as every bar)
    trainer = pl.Trainer(max_epochs=int(epochs), logger=logger, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=bars_shown(sys.stdout), accelerator=accelerator, devices=devices,
                         strategy=strategy, use_distributed_sampler=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with held_teacher(denoiser):  # the caller's model comes back as it was: mode, flags, device
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
    module.check_update(None, collective=False)  # the trained parameters once more, whatever the loop checked
    return Fitted(module.records, module.updates, trainer.world_size, time.perf_counter() - t0,
                  time.process_time() - c0)


def cache_path(training: CachedTraining, cache_dir) -> Path:
    """Where ``training``'s part is cached: ``<cache_dir>/<folder>/<stem>-<digest of its settings>.pt``."""
    return Path(cache_dir) / training.folder / f"{training.stem()}-{digest(training.settings())}.pt"


def train_cached(training: CachedTraining, cache_dir, use_cache: bool = True, new_source: str = "trained"):
    """(trained part, info): the part cached for ``training.settings()`` (used only when the file
    verifies and holds these settings), or trained now and stored with its settings and records
    (:func:`amedlab.cache.trained_once`; a training that diverges raises, nothing is stored)."""
    return trained_once(cache_path(training, cache_dir), training.what, training.load, training.train, use_cache,
                        new_source, settings=training.settings())


__all__ = ["TrainedMethod", "CachedTraining", "Update", "Fit", "Fitted", "fit", "train_cached", "cache_path",
           "average_gradients"]
