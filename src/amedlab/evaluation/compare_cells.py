"""Is row A of a sweep better than row B, at each NFE? The library of ``stage=compare_cells sweep_dir=...
compare_cells.rows=[A,B]`` (:mod:`amedlab.stages.compare_cells`).

Two rows of a sweep's table (by label, e.g. ``"AMED-Plugin (on iPNDM)"``, or by solver name when it
names one row, e.g. ``amed_plugin``) are compared cell by cell: the paired difference A - B of each
metric at every NFE, with its interval (``table.significance``: level and source), from the
per-sample data the cells stored (:mod:`.uncertainty`; same seeds, so the comparison is paired).
The stage prints a table per metric and writes ``compare_<A>_vs_<B>.md`` and ``.json`` next to the table.

The sweep is read as the table reads it (:func:`.table.gather`, policy in :mod:`.table`): only
complete, sealed, verifying cells of the current format are compared, every other ``metrics.json``
is named in one warning, and two cells of one row label and NFE with other settings are an error
naming ``solver.label``.

Training replicates (a trained row evaluated at several ``seed``, pooled by the table): a row is
compared as the table shows it. ``a``, ``b`` and ``diff`` are of the means over the replicates;
``lo``/``hi`` and ``significant`` are **pooled** over training and evaluation seeds
(:func:`.uncertainty.pooled_diff`: each replicate pair's paired replicates centred on its own
difference, the pairs with equal weight): "is A lower than B, retraining included". ``every_pair``
adds the table's bold rule: whether every replicate pair's paired interval excludes 0 on the same
side (its ``lo``/``hi``: the extreme ends over the pairs). Two single cells are compared as before.
"""
from __future__ import annotations

import re

from . import uncertainty as U
from ..errors import ConfigError
from .table import METRICS, _value, build_rows, check_metrics, fmt, gather, load_cell_data, num_replicates, skipped_note


def _choices(cell: dict) -> set[str]:
    """The solver config a cell was run with (its ``solver=...`` override, e.g. ``amed_plugin_vs``)."""
    return {o.split("=", 1)[1] for o in cell.get("overrides") or [] if o.startswith("solver=")}


