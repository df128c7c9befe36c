"""``solver.json``: a trained multistep solver as plain numbers, enough to sample without amedlab.

A solver of this kind (the learned grid + coefficients, ``solver=learned``; its untrained form is
variable-step iPNDM) walks a fixed grid sigma_0 > ... > sigma_{N-1} of the probability-flow ODE
dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3). At step i it evaluates the slope
d_i = (x_i - D(x_i, sigma_i)) / sigma_i and moves

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * sum_j w_{i,j} d_{i-j}        (newest slope first)

where ``weights[i]`` are the Adams-Bashforth weights of the learned times with the learned
corrections folded in. With ``afs`` the first slope is GENIE's analytical x / sqrt(1 + sigma_0^2)
(no model call); with ``final_step="denoise"`` one more call returns D(x, sigma_{N-1}).

The file (schema :data:`SCHEMA_VERSION`) holds the sigmas, the weights, AFS, NFE, the maximum order,
the model's identity and the training's provenance, and a sha256 ``digest`` over the rest. The loop
is :meth:`ExportedSolver.sample`; docs/export.md prints the same loop as 30 lines of numpy.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import DigestMismatchError, ExportError, SchemaVersionError, WrongModelError, WrongNFEError

SCHEMA_VERSION = 1
KIND = "amedlab.multistep_solver"
FINAL_STEPS = ("sigma_min", "denoise")


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_digest(record: dict) -> str:
    """sha256 of the canonical JSON of ``record`` without its ``digest``."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "digest"})).hexdigest()


def verify_record(record, kind: str, where: str, what: str) -> None:
    """An exported record (``solver.json``, ``amed.json``) of ``kind``, of this schema version, whose
    content matches its digest; else the named error."""
    if not isinstance(record, dict) or record.get("kind") != kind:
        raise ExportError(f"{where}: not {what} (kind {kind!r})")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise SchemaVersionError(f"{where}: schema_version={record.get('schema_version')!r}; this amedlab reads "
                                 f"schema_version {SCHEMA_VERSION} (export it again with this version)")
    if record.get("digest") != content_digest(record):
        raise DigestMismatchError(f"{where}: the content does not match its digest (the file was edited or "
                                  "damaged); export it again")


@dataclass(frozen=True)
class ExportedSolver:
    """The content of a ``solver.json`` (see the module docstring for the step)."""

    sigmas: list[float]
    weights: list[list[float]]
    afs: bool
    final_step: str
    nfe: int
    max_order: int
    model: dict = field(default_factory=dict)        # identity, name, sample_shape, parametrisation
    provenance: dict = field(default_factory=dict)   # amedlab version, settings, the trained file's digest

    def __post_init__(self) -> None:
        n = len(self.sigmas)
        if n < 2 or any(not math.isfinite(s) or s <= 0 for s in self.sigmas) or any(
                a <= b for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ExportError(f"sigmas={self.sigmas!r}: a strictly decreasing list of >= 2 positive numbers")
        if len(self.weights) != n - 1:
            raise ExportError(f"weights: one list per step ({n - 1}), got {len(self.weights)}")
        for i, w in enumerate(self.weights):
            if not 1 <= len(w) <= min(self.max_order, i + 1) or not all(math.isfinite(v) for v in w):
                raise ExportError(f"weights[{i}]={w!r}: 1 to min(max_order={self.max_order}, {i + 1}) finite numbers")
        if self.final_step not in FINAL_STEPS:
            raise ExportError(f"final_step={self.final_step!r}; accepted: {', '.join(FINAL_STEPS)}")
        if self.nfe != n - 1 - int(self.afs) + int(self.final_step == "denoise"):
            raise ExportError(f"nfe={self.nfe} does not match {n} sigmas, afs={self.afs}, final_step={self.final_step}")

    # -- the file --
    def record(self) -> dict:
        body = {"schema_version": SCHEMA_VERSION, "kind": KIND, **asdict(self)}
        return {**body, "digest": content_digest(body)}

    def save(self, path) -> Path:
        from ..io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.record(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_record(cls, record: dict, where: str = "solver.json") -> "ExportedSolver":
        verify_record(record, KIND, where, "an exported amedlab solver")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in names})

    @classmethod
    def load(cls, path, *, nfe: int | None = None, model_identity: str | None = None) -> "ExportedSolver":
        """Read and verify ``path`` (a ``solver.json`` or the folder holding one); ``nfe`` /
        ``model_identity``: what the caller will run, checked against what it was trained for."""
        path = Path(path)
        if path.is_dir():
            path = path / "solver.json"
        if not path.is_file():
            raise ExportError(f"{str(path)!r}: no such solver.json (stage=export writes one)")
        try:
            record = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(f"{str(path)!r}: not JSON ({err})") from None
        solver = cls.from_record(record, str(path))
        solver.check(nfe=nfe, model_identity=model_identity)
        return solver

    def check(self, *, nfe: int | None = None, model_identity: str | None = None) -> None:
        if nfe is not None and int(nfe) != self.nfe:
            raise WrongNFEError(f"this solver was trained for NFE {self.nfe}, not {nfe}: its grid and weights belong to "
                                f"that NFE (export one trained for NFE {nfe})")
        own = self.model.get("identity")
        if model_identity is not None and own is not None and model_identity != own:
            raise WrongModelError(f"this solver was trained for model {self.model.get('name')!r} (identity {own}), "
                                  f"not for the model given (identity {model_identity})")

    # -- the loop --
    def sample(self, model, x: torch.Tensor, callback=None) -> torch.Tensor:
        """Integrate from ``x`` (noise already times sigma_0) with ``model(x, sigma[B]) -> D``.
        ``callback(i, sigma, x, denoised)`` after each evaluated point (denoised None under AFS)."""
        ones = x.new_ones(x.shape[0])
        slopes: list[torch.Tensor] = []
        for i, (s, s_next) in enumerate(zip(self.sigmas, self.sigmas[1:])):
            if i == 0 and self.afs:
                d, denoised = x / math.sqrt(1 + s * s), None
            else:
                denoised = model(x, s * ones)
                d = (x - denoised) / s
            if callback is not None:
                callback(i, s, x, denoised)
            slopes = [d, *slopes][: self.max_order]
            x = x + (s_next - s) * sum(w * slope for w, slope in zip(self.weights[i], slopes))
        if self.final_step == "denoise":
            x = model(x, self.sigmas[-1] * ones)
        return x

    @property
    def model_sigmas(self) -> list[float]:
        """The noise levels the model is called at, in order (``nfe`` of them)."""
        calls = self.sigmas[int(self.afs):-1]
        return calls + ([self.sigmas[-1]] if self.final_step == "denoise" else [])
