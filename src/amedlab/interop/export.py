"""Taking a trained solver out of amedlab (``stage=export``).

- The learned grid + coefficients (``solver=learned``) becomes ``solver.json``
  (:class:`~amedlab.interop.solver_json.ExportedSolver`): sigmas, per-step weights, AFS, NFE, order,
  the model's identity and the provenance. Before it is written, the file's own loop is run against
  amedlab's sampler on the same model and noise: the export is refused if they differ.
- An AMED rule's per-sample predictor becomes ``predictor.safetensors`` plus ``amed.json`` (its
  sizes, what it was distilled for, the base rule, the grid, and the model block whose output it
  reads). The predictor needs the model's features from that block: backends that expose one are
  the digits teacher, NVlabs EDM pickles and diffusers ``UNet2DModel`` (``mid_block``); any other
  model is a named error.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import ExportError, WrongModelError, WrongNFEError
from .solver_json import SCHEMA_VERSION, ExportedSolver, content_digest, verify_record

AMED_KIND = "amedlab.amed_predictor"
#: the model classes whose forward pass exposes the block AMED's predictor reads
FEATURE_BACKENDS = {"EDMPrecond": "the digits teacher (model=digits_unet)", "EDMPickleDenoiser": "NVlabs EDM pickles (model=edm_pkl)",
                    "DiffusersVPDenoiser": "diffusers UNet2DModel (model=diffusers)"}


def _inner(model):
    return getattr(model, "inner", model)


def feature_block(model) -> str | None:
    """The network block whose output AMED's predictor reads (None: the model has no such block)."""
    inner = _inner(model)
    return getattr(inner, "feature_block", None) if getattr(model, "feature_dim", 0) else None


def parametrisation(model) -> dict:
    """How the model is called: amedlab's D(x, sigma) on the EDM/VE scale, and for a diffusers model
    the VP epsilon / v / sample prediction it wraps (a scheduler checks it)."""
    inner = _inner(model)
    out = {"denoiser": "edm", "backend": type(inner).__name__}
    if hasattr(inner, "prediction_type"):  # a diffusers VP model: what a scheduler needs to call it the same way
        out["prediction_type"] = inner.prediction_type
        # sigma -> timestep: linear in log sigma over the DDPM table (amedlab.models.adapters), kept exactly
        out["log_sigmas"] = [float(v) for v in inner.log_sigmas.float().tolist()]
    return out


def model_record(model, name: str | None) -> dict:
    return {"identity": model.identity(), "name": name, "sample_shape": list(getattr(model, "sample_shape", ())),
            "parametrisation": parametrisation(model)}


def _check_trained_for(meta: dict, model, nfe: int, what: str) -> None:
    own = meta.get("model_identity")
    if own is not None and own != model.identity():
        raise WrongModelError(f"solver: this {what} was trained for model {meta.get('model_name')!r} (identity {own}), "
                              f"not for the model given (identity {model.identity()}); export from a cell of that model",
                              "model")
    if meta.get("nfe") is not None and int(meta["nfe"]) != int(nfe):
        raise WrongNFEError(f"nfe={nfe}: this {what} was trained for NFE {meta['nfe']}", "nfe")


def learned_solver_json(solver, model, nfe: int, model_name: str | None, provenance: dict) -> ExportedSolver:
    """The ``solver.json`` content of a learned-solver :class:`~amedlab.solvers.Solver`."""
    params = solver.rule.params
    _check_trained_for(params.meta, model, nfe, "learned solver")
    if solver.afs not in (True, False):
        raise ExportError(f"solver.afs={solver.afs!r}: solver.json carries GENIE's AFS (true) or none (false); the "
                          "data-mean AFS needs the model's data mean at sampling", "solver.afs")
    summary = params.summary()
    return ExportedSolver(sigmas=[float(s) for s in summary["sigmas"]], weights=summary["weights"],
                          afs=bool(solver.afs), final_step=solver.final_step, nfe=int(nfe), max_order=params.max_order,
                          model=model_record(model, model_name), provenance=provenance)


