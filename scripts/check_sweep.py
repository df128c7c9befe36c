"""Compose every cell of a ``python -m amedlab -m ...`` sweep and run the evaluate stage's checks on
each, without sampling: what ``scripts/gpu_check.sh --dry-run`` runs for its Table 2 sweep.

    python scripts/check_sweep.py experiments=table2_digits hydra/launcher=basic device=cuda ...

The sweep is expanded as Hydra's basic sweeper does (comma lists on the command line and the
config's ``hydra.sweeper.params``); each cell is composed with the real configs, its launcher
included, and checked: solver name, options and reachable NFE, schedule, seeds, dtype, precision,
feature extractor and its weights file. Exit status 1 and the failing cells when any fails.
"""
from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from amedlab.specs import CONF_DIR
from amedlab.evaluation.evaluate import cell_schedule
from amedlab.evaluation.extractors import check_extractor_weights, resolve_extractor_name
from amedlab.models.base import PRECISIONS
from amedlab.sampling import parse_seeds
from amedlab.specs.solver import check_schedule, check_solver_node
from amedlab.specs.values import check_known_keys, choice_at


def check_cell(cfg) -> str:
    """The evaluate stage's checks that need no device, model or directory; a one-line summary.

    (The full check, ``amedlab.specs.evaluate.check_evaluate``, also loads the model on ``device`` and
    probes the output directories: what this dry run on a CPU machine must not do.)"""
    e = cfg.eval
    node = dict(cfg.solver)
    check_known_keys(cfg)
    check_schedule(cfg.schedule)
    schedule = cell_schedule(cfg.schedule, node["name"], e.get("schedule_per_solver"))
    _, points = check_solver_node(cfg.solver, "solver", int(cfg.nfe))
    seeds = parse_seeds(e.seeds)
    choice_at(cfg, "eval.dtype", ("float32", "float64"))
    choice_at(cfg, "eval.precision", tuple(PRECISIONS))
    extractor = resolve_extractor_name(str(e.feature_extractor), str(e.real.source), cfg.dataset.get("name"))
    check_extractor_weights(extractor, e.get("inception_weights"), e.get("digits_classifier"))
    return (f"{node['name']} nfe={cfg.nfe}: {points} points, {schedule['kind']} rho={schedule['rho']}, "
            f"{len(seeds)} seeds, device={cfg.device}, {extractor}")


def cells(overrides: list[str]) -> list[list[str]]:
    """Every cell's overrides, as Hydra's basic sweeper expands them."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    base = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = dict(base.hydra.sweeper.get("params") or {})
    given = {o.split("=", 1)[0] for o in overrides}
    parsed = parser.parse_overrides(overrides + [f"{k}={v}" for k, v in params.items() if k not in given])
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def main(argv: list[str]) -> int:
    failed = 0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        all_cells = cells(argv)
        for cell in all_cells:
            try:
                cfg = compose(config_name="config", overrides=cell, return_hydra_config=True)
                if cfg.stage != "evaluate":
                    raise ValueError(f"stage={cfg.stage!r}: this check covers stage=evaluate sweeps")
                print("ok  ", check_cell(cfg))
            except Exception as err:  # every failing cell is listed, not just the first
                failed += 1
                print("FAIL", " ".join(cell), "->", f"{type(err).__name__}: {err}")
    print(f"{len(all_cells) - failed}/{len(all_cells)} cells compose and pass the checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
