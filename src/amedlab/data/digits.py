"""The built-in data set: scikit-learn's handwritten digits (1797 images, 8x8, values 0..16).

Images are scaled to [-1, 1] (``x / 8 - 1``) and optionally upsampled (``image_size=16``). The
train / held-out split is fixed: stratified by label, drawn once from ``split_seed`` (independent
of the run's seed), so every stage and every test sees the same held-out images.
"""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

NATIVE_SIZE = 8
NUM_IMAGES = 1797
UPSAMPLE_MODES = ("nearest", "bilinear")


def check_digits_options(image_size: int, held_out_fraction: float, upsample_mode: str = "bilinear") -> None:
    """Raise a ValueError naming the key, the bad value and what is accepted."""
    if int(image_size) != image_size or image_size < NATIVE_SIZE or image_size % NATIVE_SIZE:
        raise ValueError(f"dataset.image_size={image_size!r}: accepted values are multiples of 8 (8, 16, 24, ...)")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"dataset.held_out_fraction={held_out_fraction!r} must lie strictly between 0 and 1")
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(f"dataset.upsample_mode={upsample_mode!r}; accepted: {', '.join(UPSAMPLE_MODES)}")


def load_digits_tensors(image_size: int = 8, upsample_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``([N, 1, S, S] float32 in [-1, 1], [N] int64 labels)``."""
    from sklearn.datasets import load_digits

    check_digits_options(image_size, 0.5, upsample_mode)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != NATIVE_SIZE:
        kw = {"align_corners": False} if upsample_mode == "bilinear" else {}
        images = F.interpolate(images, size=(image_size, image_size), mode=upsample_mode, **kw).clamp(-1, 1)
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def digits_split(held_out_fraction: float = 0.2, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train_indices, held_out_indices) into the 1797 digits, stratified by label, sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_digits_options(NATIVE_SIZE, held_out_fraction)
    labels = load_digits().target
    train, held_out = train_test_split(
        np.arange(len(labels)), test_size=held_out_fraction, random_state=split_seed, stratify=labels
    )
    return np.sort(train), np.sort(held_out)


class DigitsDataModule(pl.LightningDataModule):
    """Digits as (image, label) batches: the fixed train split for training, held-out for validation."""

    def __init__(self, image_size: int = 8, held_out_fraction: float = 0.2, split_seed: int = 0,
                 batch_size: int = 256, upsample_mode: str = "bilinear") -> None:
        super().__init__()
        check_digits_options(image_size, held_out_fraction, upsample_mode)
        self.image_size, self.held_out_fraction, self.split_seed = image_size, held_out_fraction, split_seed
        self.batch_size, self.upsample_mode = batch_size, upsample_mode
        self.train_set = self.held_out_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size, self.upsample_mode)
        train, held_out = digits_split(self.held_out_fraction, self.split_seed)
        self.train_set = TensorDataset(images[train], labels[train])
        self.held_out_set = TensorDataset(images[held_out], labels[held_out])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out_set, batch_size=512, shuffle=False)

    @classmethod
    def from_config(cls, dataset_cfg, batch_size: int) -> "DigitsDataModule":
        return cls(image_size=int(dataset_cfg.get("image_size", 8)),
                   held_out_fraction=float(dataset_cfg.get("held_out_fraction", 0.2)),
                   split_seed=int(dataset_cfg.get("split_seed", 0)), batch_size=int(batch_size),
                   upsample_mode=str(dataset_cfg.get("upsample_mode", "bilinear")))
