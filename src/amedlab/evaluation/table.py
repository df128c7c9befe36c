"""The paper's Table 2 from a sweep's ``metrics.json`` files: the library of ``stage=table sweep_dir=...``
(:mod:`amedlab.stages.table`).

The stage writes, into ``table.out_dir`` (default: the sweep directory):
- ``table2.md``: one markdown table per metric in ``table.metrics`` (rows: solvers in the paper's
  order; columns: NFE; each value with its interval over seeds, ``value ± half-width``), then a
  legend: the lowest cell of a column is in bold only if it is significantly lower than every other
  cell there (``table.significance.level``, a paired interval of the difference excluding 0, from the
  replicates the cells stored, :mod:`.uncertainty`); otherwise the tied group is in italics;
- ``table2.tex``: the same as LaTeX tabulars (booktabs; ``\\textbf`` / ``\\textit``);
- ``table2.csv``: one line per cell with every metric, its interval (``_lo``, ``_hi``), the real set's
  spread, the marks, and the paired difference to the column's lowest cell with its interval;
- ``<metric>_vs_nfe.png``: one line per solver, log-scale y, error bars, the legend right of the axes
  (``fid_vs_nfe.png`` is the main plot);
- ``table2_ratio.md``, ``.tex``, ``.csv`` (a sweep with a limit cell): every cell of FID and KID as a
  multiple of the limit row's value, with the interval of the ratio from the paired replicates
  (:func:`ratio_lines`);
- ``samples_by_solver.png``: the rows of the table (same order and labels) against its NFE columns, each
  cell its first images (``preview.npz``, verified against the digest its ``metrics.json`` records), the
  same seeds in every cell: cells whose preview holds other seeds than most cells' are named in one
  warning and left blank, and so are cells without a preview (evaluated before previews were kept;
  re-running the sweep adds them without recomputing a metric) and cells whose preview fails its check;
and prints the main table and the paths. Missing cells (not run, or still running) show as n/a;
cells evaluated before intervals were stored show no interval and are never called significant.

The limit row: a cell whose ``metrics.json`` has ``"limit": true`` (stage=evaluate's limit cell, the
teacher's own ODE solution, ``eval.ode_reference``) is the last row of every table, the same cell in
every NFE column with its value and interval. It is a bound, not a competitor: never in bold or
italics, left out of each column's comparison (and of the plots' lines: a dashed horizontal line
instead). A sweep without one is tabulated as before, with one info line on how to add it.

Which numbers are tabulated (here and in :mod:`.compare_cells`): every ``metrics.json`` under the
sweep is classified by :func:`classify`. A cell is tabulated only if its file is a JSON object,
``complete`` is true, it is sealed and verifies (:func:`amedlab.cache.seal_problem`: a digest over
everything else), its ``format`` is :data:`~.evaluate.METRICS_FORMAT`, and the fields the table reads
have the right types (:data:`REQUIRED`). Any other file (unreadable or truncated JSON, a list, a cell
still running or killed, no digest, edited or damaged, another format version, a missing or mistyped
field) is never tabulated. The policy:

- some files bad, some good: the table of the good cells is written; ONE warning names every skipped
  file with its reason, and the legend under each table says how many files were skipped and why;
- no good cell at all: a user error naming ``sweep_dir`` that lists the reasons; nothing is written;
- two good cells with the same row label and NFE but other settings (their ``solver_config`` or
  ``cell_key`` differ): a user error naming ``solver.label`` and both files (set a distinct
  ``solver.label`` per configuration), never a silent choice; the same cell twice (same ``cell_key``,
  e.g. a copied folder): the newer is used, with a warning; the same cell at another ``seed`` (the
  only difference: the next paragraph) is a training replicate.

Training replicates (docs/evaluation.md): a trained row (AMED's predictor, the learned solver) moves
when it is trained again, as much as its interval over the evaluation seeds. The top-level ``seed`` is
its training replicate r (its own teacher trajectories, initialisation and batch order), and cells of
one row and NFE that differ only in ``seed`` (:func:`cell_seed`; same label, solver config, model,
evaluation seeds, schedule, real set and bootstrap pairing) are pooled into one table cell
(:func:`pooled_cell`, :func:`pool_rows`): the mean over the k replicates, with the interval over
training and evaluation seeds (the replicates' stored bootstrap replicates, each centred on its own
value, pooled with equal weight: no second bootstrap) shown as ``mean [lo, hi]``, the row named
``label (k=N)``, and the training spread (min – max, sd of the k values) in a table under each table
and in the CSV (``<m>_train_lo``/``_hi``/``_sd``, ``replicates``, ``train_seeds``). Its bold and
italics must hold over the training seeds: every replicate against every cell of every other row
(:func:`column_marks`). The ratio view pools the replicates' ratios the same way. A row of one cell
per NFE (k = 1, ``make run``) is tabulated exactly as before; the legend names the trained rows that
have k = 1.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path

from ..cache import seal_problem
from ..errors import ConfigError, MissingFileError
from ..io import atomic_write_text
from . import evaluate as _evaluate
from . import uncertainty as U
from .evaluate import METRICS_FILE, read_preview
from .plots import metric_vs_nfe_png, samples_by_solver_png

log = logging.getLogger(__name__)

#: rows in the paper's order (Table 2); other solvers follow alphabetically
SOLVER_ORDER = ("euler", "heun", "midpoint", "dpm2", "dpmpp2m", "dpmpp3m", "dpmpp", "unipc", "ipndm", "amed", "amed_plugin", "learned")
METRICS = {"fid": "FID", "kid_mean": "KID", "rmse": "RMSE vs high-NFE solution"}
#: overrides that do not make a different row (they name the cell, the sweep or how it ran)
NEUTRAL_KEYS = ("nfe", "solver", "experiments", "stage", "sweep_dir", "seed")
NEUTRAL_PREFIXES = ("logger", "hydra", "eval.batch_size", "eval.num_threads", "cache_dir",
                    "model.path", "eval.skip_finished", "eval.sample_grid", "eval.save_samples", "device")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


#: the fields a tabulated cell must hold: field -> (test, what is accepted)
REQUIRED = {
    "label": (_text, "a non-empty string"),
    "solver": (_text, "a non-empty string"),
    "nfe": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "fid": (_number, "a finite number"),
    "rmse": (_number, "a finite number"),
    "kid_mean": (lambda v: v is None or _number(v), "a finite number or null"),
    "uncertainty": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "overrides": (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of strings"),
    "solver_config": (lambda v: isinstance(v, dict), "an object"),
    "cell_key": (_text, "a non-empty string"),
}
#: fields a cell may hold (absent: the default); present, they must have the right type
OPTIONAL = {"limit": (lambda v: isinstance(v, bool), "true or false (absent: false)")}
#: the kinds of skipped file, in the order the legend lists them
SKIP_KINDS = ("unreadable", "not a JSON object", "incomplete", "not sealed", "edited or damaged",
              "another format version", "missing or mistyped fields")


def cell_problem(record) -> tuple[str, str] | None:
    """None if ``record`` (a metrics.json read back) may be tabulated, else (kind, reason)."""
    if not isinstance(record, dict):
        return "not a JSON object", f"not a JSON object (a {type(record).__name__})"
    if record.get("complete") is not True:
        return "incomplete", f"incomplete (complete={record.get('complete')!r}: a cell still running or killed)"
    sealed = seal_problem(record)
    if sealed is not None:
        return ("not sealed" if "digest" not in record else "edited or damaged"), sealed
    fmt_ = record.get("format")
    if fmt_ != _evaluate.METRICS_FORMAT:
        return "another format version", (f"format {fmt_!r}, not {_evaluate.METRICS_FORMAT} (stale: written by another "
                                          "version; re-run the cell)")
    bad = []
    for field, (ok, accepted) in REQUIRED.items():
        if field not in record:
            bad.append(f"no {field}")
        elif not ok(record[field]):
            bad.append(f"{field}={record[field]!r} (accepted: {accepted})")
    bad += [f"{field}={record[field]!r} (accepted: {accepted})" for field, (ok, accepted) in OPTIONAL.items()
            if field in record and not ok(record[field])]
    if bad:
        return "missing or mistyped fields", "missing or mistyped fields: " + ", ".join(bad)
    return None


def read_cell(path) -> tuple[dict | None, tuple[str, str] | None]:
    """(the cell, with ``_path`` and ``_mtime`` added, None) or (None, (kind, reason)) for one metrics.json."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        mtime = path.stat().st_mtime
    except (OSError, UnicodeDecodeError) as err:
        return None, ("unreadable", f"unreadable ({type(err).__name__}: {err.strerror or err})"
                      if isinstance(err, OSError) else f"unreadable ({type(err).__name__})")
    except json.JSONDecodeError as err:
        return None, ("unreadable", f"not valid JSON (truncated or damaged: {err.msg} at line {err.lineno})")
    problem = cell_problem(record)
    if problem is not None:
        return None, problem
    record["_path"], record["_mtime"] = str(path), mtime
    return record, None


