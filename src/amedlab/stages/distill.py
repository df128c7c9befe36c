"""``stage=distill``: distill an AMED predictor for ``solver`` (amed or amed_plugin) at ``nfe`` on ``model``.

Writes ``predictor.pt`` and ``distill.json`` (settings, metadata, per-interval records) to the run
directory. The library part is :func:`amedlab.amed.distill`.
"""
from __future__ import annotations

from ..amed.distill import distill
from ..io import atomic_write_json, run_dir
from ..specs import check_stage


def run(cfg):
    spec = check_stage(cfg, "distill")  # every check and the model file, before any compute
    predictor = distill(spec.model, spec.distill)
    out = run_dir()
    path = predictor.save(out / "predictor.pt")
    atomic_write_json(out / "distill.json", {"predictor": str(path), "meta": predictor.meta, "records": predictor.records})
    m = predictor.meta
    print(f"distilled {m['solver']} for nfe={m['nfe']} ({m['num_points']} points, {m['updates']} updates) in "
          f"{m['train_seconds']:.1f} s; trajectories {'from cache' if m['trajectories_cached'] else 'generated'} in "
          f"{m['trajectory_seconds']:.1f} s\nfinal loss per interval: {[round(v, 5) for v in m['final_interval_loss']]}\n"
          f"predictor: {path}")
    return sum(m["final_interval_loss"])
