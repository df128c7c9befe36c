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
metadata (and warns about): see its docstring for the thresholds. :func:`divergence` is the per-update
check of every training here: a non-finite loss, non-finite or runaway parameters or a collapsed
learned grid stop it at once with :func:`diverged` (a ResultError naming the learning rate to lower), before
anything is stored.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

OBJECTIVES = ("interval", "trajectory")
#: distill.lr_schedule: ``constant`` (the paper's Adam at a fixed rate) or ``cosine`` (ours: the rate
#: falls as 0.5 (1 + cos(pi p)) over the training progress p in [0, 1), so the predictor settles
#: within the same number of updates instead of still drifting at the end)
LR_SCHEDULES = ("constant", "cosine")
#: the convergence thresholds (documented in docs/amed.md)
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


def check_lr_schedule(schedule) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"distill.lr_schedule={schedule!r}; accepted: {', '.join(LR_SCHEDULES)}")


def lr_factor(schedule: str, progress: float) -> float:
    """The learning-rate multiplier at training progress ``progress`` (the fraction of batches done)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def convergence(records: list[dict], tail: float = TAIL_FRACTION, r_tol: float = R_TOLERANCE,
                loss_tol: float = LOSS_TOLERANCE, noise_sigmas: float = NOISE_SIGMAS) -> dict:
    """Did each interval's training settle? From the per-update records (interval, loss, r_mean and,
    when trained over several epochs, epoch).

    Per interval with n updates, k = ceil(tail * n): the mean of the last k updates is compared with
    a reference window. With two or more epochs that window is the same k batches one epoch earlier
    (the data module serves every epoch in the same order, so the pair sees the same trajectories and
    the comparison is paired, free of which trajectories happen to fall in a window); with one epoch
    it is the k updates before the last k. r "still moves" when |change of mean r| > ``r_tol``; the
    loss when |relative change of the mean loss| > ``loss_tol``. Either counts only if it also
    exceeds ``noise_sigmas`` standard errors of the change (of the paired differences, or of the two
    windows' means). Fewer than 2 updates: not judged.
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
            last_epoch = recs[-1].get("epoch")
            per_epoch = sum(1 for r in recs if r.get("epoch") == last_epoch) if last_epoch is not None else n
            paired = last_epoch is not None and n >= 2 * per_epoch
            k = min(k, per_epoch if paired else n // 2)
            last = recs[-k:]
            prev = recs[-per_epoch - k : -per_epoch] if paired else recs[-2 * k : -k]

            def change(key):
                a = torch.tensor([float(r[key]) for r in last], dtype=torch.float64)
                b = torch.tensor([float(r[key]) for r in prev], dtype=torch.float64)
                if paired:
                    var = (a - b).var().item() / k if k > 1 else 0.0
                else:
                    var = (a.var().item() + b.var().item()) / k if k > 1 else 0.0
                return a.mean().item(), b.mean().item(), math.sqrt(var)

            r_last, r_prev, r_se = change("r_mean")
            l_last, l_prev, l_se = change("loss")
            r_change, l_change = r_last - r_prev, l_last - l_prev
            rel = l_change / max(abs(l_prev), 1e-30)
            r_moves = abs(r_change) > r_tol and abs(r_change) > noise_sigmas * r_se
            l_moves = abs(rel) > loss_tol and abs(l_change) > noise_sigmas * l_se
            entry.update(loss_end=l_last, r_end=r_last, r_change=r_change, loss_rel_change=rel,
                         tail_updates=k, paired_with_previous_epoch=paired, converged=not (r_moves or l_moves))
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