def classify(sweep_dir) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """(the cells that may be tabulated, [(path, kind, reason)] for every other metrics.json under ``sweep_dir``)."""
    cells, skipped = [], []
    for path in sorted(Path(sweep_dir).rglob(METRICS_FILE)):
        cell, problem = read_cell(path)
        if cell is None:
            skipped.append((str(path), *problem))
        else:
            cells.append(cell)
    return cells, skipped


def skipped_message(skipped) -> str:
    """One line naming every skipped file with its reason."""
    return (f"{len(skipped)} {METRICS_FILE} file(s) skipped, not tabulated: "
            + "; ".join(f"{path}: {reason}" for path, _, reason in skipped))


def skipped_note(skipped) -> str:
    """The legend's sentence on the skipped files (how many, why), or '' when none was skipped."""
    if not skipped:
        return ""
    counts = {kind: sum(1 for s in skipped if s[1] == kind) for kind in SKIP_KINDS}
    why = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return (f"Skipped: {len(skipped)} {METRICS_FILE} file(s) of the sweep are not tabulated ({why}); "
            "the stage's warning names each file and its reason.")


def collect(sweep_dir) -> list[dict]:
    """The cells of ``sweep_dir`` that may be tabulated (:func:`classify`); one warning names the others."""
    cells, skipped = classify(sweep_dir)
    if skipped:
        log.warning("%s", skipped_message(skipped))
    return cells


