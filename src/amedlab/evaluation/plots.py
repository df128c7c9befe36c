"""Pictures (PNG, written atomically): a grid of samples per cell, the metric against NFE for a whole
sweep, and the sweep's samples side by side (rows: solvers, columns: NFE, the same seeds in every cell)."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes


def grid_canvas(images, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 images ``[N, C, H, W]`` (a tensor or an array) -> one ``[rows*(H+pad)+pad, ..., C]`` canvas,
    row by row, white between the images."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, c, h, w = arr.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = arr.transpose(0, 2, 3, 1)
    for k in range(n):
        r, q = divmod(k, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[k]
    return canvas


def sample_grid_png(images: torch.Tensor, path, columns: int | None = None, scale: int | None = None,
                    pad: int = 1) -> Path:
    """uint8 images ``[N, C, H, W]`` (C = 1 or 3) -> one PNG grid, enlarged ``scale`` times (nearest)."""
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    scale = scale or max(1, 64 // max(h, w))
    canvas = grid_canvas(images, columns, pad)
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def grid_tiles(png_path, count: int, shape: Sequence[int], pad: int = 1) -> np.ndarray | None:
    """The first ``count`` images ``[count, C, H, W]`` (uint8) of a grid written by :func:`sample_grid_png`
    with its default columns and scale, read back exactly (a PNG is lossless, the scale a repeat); None
    when the file does not have that geometry or holds fewer images."""
    from PIL import Image

    c, h, w = (int(v) for v in shape)
    with Image.open(png_path) as img:
        canvas = np.asarray(img.convert("L" if c == 1 else "RGB"))
    canvas = canvas[..., None] if canvas.ndim == 2 else canvas
    scale = max(1, 64 // max(h, w))
    if canvas.shape[0] % scale or canvas.shape[1] % scale:
        return None
    canvas = canvas[::scale, ::scale]
    columns, rem_w = divmod(canvas.shape[1] - pad, w + pad)
    rows, rem_h = divmod(canvas.shape[0] - pad, h + pad)
    # the last row may be short: only the rows above it are surely full
    if rem_w or rem_h or columns < 1 or rows < 1 or canvas.shape[2] != c or count > (rows - 1) * columns + 1:
        return None
    out = np.empty((count, c, h, w), np.uint8)
    for k in range(count):
        r, q = divmod(k, columns)
        tile = canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w]
        out[k] = tile.transpose(2, 0, 1)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    """The figure as PNG, cropped to what is drawn (``bbox_inches="tight"``: a legend or labels outside
    the axes are kept whole), then closed."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def metric_vs_nfe_figure(series: Mapping[str, Mapping[int, float]], metric: str = "FID", title: str | None = None,
                         log_y: bool = True, errors: Mapping[str, Mapping[int, float]] | None = None,
                         error_label: str | None = None, limits: Mapping[str, float] | None = None):
    """The figure of :func:`metric_vs_nfe_png` (open; the caller closes it)."""
    plt = _pyplot()
    # wider than the axes: the legend goes right of them (a Table 2 sweep has ~11 rows, which inside
    # the axes hid the points of the upper left)
    fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=120)
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
    for label, value in (limits or {}).items():  # a bound at every NFE, not a curve (a log axis cannot show <= 0)
        if value is not None and np.isfinite(value) and (value > 0 or not log_y):
            ax.axhline(value, color="0.25", linestyle="--", linewidth=1.2, label=label, zorder=1)
    all_nfes = sorted({n for points in series.values() for n in points})
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks(all_nfes)
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    note = f"error bars: {error_label}" if errors and any(errors.values()) and error_label else None
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        last = [k for k, label in enumerate(labels) if label in (limits or {})]  # the limits last, as in the table
        order = [k for k in range(len(labels)) if k not in last] + last
        # outside the axes, right of them: it never hides a point; the error bars' note is its title
        ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, title=note, title_fontsize=7, alignment="left")
    elif note:
        ax.set_title(f"{ax.get_title()}\n{note}", fontsize=9)
    fig.tight_layout()
    return fig


def metric_vs_nfe_png(series: Mapping[str, Mapping[int, float]], path, metric: str = "FID",
                      title: str | None = None, log_y: bool = True,
                      errors: Mapping[str, Mapping[int, float]] | None = None, error_label: str | None = None,
                      limits: Mapping[str, float] | None = None) -> Path:
    """One line per solver (``{label: {nfe: value}}``), log-scale y; missing points are skipped; the
    legend right of the axes.

    ``errors`` (``{label: {nfe: half-width}}``) draws error bars (clipped at the axis on a log scale);
    ``limits`` (``{label: value}``, the table's limit rows) a dashed horizontal line each, in the legend."""
    return _save(metric_vs_nfe_figure(series, metric, title, log_y, errors, error_label, limits), path)


#: how many images a row of one cell of samples_by_solver.png holds (8 previews: 2 rows of 4)
STRIP_COLUMNS = 4


def samples_by_solver_figure(labels: Sequence[str], nfes: Sequence[int], images: Mapping, notes: Mapping | None = None,
                             title: str | None = None):
    """The figure of :func:`samples_by_solver_png` (open; the caller closes it): one row per label,
    one column per NFE; a cell without images shows its note (``notes[(label, nfe)]``) in grey."""
    plt = _pyplot()
    notes = notes or {}
    shapes = [np.asarray(v).shape for v in images.values()]
    k = max((s[0] for s in shapes), default=STRIP_COLUMNS)
    h = max((s[2] for s in shapes), default=8)
    w = max((s[3] for s in shapes), default=8)
    columns = min(k, STRIP_COLUMNS)
    strip_rows = math.ceil(k / columns)
    inch = 0.32  # one image, whatever its pixels: the picture is about the solvers, not the resolution
    cell_w, cell_h = columns * inch * (w + 1) / max(h, w), strip_rows * inch * (h + 1) / max(h, w)
    fig_w, fig_h = max(2.0, len(nfes) * (cell_w + 0.15)), max(1.0, len(labels) * (cell_h + 0.15)) + 0.6
    fig, axes = plt.subplots(len(labels), len(nfes), squeeze=False, dpi=150, figsize=(fig_w, fig_h),
                             gridspec_kw={"wspace": 0.05, "hspace": 0.08})
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=1 - 0.55 / fig_h)  # room for the title, no more
    for i, label in enumerate(labels):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.8")
            imgs = images.get((label, n))
            if imgs is not None:
                canvas = grid_canvas(imgs, columns)
                if canvas.shape[2] == 1:
                    ax.imshow(canvas[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(canvas, interpolation="nearest")
            else:
                ax.set_box_aspect((strip_rows * (h + 1) + 1) / (columns * (w + 1) + 1))  # an image cell's shape
                ax.text(0.5, 0.5, notes.get((label, n), "n/a"), ha="center", va="center", fontsize=6, color="0.5",
                        transform=ax.transAxes, wrap=True)
            if i == 0:
                ax.set_title(f"NFE {n}", fontsize=9)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def samples_by_solver_png(labels: Sequence[str], nfes: Sequence[int], images: Mapping, path, notes: Mapping | None = None,
                          title: str | None = None) -> Path:
    """The sweep's samples side by side: rows ``labels`` (the table's rows, in its order), columns ``nfes``,
    each cell its images ``images[(label, nfe)]`` (uint8 ``[K, C, H, W]``, the same seeds in every cell)."""
    return _save(samples_by_solver_figure(labels, nfes, images, notes, title), path)