def pick_row(rows, name: str) -> str:
    """The row label that ``name`` means: an exact label, else the only row of that solver config
    (``amed_plugin_vs``), else the only row of that solver kind (``amed_plugin``)."""
    if name in rows:
        return name
    for names in (_choices, lambda c: {str(c.get("solver"))}):
        matches = [label for label, cells in rows.items() if any(name in names(c) for c in cells.values())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConfigError(f"compare_cells.rows: {name!r} names {len(matches)} rows ({'; '.join(matches)}); "
                              "give the full label", "compare_cells.rows")
    available = "; ".join(f"{label!r} ({', '.join(sorted(set().union(*(_choices(c) | {str(c.get('solver'))} for c in cells.values()))))})"
                          for label, cells in rows.items())
    raise ConfigError(f"compare_cells.rows: no row {name!r} in this sweep; accepted: a row label, or a solver (config) "
                      f"name that names one row, of these rows (solver configs): {available}", "compare_cells.rows")


def compare_rows(sweep_dir, row_a: str, row_b: str, metrics=("fid", "rmse"), level: float = 0.95,
                 source: str = "samples") -> dict:
    """{"a", "b", "nfes", "metrics": {metric: [{"nfe", "a", "b", "diff", "lo", "hi", "significant", "why"}]}}."""
    metrics = check_metrics(metrics, "compare_cells.metrics")
    cells, skipped = gather(sweep_dir)
    nfes, rows = build_rows(cells)
    a, b = pick_row(rows, str(row_a)), pick_row(rows, str(row_b))
    if a == b:
        raise ConfigError(f"compare_cells.rows={[str(row_a), str(row_b)]!r}: both name the row {a!r}; accepted: two "
                          f"different rows, of: {'; '.join(map(repr, rows))}", "compare_cells.rows")
    data, why_none = load_cell_data({a: rows[a], b: rows[b]})
    out = {"a": a, "b": b, "level": level, "source": source, "sweep_dir": str(sweep_dir), "nfes": [], "metrics": {},
           "skipped": [{"path": p, "kind": k, "reason": r} for p, k, r in skipped]}
    common = [n for n in nfes if n in rows[a] and n in rows[b]]
    out["nfes"] = common
    for m in metrics:
        lines = []
        for n in common:
            ca, cb = rows[a][n], rows[b][n]
            line = {"nfe": n, "a": _value(ca, m), "b": _value(cb, m), "diff": None, "lo": None, "hi": None,
                    "significant": None, "why": None}
            da, db = data.get((a, n)), data.get((b, n))
            if num_replicates(ca) * num_replicates(cb) > 1:  # training replicates: k of each row
                line["replicates"] = [num_replicates(ca), num_replicates(cb)]
            if da is None or db is None:
                line["why"] = why_none.get((a, n)) or why_none.get((b, n))
            else:
                d, reason = U.pooled_diff(da, db, m, level, source)  # two single cells: paired_diff, as before
                if d is None:
                    line["why"] = reason
                else:
                    line.update(diff=d["diff"], lo=d["lo"], hi=d["hi"], se=d.get("se"), significant=d["significant"],
                                method=d["method"] + (f", {d['source']}" if "source" in d else ""))
                    if m == "kid_mean":  # the replicates are of the full-sample KID: show the values they compare
                        line.update(a=_mean_of(x.meta.get("kid_full") for x in da),
                                    b=_mean_of(x.meta.get("kid_full") for x in db))
                    if len(da) * len(db) > 1:  # the table's bold rule: over every replicate pair
                        e, _ = U.replicate_diff(da, db, m, level, source)
                        line["every_pair"] = None if e is None else {"lo": e["lo"], "hi": e["hi"],
                                                                     "significant": e["significant"], "pairs": e["pairs"]}
            lines.append(line)
        out["metrics"][m] = lines
    return out


def _mean_of(values):
    values = list(values)
    return None if not values or any(not isinstance(v, (int, float)) for v in values) else sum(values) / len(values)


def to_markdown(result: dict) -> str:
    a, b, pct = result["a"], result["b"], f"{100 * result['level']:g}%"
    parts = []
    for m, lines in result["metrics"].items():
        paired = "the same seeds" + (" and resampled real set" if result["source"] == "total" and m != "rmse" else "")
        title = f"**{METRICS[m]}: {a} minus {b}** (paired over {paired}; {pct} interval; negative: {a} is lower)"
        rows = ["| NFE | " + a + " | " + b + f" | difference [{pct} interval] | |", "|---|---|---|---|---|"]
        for ln in lines:
            if ln["diff"] is None:
                verdict, diff = f"not comparable: {ln['why']}", "n/a"
            else:
                diff = f"{ln['diff']:+.4g} [{ln['lo']:+.3g}, {ln['hi']:+.3g}]"
                verdict = ((f"{a} lower" if ln["diff"] < 0 else f"{b} lower") if ln["significant"]
                           else "not significant")
            if ln.get("every_pair") is not None and ln["diff"] is not None:
                verdict += "; every replicate pair: " + ("yes" if ln["every_pair"]["significant"] else "no")
            rows.append(f"| {ln['nfe']} | {fmt(ln['a'])} | {fmt(ln['b'])} | {diff} | {verdict} |")
        note = ""
        ks = {tuple(ln.get("replicates") or (1, 1)) for ln in lines}
        if any(max(k) > 1 for k in ks):
            note += (f"\n\nTraining replicates ({a}: k={'/'.join(sorted({str(k[0]) for k in ks}))}, {b}: "
                     f"k={'/'.join(sorted({str(k[1]) for k in ks}))} training seeds): the values are the means over the "
                     "replicates and the interval is pooled over training and evaluation seeds (each replicate pair's "
                     "paired replicates centred on its own difference, the pairs with equal weight; RMSE: the mixture of "
                     "the pairs' delta-method normals). 'every replicate pair' is the table's bold rule: whether every "
                     "pair's own paired interval excludes 0 on the same side.")
        if m == "kid_mean":
            note += ("\n\nKID: the values and the difference are of the full-sample unbiased MMD^2 (kid_full in "
                    "metrics.json), not torch-fidelity's average over random subsets (kid_mean) that the table shows.")
        parts.append(title + "\n\n" + "\n".join(rows) + note)
    skipped = skipped_note([(d["path"], d["kind"], d["reason"]) for d in result.get("skipped") or []])
    if skipped:
        parts.append(skipped)
    return "\n\n".join(parts) + "\n"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "row"


def output_stem(result: dict) -> str:
    """``compare_<A>_vs_<B>``: the file name (without suffix) of a comparison's markdown and JSON."""
    return f"compare_{_slug(result['a'])}_vs_{_slug(result['b'])}"
