"""A learned solver: the time grid and the multistep coefficients of variable-step iPNDM.

Where the model is evaluated and how the stored slopes are combined are the two things a few-step
multistep solver decides; here both are parameters, trained end to end (:mod:`.train`) like the
learned grids of LD3 (Tong et al., ICLR 2025) and the grid + coefficients of S4S-Alt (Frankel et al.,
ICML 2025). A few dozen parameters:

- the N grid times (:class:`.grid.LearnedGrid`), sigma_max = s_0 > ... > s_{N-1} = sigma_min, both ends fixed: the
  log-sigma increments are a softmax (plus a small floor, so no interval collapses) times the fixed
  span log(sigma_max / sigma_min). Initialised to reproduce the schedule's grid (to ~1e-15).
- per step i of order k_i = min(max_order, i + 1) (iPNDM's warm-up), the weights on the k_i newest
  slopes are the variable-step Adams-Bashforth weights of the *current* times
  (:func:`amedlab.solvers.multistep.adams_bashforth_weights`) plus a learned correction, zero at
  initialisation. The corrections sum to zero (k_i - 1 free values per step), so the weights keep
  summing to one: a constant slope is still integrated exactly (first-order consistency).

Untrained, the solver is exactly ``IPNDM(variable_step=True)`` on the schedule's grid (tested).
Every model call is made by the one driver loop (:class:`amedlab.solvers.Solver`), so the NFE is
counted as for every other solver: 1 per step, minus one with AFS.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..cache import read_tensors, save_verified, verified
from ..solvers.base import StepRule, bcast
from ..solvers.multistep import adams_bashforth_weights
from ..training.grid import FLOOR, LearnedGrid

FORMAT_VERSION = 1


def step_orders(num_points: int, max_order: int) -> list[int]:
    """iPNDM's order at each of the N - 1 steps (warm-up: order <= points available)."""
    return [min(max_order, i + 1) for i in range(num_points - 1)]


class LearnedSolverParams(LearnedGrid):
    """The learned grid (``grid_logits``, N - 1 values) and coefficient corrections (``coef``).

    ``base_sigmas``: the schedule's grid (N points, decreasing) the parameters start from.
    ``learn_grid`` / ``learn_coefficients``: which of the two are trained (the other stays at its
    initial value). ``meta``: what the parameters were trained for (model, nfe, schedule, afs, ...).
    """

    def __init__(self, base_sigmas, max_order: int = 4, learn_grid: bool = True, learn_coefficients: bool = True,
                 meta: dict | None = None) -> None:
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"solver.options.max_order={max_order!r}; accepted: 1, 2, 3, 4")
        super().__init__(base_sigmas, learn_grid)  # the grid: base_sigmas, log_max, log_min, grid_logits
        n = self.num_points
        self.max_order, self.learn_coefficients = int(max_order), bool(learn_coefficients)
        self.meta = dict(meta or {})
        self.orders = step_orders(n, self.max_order)
        self.offsets = [sum(k - 1 for k in self.orders[:i]) for i in range(n)]
        self.coef = nn.Parameter(torch.zeros(self.offsets[-1], dtype=torch.float64), requires_grad=self.learn_coefficients)

    def corrections(self, step: int) -> list[torch.Tensor]:
        """The k_i additive corrections of step ``step`` (newest slope first), summing to zero."""
        k = self.orders[step]
        free = self.coef[self.offsets[step] : self.offsets[step] + k - 1]
        return [-free.sum(), *free.unbind()] if k > 1 else [torch.zeros((), dtype=self.coef.dtype, device=self.coef.device)]

    def weights(self, step: int, times: list[torch.Tensor], t_next: torch.Tensor) -> list[torch.Tensor]:
        """Per-sample weights [B] of step ``step``: variable-step AB weights + the corrections."""
        ab = adams_bashforth_weights(times, t_next)
        return [w + d.to(w) for w, d in zip(ab, self.corrections(step))]

    def summary(self) -> dict:
        """The grid and the per-step weights on the learned grid (for metrics, logs and plots)."""
        with torch.no_grad():
            s = self.sigmas()
            out = []
            for i, k in enumerate(self.orders):
                times = [s[i - j].reshape(1) for j in range(k)]
                out.append([float(w) for w in self.weights(i, times, s[i + 1].reshape(1))])
        return {"sigmas": s.tolist(), "weights": out, "corrections": self.coef.detach().tolist()}

    # -- persistence: tensors and builtins only, read with weights_only=True --
    def hparams(self) -> dict:
        return {"num_points": self.num_points, "max_order": self.max_order, "learn_grid": self.learn_grid,
                "learn_coefficients": self.learn_coefficients}

    def blob(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": "learned_solver", "hparams": self.hparams(), "meta": self.meta,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def save(self, path, spec: dict | None = None, records: list | None = None) -> Path:
        """Written atomically with a digest of its content (:func:`amedlab.cache.save_verified`).
        ``spec`` / ``records``: what it was trained for and the training records, stored (under the digest)
        by the cache (:func:`amedlab.cache.trained_once`), which uses a cached file only for the same spec."""
        return save_verified(path, {**self.blob(), **{k: v for k, v in (("spec", spec), ("records", records))
                                                        if v is not None}})

    @classmethod
    def from_blob(cls, blob, path) -> "LearnedSolverParams":
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION or blob.get("kind") != "learned_solver":
            raise ValueError(f"{str(path)!r} is not a learned-solver file (format {FORMAT_VERSION}, kind learned_solver)")
        if "digest" in blob and not verified(blob):
            raise ValueError(f"{str(path)!r}: the content does not match its digest (the file is corrupted)")
        try:
            hp, state = blob["hparams"], blob["state_dict"]
            params = cls(state["base_sigmas"], hp["max_order"], hp["learn_grid"], hp["learn_coefficients"], blob["meta"])
            params.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError, ValueError) as err:
            raise ValueError(f"{str(path)!r}: not a valid learned-solver file ({str(err).splitlines()[0]})") from None
        return params

    @classmethod
    def load(cls, path) -> "LearnedSolverParams":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r}: no such learned-solver file")
        return cls.from_blob(read_tensors(path), path)

    def check_compatible(self, model_identity: str | None, sigmas: torch.Tensor, afs) -> None:
        """Sampling must use the grid, model and AFS setting the parameters were trained for."""
        meta = self.meta
        if model_identity is not None and meta.get("model_identity") not in (None, model_identity):
            raise ValueError(f"this learned solver was trained for model {meta.get('model_name')!r} (identity "
                             f"{meta['model_identity']}), not for the model given (identity {model_identity})")
        own = self.sigmas().detach()
        given = sigmas.detach().double().cpu()
        if len(given) != len(own) or not torch.allclose(given, own.cpu(), rtol=1e-9, atol=0):
            raise ValueError(f"this learned solver samples on its own {len(own)}-point grid "
                             f"{[round(v, 4) for v in own.tolist()]}, not on the grid given "
                             f"{[round(v, 4) for v in given.tolist()]}: pass params.sigmas()")
        if "afs" in meta and meta["afs"] != afs:
            raise ValueError(f"this learned solver was trained with afs={meta['afs']}, sampling asks afs={afs}")


