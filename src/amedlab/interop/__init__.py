"""Trained solvers outside amedlab: ``solver.json`` (:mod:`.solver_json`), made by ``stage=export``
(:mod:`.export`), run by a diffusers scheduler (:mod:`.diffusers`, needs ``amed-lab[diffusers]``), a
k-diffusion-style sampler (:mod:`.k_diffusion`) or 30 lines of your own (docs/export.md)."""
from .solver_json import SCHEMA_VERSION, ExportedSolver

__all__ = ["SCHEMA_VERSION", "ExportedSolver"]
