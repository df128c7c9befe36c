"""AMED-Solver and AMED-Plugin as step rules over the existing ones (no solver is copied).

For each interval [t_cur, t_next], g_phi gives (r, c, a) and t_mid = t_next^r t_cur^(1-r):
- over a two-stage rule (``step_at``): ``amed`` = the mean-direction step
  x_next = x + c (t_next - t_cur) d(x_mid, t_mid), the model queried at a * t_mid;
  over DPM-Solver-2, its r1 is the learned r (weights 1 - 1/(2r), 1/(2r) on the two slopes);
- over a one-evaluation rule (Euler, iPNDM, DPM-Solver++): the base rule steps t_cur -> t_mid,
  the model is evaluated at (x_mid, a * t_mid), the base rule steps t_mid -> t_next with its history
  (now holding t_mid), and c scales that second sub-step. Both cost 2 NFE per interval.
"""
from __future__ import annotations

import torch

from ..solvers.base import StepRule, bcast, evaluate, mid_time, window
from ..solvers.multistep import IPNDM, DPMSolverPP
from ..solvers.single_step import DPMSolver2, Euler, MeanDirection
from .predictor import AMEDPredictor

PLUGIN_BASES = ("euler", "dpm2", "ipndm", "dpmpp")
AMED_SOLVERS = ("amed", "amed_plugin")  # the solver names that need a predictor


class AMEDPlugin(StepRule):
    nfe_per_step = 2

    def __init__(self, base: StepRule, predictor: AMEDPredictor) -> None:
        self.two_stage = hasattr(base, "step_at")
        if not self.two_stage and base.nfe_per_step != 1:
            raise ValueError(f"AMED plugs into one-evaluation or two-stage (step_at) rules, not {base.name!r}")
        self.base, self.predictor = base, predictor
        self.history_size = base.history_size
        self.default_afs = predictor.meta.get("afs", False)
        self.name = "amed" if isinstance(base, MeanDirection) else f"amed_plugin[{base.name}]"
        self.last_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._checked: set = set()

    @property
    def multistep(self) -> bool:
        return self.history_size > 0

    def options(self):
        return {"base": self.base.name, **self.base.options()}

    def own_grid(self):
        """The grid the predictor learned with ``solver.distill.learn_grid`` (its ``meta["sigmas"]``);
        None for a predictor trained on the schedule's grid (the caller's schedule decides)."""
        return self.predictor.learned_grid()

    def prepare(self, denoiser, sigmas, afs):
        key = (id(denoiser), tuple(sigmas.tolist()), afs)
        if key not in self._checked:
            identity = denoiser.identity() if hasattr(denoiser, "identity") else None
            self.predictor.check_compatible(identity, sigmas, afs)
            self._checked.add(key)
        self.last_outputs = []

    def step(self, denoiser, cur, t_next, history, remaining):
        r, c, a = self.predictor(cur.features, cur.t, t_next)
        self.last_outputs.append((r, c, a))
        if self.two_stage:
            return self.base.step_at(denoiser, cur, t_next, r, a, c), [cur]
        t_mid = mid_time(cur.t, t_next, r)
        x_mid, first = self.base.step(denoiser, cur, t_mid, history, 2 * remaining)
        mid = evaluate(denoiser, x_mid, t_mid, a * t_mid)
        kept = window(history, first, self.history_size)
        x_end, second = self.base.step(denoiser, mid, t_next, kept, 2 * remaining - 1)
        return x_mid + bcast(c, x_mid) * (x_end - x_mid), first + second


def _predictor(predictor) -> AMEDPredictor:
    if isinstance(predictor, AMEDPredictor):
        return predictor
    if predictor is None:
        raise ValueError("solver.predictor is required for AMED: a trained predictor or its file path "
                         "(train one with stage=distill or amedlab.amed.distill)")
    return AMEDPredictor.load(predictor)


def make_base_rule(base: str, **options) -> StepRule:
    """The rule AMED-Plugin wraps; ``options`` go to it (e.g. max_order for ipndm)."""
    rules = {"euler": Euler, "dpm2": DPMSolver2, "ipndm": IPNDM, "dpmpp": DPMSolverPP}
    if base not in rules:
        raise ValueError(f"solver.base={base!r}; AMED-Plugin accepts: {', '.join(PLUGIN_BASES)}")
    return rules[base](**options)


def amed(predictor=None) -> AMEDPlugin:
    """AMED-Solver: the mean-direction step at a learned time."""
    return AMEDPlugin(MeanDirection("geometric"), _predictor(predictor))


def amed_plugin(predictor=None, base: str = "ipndm", **base_options) -> AMEDPlugin:
    """AMED-Plugin over ``base`` (euler, dpm2, ipndm, dpmpp)."""
    return AMEDPlugin(make_base_rule(base, **base_options), _predictor(predictor))



# -- what the registry asks of a trained rule (amedlab.solvers): its row name, a stand-in, its training --

PLUGIN_BASE_NAMES = {"euler": "DDIM", "dpm2": "DPM-Solver-2", "ipndm": "iPNDM", "dpmpp": "DPM-Solver++"}


def _variant_tags(node) -> list[str]:
    """What an AMED row does differently from the paper's recipe (variable-step base, AFS, objective)."""
    options, sdist = dict(node.get("options") or {}), dict(node.get("distill") or {})
    tags = ["variable-step"] if options.get("variable_step") else []
    if node.get("afs") == "mean":
        tags.append("AFS-mean")
    if sdist.get("objective", "interval") != "interval":
        tags.append(f"{sdist['objective']} objective")
    if sdist.get("learn_grid"):
        tags.append("learned grid")
    return tags


def row_label(node) -> str:
    """The Table 2 row name of an AMED solver config: the paper's, with what differs from its recipe."""
    tags = _variant_tags(node)
    if node["name"] == "amed_plugin":
        base = str(dict(node.get("options") or {}).get("base", "ipndm"))
        return f"AMED-Plugin (on {PLUGIN_BASE_NAMES.get(base, base)}{''.join(', ' + t for t in tags)})"
    return "AMED-Solver" + (f" ({', '.join(tags)})" if tags else "")


def stand_in() -> dict:
    """A predictor that builds the rule when only its grid size matters (NFE counting, checks)."""
    return {"predictor": AMEDPredictor(feature_dim=1)}


for _rule in (amed, amed_plugin):
    # the trained hook (amedlab.solvers.trained) by name: imported when the evaluation first asks for it
    _rule.row_label, _rule.stand_in, _rule.trained = row_label, stand_in, "amedlab.amed.trained:TRAINING"
