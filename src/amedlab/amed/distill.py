"""Distillation of g_phi against cached teacher trajectories (AMED, Sec. 3.4), on Lightning.

Per batch of trajectories, one optimizer step per interval: the student takes one AMED step from
x_i and the loss is the batch mean of ||x_{i+1}^student - x_{i+1}^teacher||^2. Single-step students
restart each interval from the teacher state; multistep students continue from their own detached
output (their history must be their own). ``distill(denoiser, ...)`` is the Python API;
``run(cfg)`` is ``python -m amedlab stage=distill``.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping

import pytorch_lightning as pl
import torch

from ..configs import check_schedule_cfg, solver_from_cfg
from ..data.trajectories import TrajectoryDataModule, cached_trajectories, student_grid
from ..io import plain
from ..sampling import parse_seeds
from ..solvers.base import Solver, check_afs
from .objectives import check_objective, convergence, trajectory_loss, warn_if_unconverged
from .placement import held_teacher, lightning_placement, teacher_to
from .predictor import AMEDPredictor
from .solvers import AMED_SOLVERS, AMEDPlugin

log = logging.getLogger(__name__)

# the paper's recommended settings (AMED, arXiv 2312.00094, experimental setup)
DEFAULTS = {
    "amed": {"teacher": {"name": "heun", "afs": False, "options": {}}, "M": 1, "s_dir": 0.01, "s_time": 0.0,
             "schedule": {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 1.0}},
    "amed_plugin": {"teacher": {"name": "ipndm", "afs": False, "options": {"max_order": 4}}, "M": 2, "s_dir": 0.01,
                    "s_time": 0.2, "schedule": {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}},
}


def _average_gradients(module: torch.nn.Module) -> None:
    """Mean of the gradients over processes (no-op on one). Explicit, because the distillation takes
    several backward passes per training step (one per interval) and DDP's reducer syncs only one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def student_intervals(denoiser, rule: AMEDPlugin, states: torch.Tensor, sigmas: torch.Tensor, afs):
    """Walk the student over teacher trajectories ``states`` [B, N, ...]; yield (i, loss_i) per interval.

    loss_i = batch mean of ||x_{i+1} - teacher_{i+1}||^2. The caller may take an optimizer step between
    yields (the paper's one update per interval). Single-step students restart from the teacher state;
    multistep students continue from their own detached output and history (``Solver.steps``).
    """
    rule.last_outputs = []
    walk = Solver(rule, afs=afs).steps(denoiser, states[:, 0], sigmas, restart=None if rule.multistep else states,
                                       detach=True)
    for interval in walk:
        i = interval.index
        yield i, (interval.x_next - states[:, i + 1]).pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def interval_losses(denoiser, rule: AMEDPlugin, states: torch.Tensor, sigmas: torch.Tensor, afs) -> list[float]:
    """The per-interval distillation losses of ``rule`` on held-out trajectories (no update)."""
    return [loss.item() for _, loss in student_intervals(denoiser, rule, states, sigmas, afs)]


class AMEDDistillation(pl.LightningModule):
    """Trains ``rule.predictor``; the denoiser is frozen (gradients flow through its input only).

    The denoiser is held, not registered as a submodule: Lightning moves its module to the CPU when
    ``fit`` ends, and the denoiser is the caller's model. Freeze it around ``fit`` with
    ``placement.held_teacher`` (as :func:`distill` does), which also restores it afterwards.
    """

    def __init__(self, denoiser, rule: AMEDPlugin, sigmas: torch.Tensor, afs, lr: float = 5e-3,
                 objective: str = "interval", intermediate_weight: float = 0.0) -> None:
        super().__init__()
        object.__setattr__(self, "denoiser", denoiser)  # bypasses nn.Module's registration
        self.objective, self.intermediate_weight = objective, float(intermediate_weight)
        self.rule, self.predictor = rule, rule.predictor
        self.register_buffer("sigmas", sigmas.clone())
        self.afs, self.lr = afs, float(lr)
        self.automatic_optimization = False
        self.records: list[dict] = []  # per interval and batch: loss and r/c/a statistics

    def configure_optimizers(self):
        return torch.optim.Adam(self.predictor.parameters(), lr=self.lr)

    def on_fit_start(self):
        teacher_to(self.denoiser, self.device)  # a DDP rank's own GPU; held_teacher moves it back

    def on_train_start(self):
        # DDP's reducer syncs one backward per forward; we take one per interval and average ourselves.
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            wrapped.require_backward_grad_sync = False

    def _record(self, i: int, loss: float, batch_size: int) -> None:
        rec = {"interval": i, "loss": loss}
        for name, v in zip("rca", self.rule.last_outputs[i]):
            v = v.detach()
            rec[f"{name}_mean"], rec[f"{name}_std"] = v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)
        self.records.append(rec)
        self.log_dict({f"interval_{i}/{k}": v for k, v in rec.items() if k != "interval"}, on_step=True, batch_size=batch_size)

    def training_step(self, batch, batch_idx):
        (states,) = batch
        opt = self.optimizers()
        if self.objective == "trajectory":
            # one update per batch: backprop through the whole student run (objectives.trajectory_loss)
            opt.zero_grad()
            loss, errors = trajectory_loss(Solver(self.rule, afs=self.afs), self.denoiser, states, self.sigmas,
                                           self.intermediate_weight)
            self.manual_backward(loss)
            _average_gradients(self.predictor)
            opt.step()
            for i, err in enumerate(errors):
                self._record(i, err.item(), len(states))
            return
        for i, loss in student_intervals(self.denoiser, self.rule, states, self.sigmas, self.afs):
            opt.zero_grad()
            self.manual_backward(loss)
            _average_gradients(self.predictor)
            opt.step()
            self._record(i, loss.item(), len(states))


