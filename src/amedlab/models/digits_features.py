"""The digits feature network: a small classifier trained by the project (``stage=train_features``).

Its penultimate layer (``feature_dim`` numbers after a ReLU) is the feature space for FID / KID on
the built-in digits, the way Inception-v3's pool layer is for CIFAR-10. It sees 8x8 images; larger
inputs (``dataset.image_size=16``) are area-downsampled to 8x8 first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from amedlab.models.base import device_of
from amedlab.models.digits import ASSETS_DIR, load_checkpoint, resolve_checkpoint_path, save_checkpoint

SHIPPED_CLASSIFIER = ASSETS_DIR / "digits_classifier.safetensors"
CLASSIFIER_KIND = "amedlab.digits_classifier"
RESOLUTION = 8


class DigitsClassifier(nn.Module):
    """conv-conv-pool (8->4) conv-conv-pool (4->2) -> Linear -> ReLU (features) -> Linear (10 logits)."""

    def __init__(self, channels: int = 32, feature_dim: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        self._config = dict(channels=channels, feature_dim=feature_dim, dropout=dropout)
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))
        self.feature_dim = feature_dim

    def config(self) -> dict:
        return dict(self._config)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]`` of images in [-1, 1], shape [B, 1, S, S]."""
        if x.shape[-1] != RESOLUTION or x.shape[-2] != RESOLUTION:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(model: DigitsClassifier, path: str | os.PathLike, metadata=None) -> Path:
    return save_checkpoint(path, model.state_dict(), CLASSIFIER_KIND, model.config(), metadata)


def load_digits_classifier(path: str | os.PathLike | None = None) -> DigitsClassifier:
    """The shipped classifier (``path=None``) or one written by ``stage=train_features``; eval mode, frozen."""
    path = resolve_checkpoint_path(path, "eval.digits_classifier", SHIPPED_CLASSIFIER)
    state_dict, config, _ = load_checkpoint(path, CLASSIFIER_KIND)
    try:
        model = DigitsClassifier(**config)
        model.load_state_dict(state_dict)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{str(path)!r}: its weights do not fit the classifier its config describes "
                         f"({str(err).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def digits_features(images: torch.Tensor, classifier: DigitsClassifier | None = None,
                    batch_size: int = 1000) -> torch.Tensor:
    """Images in [-1, 1] (``[N, 1, S, S]``, S a multiple of 8) -> float64 features ``[N, feature_dim]``.

    Images are clamped to [-1, 1] first, as a sample would be before being saved as an image.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digits_features expects images of shape [N, 1, S, S]; got {tuple(images.shape)}")
    classifier = classifier if classifier is not None else load_digits_classifier()
    device = device_of(classifier)
    out = [classifier.features(chunk.to(device, torch.float32).clamp(-1, 1)).double().cpu()
           for chunk in images.split(batch_size)]
    return torch.cat(out)
