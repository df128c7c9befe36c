"""The frozen teacher during distillation: used, never owned.

Lightning moves the LightningModule (and every registered submodule) to its device when ``fit``
starts and back to the CPU when it ends. The teacher is the caller's model (in ``stage=evaluate`` the
very object that samples afterwards), so the distillation module holds it without registering it,
the Trainer runs where the teacher is, and whatever is changed on it for the duration (eval mode,
no weight gradients, the device of a DDP rank) is put back afterwards.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..models.base import device_of

log = logging.getLogger(__name__)


def lightning_placement(denoiser, accelerator: str = "auto", devices=1) -> tuple[str, object]:
    """Lightning's (accelerator, devices) for distilling ``denoiser``.

    ``accelerator="auto"`` on one device means the teacher's device (cuda:1 -> gpu [1], cpu -> cpu):
    Lightning's own "auto" would pick any GPU, even for a model the caller keeps on the CPU. Explicit
    settings, and several devices (DDP), are kept as given.
    """
    if accelerator != "auto" or str(devices) not in ("1", "auto"):
        return accelerator, devices

    device = device_of(denoiser)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return trainer_device(f"cuda:{index}")
    if device.type == "cpu":
        return trainer_device("cpu")
    return accelerator, devices


@contextmanager
def held_teacher(denoiser):
    """Eval mode and no weight gradients (gradients flow through the input only) for the duration;
    afterwards the caller's mode, ``requires_grad`` flags and device are restored."""
    modules = denoiser if isinstance(denoiser, torch.nn.Module) else None
    if modules is None:
        yield denoiser
        return
    training = {m: m.training for m in modules.modules()}
    flags = [(p, p.requires_grad) for p in modules.parameters()]
    home = device_of(modules)
    modules.eval().requires_grad_(False)
    try:
        yield denoiser
    finally:
        for m, mode in training.items():
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        if device_of(modules) != home:
            modules.to(home)


def teacher_to(denoiser, device: torch.device) -> None:
    """Put the teacher on the training device when it is elsewhere (a DDP rank's GPU); restored by
    :func:`held_teacher`."""
    if isinstance(denoiser, torch.nn.Module) and device_of(denoiser) != device:
        log.info("distillation: the teacher moves from %s to %s for training (moved back afterwards)",
                 device_of(denoiser), device)
        denoiser.to(device)


def trainer_device(device: str) -> tuple[str, list[int] | int]:
    """``device`` ('cpu', 'cuda', 'cuda:1') -> Lightning's (accelerator, devices)."""
    if device == "cpu":
        return "cpu", 1
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; accepted here: cpu")
        return "gpu", [int(device.split(":")[1])] if ":" in device else 1
    raise ValueError(f"device={device!r}; accepted: cpu, cuda, cuda:<index>")
