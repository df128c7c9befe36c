"""A ``solver`` config node (``conf/solver/*.yaml``) as a typed spec: build it, count its grid points,
name its Table 2 row. Plain mappings in, no Hydra config: :mod:`amedlab.specs` builds these."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..io import plain
from . import Solver, make_solver, rule_factory

#: the paper's row names (Table 2) of the classical rules; a rule registered with a ``row_label``
#: attribute on its factory (AMED, the learned solver) names its own rows
ROW_NAMES = {"euler": "DDIM (Euler)", "heun": "EDM (Heun)", "midpoint": "Midpoint", "dpm2": "DPM-Solver-2",
             "dpmpp2m": "DPM-Solver++(2M)", "dpmpp3m": "DPM-Solver++(3M)", "dpmpp": "DPM-Solver++",
             "unipc": "UniPC", "ipndm": "iPNDM"}


def solver_from_node(node: Mapping, **extra) -> Solver:
    """The solver of a ``solver`` mapping (name, afs, final_step, options); ``extra`` goes to the rule."""
    options = dict(node.get("options") or {})
    options.update(extra)
    return make_solver(node["name"], afs=node.get("afs", False), final_step=node.get("final_step", "sigma_min"),
                       target=node.get("_target_"), **options)


def solver_label(node: Mapping) -> str:
    """The Table 2 row name of a solver config: ``label`` when set; else the rule's own ``row_label``
    (registered on its factory), else the paper's name with the variable-step and AFS tags."""
    if node.get("label"):
        return str(node["label"])
    name, afs = node["name"], node.get("afs", False)
    own = getattr(rule_factory(name, node.get("_target_")), "row_label", None)
    if own is not None:
        return own(node)
    options = dict(node.get("options") or {})
    label = ROW_NAMES.get(name, name)
    if options.get("variable_step"):
        label += " (variable-step)"
    if afs:
        tag = "AFS-mean" if afs == "mean" else "AFS"
        label = label[:-1] + f", {tag})" if label.endswith(")") else label + f" ({tag})"
    return label


@dataclass(frozen=True)
class SolverSpec:
    """A ``solver`` config: the step rule's name and options, AFS, the final step, and for AMED the
    predictor file and ``distill`` settings (teacher, M, s_dir, s_time, objective, learn_grid)."""

    name: str
    afs: bool | str = False
    final_step: str = "sigma_min"
    options: Mapping = field(default_factory=dict)
    predictor: str | None = None
    distill: Mapping = field(default_factory=dict)
    row_label: str | None = None            # ``solver.label``: None derives it (:func:`solver_label`)
    target: str | None = None               # ``solver._target_``: a user's StepRule class (docs/extending.md)

    @classmethod
    def from_node(cls, node: Mapping) -> SolverSpec:
        return cls(node["name"], node.get("afs", False), node.get("final_step", "sigma_min"),
                   dict(plain(node.get("options")) or {}), node.get("predictor"), dict(plain(node.get("distill")) or {}),
                   node.get("label"), node.get("_target_"))

    @classmethod
    def named(cls, name: str) -> SolverSpec:
        """The package's ``conf/solver/<name>.yaml`` (a ``--config-dir``'s solvers: :func:`amedlab.specs.load_group`)."""
        from ..resources import package_conf

        return cls.from_node(package_conf("solver", name))

    def node(self) -> dict:
        """What the solver builder reads: name, afs, final_step, options (and a user's ``_target_``)."""
        node = {"name": self.name, "afs": self.afs, "final_step": self.final_step, "options": dict(self.options)}
        return node if self.target is None else {**node, "_target_": self.target}

    def as_dict(self) -> dict:
        return {**self.node(), "predictor": self.predictor, "distill": dict(self.distill), "label": self.row_label}

    def build(self, **extra) -> Solver:
        """The solver; trained rules take their trained part here (``predictor=``, ``params=``)."""
        return solver_from_node(self.node(), **extra)

    def num_points(self, nfe: int) -> int:
        """Grid points giving exactly ``nfe`` counted evaluations (an error lists the reachable NFEs).
        A rule that needs a trained part to be built declares ``stand_in()`` on its factory."""
        stand_in = getattr(rule_factory(self.name, self.target), "stand_in", None)
        return self.build(**(stand_in() if stand_in else {})).num_points(int(nfe))

    @property
    def label(self) -> str:
        return solver_label(self.as_dict())
