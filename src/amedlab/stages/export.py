"""``stage=export``: a trained solver out of amedlab, for the cell ``stage=evaluate`` would run (same
experiment, model, solver, NFE). The trained part comes from the cache, or is trained now, exactly as
for that cell. Writes into ``export.dir`` (default: the run directory):

- ``solver=learned``: ``solver.json`` (:mod:`amedlab.interop.solver_json`), checked against amedlab's
  sampler before it is written; run it with ``amedlab.interop.diffusers.LearnedScheduler``,
  ``amedlab.interop.k_diffusion.sample_learned`` or the loop in docs/export.md;
- an AMED rule: ``predictor.safetensors`` + ``amed.json`` (the predictor and the feature hook it reads).
"""
from __future__ import annotations

import datetime
import json

import torch

from .. import __version__
from ..evaluation.evaluate import bits_environment, cell_solver
from ..interop.export import amed_export, learned_solver_json, write_solver_json
from ..io import plain
from ..solvers.trained import key_content
from ..specs import check_stage
from ..specs.config import hydra_command


def run(cfg):
    spec = check_stage(cfg, "export")
    model = spec.model.to(spec.device).eval()
    files = {"predictor": None}
    if spec.trained_part is not None:
        from ..cache import sha256_file

        files["predictor"] = sha256_file(spec.solver.predictor)
    solver, info = cell_solver(spec, model, files, spec.predictor_cache)
    info = dict(info or {})
    info.pop("records", None)
    provenance = {"amedlab": __version__, "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": hydra_command(), "solver": spec.solver_node.get("name"), "schedule": spec.schedule,
                  "trained_for": None if spec.trained_settings is None else plain(key_content(spec.trained, spec.trained_settings)),
                  "trained_part": plain({k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}),
                  "environment": bits_environment(spec.device, torch.float64)}
    provenance = json.loads(json.dumps(provenance, default=str))  # plain JSON values only
    model = model.double()  # the check below compares in float64
    if spec.trained.key == "learned":
        exported = learned_solver_json(solver, model, spec.nfe, spec.model_name, provenance)
        out = write_solver_json(exported, solver, model, spec.out_dir)
        print(f"solver.json: {spec.solver.label} NFE {spec.nfe}, {len(exported.sigmas)} sigmas, max order "
              f"{exported.max_order}, afs={exported.afs}; its loop equals amedlab's sampler to "
              f"{out['self_check']:.1e} (relative, float64, seeds 0-3)")
    else:
        out = amed_export(solver, model, spec.nfe, spec.model_name, provenance, spec.out_dir)
        print(f"AMED predictor of {spec.solver.label} NFE {spec.nfe}: {out['weights']} and {out['file']}")
    print(f"written to {spec.out_dir}")
    return out
