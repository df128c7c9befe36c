"""Training the digits U-Net with EDM's loss (Karras et al. 2022) and EMA weights: the library of
``stage=train_teacher`` (:mod:`amedlab.stages.train_teacher`), and the helpers both training stages share.

The stage writes into the run directory: ``digits_teacher.safetensors`` (EMA weights + the config that rebuilds
the network), ``metrics.json`` and ``recipe.json`` (command, seed, steps, wall time).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchmetrics

from amedlab.progress import enabled as bars_shown
from amedlab.wandb_logger import lightning_loggers
from amedlab.io import atomic_write_text, run_dir
from amedlab.models.digits import make_digits_denoiser
from amedlab.models.precond import edm_loss
from amedlab.training.ema import EMA
from amedlab.training.placement import trainer_device

VAL_SEED = 1234  # fixed noise for the held-out loss, so its curve is comparable across steps


# --- helpers shared by the two training stages (features.py imports them) ---------------------

def output_dir() -> Path:
    """The run directory of a training stage (``outputs/no_hydra`` outside Hydra, e.g. from tests)."""
    return run_dir(Path("outputs") / "no_hydra")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically, keys sorted (recipes diff cleanly)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def log_every_n_steps(datamodule) -> int:
    """Log at least once per epoch (the digits train split is only a few batches long)."""
    datamodule.setup("fit")
    return max(1, min(50, len(datamodule.train_set) // datamodule.batch_size))


def max_time(node) -> timedelta | None:
    """``max_minutes`` (null = no limit) as Lightning's ``max_time``: training stops at whichever of
    ``steps`` and ``max_minutes`` comes first; the recipe records the steps actually taken."""
    minutes = node.get("max_minutes")
    return None if minutes is None else timedelta(minutes=float(minutes))


def set_threads(node) -> None:
    """``num_threads`` (null = torch's default): 1 is faster than 2 when other jobs share a 2-core CPU."""
    if node.get("num_threads") is not None:
        torch.set_num_threads(int(node.get("num_threads")))


def make_trainer(device: str, logger: Mapping | None, node: Mapping, out: Path, datamodule) -> pl.Trainer:
    """A Lightning trainer for ``node`` (the train.teacher / train.features settings) on ``device``: stops
    at ``steps`` or ``max_minutes``, validates every ``val_every_steps``, logs into the run directory
    (and to wandb with the ``logger`` settings), no checkpoints (the stage writes its own, atomically),
    Lightning's progress bar on a terminal only (:func:`amedlab.progress.enabled`; it writes to stdout)."""
    accelerator, devices = trainer_device(str(device))
    return pl.Trainer(
        max_steps=int(node["steps"]), max_time=max_time(node), accelerator=accelerator, devices=devices,
        logger=lightning_loggers(logger, out), enable_checkpointing=False, enable_progress_bar=bars_shown(sys.stdout),
        enable_model_summary=False, val_check_interval=int(node["val_every_steps"]), check_val_every_n_epoch=None,
        log_every_n_steps=log_every_n_steps(datamodule), num_sanity_val_steps=0, default_root_dir=str(out),
    )


# --- the teacher ------------------------------------------------------------------------------


class TeacherModule(pl.LightningModule):
    """EDM training: ln(sigma) ~ N(p_mean, p_std^2), loss weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, net: Mapping, sigma_data: float = 0.5, lr: float = 2e-3, warmup_steps: int = 200,
                 p_mean: float = -1.2, p_std: float = 1.2, ema_halflife_steps: float = 300.0,
                 ema_rampup: float | None = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = make_digits_denoiser(dict(net), sigma_data=sigma_data)
        self.ema = EMA(self.model, ema_halflife_steps, ema_rampup)
        self.val_loss = torchmetrics.MeanMetric()  # the held-out loss over a validation pass, weighted by images

    def training_step(self, batch, batch_idx):
        images, _ = batch
        loss = edm_loss(self.model, images, self.hparams.p_mean, self.hparams.p_std)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.model, self.global_step)

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        gen = torch.Generator(device=images.device).manual_seed(VAL_SEED + batch_idx)
        loss = edm_loss(self.ema.module, images, self.hparams.p_mean, self.hparams.p_std, generator=gen)
        self.val_loss.update(loss, weight=len(images))
        self.log("val/ema_loss", self.val_loss, prog_bar=True)  # computed and reset at the pass's end
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)
        warmup = max(int(self.hparams.warmup_steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def module_from_config(tcfg: Mapping) -> TeacherModule:
    return TeacherModule(net=dict(tcfg["net"]), sigma_data=float(tcfg["sigma_data"]), lr=float(tcfg["lr"]),
                         warmup_steps=int(tcfg["warmup_steps"]), p_mean=float(tcfg["p_mean"]),
                         p_std=float(tcfg["p_std"]), ema_halflife_steps=float(tcfg["ema_halflife_steps"]),
                         ema_rampup=tcfg.get("ema_rampup"))


def json_text(obj) -> str:
    """Canonical JSON (keys sorted), e.g. the recipe stored in the checkpoint's metadata."""
    return json.dumps(obj, sort_keys=True)