def distill(
    denoiser,
    solver: str = "amed",
    nfe: int = 5,
    schedule: Mapping | None = None,
    afs: bool | str = True,
    solver_options: Mapping | None = None,
    teacher: Mapping | None = None,
    M: int | None = None,
    s_dir: float | None = None,
    s_time: float | None = None,
    num_trajectories: int = 10000,
    seeds=None,
    batch_size: int = 128,
    lr: float = 5e-3,
    epochs: int = 1,
    predictor_sizes: Mapping | None = None,
    cache_dir=None,
    dtype: torch.dtype = torch.float32,
    gen_batch_size: int = 500,
    seed: int = 0,
    logger=False,
    model_name: str | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    objective: str = "interval",
    intermediate_weight: float = 0.0,
) -> AMEDPredictor:
    """Distill an AMED predictor for ``denoiser``; returns it with its training settings in ``meta``.

    Unset settings follow the paper's recommendations for ``solver`` (see ``DEFAULTS``).
    ``seeds`` default to 100000.. (disjoint from evaluation seeds 0..). ``devices``/``strategy``
    are Lightning's (e.g. devices=2, strategy="ddp"): each process takes batch_size / devices of
    every global batch, so the result matches one process. Every rank returns the trained predictor.
    ``objective``: ``interval`` (the paper's one update per interval) or ``trajectory`` (backprop through
    the whole student run, loss on the final sample plus ``intermediate_weight`` x the inner grid
    points; :mod:`amedlab.amed.objectives`). ``meta["convergence"]`` says whether every interval settled.
    """
    if solver not in AMED_SOLVERS:
        raise ValueError(f"solver={solver!r} cannot be distilled; accepted: {', '.join(AMED_SOLVERS)}")
    d = DEFAULTS[solver]
    schedule = plain(schedule or d["schedule"])
    teacher = plain(teacher or d["teacher"])
    M = d["M"] if M is None else int(M)
    s_dir = d["s_dir"] if s_dir is None else float(s_dir)
    s_time = d["s_time"] if s_time is None else float(s_time)
    solver_options = plain(solver_options or ({"base": "ipndm", "max_order": 4} if solver == "amed_plugin" else {}))
    check_schedule_cfg(schedule)
    check_afs(afs)
    check_objective(objective, intermediate_weight)
    solver_from_cfg(teacher)  # validates the teacher's name and options before any compute
    feature_dim = int(getattr(denoiser, "feature_dim", 0))
    if feature_dim < 1:
        raise ValueError("the model exposes no per-sample features (feature_dim = 0); AMED's predictor needs them")
    seeds = parse_seeds(seeds if seeds is not None else f"100000-{100000 + int(num_trajectories) - 1}")

    torch.manual_seed(seed)  # the predictor's initialisation
    predictor = AMEDPredictor(feature_dim=feature_dim, s_dir=s_dir, s_time=s_time, **dict(predictor_sizes or {}))
    node = {"name": solver, "afs": afs, "final_step": "sigma_min", "options": solver_options}
    student = solver_from_cfg(node, predictor=predictor)
    num_points = student.num_points(int(nfe))
    sigmas = student_grid(schedule, num_points)

    t0 = time.perf_counter()
    data, was_cached = cached_trajectories(denoiser, teacher, schedule, num_points, M, seeds, cache_dir, dtype, gen_batch_size)
    cache_seconds = time.perf_counter() - t0

    module = AMEDDistillation(denoiser, student.rule, sigmas, afs, lr, objective, intermediate_weight)
    # the frozen teacher is in eval mode on purpose; Lightning's banner and tips are noise here
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    accelerator, devices = lightning_placement(denoiser, accelerator, devices)  # where the teacher is
    trainer = pl.Trainer(max_epochs=int(epochs), logger=logger, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, accelerator=accelerator, devices=devices, strategy=strategy,
                         use_distributed_sampler=False)  # the data module shards itself (same batches as one process)
    t1 = time.perf_counter()
    with held_teacher(denoiser):  # the caller's model comes back as it was: mode, flags, device
        trainer.fit(module, datamodule=TrajectoryDataModule(data["states"], batch_size, seed))
    train_seconds = time.perf_counter() - t1
    predictor = predictor.cpu()

    last = {}
    for rec in module.records:
        last[rec["interval"]] = rec
    predictor.meta = {
        "solver": solver, "solver_options": solver_options, "nfe": int(nfe), "num_points": num_points,
        "sigmas": sigmas.tolist(), "schedule": schedule, "afs": afs,
        "teacher": teacher, "M": M, "s_dir": s_dir, "s_time": s_time,
        "model_identity": denoiser.identity() if hasattr(denoiser, "identity") else None,
        "model_name": model_name or type(denoiser).__name__,
        "num_trajectories": len(seeds), "batch_size": int(batch_size), "lr": float(lr), "epochs": int(epochs),
        "world_size": trainer.world_size,
        "updates": len(module.records), "final_interval_loss": [last[i]["loss"] for i in sorted(last)],
        "trajectories_cached": was_cached, "trajectory_seconds": cache_seconds, "train_seconds": train_seconds,
        "convergence": convergence(module.records),
    }
    if objective != "interval":  # the paper's default leaves the metadata as it was
        predictor.meta.update(objective=objective, intermediate_weight=float(intermediate_weight))
    warn_if_unconverged(predictor.meta["convergence"], f"{solver} distillation for nfe={int(nfe)}")
    predictor.records = module.records
    return predictor


