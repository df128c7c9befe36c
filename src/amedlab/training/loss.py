"""What every trained solver shares in its objective and its training loop: the squared error, the
trajectory objective (the student's states against the teacher's at every coarse grid point: one loss
for every student, AMED's predictor and the learned solver alike), and the divergence checks that stop
a training at its first bad update (nothing is cached then)."""
from __future__ import annotations

import math

import torch

from ..solvers.base import Solver, State


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


#: a trained parameter beyond this magnitude has run away (:func:`divergence`): Adam moves a parameter by
#: about the learning rate per update, so no sane rate gets there, and none of the predictor's weights,
#: the grid's logits or the corrections to step weights that sum to one means anything that large
PARAMETER_LIMIT = 1e6


def divergence(loss: float | None, modules: dict, grid=None) -> str | None:
    """Why training has diverged at this update, or None: a non-finite ``loss``, non-finite parameters
    in one of ``modules`` (a description -> module) or parameters beyond :data:`PARAMETER_LIMIT`, or a
    learned ``grid`` that is no longer usable (:meth:`amedlab.training.grid.LearnedGrid.problem`)."""
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"

    def names(found):
        return ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")

    for what, module in modules.items():
        named = [(name, p.detach()) for name, p in module.named_parameters() if p.requires_grad and p.numel()]
        if not named:
            continue
        # the largest magnitude per parameter (NaN propagates), read back in one transfer
        size = dict(zip([n for n, _ in named], torch.stack([p.abs().max().double() for _, p in named]).tolist()))
        bad = [name for name, v in size.items() if not math.isfinite(v)]
        if bad:
            return f"non-finite {what} parameters: {names(bad)}"
        huge = [name for name, v in size.items() if v > PARAMETER_LIMIT]
        if huge:
            return (f"{what} parameters ran away: up to {max(size[n] for n in huge):.3g} in {names(huge)}, "
                    f"the limit is {PARAMETER_LIMIT:.0e}")
    return None if grid is None else grid.problem()


def diverged(key: str, value, update: int, reason: str):
    """The error for a training that diverged (a :class:`amedlab.errors.ResultError` naming the
    learning-rate ``key`` to lower); raised before anything is stored."""
    from ..errors import ResultError

    return ResultError(f"{key}={value!r}: training diverged at update {update} ({reason}); nothing was cached; "
                       f"lower {key}", key)


def any_rank(flag: bool, device) -> bool:
    """``flag`` or'ed over the processes of a distributed run (itself on one), so that every rank
    stops at the same update instead of one waiting for the others in a collective."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(1.0 if flag else 0.0, device=device)
        dist.all_reduce(t)
        return bool(t.item() > 0)
    return flag


def feature_block_of(denoiser) -> tuple[torch.nn.Module, str]:
    """(the module, its name) whose output is the teacher's feature map: ``denoiser.feature_block`` of
    ``denoiser.net`` (:class:`amedlab.models.precond.EDMPrecond`); a ValueError for a denoiser without one."""
    net, block = getattr(denoiser, "net", None), getattr(denoiser, "feature_block", None)
    if not isinstance(net, torch.nn.Module) or not block:
        raise ValueError(f"{type(denoiser).__name__} has no feature block (a network `net` with `feature_block`, as "
                         "EDMPrecond): a teacher-feature loss needs the teacher's own features")
    return net.get_submodule(block), str(block)


def teacher_features(denoiser, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(x, sigma), the full output of the teacher's feature block [B, -1]) from one forward pass of the
    teacher, differentiable with respect to ``x`` (unlike the detached channel-mean ``last_features``
    AMED's predictor reads). The features are the *teacher's* (the denoiser being sampled), never an
    evaluation extractor's."""
    module, block = feature_block_of(denoiser)
    kept: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        kept.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        s = torch.full((len(x),), float(sigma), dtype=x.dtype, device=x.device)
        denoised = denoiser(x, s)
    finally:
        handle.remove()
    if not kept:
        raise RuntimeError(f"feature block {block!r} did not run during the forward pass")
    return denoised, kept[-1].flatten(1).to(x.dtype)
