"""PNG figures of ``stage=analyze_trajectories`` (matplotlib, Agg backend), written atomically."""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from amedlab.io import atomic_write_bytes  # noqa: E402

FLOOR = 1e-17  # log axes: exact zeros (e.g. the Gaussian's straight lines) are drawn at this floor


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render to memory, then write to a temporary name and ``os.replace`` (no half-written PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _title(results: dict) -> str:
    model = results.get("model") or {}
    name = model.get("name", "model") if isinstance(model, dict) else str(model)
    s = results["schedule"]
    return (f"{name}: {results['num_samples']} trajectories, {results['fine']['solver']} {results['fine']['steps']} steps, "
            f"{s['kind']} rho={s['rho']}")


def plot_pca(results: dict, raw: dict, path) -> Path:
    """(a) unexplained variance and (b) rebuild error per k; (c) profiles along sigma; (d) 2-D views."""
    geom, sig = raw["geometry"], raw["fine_sigmas"].double()
    K = geom["explained_variance"].shape[1]
    ks = list(range(1, K + 1))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    ax.boxplot([geom["unexplained_variance"][:, k - 1].clamp_min(FLOOR).numpy() for k in ks], showfliers=False)
    ax.set(yscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="top-k principal components",
           ylabel="1 - explained variance", title="(a) variance left out by the top k")
    ax = axes[0, 1]
    ax.boxplot([geom["rel_error"][:, k - 1].clamp_min(FLOOR).numpy() for k in ks], showfliers=False)
    ax.set(yscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="top-k principal components",
           ylabel="||X - X_k||_F / ||X||_F", title="(b) relative error of the rebuilt trajectory")
    ax = axes[1, 0]
    for k in ks:
        ax.plot(sig.numpy(), geom["point_rel_error"][:, k - 1].mean(0).clamp_min(FLOOR).numpy(), label=f"point error, top {k}")
    ax.plot(sig.numpy(), geom["line_deviation"].mean(0).clamp_min(FLOOR).numpy(), "k--", label="distance to chord / chord")
    ax.plot(sig.numpy(), geom["plane_deviation"].mean(0).clamp_min(FLOOR).numpy(), "k:", label="distance to top-2 plane / chord")
    ax.set(xscale="log", yscale="log", xlabel="sigma (sampling runs left to right)", ylabel="mean over trajectories",
           title="(c) along the trajectory: ||x_t - x_k,t|| / ||x_t|| and deviations")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    coords = geom["plane_coords"]
    X0 = coords[:, :1]
    chord = (coords[:, -1] - coords[:, 0]).norm(dim=-1).clamp_min(FLOOR)
    for b in range(min(8, coords.shape[0])):
        c = (coords[b] - X0[b]) / chord[b]
        if c[-1, 0] < 0:
            c[:, 0] = -c[:, 0]
        if c[c[:, 1].abs().argmax(), 1] < 0:
            c[:, 1] = -c[:, 1]
        ax.plot(c[:, 0].numpy(), c[:, 1].numpy(), lw=1)
        ax.plot([0, c[-1, 0].item()], [0, c[-1, 1].item()], color="gray", lw=0.5, ls="--")
    ax.set(xlabel="PC 1 (from x_T, / chord)", ylabel="PC 2 (/ chord)",
           title="(d) 8 trajectories in their own top-2 plane (dashed: chord)")
    fig.suptitle(_title(results))
    fig.tight_layout()
    return save_figure(fig, path)


def _positions(results: dict):
    """One x position per (NFE, interval), a gap between NFEs."""
    pos, labels, groups, x = [], [], [], 0
    for nfe, o in results["oracle"]["nfe"].items():
        group = []
        for e in o["restart"]:
            pos.append(x)
            labels.append(f"{nfe}:{e['interval']}")
            group.append(x)
            x += 1
        groups.append((nfe, group))
        x += 1
    return pos, labels, groups


def plot_oracle(results: dict, raw: dict, path) -> Path:
    """(a) r* per interval vs shared r, DPM-Solver-2's 1/2 and AMED's learned r; (b) restart errors per
    interval; (c) final-sample RMSE vs NFE, oracle chained and the solvers."""
    pos, labels, groups = _positions(results)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    r_all = [iv["r_star"].double().numpy() for nfe in results["oracle"]["nfe"] for iv in raw["oracle"][nfe]["restart"]]
    ax.boxplot(r_all, positions=pos, widths=0.6, showfliers=False)
    shared = [iv["r_shared"] for nfe in results["oracle"]["nfe"] for iv in raw["oracle"][nfe]["restart"]]
    ax.plot(pos, shared, "x", color="C1", label="best shared r")
    amed = [iv.get("amed_r") for nfe in results["oracle"]["nfe"] for iv in raw["oracle"][nfe]["restart"]]
    if any(a is not None for a in amed):
        ax.plot([p for p, a in zip(pos, amed) if a is not None],
                [a.median().item() for a in amed if a is not None], "D", color="C2", label="AMED learned r (median)")
    ax.axhline(0.5, color="gray", ls="--", lw=0.8, label="DPM-Solver-2 (r = 1/2)")
    ax.set(xticks=pos, xlabel="NFE:interval", ylabel="r", ylim=(-0.02, 1.02),
           title="(a) per-sample oracle r* (restart), box = p25-p75")
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.legend(fontsize=8)
    ax = axes[1]
    names = list(next(iter(results["oracle"]["nfe"].values()))["restart"][0]["rmse"])
    for j, name in enumerate(names):
        for g, (nfe, group) in enumerate(groups):
            vals = [max(e["rmse"][name], FLOOR) for e in results["oracle"]["nfe"][nfe]["restart"]]
            ax.plot(group, vals, "o-", color=f"C{j}", ms=3, label=name if g == 0 else None)
    ax.set(yscale="log", xticks=pos, xlabel="NFE:interval", ylabel="RMSE at the interval's end",
           title="(b) one step from the fine state (restart)")
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.legend(fontsize=8)
    ax = axes[2]
    nfes = list(results["oracle"]["nfe"])
    for j, (name, res) in enumerate(results["final_rmse"].items()):
        xs = [n for n in nfes if res.get(n)]
        style = "-" if name.startswith("oracle") else ("-." if name == "amed" else "--")
        ax.plot(xs, [max(res[n]["rmse"], FLOOR) for n in xs], style, marker="o", ms=4, label=name)
    if "rmse_vs_reference" in results["fine"]:
        ax.axhline(results["fine"]["rmse_vs_reference"], color="gray", lw=0.8, label="fine run vs exact")
    ax.set(yscale="log", xticks=nfes, xlabel="NFE", ylabel="final-sample RMSE vs fine trajectory",
           title="(c) whole solve (oracle chained from its own output)")
    ax.legend(fontsize=8)
    fig.suptitle(_title(results))
    fig.tight_layout()
    return save_figure(fig, path)
