"""A learnable time grid: N noise levels, decreasing, both ends fixed (one small module, shared).

The log-sigma increments are a softmax (plus a small floor, so no interval collapses) times the fixed
span log(sigma_max / sigma_min), as in the learned grids of LD3 (Tong et al., ICLR 2025). Initialised
to reproduce the schedule's grid (to ~1e-15). Used by the learned solver
(:class:`amedlab.learned.solver.LearnedSolverParams`) and by AMED's distillation with
``solver.distill.learn_grid`` (:mod:`amedlab.amed.distill`).
"""
from __future__ import annotations

import torch
from torch import nn

#: the share of the log-sigma span spread evenly over the intervals: no interval can shrink below
#: FLOOR / (N - 1) of the span, so the grid stays strictly decreasing under any parameters
FLOOR = 1e-3
#: a grid whose logits span more than this has diverged (:meth:`LearnedGrid.problem`): Adam moves a
#: logit by about the learning rate per update, so no sane rate gets there, and the softmax is
#: saturated (the collapsed intervals sit on the floor with no gradient left to bring them back)
LOGIT_SPAN_LIMIT = 1e6


class LearnedGrid(nn.Module):
    """``grid_logits`` (N - 1 values) define the grid; ``base_sigmas`` is the grid they start from.

    The parameter and buffer names are those of the learned solver's saved files (kept unchanged).
    """

    def __init__(self, base_sigmas, learn_grid: bool = True) -> None:
        super().__init__()
        base = torch.as_tensor(base_sigmas, dtype=torch.float64).detach().cpu()
        if base.ndim != 1 or len(base) < 2 or not bool((base[1:] < base[:-1]).all()) or not bool((base > 0).all()):
            raise ValueError(f"a learned grid starts from a decreasing grid of >= 2 positive sigmas; got {base.tolist()}")
        n = len(base)
        self.num_points, self.learn_grid = n, bool(learn_grid)
        self.register_buffer("base_sigmas", base.clone())
        self.register_buffer("log_max", base[0].log())
        self.register_buffer("log_min", base[-1].log())
        # softmax(logits) = (q - FLOOR/(N-1)) / (1 - FLOOR), q the schedule's share of the span per interval
        q = (base[:-1].log() - base[1:].log()) / (base[0].log() - base[-1].log())
        rest = (q - FLOOR / (n - 1)) / (1 - FLOOR)
        if not bool((rest > 0).all()):
            raise ValueError(f"the grid {base.tolist()} has an interval below the floor of {FLOOR / (n - 1):.2g} of the "
                             "log-sigma span; a learned grid cannot start from it")
        self.grid_logits = nn.Parameter(rest.log(), requires_grad=self.learn_grid)

    def sigmas(self) -> torch.Tensor:
        """The grid [N], float64, differentiable in ``grid_logits``; ends exactly sigma_max, sigma_min."""
        n = self.num_points
        shares = FLOOR / (n - 1) + (1 - FLOOR) * torch.softmax(self.grid_logits, 0)
        inner = self.log_max - (self.log_max - self.log_min) * torch.cumsum(shares, 0)[:-1]
        return torch.cat([self.base_sigmas[:1], inner.exp(), self.base_sigmas[-1:]])

    @torch.no_grad()
    def problem(self) -> str | None:
        """Why the grid has diverged (non-finite logits or times, times not strictly decreasing, or
        logits spread past :data:`LOGIT_SPAN_LIMIT`), or None for a usable grid."""
        logits = self.grid_logits.detach()
        if not bool(torch.isfinite(logits).all()):
            return "the learned grid's logits are not finite"
        s = self.sigmas()
        if not bool(torch.isfinite(s).all()):
            return f"the learned grid is not finite ({s.tolist()})"
        if not bool((s[1:] < s[:-1]).all()):
            return f"the learned grid is not strictly decreasing ({s.tolist()})"
        span = float(logits.max() - logits.min())
        if span > LOGIT_SPAN_LIMIT:
            return (f"the learned grid collapsed to {[round(v, 6) for v in s.tolist()]}: its logits span {span:.3g}, "
                    f"the limit is {LOGIT_SPAN_LIMIT:.0e}")
        return None


__all__ = ["LearnedGrid", "FLOOR", "LOGIT_SPAN_LIMIT"]
