"""``stage=train_features``: train the digits classifier whose penultimate layer is the FID space.

Trains on the fixed train split (with random translations), measures accuracy on the held-out split,
writes ``digits_classifier.safetensors``, ``metrics.json`` and ``recipe.json`` into the run directory.
The library part is :mod:`amedlab.training.features`.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl

from ..data.digits import DigitsDataModule
from ..models.digits_features import save_classifier
from ..training.features import accuracy, module_from_config
from ..io import plain
from ..specs.config import hydra_command
from ..training.teacher import make_trainer, output_dir, set_threads, write_json
from ..specs import check_stage


def run(cfg) -> float:
    """Train the classifier; returns its held-out accuracy."""
    spec = check_stage(cfg, "train_features")
    fcfg = spec.node
    out = output_dir()
    set_threads(fcfg)
    pl.seed_everything(spec.seed, workers=True)
    datamodule = DigitsDataModule.from_config(spec.dataset, batch_size=int(fcfg["batch_size"]))
    module = module_from_config(fcfg)
    trainer = make_trainer(spec.device, spec.logger, fcfg, out, datamodule)
    start = time.time()
    trainer.fit(module, datamodule=datamodule)
    wall = time.time() - start
    model = module.model.cpu().eval()
    held_out = datamodule.held_out_set.tensors
    acc = accuracy(model, *held_out)
    recipe = {"command": hydra_command(), "seed": int(cfg.seed), "steps": int(trainer.global_step),
              "wall_time_s": round(wall, 1), "held_out_accuracy": acc, "num_held_out": len(held_out[1]),
              "num_params": sum(p.numel() for p in model.parameters()),
              "train": plain(fcfg), "dataset": plain(cfg.dataset)}
    ckpt = save_classifier(model, out / "digits_classifier.safetensors",
                           metadata={"held_out_accuracy": f"{acc:.4f}", "command": recipe["command"]})
    write_json(out / "recipe.json", {**recipe, "checkpoint": ckpt.name})
    write_json(out / "metrics.json", {"held_out_accuracy": acc, "wall_time_s": round(wall, 1),
                                      "steps": int(trainer.global_step)})
    return acc
