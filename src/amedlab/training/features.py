"""The digits classifier whose penultimate layer is the FID space: the library of ``stage=train_features``
(:mod:`amedlab.stages.train_features`).

The stage trains on the fixed train split (with random translations), measures accuracy on the held-out split,
writes ``digits_classifier.safetensors``, ``metrics.json`` and ``recipe.json`` into the run directory.
"""
from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
import torchmetrics
from torch.nn import functional as F

from amedlab.models.digits_features import DigitsClassifier


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (2, b), device=images.device)).unbind(0)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None])[:, None, :, None].expand(b, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None])[:, None, None, :].expand(b, 1, h, w)
    return out.gather(3, cols)


class ClassifierModule(pl.LightningModule):
    def __init__(self, channels: int = 32, feature_dim: int = 64, dropout: float = 0.3, lr: float = 1e-3,
                 weight_decay: float = 1e-4, max_shift: int = 1, steps: int = 1500) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = DigitsClassifier(channels=channels, feature_dim=feature_dim, dropout=dropout)
        # held-out loss and accuracy over a whole validation pass (computed and reset at its end)
        self.val_loss = torchmetrics.MeanMetric()
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(random_shift(images, int(self.hparams.max_shift)))
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model(images)
        self.val_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.val_accuracy.update(logits, labels)
        self.log("val/loss", self.val_loss)
        self.log("val/accuracy", self.val_accuracy)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(self.hparams.steps), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def module_from_config(fcfg: Mapping) -> ClassifierModule:
    return ClassifierModule(channels=int(fcfg["channels"]), feature_dim=int(fcfg["feature_dim"]),
                            dropout=float(fcfg["dropout"]), lr=float(fcfg["lr"]),
                            weight_decay=float(fcfg["weight_decay"]), max_shift=int(fcfg["max_shift"]),
                            steps=int(fcfg["steps"]))


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())
