"""Exponential moving average of weights with EDM's half-life schedule (Karras et al. 2022, App. F).

The decay per step is ``0.5 ** (1 / halflife)``, where the half-life (in optimizer steps) ramps up
as ``min(halflife_steps, rampup * step)`` so that early, poor weights are forgotten quickly.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, model: nn.Module, halflife_steps: float = 500.0, rampup: float | None = 0.05) -> None:
        super().__init__()
        if not halflife_steps > 0:
            raise ValueError(f"ema halflife_steps={halflife_steps!r} must be > 0")
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.halflife_steps = float(halflife_steps)
        self.rampup = rampup

    def decay(self, step: int) -> float:
        halflife = self.halflife_steps
        if self.rampup is not None:
            halflife = min(halflife, self.rampup * step)
        return 0.5 ** (1.0 / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        beta = self.decay(step)
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - beta)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