class LearnedIPNDM(StepRule):
    """Variable-step iPNDM whose per-step weights carry the learned corrections of ``params``.

    ``params=None``: no correction (exactly ``IPNDM(max_order, variable_step=True)``), on whatever
    grid is given. The step index is counted from :meth:`prepare` (called once per ``sample``).
    """

    name = "learned"

    def __init__(self, params: LearnedSolverParams | None = None, max_order: int = 4) -> None:
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"solver.options.max_order={max_order!r}; accepted: 1, 2, 3, 4")
        if params is not None and params.max_order != max_order:
            raise ValueError(f"solver.options.max_order={max_order} but the learned parameters were trained with "
                             f"max_order={params.max_order}")
        self.params, self.max_order, self.history_size = params, int(max_order), int(max_order) - 1
        self.default_afs = params.meta.get("afs", False) if params is not None else False
        self._step = 0

    def options(self):
        return {"max_order": self.max_order}

    def own_grid(self):
        return None if self.params is None else self.params.sigmas().detach()

    def prepare(self, denoiser, sigmas, afs):
        if self.params is not None:
            identity = denoiser.identity() if hasattr(denoiser, "identity") else None
            self.params.check_compatible(identity, sigmas, afs)
        self._step = 0

    def step(self, denoiser, cur, t_next, history, remaining):
        i, self._step = self._step, self._step + 1
        order = min(self.max_order, len(history) + 1)
        points = [cur] + list(reversed(history[len(history) - order + 1 :]))
        times = [p.t for p in points]
        if self.params is None:
            weights = adams_bashforth_weights(times, t_next)
        else:
            if order != self.params.orders[i]:
                raise RuntimeError(f"learned solver: step {i} has order {order}, trained for {self.params.orders[i]}")
            weights = self.params.weights(i, times, t_next)
        direction = sum(bcast(w.to(cur.x.dtype), cur.x) * p.slope for w, p in zip(weights, points))
        return cur.x + bcast(t_next - cur.t, cur.x) * direction, [cur]


def learned(params=None, max_order: int = 4) -> LearnedIPNDM:
    """``make_solver("learned", params=...)``: a :class:`LearnedSolverParams` or its file path."""
    if params is not None and not isinstance(params, LearnedSolverParams):
        params = LearnedSolverParams.load(params)
    return LearnedIPNDM(params, max_order)


def map_to_num_points(params: LearnedSolverParams, num_points: int) -> LearnedSolverParams:
    """The learned grid carried to another grid size (another NFE), coefficients back to AB weights.

    log sigma is interpolated (piecewise linear, so monotone) over the normalised index i / (N - 1);
    the ends stay sigma_max / sigma_min. The per-step corrections do not transfer (the steps differ),
    so the mapped solver is variable-step iPNDM on the mapped grid.
    """
    own = params.sigmas().detach()
    src = own.log()
    u_src = torch.linspace(0, 1, len(src), dtype=torch.float64)
    u = torch.linspace(0, 1, int(num_points), dtype=torch.float64)
    idx = torch.clamp(torch.searchsorted(u_src, u, right=True) - 1, 0, len(src) - 2)
    frac = (u - u_src[idx]) / (u_src[idx + 1] - u_src[idx])
    logs = src[idx] + frac * (src[idx + 1] - src[idx])
    grid = torch.cat([own[:1], logs[1:-1].exp(), own[-1:]])
    meta = {**params.meta, "mapped_from_num_points": params.num_points, "num_points": int(num_points)}
    return LearnedSolverParams(grid, params.max_order, params.learn_grid, False, meta)


__all__ = ["LearnedSolverParams", "LearnedIPNDM", "learned", "map_to_num_points", "step_orders", "FLOOR"]


def _row_label(node) -> str:
    from .settings import label

    return label(node)


learned.row_label = _row_label  # the Table 2 row name (amedlab.solvers.spec.solver_label)
# the trained hook (amedlab.solvers.trained) by name: imported when the evaluation first asks for it
learned.trained = "amedlab.learned.trained:TRAINING"