def _relative(path, root) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def gather(sweep_dir) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """(good cells, skipped files) of ``sweep_dir``, with one warning naming the skipped files; a
    sweep without one good cell is a user error naming ``sweep_dir``."""
    sweep_dir = Path(sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        what = "is a file, not a directory" if sweep_dir.exists() else "no such directory"
        raise (ConfigError if sweep_dir.exists() else MissingFileError)(
            f"sweep_dir={str(sweep_dir)!r}: {what}; accepted: an existing sweep directory", "sweep_dir")
    cells, skipped = classify(sweep_dir)
    if not cells:
        why = (f" that can be tabulated: all {len(skipped)} skipped ("
               + "; ".join(f"{_relative(p, sweep_dir)}: {r}" for p, _, r in skipped) + ")") if skipped else ""
        raise ConfigError(f"sweep_dir={str(sweep_dir)!r} holds no complete {METRICS_FILE}{why}; accepted: a sweep "
                          f"directory with at least one complete, sealed {METRICS_FILE} of format "
                          f"{_evaluate.METRICS_FORMAT} (run the sweep first, e.g. python -m amedlab -m "
                          "experiments=table2_digits)", "sweep_dir")
    if skipped:
        log.warning("%s", skipped_message(skipped))
    return cells, skipped


def _distinguishing(overrides) -> list[str]:
    """The overrides that can make a different row (not the NFE, the solver, or how the cell ran)."""
    kept = []
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in NEUTRAL_KEYS or any(key == p or key.startswith(p + ".") for p in NEUTRAL_PREFIXES):
            continue
        kept.append(o)
    return kept


def common_overrides(cells: list[dict]) -> list[str]:
    """Overrides shared by every cell (they describe the sweep, not a row)."""
    if not cells:
        return []
    common = set.intersection(*(set(_distinguishing(m.get("overrides"))) for m in cells))
    return [o for o in _distinguishing(cells[0].get("overrides")) if o in common]


def _conflict(label: str, nfe: int, old: dict, new: dict) -> ConfigError | None:
    """None if ``old`` and ``new`` are the same cell written twice (same cell_key and solver config),
    else the error naming both files: one row label and NFE for two configurations."""
    a, b = old.get("solver_config") or {}, new.get("solver_config") or {}
    if old.get("cell_key") == new.get("cell_key") and a == b:
        return None
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        what = f"their solver_config differs in {', '.join(map(str, keys))}"
    else:
        what = "their cell_key differs, i.e. another model, seeds, schedule or input file"
    first, second = sorted((old["_path"], new["_path"]))
    return ConfigError(f"solver.label={label!r}: two cells of this sweep have the row label {label!r} at NFE {nfe} "
                       f"with different settings ({what}): {first} and {second}; accepted: a distinct solver.label per "
                       "solver configuration (re-run one of them with its own solver.label), or remove the stale cell "
                       "from the sweep", "solver.label")


def is_limit(cell: dict | None) -> bool:
    """Whether ``cell`` is a limit cell (the teacher's ODE solution scored as a cell; absent: not)."""
    return cell is not None and cell.get("limit") is True


def limit_rows(rows) -> list[str]:
    """The labels of the limit rows of :func:`build_rows`' table (in its order: last)."""
    return [label for label, cells in rows.items() if any(is_limit(c) for c in cells.values())]


def cell_seed(cell: dict) -> int:
    """The training replicate r of a cell: the top-level ``seed`` it ran with, as metrics.json records it
    (``seed``, a seed set in a config file included); a cell written before that field, from its
    ``seed=`` override (absent: 0, the default)."""
    if isinstance(cell.get("seed"), int) and not isinstance(cell.get("seed"), bool):
        return cell["seed"]
    seed = 0
    for o in cell.get("overrides") or []:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "seed":
            try:
                seed = int(value)
            except ValueError:
                pass
    return seed


#: what two replicates of one trained cell share: everything but the seed (the cell_key has it inside)
REPLICATE_FIELDS = ("solver_config", "model", "seeds", "num_samples", "schedule", "feature_extractor", "precision", "limit")


def _replicate_signature(cell: dict) -> dict:
    real = {k: v for k, v in (cell.get("real_data") or {}).items() if k not in ("cached", "cache_file")}
    return {**{f: cell.get(f) for f in REPLICATE_FIELDS}, "real_data": real,
            "pairing_key": (cell.get("uncertainty") or {}).get("pairing_key")}


def _replicate_conflict(label: str, nfe: int, old: dict, new: dict) -> ConfigError | None:
    """None if ``old`` and ``new`` (other seeds) are replicates of one cell: the same label and every
    setting but ``seed`` (:data:`REPLICATE_FIELDS`, the real set, the bootstrap's pairing); else the
    error of one row label and NFE for two configurations."""
    a, b = _replicate_signature(old), _replicate_signature(new)
    if a == b:
        return None
    if a["solver_config"] != b["solver_config"]:
        return _conflict(label, nfe, old, new)
    keys = sorted(k for k in a if a[k] != b[k])
    first, second = sorted((old, new), key=lambda c: (cell_seed(c), c["_path"]))
    return ConfigError(f"solver.label={label!r}: two cells of this sweep have the row label {label!r} at NFE {nfe}, "
                       f"seed={cell_seed(first)} and seed={cell_seed(second)}, and differ in more than the seed (in "
                       f"{', '.join(keys)}): {first['_path']} and {second['_path']}, so they are no training replicates "
                       "of one row; "
                       "accepted: a distinct solver.label per configuration, or remove the stale cell from the sweep",
                       "solver.label")


def replicates(cell: dict | None) -> list[dict]:
    """The cells a table cell stands for: its training replicates (seed order), or the cell itself."""
    return [] if cell is None else list(cell.get("_replicates") or [cell])


def num_replicates(cell: dict | None) -> int:
    return len(replicates(cell))


def is_trained(cell: dict | None) -> bool:
    """Whether the cell's rule had a trained part (AMED's predictor, the learned solver): it records one."""
    return cell is not None and any(c.get("predictor") is not None for c in replicates(cell))


def _mean(values):
    return None if not values or any(_value({"v": v}, "v") is None for v in values) else float(sum(values) / len(values))


def pooled_cell(cells: list[dict]) -> dict:
    """One table cell for the training replicates ``cells`` of a row and NFE (k >= 2, in seed order):
    the first replicate's record with the mean of each metric, the replicates under ``_replicates`` and
    their seeds under ``_seeds``; the pooled intervals are added from their stored replicates by
    :func:`pool_rows` (``_pooled``)."""
    out = dict(cells[0])
    for m in ("fid", "kid_mean", "kid_std", "rmse"):
        out[m] = _mean([c.get(m) for c in cells])
    out.update(_replicates=list(cells), _seeds=[cell_seed(c) for c in cells], _mtime=max(c["_mtime"] for c in cells))
    return out


def build_rows(cells: list[dict]) -> tuple[list[int], "OrderedDict[str, dict[int, dict]]"]:
    """(sorted NFEs, {row label: {nfe: cell}}), rows in the paper's order, limit rows last.

    A row is a solver plus the overrides that differ between cells (e.g. a swept schedule.rho; never
    ``seed``). Two cells of one row and NFE are: training replicates, when they ran with other ``seed``
    (:func:`cell_seed`) and agree in everything else (:func:`_replicate_conflict`): the row's cell is
    then :func:`pooled_cell` of them; the same cell written twice (same seed, cell_key and
    solver_config: the newer is used, with a warning); or a ConfigError naming ``solver.label`` and both
    files. The NFEs are the other cells' (a limit cell's own NFE is no column); a limit row holds its
    cell (the newest, if one label has several) at every one of them."""
    common = set(common_overrides(cells))
    keyed = {}
    for m in cells:
        extra = ", ".join(o for o in _distinguishing(m.get("overrides")) if o not in common)
        label = m["label"] + (f" [{extra}]" if extra else "")
        order = SOLVER_ORDER.index(m["solver"]) if m.get("solver") in SOLVER_ORDER else len(SOLVER_ORDER)
        order += (len(SOLVER_ORDER) + 1) * is_limit(m)  # a bound below the competitors
        slot = keyed.setdefault(label, {"order": (order, m.get("solver", ""), label), "cells": {}})
        nfe, seed = int(m["nfe"]), cell_seed(m)
        by_seed = slot["cells"].setdefault(nfe, {})
        old = by_seed.get(seed)
        if old is not None:
            err = _conflict(label, nfe, old, m)
            if err is not None:
                raise err
            log.warning("the same cell twice for %s NFE %d (same cell_key): %s and %s; the newer is used",
                        label, nfe, old["_path"], m["_path"])
        elif by_seed:  # another seed of this row and NFE: a training replicate, or two configurations
            err = _replicate_conflict(label, nfe, next(iter(by_seed.values())), m)
            if err is not None:
                raise err
        if old is None or m["_mtime"] >= old["_mtime"]:
            by_seed[seed] = m
    rows = OrderedDict()
    for label, slot in sorted(keyed.items(), key=lambda kv: kv[1]["order"]):
        rows[label] = {n: (next(iter(by_seed.values())) if len(by_seed) == 1 else
                           pooled_cell([by_seed[s] for s in sorted(by_seed)])) for n, by_seed in slot["cells"].items()}
    limits = limit_rows(rows)
    nfes = sorted({n for label, r in rows.items() if label not in limits for n in r}
                  or {n for r in rows.values() for n in r})  # a sweep of limit cells alone: their own NFEs
    for label in limits:  # the teacher's own solution: the seed changes nothing of it but KID's subsets
        newest = max((c for cell in rows[label].values() for c in replicates(cell)), key=lambda c: c["_mtime"])
        rows[label] = {n: newest for n in nfes}
    return nfes, rows


def _value(cell: dict | None, metric: str):
    v = None if cell is None else cell.get(metric)
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def best_per_column(rows, nfes, metric: str) -> dict[int, float | None]:
    """The lowest value of ``metric`` at each NFE (lower is better for FID, KID and RMSE), the limit rows
    left out (a bound, not a competitor)."""
    return {n: min((v for r in rows.values() if not is_limit(r.get(n)) and (v := _value(r.get(n), metric)) is not None),
                   default=None) for n in nfes}


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def fmt_pm(h: float) -> str:
    return f"{h:.2g}" if h < 1000 else f"{h:.3g}"


# ------------------------------------------------------------------------------------------------
# Intervals and significance (amedlab.evaluation.uncertainty)
# ------------------------------------------------------------------------------------------------

def half_width(cell: dict | None, metric: str, level: float) -> float | None:
    """Half-width of the cell's interval over seeds (real set fixed) at ``level``; None without data,
    and for a row's pooled training replicates (their interval is not symmetric: :func:`bounds`)."""
    if cell is None or num_replicates(cell) > 1:
        return None
    u = cell.get("uncertainty") or {}
    entry = {"fid": (u.get("fid") or {}).get("samples"), "kid_mean": (u.get("kid") or {}).get("samples"),
             "rmse": u.get("rmse")}.get(metric)
    if not entry or not isinstance(entry.get("se"), (int, float)):
        return None
    return U.z_value(level) * float(entry["se"])


def real_half_width(cell: dict | None, metric: str, level: float) -> float | None:
    """The spread due to the finite real set (generated samples fixed), at ``level``; training
    replicates: the mean of theirs (the same real set in each)."""
    if cell is not None and num_replicates(cell) > 1:
        return _mean([real_half_width(c, metric, level) for c in replicates(cell)])
    u = (cell or {}).get("uncertainty") or {}
    entry = {"fid": (u.get("fid") or {}).get("real"), "kid_mean": (u.get("kid") or {}).get("real")}.get(metric)
    if not entry or not isinstance(entry.get("se"), (int, float)):
        return None
    return U.z_value(level) * float(entry["se"])


def load_cell_data(rows) -> tuple[dict, dict]:
    """({(label, nfe): (CellData, ...)}, {(label, nfe): why none}) for every cell of the table: one
    CellData per training replicate (one for an ordinary cell); a cell has data only if every replicate has."""
    data, why, read = {}, {}, {}
    for label, cells in rows.items():
        for n, cell in cells.items():
            got = []
            for c in replicates(cell):
                if c["_path"] not in read:  # a limit row's one cell is read once
                    read[c["_path"]] = U.load_cell(c, Path(c["_path"]).parent)
                    if read[c["_path"]][0] is None and c.get("uncertainty"):  # recorded but unusable: say so (an
                        log.warning("%s NFE %d: %s", label, n, read[c["_path"]][1])  # old cell is expected to have none)
                d, reason = read[c["_path"]]
                if d is None:
                    why[(label, n)] = reason if num_replicates(cell) == 1 else f"seed={cell_seed(c)}: {reason}"
                    break
                got.append(d)
            else:
                data[(label, n)] = tuple(got)
    return data, why


#: the training-spread columns of table2.csv, per metric
TRAIN_PREFIX = {"fid": "fid", "kid_mean": "kid", "rmse": "rmse"}


def pool_rows(rows, data: dict, level: float = 0.95) -> None:
    """Adds ``_pooled`` to every cell of ``rows`` that pools training replicates: per metric the mean
    (``value``), the ``level`` interval over training and evaluation seeds (``lo``, ``hi``; FID and KID:
    :func:`.uncertainty.pooled_interval` of the replicates' bootstrap replicates over seeds, the real
    set fixed as in the ``±`` of a single cell; RMSE: :func:`.uncertainty.normal_mixture_interval` of
    their delta-method normals) and the training spread (``train``: :func:`.uncertainty.training_spread`)."""
    for label, cells in rows.items():
        for n, cell in cells.items():
            reps = replicates(cell)
            if len(reps) < 2 or "_pooled" in cell:
                continue
            pooled = {}
            for m in CSV_METRICS:
                values = [_value(c, m) for c in reps]
                entry = {"value": _value(cell, m), "lo": None, "hi": None, "train": U.training_spread(values), "why": None}
                try:
                    if m == "rmse":
                        ses = [((c.get("uncertainty") or {}).get("rmse") or {}).get("se") for c in reps]
                        if None in ses or None in values:
                            raise ValueError("no per-sample data")
                        got = U.normal_mixture_interval(values, ses, level)
                    elif (label, n) not in data:
                        raise ValueError("no per-sample data")
                    elif None in values:
                        raise ValueError(f"no {m} value in every replicate")
                    else:
                        got = U.pooled_interval(values, [d.reps(m, "samples") for d in data[(label, n)]], level)
                    entry.update(lo=got["lo"], hi=got["hi"])
                except ValueError as err:
                    entry["why"] = str(err)
                pooled[m] = entry
            cell["_pooled"] = pooled


def column_marks(rows, nfes, metric: str, data: dict, level: float = 0.95, source: str = "samples") -> dict:
    """Per NFE: which cells to mark, and each cell's paired difference to the lowest one.

    ``{nfe: {"best": label, "status": "significant" | "tied" | "untested" | None, "tied": [labels],
    "diffs": {label: diff dict | None}, "why": {label: reason}}}``. The lowest cell is *significant*
    when the ``level`` paired interval of (other - lowest) excludes 0 for every other cell; else the
    *tied* group is the lowest cell and every cell whose interval contains 0 or cannot be formed.
    A column where the lowest cell has no per-sample data is *untested*. Limit rows take no part: a
    bound, not a competitor (never marked, nothing compared with them).

    Training replicates (a trained row from k seeds): the lowest row is the lowest mean, and every
    claim must hold over the training seeds: each replicate of a row is compared with each replicate of
    the lowest (:func:`.uncertainty.replicate_diff`; ``lo``/``hi`` the extreme ends over the pairs), so
    the lowest is *significant* only if every replicate is significantly lower than every cell of every
    other row, and a row leaves the tied group only if every one of its pairs is significantly higher."""
    out = {}
    for n in nfes:
        values = {label: v for label, cells in rows.items()
                  if not is_limit(cells.get(n)) and (v := _value(cells.get(n), metric)) is not None}
        if not values:
            out[n] = {"best": None, "status": None, "tied": [], "diffs": {}, "why": {}}
            continue
        best = min(values, key=values.get)
        diffs, why = {}, {}
        if (best, n) not in data or len(values) == 1:
            status = "untested" if (best, n) not in data else "significant"
            out[n] = {"best": best, "status": status, "tied": [best], "diffs": {}, "why": {}}
            continue
        tied = [best]
        for label in values:
            if label == best:
                continue
            other = data.get((label, n))
            d, reason = ((None, "no per-sample data") if other is None else
                         U.replicate_diff(other, data[(best, n)], metric, level, source))
            diffs[label] = d
            if d is None:
                why[label] = reason
                tied.append(label)
            elif not d["lo"] > 0:  # the interval of (other - lowest) does not lie above 0
                tied.append(label)
        status = "significant" if len(tied) == 1 else "tied"
        out[n] = {"best": best, "status": status, "tied": tied, "diffs": diffs, "why": why}
    return out


def _mark(marks, label, n) -> str:
    """'best' (significantly lowest), 'tied' (in the tied group), 'lowest' (untested column) or ''."""
    m = marks.get(n) or {}
    if m.get("best") is None or label not in m.get("tied", []):
        return ""
    if m["status"] == "significant":
        return "best"
    return "lowest" if m["status"] == "untested" else "tied"


def _cell_text(cell, metric, level, tex=False):
    v = _value(cell, metric)
    if v is None:
        return "--" if tex else "n/a"
    if num_replicates(cell) > 1:  # the mean of the training replicates and its pooled interval: not symmetric
        lo, hi = bounds(cell, metric, level)
        return fmt(v) if lo is None else f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"
    h = half_width(cell, metric, level)
    if h is None:
        return fmt(v)
    return f"{fmt(v)} $\\pm$ {fmt_pm(h)}" if tex else f"{fmt(v)} ± {fmt_pm(h)}"


def row_text(label: str, cells: dict) -> str:
    """A row's name in the tables: its label, with ``(k=N)`` for a trained row pooled from N training
    seeds (``k=2-3`` when its columns have different numbers of replicates)."""
    ks = sorted({num_replicates(c) for c in cells.values()})
    if not ks or ks[-1] < 2:
        return label
    return f"{label} (k={ks[0]})" if len(ks) == 1 else f"{label} (k={ks[0]}-{ks[-1]})"


def markdown_table(rows, nfes, metric: str, marks: dict | None = None, level: float = 0.95) -> str:
    marks = marks if marks is not None else column_marks(rows, nfes, metric, {}, level)
    lines = ["| NFE | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for label, cells in rows.items():
        out = []
        for n in nfes:
            text, mark = _cell_text(cells.get(n), metric, level), _mark(marks, label, n)
            out.append(f"**{text}**" if mark in ("best", "lowest") else (f"*{text}*" if mark == "tied" else text))
        lines.append(f"| {row_text(label, cells)} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}"}
    return "".join(special.get(ch, ch) for ch in s)


def latex_table(rows, nfes, metric: str, caption: str, marks: dict | None = None, level: float = 0.95) -> str:
    marks = marks if marks is not None else column_marks(rows, nfes, metric, {}, level)
    lines = [f"% {caption}", "% needs \\usepackage{booktabs}", "\\begin{tabular}{l" + "c" * len(nfes) + "}", "\\toprule",
             "NFE & " + " & ".join(str(n) for n in nfes) + r" \\", "\\midrule"]
    for label, cells in rows.items():
        out = []
        for n in nfes:
            text, mark = _cell_text(cells.get(n), metric, level, tex=True), _mark(marks, label, n)
            out.append(f"\\textbf{{{text}}}" if mark in ("best", "lowest") else (f"\\textit{{{text}}}" if mark == "tied" else text))
        lines.append(_tex_escape(row_text(label, cells)) + " & " + " & ".join(out) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def pooled_rows(rows) -> list[str]:
    """The labels of the rows with a cell pooled from k >= 2 training replicates."""
    return [label for label, cells in rows.items() if any(num_replicates(c) > 1 for c in cells.values())]


def _spread_text(cell, metric: str, tex: bool = False) -> str:
    t = ((cell or {}).get("_pooled") or {}).get(metric, {}).get("train") if num_replicates(cell) > 1 else None
    if t is None:
        return "--" if tex else "n/a" if cell is None or _value(cell, metric) is None else "k=1"
    dash = "--" if tex else "–"
    return f"{fmt(t['min'])} {dash} {fmt(t['max'])} (sd {fmt_pm(t['sd'])})"


def spread_table(rows, nfes, metric: str, tex: bool = False) -> str:
    """The training spread of the pooled rows (:func:`pooled_rows`): per NFE, min – max (sd) of the k
    replicate values; '' when there is none."""
    labels = pooled_rows(rows)
    if not labels:
        return ""
    if tex:
        lines = ["\\begin{tabular}{l" + "c" * len(nfes) + "}", "\\toprule", "NFE & " + " & ".join(map(str, nfes)) + r" \\",
                 "\\midrule"]
        lines += [_tex_escape(row_text(label, rows[label])) + " & "
                  + " & ".join(_spread_text(rows[label].get(n), metric, True) for n in nfes) + r" \\" for label in labels]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"])
    lines = ["| NFE | " + " | ".join(map(str, nfes)) + " |", "|---" * (len(nfes) + 1) + "|"]
    lines += [f"| {row_text(label, rows[label])} | " + " | ".join(_spread_text(rows[label].get(n), metric) for n in nfes)
              + " |" for label in labels]
    return "\n".join(lines)


def bounds(cell: dict | None, metric: str, level: float, fn=half_width) -> tuple[float | None, float | None]:
    """(low, high) of the cell's interval at ``level`` (``fn``: :func:`half_width`, or
    :func:`real_half_width` for the real set's spread); (None, None) without one. A cell pooled from
    training replicates: its interval over training and evaluation seeds (:func:`pool_rows`)."""
    if fn is half_width and num_replicates(cell) > 1:
        p = ((cell.get("_pooled") or {}).get(metric) or {})
        return (p.get("lo"), p.get("hi")) if p.get("lo") is not None else (None, None)
    v, h = _value(cell, metric), fn(cell, metric, level)
    return (None, None) if v is None or h is None else (v - h, v + h)


CSV_METRICS = ("fid", "kid_mean", "rmse")
CSV_FIELDS = ("solver", "label", "nfe", "limit", "fid", "fid_lo", "fid_hi", "fid_real_lo", "fid_real_hi", "kid_mean", "kid_std",
              "kid_lo", "kid_hi", "rmse", "rmse_lo", "rmse_hi", "num_samples", "feature_extractor", "schedule", "rho",
              "best_fid", "best_kid_mean", "best_rmse", "mark_fid", "mark_kid_mean", "mark_rmse",
              "fid_minus_lowest", "fid_minus_lowest_lo", "fid_minus_lowest_hi",
              "rmse_minus_lowest", "rmse_minus_lowest_lo", "rmse_minus_lowest_hi",
              "replicates", "train_seeds", "fid_train_lo", "fid_train_hi", "fid_train_sd", "kid_train_lo", "kid_train_hi",
              "kid_train_sd", "rmse_train_lo", "rmse_train_hi", "rmse_train_sd", "metrics_file")


def csv_rows(rows, nfes, marks: dict | None = None, level: float = 0.95) -> list[dict]:
    """The lines of :func:`csv_table` as dicts over :data:`CSV_FIELDS` (values as numbers, not text); a
    limit row's cell once, at its own NFE, with ``limit`` = 1. A trained row's cell pooled from k
    training replicates: the means, the pooled intervals, ``replicates`` = k, their seeds, the training
    spread (``<m>_train_lo``/``_hi``: min and max of the k values, ``_sd``) and every replicate's file
    (``metrics_file``, ``;``-separated)."""
    marks = marks or {}
    marks = {m: marks.get(m) or column_marks(rows, nfes, m, {}, level) for m in CSV_METRICS}
    out = []
    for label, cells in rows.items():
        for n in nfes:
            c = cells.get(n)
            if c is None or (is_limit(c) and n != nfes[0]):
                continue
            sched = c.get("schedule") or {}
            row = {
                "solver": c.get("solver"), "label": label, "nfe": c["nfe"] if is_limit(c) else n, "limit": int(is_limit(c)),
                "fid": c.get("fid"), "kid_mean": c.get("kid_mean"),
                "kid_std": c.get("kid_std"), "rmse": c.get("rmse"), "num_samples": c.get("num_samples"),
                "feature_extractor": c.get("feature_extractor"), "schedule": sched.get("kind"), "rho": sched.get("rho"),
                "metrics_file": ";".join(r["_path"] for r in replicates(c)), "replicates": num_replicates(c),
                "train_seeds": ",".join(str(cell_seed(r)) for r in replicates(c)),
            }
            for m, prefix in TRAIN_PREFIX.items():  # the spread over the training seeds (k >= 2 only)
                t = (((c.get("_pooled") or {}).get(m) or {}).get("train") or {}) if num_replicates(c) > 1 else {}
                row[f"{prefix}_train_lo"], row[f"{prefix}_train_hi"], row[f"{prefix}_train_sd"] = (
                    t.get("min"), t.get("max"), t.get("sd"))
            row["fid_lo"], row["fid_hi"] = bounds(c, "fid", level)
            row["fid_real_lo"], row["fid_real_hi"] = bounds(c, "fid", level, real_half_width)
            row["kid_lo"], row["kid_hi"] = bounds(c, "kid_mean", level)
            row["rmse_lo"], row["rmse_hi"] = bounds(c, "rmse", level)
            for m in CSV_METRICS:
                mark = _mark(marks[m], label, n)
                row[f"best_{m}"] = int(mark in ("best", "lowest"))  # in bold (lowest: untested, no data)
                row[f"mark_{m}"] = mark
            for m in ("fid", "rmse"):
                d = (marks[m].get(n) or {}).get("diffs", {}).get(label)
                if d:
                    row[f"{m}_minus_lowest"], row[f"{m}_minus_lowest_lo"], row[f"{m}_minus_lowest_hi"] = d["diff"], d["lo"], d["hi"]
            out.append({f: row.get(f) for f in CSV_FIELDS})
    return out


def csv_table(rows, nfes, marks: dict | None = None, level: float = 0.95, lines: list[dict] | None = None) -> str:
    """One line per cell: the values, their intervals (``_lo``/``_hi``; ``fid_real_*``: the real set's
    spread), the marks (``best_<m>`` = 1 for a cell in bold; ``mark_<m>``: best (significantly lowest), tied,
    lowest (bold but untested: no per-sample data) or empty) and the paired difference to the column's lowest
    cell with its interval. ``lines``: :func:`csv_rows` already made."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(csv_rows(rows, nfes, marks, level) if lines is None else lines)
    return buf.getvalue()


def legend(rows, nfes, metric: str, marks: dict, level: float, source: str, data: dict, skipped=()) -> str:
    """How to read one table: what +- is, what bold and italics mean, at which level; notes on missing
    data and on the files of the sweep that were skipped (``skipped``: :func:`classify`'s second part)."""
    pct = f"{100 * level:g}%"
    cells = list({id(c): c for r in rows.values() for c in r.values()}.values())  # a limit row's cell once
    with_u = [c for c in cells if bounds(c, metric, level)[0] is not None]
    parts = []
    if with_u:
        how = {"fid": "bootstrap over the seeds", "kid_mean": "bootstrap over the seeds (of the full-sample KID)",
               "rmse": "delta method over the per-sample errors"}[metric]
        u0 = replicates(with_u[0])[0].get("uncertainty") or {}
        extra = f", {u0.get('resamples')} resamples" if metric != "rmse" else ""
        parts.append(f"± : {pct} interval of the cell over seeds ({how}{extra}; the real set held fixed).")
        real = sorted(h for c in with_u if (h := real_half_width(c, metric, level)) is not None)
        if real:
            csv_cols = "; CSV fid_real_lo/hi" if metric == "fid" else ""
            parts.append(f"The finite real set adds ± {fmt_pm(real[len(real) // 2])} (median over cells{csv_cols}), "
                         "the same real set for every cell: it does not enter the comparisons.")
    statuses = {m["status"] for m in marks.values() if m.get("status")}
    test = ("paired over the per-sample errors" if metric == "rmse" else
            "paired bootstrap, the same resampled seeds" + (" and real set" if source == "total" else "") + " for both cells")
    parts.append(f"**Bold**: the lowest value of its column, significantly lower than every other cell there "
                 f"(the {pct} interval of each difference excludes 0; {test}). *Italics*: where no cell is, the tied "
                 "group: the lowest and every cell not significantly higher.")
    if "untested" in statuses:
        untested = sorted(n for n, m in marks.items() if m.get("status") == "untested")
        parts.append(f"NFE {', '.join(map(str, untested))}: no per-sample data for the lowest cell (evaluated before "
                     "intervals were stored), so bold there is only the lowest value, not tested.")
    parts += replicate_notes(rows, metric, pct)
    missing = len(cells) - len(with_u)
    if missing and with_u:
        parts.append(f"{missing} cell(s) have no interval (evaluated before intervals were stored or bootstrap disabled).")
    elif not with_u:
        parts[0:0] = ["No intervals: these cells carry no per-sample data (evaluated before intervals were stored)."]
    parts += [limit_note(rows, label) for label in limit_rows(rows)]
    if skipped:
        parts.append(skipped_note(skipped))
    return " ".join(parts)


def replicate_notes(rows, metric: str, pct: str) -> list[str]:
    """The legend's sentences on trained rows: how a row pooled from k training seeds is shown and
    marked; and which trained rows come from one training seed (k=1), whose retraining spread the
    table does not hold (make run-full trains three)."""
    out = []
    pooled = pooled_rows(rows)
    if pooled:
        how = ("the equal mixture of the replicates' delta-method normals" if metric == "rmse" else
               "the replicates' bootstrap replicates over the seeds, each centred on its own value, pooled with equal "
               "weight; the real set held fixed")
        csv_cols = f"table2.csv: {TRAIN_PREFIX[metric]}_train_lo/hi/sd"
        out.append(f"(k=N): a trained row from N training seeds (the top-level seed: 0, 1, ...; each replicate trained "
                   f"on its own teacher trajectories, from its own initialisation and batch order). Its value is the mean over the "
                   f"replicates, [lo, hi] the {pct} percentile interval over training and evaluation seeds ({how}); "
                   f"the training spread (min – max and sd of the N values) is in the table below ({csv_cols}). Bold "
                   "and italics hold over the training seeds: such a row is bold only if every replicate is "
                   "significantly lower than every cell of every other row, and a row leaves the tied group only "
                   "if every pair of its cells with the lowest row's replicates is significantly higher.")
    single = [label for label, cells in rows.items() if label not in pooled and not any(is_limit(c) for c in cells.values())
              and any(is_trained(c) for c in cells.values())]
    if single:
        out.append(f"Trained rows from one training seed (k=1): {'; '.join(single)}. Their values, intervals and marks "
                   "are those of that one training: the spread over retraining is not in them (make run-full trains "
                   "three seeds per trained row: docs/evaluation.md, training replicates).")
    return out


def limit_note(rows, label: str) -> str:
    """The legend's sentence on a limit row: what it is, and that it is a bound, not a competitor."""
    cell = next(iter(rows[label].values()))
    return (f"{label} (last row): the limit, the teacher's own ODE solution (eval.ode_reference, NFE {cell['nfe']}) "
            "scored as a cell, what every ODE solver of this teacher converges to as its NFE grows. The same cell in "
            "every column; a bound, not a competitor: never in bold or italics and left out of the comparisons.")


def describe(cells: list[dict]) -> str:
    """One line on what the numbers are: model, samples, features, real data."""
    def uniq(values):
        vals = sorted({str(v) for v in values if v is not None})
        return "/".join(vals) if vals else "?"

    model = uniq(c.get("model", {}).get("name") for c in cells)
    samples = uniq(c.get("num_samples") for c in cells)
    extractor = uniq(c.get("feature_extractor") for c in cells)
    real = uniq((c.get("real_data") or {}).get("split") or (c.get("real_data") or {}).get("path") for c in cells)
    common = common_overrides(cells)
    settings = f"; {', '.join(common)}" if common else ""
    return f"model {model}, {samples} samples per cell, {extractor} features, real data: {real}{settings}"


# ------------------------------------------------------------------------------------------------
# The ratio view: every cell as a multiple of the limit (table2_ratio.md, .tex, .csv)
# ------------------------------------------------------------------------------------------------

#: the metrics with a ratio view (the limit's RMSE is 0 by construction: no RMSE ratio)
RATIO_METRICS = ("fid", "kid_mean")
RATIO_STEM = "table2_ratio"
RATIO_FIELDS = ("metric", "solver", "label", "nfe", "limit_label", "value", "limit_value", "ratio", "ratio_lo", "ratio_hi",
                "statistic", "source", "why", "replicates", "metrics_file", "limit_file")


def ratio_line(cell: dict, limit: dict, metric: str, pair: tuple, level: float, source: str) -> dict:
    """One cell over its limit cell (over :data:`RATIO_FIELDS`, without the labels): the paired ratio and
    its interval (:func:`.uncertainty.paired_ratio`) when both cells kept their replicates (``pair``:
    their :class:`~.uncertainty.CellData` tuples, None where missing); else the ratio of the table's values,
    without an interval, and ``why``. A cell pooled from k training replicates: the mean of the k paired
    ratios and their pooled interval (:func:`.uncertainty.pooled_ratio`, as the table pools the row)."""
    line = {"metric": metric, "solver": cell.get("solver"), "nfe": cell["nfe"], "statistic": metric,
            "value": _value(cell, metric), "limit_value": _value(limit, metric), "ratio": None, "ratio_lo": None,
            "ratio_hi": None, "source": None, "why": None, "replicates": num_replicates(cell),
            "metrics_file": ";".join(c["_path"] for c in replicates(cell)), "limit_file": limit["_path"]}
    a, b = pair
    r, why = (None, "no per-sample data") if a is None or b is None else U.pooled_ratio(a, b[0], metric, level, source)
    if r is not None:  # KID: the replicates are of the full-sample MMD^2, so is the ratio (as the differences)
        line.update(statistic="kid_full" if metric == "kid_mean" else metric, value=r["a"], limit_value=r["b"],
                    ratio=r["ratio"], ratio_lo=r["lo"], ratio_hi=r["hi"], source=r["source"])
    else:
        line["why"] = why
        if line["value"] is not None and line["limit_value"] is not None and line["limit_value"] > 0:
            line["ratio"] = line["value"] / line["limit_value"]
    return line


def ratio_lines(rows, nfes, metrics, data: dict, level: float = 0.95, source: str = "samples") -> list[dict]:
    """The ratio view's lines (table2_ratio.csv): per ratio metric of ``metrics``, limit row and other
    cell, the cell over the limit (:func:`ratio_line`), paired through the replicates of ``data``
    (:func:`load_cell_data`) as the table's paired differences."""
    out = []
    limits = limit_rows(rows)
    for m in [m for m in metrics if m in RATIO_METRICS]:
        for lim in limits:
            for label, cells in rows.items():
                for n in nfes:
                    if label in limits or cells.get(n) is None:
                        continue
                    line = ratio_line(cells[n], rows[lim][n], m, (data.get((label, n)), data.get((lim, n))), level, source)
                    out.append({f: line.get(f) for f in RATIO_FIELDS} | {"label": label, "limit_label": lim})
    return out


def _ratio_text(line: dict | None, tex: bool = False) -> str:
    if line is None or line["ratio"] is None:
        return "--" if tex else "n/a"
    text = f"{line['ratio']:.3g}"
    return text if line["ratio_lo"] is None else f"{text} [{line['ratio_lo']:.3g}, {line['ratio_hi']:.3g}]"


def ratio_tables(rows, nfes, lines: list[dict], about: str, level: float, source: str) -> tuple[str, str]:
    """(markdown, LaTeX) of the ratio view: one table per metric and limit row, the other rows against
    the NFE columns, each cell ``ratio [lo, hi]``, a legend under each."""
    pct, md, tex = f"{100 * level:g}%", [], []
    for m, lim in dict.fromkeys((ln["metric"], ln["limit_label"]) for ln in lines):
        got = {(ln["label"], ln["nfe"]): ln for ln in lines if ln["metric"] == m and ln["limit_label"] == lim}
        limit_cell = rows[lim][nfes[0]]
        title = f"{METRICS[m]} / {METRICS[m]} of the limit, {lim} ({_cell_text(limit_cell, m, level)}; {about})"
        labels = [label for label in rows if any((label, n) in got for n in nfes)]
        grid = {label: [_ratio_text(got.get((label, n))) for n in nfes] for label in labels}
        head = "| NFE | " + " | ".join(map(str, nfes)) + " |\n" + "|---" * (len(nfes) + 1) + "|"
        body = "\n".join(f"| {row_text(label, rows[label])} | " + " | ".join(texts) + " |" for label, texts in grid.items())
        paired = "the same resampled seeds" + (" and real set" if source == "total" else "")
        unpaired = sum(1 for ln in got.values() if ln["ratio"] is not None and ln["ratio_lo"] is None)
        note = (f"Each cell as a multiple of the limit row's {METRICS[m]} ({lim}, the teacher's own ODE solution): 1 is "
                f"the limit. [lo, hi]: {pct} percentile interval of the ratio over the paired bootstrap replicates the "
                f"cells stored ({paired} in the cell and in the limit, as the table's paired differences).")
        if m == "kid_mean":
            note += (" KID: the ratio of the full-sample KID (kid_full, whose replicates the cells store), not of "
                     "torch-fidelity's subset average (kid_mean) the table shows, where the replicates exist.")
        if any((ln.get("replicates") or 1) > 1 for ln in got.values()):
            note += (" (k=N): a trained row from N training seeds: the mean of its N replicates' ratios, [lo, hi] over "
                     "training and evaluation seeds (each replicate's paired ratio replicates centred on its ratio, "
                     "pooled with equal weight), as Table 2 pools the row.")
        if unpaired:
            note += f" {unpaired} cell(s) have no paired replicates: the ratio of the values alone, no interval."
        md.append(f"**{title}**\n\n{head}\n{body}\n\n{note}")
        lines_tex = [f"% {title}. {note}", "% needs \\usepackage{booktabs}", "\\begin{tabular}{l" + "c" * len(nfes) + "}",
                     "\\toprule", "NFE & " + " & ".join(map(str, nfes)) + r" \\", "\\midrule"]
        lines_tex += [_tex_escape(row_text(label, rows[label])) + " & "
                      + " & ".join(_ratio_text(got.get((label, n)), tex=True) for n in nfes) + r" \\" for label in labels]
        tex.append("\n".join(lines_tex + ["\\bottomrule", "\\end{tabular}"]))
    return "\n\n".join(md) + "\n", "\n\n".join(tex) + "\n"


def ratio_csv(lines: list[dict]) -> str:
    """table2_ratio.csv: one line per (metric, limit, cell), over :data:`RATIO_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RATIO_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(lines)
    return buf.getvalue()


def _add_limit_hint(cells: list[dict], sweep_dir: Path) -> str:
    """The info line of a sweep without a limit cell: the command that adds it (its NFE as recorded)."""
    nfes = {(c.get("ode_reference") or {}).get("nfe") for c in cells} - {None}
    experiments = {o for c in cells for o in c.get("overrides") or [] if o.startswith("experiments=")}
    args = ["solver=ode_reference", f"nfe={nfes.pop() if len(nfes) == 1 else '<eval.ode_reference.nfe>'}",
            f"sweep_dir={sweep_dir}"]
    if len(experiments) == 1:  # the sweep's experiment, when its cells name one
        args.insert(0, experiments.pop())
    return (f"{sweep_dir}: no limit cell (the teacher's own ODE solution as a row, and the ratio view {RATIO_STEM}.*); "
            f"add it with: amedlab -m {' '.join(args)}, then run stage=table again (docs/evaluation.md, the limit row)")


def write_ratio_view(out: Path, rows, nfes, metrics, data: dict, level: float, source: str, about: str,
                     cells: list[dict], sweep_dir: Path) -> tuple[dict, list[dict]]:
    """(paths, lines) of the ratio view, written when the sweep has a limit row and ``metrics`` a ratio
    metric; otherwise ({}, []) with one info line, and an earlier ratio view in ``out`` removed (it
    would describe cells this table no longer has)."""
    lines = ratio_lines(rows, nfes, metrics, data, level, source) if limit_rows(rows) else []
    if not lines:
        for suffix in (".md", ".tex", ".csv"):
            (out / f"{RATIO_STEM}{suffix}").unlink(missing_ok=True)
        log.info("%s", _add_limit_hint(cells, sweep_dir) if not limit_rows(rows) else
                 f"no ratio view: table.metrics={list(metrics)} has none of {', '.join(RATIO_METRICS)}")
        return {}, []
    md, tex = ratio_tables(rows, nfes, lines, about, level, source)
    return {"ratio_markdown": atomic_write_text(out / f"{RATIO_STEM}.md", md),
            "ratio_latex": atomic_write_text(out / f"{RATIO_STEM}.tex", tex),
            "ratio_csv": atomic_write_text(out / f"{RATIO_STEM}.csv", ratio_csv(lines))}, lines


# ------------------------------------------------------------------------------------------------
# The sweep's samples side by side (samples_by_solver.png)
# ------------------------------------------------------------------------------------------------

PICTURE_FILE = "samples_by_solver.png"


def _seeds_text(seeds) -> str:
    seeds = list(seeds)
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ",".join(map(str, seeds))


def cell_previews(rows, nfes) -> dict:
    """What ``samples_by_solver.png`` shows: ``{"labels", "nfes", "seeds", "images": {(label, nfe): uint8
    [K, C, H, W]}, "notes": {(label, nfe): why blank}}``. Each cell's preview is read and verified
    (:func:`~.evaluate.read_preview`); images side by side must come from the same seeds, so the seeds
    most cells share are shown (a tie: those of the earlier cell in the table's order) and a cell with
    others is left blank. One warning per kind of blank cell names every such cell and its file."""
    labels = list(rows)
    found, notes, old, bad = {}, {}, [], []
    for label, cells in rows.items():
        for n in nfes:
            c = cells.get(n)
            if c is None:
                notes[(label, n)] = "not run"
                continue
            got, why = read_preview(c, Path(c["_path"]).parent)
            if got is not None:
                found[(label, n)] = got
            elif c.get("preview") is None:
                old.append(f"{label} NFE {n} ({c['_path']})")
                notes[(label, n)] = "no preview"
            else:
                bad.append(f"{label} NFE {n}: {why}")
                notes[(label, n)] = "preview failed\nits check"
    groups: dict[tuple, list] = {}
    for where, (_, seeds) in found.items():  # in the table's order
        groups.setdefault(tuple(seeds), []).append(where)
    shown = max(groups, key=lambda k: len(groups[k])) if groups else ()
    other = [where for where in found if tuple(found[where][1]) != shown]
    for where in other:
        notes[where] = "other seeds"
    if old:
        log.warning("%d cell(s) have no preview (evaluated before previews were kept), blank in %s: %s; re-run the "
                    "sweep to add them (a finished cell only gains its preview, its metrics are not recomputed)",
                    len(old), PICTURE_FILE, "; ".join(old))
    if bad:
        log.warning("%d cell(s) have a preview that fails its check, blank in %s: %s", len(bad), PICTURE_FILE,
                    "; ".join(bad))
    if other:
        log.warning("%s shows the same seeds in every cell (seeds %s, as %d cell(s) have); %d cell(s) kept the first "
                    "images of other seeds and are left blank: %s", PICTURE_FILE, _seeds_text(shown),
                    len(groups.get(shown, [])), len(other),
                    "; ".join(f"{label} NFE {n} (seeds {_seeds_text(found[(label, n)][1])}, {rows[label][n]['_path']})"
                              for label, n in other))
    images = {where: imgs for where, (imgs, seeds) in found.items() if tuple(seeds) == shown}
    return {"labels": labels, "nfes": list(nfes), "seeds": list(shown), "images": images, "notes": notes}


SOURCES = ("samples", "total")


def significance_settings(tcfg) -> tuple[float, str]:
    """(level, source) of ``table.significance``, checked: a bad value is a ConfigError naming its key."""
    sig = (tcfg or {}).get("significance")
    if sig is not None and not hasattr(sig, "get"):
        raise ConfigError(f"table.significance={sig!r}; accepted: a mapping with level and source", "table.significance")
    sig = sig or {}
    level, source = sig.get("level", 0.95), sig.get("source", "samples")
    if not _number(level) or not 0.5 <= float(level) < 1:
        raise ConfigError(f"table.significance.level={level!r}; accepted: a number in [0.5, 1), e.g. 0.95",
                          "table.significance.level")
    if source not in SOURCES:
        raise ConfigError(f"table.significance.source={source!r}; accepted: {', '.join(SOURCES)}",
                          "table.significance.source")
    return float(level), str(source)


def check_metrics(metrics, key: str = "table.metrics") -> list[str]:
    """``metrics`` as a list of names, checked: a non-empty list of distinct names of :data:`METRICS`."""
    iterable = hasattr(metrics, "__iter__") and not isinstance(metrics, (str, bytes, dict)) and not hasattr(metrics, "keys")
    given = list(metrics) if iterable else None
    accepted = f"a non-empty list of distinct names from {', '.join(METRICS)}"
    if not given:
        raise ConfigError(f"{key}={metrics!r}; accepted: {accepted}", key)
    for m in given:
        if not isinstance(m, str) or m not in METRICS:
            raise ConfigError(f"{key}={given!r}: {m!r} is not a metric; accepted: {accepted}", key)
    if len(set(given)) != len(given):
        raise ConfigError(f"{key}={given!r}: a metric is named twice; accepted: {accepted}", key)
    return [str(m) for m in given]


def _error_bar(cell, metric: str, level: float) -> float | None:
    """The plot's symmetric error bar: the half-width, or for pooled replicates the wider side of their interval."""
    if num_replicates(cell) < 2:
        return half_width(cell, metric, level)
    lo, hi = bounds(cell, metric, level)
    v = _value(cell, metric)
    return None if lo is None or v is None else max(v - lo, hi - v)


def write_tables(sweep_dir, out_dir=None, metrics=("fid", "rmse"), level: float = 0.95, source: str = "samples") -> dict:
    """Collect, format and write everything; returns {"markdown", "paths", "rows", "nfes", "cells", "marks",
    "skipped", "csv_rows", "picture", "limits", "ratio_rows"} (``skipped``: [(path, kind, reason)] of the files
    not tabulated; ``csv_rows``: table2.csv's lines, :func:`csv_rows`; ``picture``: what samples_by_solver.png
    shows, :func:`cell_previews`; ``limits``: the limit rows' labels; ``ratio_rows``: table2_ratio.csv's lines,
    :func:`ratio_lines`, empty without a limit row)."""
    sweep_dir = Path(sweep_dir)
    metrics = check_metrics(metrics)
    cells, skipped = gather(sweep_dir)  # only good cells; the others named in one warning (module docstring)
    nfes, rows = build_rows(cells)
    data, _ = load_cell_data(rows)
    pool_rows(rows, data, level)  # training replicates: the mean, the pooled interval, the training spread
    marks = {m: column_marks(rows, nfes, m, data, level, source) for m in CSV_METRICS}
    out = Path(out_dir) if out_dir else sweep_dir
    about = describe(cells)
    md_parts, tex_parts = [], []
    for m in metrics:
        title = f"{METRICS[m]} ({about})"
        note = legend(rows, nfes, m, marks[m], level, source, data, skipped)
        md_parts.append(f"**{title}**\n\n{markdown_table(rows, nfes, m, marks[m], level)}\n\n{note}")
        plain_note = note.replace("**", "").replace("*", "")  # a LaTeX comment: no markdown emphasis
        tex_parts.append(latex_table(rows, nfes, m, f"{title}. {plain_note}", marks[m], level))
        if pooled_rows(rows):  # the spread over the training seeds, under the table it belongs to
            what = f"Training spread of {METRICS[m]}: min – max (sd) of the replicate values of each trained row (k=N)"
            md_parts.append(f"{what}:\n\n{spread_table(rows, nfes, m)}")
            tex_parts.append(f"% {what}\n{spread_table(rows, nfes, m, tex=True)}")
    markdown = "\n\n".join(md_parts) + "\n"
    paths = {
        "markdown": atomic_write_text(out / "table2.md", markdown),
        "latex": atomic_write_text(out / "table2.tex", "\n\n".join(tex_parts) + "\n"),
    }
    lines = csv_rows(rows, nfes, marks, level)
    paths["csv"] = atomic_write_text(out / "table2.csv", csv_table(rows, nfes, lines=lines))
    ratio_paths, ratio = write_ratio_view(out, rows, nfes, metrics, data, level, source, about, cells, sweep_dir)
    paths.update(ratio_paths)
    limits = limit_rows(rows)
    for m in metrics:
        series = {label: {n: _value(c, m) for n, c in cells_.items()} for label, cells_ in rows.items() if label not in limits}
        errors = {label: {n: h for n, c in cells_.items() if (h := _error_bar(c, m, level)) is not None}
                  for label, cells_ in rows.items() if label not in limits}
        bound = {label: v for label in limits if (v := _value(rows[label][nfes[0]], m)) is not None}  # a dashed line
        paths[f"{m}_plot"] = metric_vs_nfe_png(series, out / f"{m}_vs_nfe.png", METRICS[m],
                                               title=f"{METRICS[m]} vs NFE ({sweep_dir.name})", errors=errors,
                                               error_label=f"{100 * level:g}% interval over seeds"
                                               + (" (k>1: training and evaluation seeds, wider side)" if pooled_rows(rows) else ""),
                                               limits=bound)
    picture = cell_previews(rows, nfes)
    seeds = f"seeds {_seeds_text(picture['seeds'])}, row by row" if picture["seeds"] else "no previews"
    paths["samples_by_solver"] = samples_by_solver_png(
        picture["labels"], picture["nfes"], picture["images"], out / PICTURE_FILE, picture["notes"],
        title=f"Samples by solver and NFE ({seeds}; {sweep_dir.name})")
    return {"markdown": markdown, "paths": paths, "rows": rows, "nfes": nfes, "cells": cells, "marks": marks,
            "skipped": skipped, "csv_rows": lines, "picture": picture, "limits": limits, "ratio_rows": ratio}
