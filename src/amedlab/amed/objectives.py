"""Distillation objectives for anything a student solver learns, and the convergence signal.

- ``interval`` (the paper's, AMED Sec. 3.4; :func:`amedlab.amed.distill.student_intervals`): one
  optimizer step per interval on ||x_{i+1} - teacher_{i+1}||^2, the student restarted or continued
  from a detached state. Greedy: a multistep student's r_i also shapes the history of the later
  intervals, which this loss never sees.
- ``trajectory`` (:func:`trajectory_loss`): the whole student run from the noise, through the one
  driver loop (:meth:`amedlab.solvers.Solver.sample`), backpropagated end to end; the loss is the
  final sample's squared error against the teacher's final state, plus ``intermediate_weight`` times
  the squared errors at the inner grid points. One optimizer step per batch. It needs no AMED
  specifics: any learnable quantity the solver reads (a predictor, a time grid passed as ``sigmas``
  with requires_grad, multistep coefficients) gets its gradient from the same call.
  Cost per batch: the forward pass of every NFE plus a backward pass through the denoiser at every
  NFE (about 3x the forward cost), with the whole run's activations held in memory (the interval
  objective holds one interval's). Per batch that is about what the interval objective spends, but
  it yields one update where the interval objective yields N - 1.

:func:`convergence` is the end-of-training check every distillation records in the predictor's
metadata (and warns about): see its docstring for the thresholds.
"""
from __future__ import annotations

import logging
import math

import torch

from ..solvers.base import Solver, State

log = logging.getLogger(__name__)

OBJECTIVES = ("interval", "trajectory")
#: the convergence thresholds (documented in the README's AMED section)
TAIL_FRACTION = 0.1   # the last tenth of each interval's updates ...
R_TOLERANCE = 0.02    # ... may not move mean r by more than this (r is in (0, 1)) ...
LOSS_TOLERANCE = 0.10  # ... nor the mean loss by more than this fraction ...
NOISE_SIGMAS = 3.0    # ... where a change also has to exceed 3 standard errors of the batch-to-batch noise


def check_objective(objective: str, intermediate_weight: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"distill.objective={objective!r}; accepted: {', '.join(OBJECTIVES)}")
    if not (isinstance(intermediate_weight, (int, float)) and math.isfinite(intermediate_weight) and intermediate_weight >= 0):
        raise ValueError(f"distill.intermediate_weight={intermediate_weight!r} must be a finite number >= 0")


def check_learn_grid(learn_grid, objective: str, intermediate_weight: float) -> None:
    """``solver.distill.learn_grid``: a bool; true needs the trajectory objective (only it backprops into
    the grid: the interval objective restarts each interval at the teacher's state *on the schedule's
    grid*) and intermediate_weight 0 (the teacher's inner states lie on the schedule's grid, not on the
    learned one; only the final state, at sigma_min, is comparable)."""
    if not isinstance(learn_grid, bool):
        raise ValueError(f"solver.distill.learn_grid={learn_grid!r}; accepted: true, false")
    if learn_grid and objective != "trajectory":
        raise ValueError(f"solver.distill.learn_grid=true needs solver.distill.objective=trajectory, not {objective!r} "
                         "(only the trajectory objective backpropagates into the grid)")
    if learn_grid and intermediate_weight:
        raise ValueError(f"solver.distill.learn_grid=true needs solver.distill.intermediate_weight=0, not "
                         f"{intermediate_weight!r} (the teacher's inner states are on the schedule's grid, not the learned one)")


def check_grid_lr(grid_lr, learn_grid: bool) -> None:
    """``solver.distill.grid_lr``: null (the grid trains at distill.lr) or a finite number > 0, with learn_grid."""
    if grid_lr is None:
        return
    if not isinstance(grid_lr, (int, float)) or isinstance(grid_lr, bool) or not (0 < grid_lr < math.inf):
        raise ValueError(f"solver.distill.grid_lr={grid_lr!r}; accepted: null or a finite number > 0")
    if not learn_grid:
        raise ValueError(f"solver.distill.grid_lr={grid_lr!r} needs solver.distill.learn_grid=true (no grid is learned)")