def run(cfg):
    """``stage=distill``: distill for ``solver`` (amed or amed_plugin) at ``nfe`` on ``model``."""
    from ..io import atomic_write_json, run_dir
    from ..validation import check_stage

    model = check_stage(cfg, "distill").model  # every check and the model file, before any compute
    dcfg, sdist = cfg.distill, cfg.solver.get("distill", {})
    predictor = distill(
        model, solver=cfg.solver.name, nfe=int(cfg.nfe), schedule=dict(cfg.schedule), afs=cfg.solver.afs,
        solver_options=dict(cfg.solver.get("options") or {}), teacher=sdist.get("teacher"), M=sdist.get("M"),
        s_dir=sdist.get("s_dir"), s_time=sdist.get("s_time"), num_trajectories=int(dcfg.num_trajectories),
        batch_size=int(dcfg.batch_size), lr=float(dcfg.lr), epochs=int(dcfg.epochs),
        predictor_sizes=dict(cfg.get("predictor") or {}), cache_dir=dcfg.cache_dir,
        gen_batch_size=int(dcfg.gen_batch_size), seed=int(cfg.seed), model_name=cfg.model.name,
        accelerator=dcfg.get("accelerator", "auto"), devices=dcfg.get("devices", 1), strategy=dcfg.get("strategy", "auto"),
        objective=sdist.get("objective", "interval"), intermediate_weight=float(sdist.get("intermediate_weight", 0.0)),
    )
    out = run_dir()
    path = predictor.save(out / "predictor.pt")
    atomic_write_json(out / "distill.json", {"predictor": str(path), "meta": predictor.meta, "records": predictor.records})
    m = predictor.meta
    print(f"distilled {m['solver']} for nfe={m['nfe']} ({m['num_points']} points, {m['updates']} updates) in "
          f"{m['train_seconds']:.1f} s; trajectories {'from cache' if m['trajectories_cached'] else 'generated'} in "
          f"{m['trajectory_seconds']:.1f} s\nfinal loss per interval: {[round(v, 5) for v in m['final_interval_loss']]}\n"
          f"predictor: {path}")
    return sum(m["final_interval_loss"])
