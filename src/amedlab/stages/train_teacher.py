"""``stage=train_teacher``: train the digits U-Net with EDM's loss (Karras et al. 2022) and EMA weights.

Writes into the run directory ``digits_teacher.safetensors`` (EMA weights + the config that rebuilds
the network), ``metrics.json`` and ``recipe.json`` (command, seed, steps, wall time). The library part
is :mod:`amedlab.training.teacher`.
"""
from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from ..data.digits import DigitsDataModule
from ..models.digits import save_denoiser
from ..io import plain
from ..specs.config import hydra_command
from ..training.teacher import json_text, make_trainer, module_from_config, output_dir, set_threads, write_json
from ..specs import check_stage


def run(cfg) -> float:
    """Train the teacher; returns the final held-out EDM loss of the EMA weights."""
    spec = check_stage(cfg, "train_teacher")
    tcfg = spec.node
    out = output_dir()
    set_threads(tcfg)
    pl.seed_everything(spec.seed, workers=True)
    datamodule = DigitsDataModule.from_config(spec.dataset, batch_size=int(tcfg["batch_size"]))
    net_cfg = {**dict(tcfg["net"]), "img_resolution": int(spec.dataset["image_size"]), "in_channels": 1, "out_channels": 1}
    module = module_from_config({**tcfg, "net": net_cfg})
    trainer = make_trainer(spec.device, spec.logger, tcfg, out, datamodule)
    start = time.time()
    trainer.fit(module, datamodule=datamodule)
    wall = time.time() - start
    final_train_loss = float(trainer.callback_metrics.get("train/loss", math.nan))
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/ema_loss"]
    num_params = sum(p.numel() for p in module.model.net.parameters())
    recipe = {
        "command": hydra_command(),
        "seed": int(cfg.seed),
        "steps": int(trainer.global_step),
        "batch_size": int(tcfg["batch_size"]),
        "wall_time_s": round(wall, 1),
        "device": str(cfg.device),
        "torch_threads": torch.get_num_threads(),
        "num_params": num_params,
        "final_train_loss": final_train_loss,
        "held_out_ema_loss": float(val),
        "train": plain(tcfg),
        "dataset": plain(cfg.dataset),
    }
    ckpt = save_denoiser(module.ema.module, out / "digits_teacher.safetensors",
                         metadata={"recipe": json_text(recipe)})
    write_json(out / "recipe.json", {**recipe, "checkpoint": ckpt.name})
    write_json(out / "metrics.json", {"held_out_ema_loss": float(val), "wall_time_s": round(wall, 1),
                                      "steps": int(trainer.global_step), "num_params": num_params})
    return float(val)