def self_check(exported: ExportedSolver, solver, model, seeds, dtype=torch.float64) -> float:
    """The largest relative difference between the file's loop and amedlab's sampler on ``seeds``."""
    from ..sampling import seeded_noise

    sigmas = torch.tensor(exported.sigmas, dtype=torch.float64)
    x = seeded_noise(list(seeds), tuple(model.sample_shape), exported.sigmas[0], dtype)
    with torch.no_grad():
        ours = solver.sample(model, x.clone(), sigmas)
        theirs = exported.sample(model, x.clone())
    return float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12))


def write_solver_json(exported: ExportedSolver, solver, model, out_dir: Path, tolerance: float = 1e-5) -> dict:
    """Check the loop against amedlab's sampler (4 seeds, float64), then write ``solver.json``."""
    diff = self_check(exported, solver, model, range(4))
    if not diff <= tolerance:
        raise RuntimeError(f"solver.json's loop differs from amedlab's sampler by {diff:.2e} (relative) on seeds 0-3; "
                           "not written (a bug: please report it)")
    exported = ExportedSolver(**{**exported.__dict__, "provenance": {**exported.provenance, "self_check": {
        "seeds": [0, 1, 2, 3], "dtype": "float64", "max_relative_difference": diff}}})
    path = exported.save(out_dir / "solver.json")
    return {"file": str(path), "digest": exported.record()["digest"], "self_check": diff}


def amed_export(solver, model, nfe: int, model_name: str | None, provenance: dict, out_dir: Path) -> dict:
    """``predictor.safetensors`` + ``amed.json`` for an AMED rule (the predictor and what runs it)."""
    from safetensors.torch import save_file

    from ..io import atomic_write_bytes, atomic_write_text

    inner = _inner(model)
    block = feature_block(model)
    if not block:
        backends = "; ".join(FEATURE_BACKENDS.values())
        raise ExportError(f"model: {type(inner).__name__} exposes no feature block, and AMED's predictor reads one "
                          f"per sample; accepted: {backends}", "model")
    predictor = solver.rule.predictor
    _check_trained_for(predictor.meta, model, nfe, "AMED predictor")
    state = {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    tmp = out_dir / ".predictor.safetensors.tmp"
    save_file(state, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    weights = atomic_write_bytes(out_dir / "predictor.safetensors", data)
    base = getattr(solver.rule, "base", None)
    body = {"schema_version": SCHEMA_VERSION, "kind": AMED_KIND, "rule": solver.rule.name,
            "base_rule": getattr(base, "name", None), "base_options": base.options() if base is not None else {},
            "hparams": predictor.hparams, "meta": predictor.meta, "afs": solver.afs, "final_step": solver.final_step,
            "nfe": int(nfe), "feature_hook": {"backend": type(inner).__name__, "block": block,
                                              "reduce": "channel mean of the block's output", "dim": int(model.feature_dim)},
            "model": model_record(model, model_name), "provenance": provenance,
            "weights": {"file": weights.name, "sha256": hashlib.sha256(data).hexdigest()}}
    record = {**body, "digest": content_digest(body)}
    path = atomic_write_text(out_dir / "amed.json", json.dumps(record, indent=2, default=str) + "\n")
    return {"file": str(path), "weights": str(weights), "digest": record["digest"]}


def load_amed_predictor(folder):
    """The predictor of an ``amed.json`` export, verified (digest, weights' sha256)."""
    from safetensors.torch import load_file

    from ..amed.predictor import AMEDPredictor
    from ..errors import DigestMismatchError

    folder = Path(folder)
    try:
        record = json.loads((folder / "amed.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder / 'amed.json'}: not a readable export ({err})") from None
    verify_record(record, AMED_KIND, str(folder / "amed.json"), "an exported AMED predictor")
    data = (folder / record["weights"]["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != record["weights"]["sha256"]:
        raise DigestMismatchError(f"{folder / record['weights']['file']}: the weights do not match amed.json's sha256")
    predictor = AMEDPredictor(**record["hparams"], meta=record["meta"])
    predictor.load_state_dict(load_file(str(folder / record["weights"]["file"])))
    return predictor, record