def squared_error(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of the per-sample squared L2 error (the paper's distillation loss, per interval)."""
    return (x - target).pow(2).flatten(1).sum(1).mean()


def trajectory_loss(solver: Solver, denoiser, states: torch.Tensor, sigmas: torch.Tensor,
                    intermediate_weight: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, per-point errors): the student run from states[:, 0] over ``sigmas``, differentiable.

    ``states`` [B, N, ...] are the teacher's states at the N grid points (states[:, 0] = x_T).
    per-point errors[i] = squared error at grid point i + 1 (the end of interval i);
    loss = errors[-1] + intermediate_weight * sum(errors[:-1]).
    """
    if solver.final_step != "sigma_min":
        raise ValueError("the trajectory objective compares grid states; it needs solver.final_step=sigma_min")
    reached: dict[int, torch.Tensor] = {}

    def keep(state: State) -> None:
        if state.index > 0:
            reached[state.index] = state.x

    final = solver.sample(denoiser, states[:, 0], sigmas, callback=keep)
    steps = states.shape[1] - 1
    reached[steps] = final
    errors = [squared_error(reached[i], states[:, i]) for i in range(1, steps + 1)]
    loss = errors[-1]
    if intermediate_weight and steps > 1:
        loss = loss + intermediate_weight * sum(errors[:-1])
    return loss, errors


def convergence(records: list[dict], tail: float = TAIL_FRACTION, r_tol: float = R_TOLERANCE,
                loss_tol: float = LOSS_TOLERANCE, noise_sigmas: float = NOISE_SIGMAS) -> dict:
    """Did each interval's training settle? From the per-update records (interval, loss, r_mean).

    Per interval with n updates, k = ceil(tail * n): the mean of the last k updates is compared with
    the mean of the k before them. r "still moves" when |change of mean r| > ``r_tol``; the loss
    when |relative change of the mean loss| > ``loss_tol``. Either counts only if it also exceeds
    ``noise_sigmas`` standard errors of the difference (batches differ, so the per-batch loss is
    noisy; a change inside that noise is not evidence of drift). Fewer than 2 updates: not judged.
    """
    by_interval: dict[int, list[dict]] = {}
    for rec in records:
        by_interval.setdefault(int(rec["interval"]), []).append(rec)
    out = []
    for i in sorted(by_interval):
        recs = by_interval[i]
        n = len(recs)
        k = max(1, math.ceil(tail * n))
        entry = {"interval": i, "updates": n, "loss_end": None, "r_end": None, "r_change": None,
                 "loss_rel_change": None, "converged": None}
        if n >= 2:
            k = min(k, n // 2)
            last, prev = recs[-k:], recs[-2 * k : -k]

            def stats(key, window):
                v = torch.tensor([float(r[key]) for r in window], dtype=torch.float64)
                return v.mean().item(), (v.var().item() / len(v) if len(v) > 1 else 0.0)

            (r_last, vr_last), (r_prev, vr_prev) = stats("r_mean", last), stats("r_mean", prev)
            (l_last, vl_last), (l_prev, vl_prev) = stats("loss", last), stats("loss", prev)
            r_change, l_change = r_last - r_prev, l_last - l_prev
            rel = l_change / max(abs(l_prev), 1e-30)
            r_moves = abs(r_change) > r_tol and abs(r_change) > noise_sigmas * math.sqrt(vr_last + vr_prev)
            l_moves = abs(rel) > loss_tol and abs(l_change) > noise_sigmas * math.sqrt(vl_last + vl_prev)
            entry.update(loss_end=l_last, r_end=r_last, r_change=r_change, loss_rel_change=rel,
                         tail_updates=k, converged=not (r_moves or l_moves))
        out.append(entry)
    judged = [e["converged"] for e in out if e["converged"] is not None]
    return {"converged": all(judged) if judged else None, "intervals": out,
            "thresholds": {"tail": tail, "r": r_tol, "loss_relative": loss_tol, "noise_sigmas": noise_sigmas}}


def warn_if_unconverged(report: dict, what: str) -> None:
    """Log a warning naming the intervals whose r or loss still moved in the last tenth of training."""
    moving = [e for e in report["intervals"] if e["converged"] is False]
    if moving:
        detail = "; ".join(f"interval {e['interval']}: r {e['r_end']:.3f} (moved {e['r_change']:+.3f}), "
                           f"loss {e['loss_end']:.4g} (moved {100 * e['loss_rel_change']:+.0f}%)" for e in moving)
        log.warning("%s has not converged: in the last %d%% of the updates %s. Raise distill.epochs or "
                    "distill.num_trajectories", what, round(100 * report["thresholds"]["tail"]), detail)
