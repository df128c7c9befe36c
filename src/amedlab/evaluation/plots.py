"""Pictures: a grid of samples per cell, and FID against NFE for a whole sweep (PNG, written atomically)."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes


def sample_grid_png(images: torch.Tensor, path, columns: int | None = None, scale: int | None = None,
                    pad: int = 1) -> Path:
    """uint8 images ``[N, C, H, W]`` (C = 1 or 3) -> one PNG grid, enlarged ``scale`` times (nearest)."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = scale or max(1, 64 // max(h, w))
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, q = divmod(k, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[k]
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def metric_vs_nfe_png(series: Mapping[str, Mapping[int, float]], path, metric: str = "FID",
                      title: str | None = None, log_y: bool = True,
                      errors: Mapping[str, Mapping[int, float]] | None = None, error_label: str | None = None) -> Path:
    """One line per solver (``{label: {nfe: value}}``), log-scale y; missing points are skipped.

    ``errors`` (``{label: {nfe: half-width}}``) draws error bars (clipped at the axis on a log scale)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = "osD^v<>pPX*h"
    for k, (label, points) in enumerate(series.items()):
        xs = sorted(n for n, v in points.items() if v is not None and np.isfinite(v) and (v > 0 or not log_y))
        if not xs:
            continue
        ys = [points[n] for n in xs]
        half = (errors or {}).get(label) or {}
        if any(n in half for n in xs):
            lo = [min(half.get(n, 0.0), y * 0.999) if log_y else half.get(n, 0.0) for n, y in zip(xs, ys)]
            hi = [half.get(n, 0.0) for n in xs]
            dx = 0.05 * (k - (len(series) - 1) / 2)  # side by side, so that the bars of one NFE do not overlap
            ax.errorbar([x + dx for x in xs], ys, yerr=[lo, hi], marker=markers[k % len(markers)], label=label, capsize=3,
                        linestyle="--" if label.startswith("AMED") else "-")
        else:
            ax.plot(xs, ys, marker=markers[k % len(markers)], label=label,
                    linestyle="--" if label.startswith("AMED") else "-")
    all_nfes = sorted({n for points in series.values() for n in points})
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks(all_nfes)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    if errors and any(errors.values()) and error_label:
        ax.text(0.99, 0.99, f"error bars: {error_label}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
