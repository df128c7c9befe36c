"""``stage=table sweep_dir=...``: the paper's Table 2 from a sweep's ``metrics.json`` files.

Writes, into ``table.out_dir`` (default: the sweep directory):
- ``table2.md``: one markdown table per metric in ``table.metrics`` (rows: solvers in the paper's
  order; columns: NFE; the best value of each column in bold);
- ``table2.tex``: the same as LaTeX tabulars (booktabs; best in ``\\textbf``);
- ``table2.csv``: one line per cell with every metric, and ``best_<metric>`` flags;
- ``<metric>_vs_nfe.png``: one line per solver, log-scale y (``fid_vs_nfe.png`` is the main plot);
and prints the main table and the paths. Missing cells (not run, or still running) show as n/a.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import OrderedDict
from pathlib import Path

from ..io import atomic_write_text
from .evaluate import METRICS_FILE
from .plots import metric_vs_nfe_png
from .wandb_logger import make_logger

log = logging.getLogger(__name__)

#: rows in the paper's order (Table 2); other solvers follow alphabetically
SOLVER_ORDER = ("euler", "heun", "midpoint", "dpm2", "dpmpp2m", "dpmpp3m", "dpmpp", "unipc", "ipndm", "amed", "amed_plugin")
METRICS = {"fid": "FID", "kid_mean": "KID", "rmse": "RMSE vs high-NFE solution"}
#: overrides that do not make a different row (they name the cell, the sweep or how it ran)
NEUTRAL_KEYS = ("nfe", "solver", "experiments", "stage", "sweep_dir", "seed")
NEUTRAL_PREFIXES = ("logger", "hydra", "eval.batch_size", "eval.num_threads", "eval.cache_dir", "distill.cache_dir",
                    "model.path", "eval.skip_finished", "eval.sample_grid", "eval.save_samples", "device")


def collect(sweep_dir) -> list[dict]:
    """Every complete metrics.json under ``sweep_dir`` (a half-written or foreign file is ignored)."""
    cells = []
    for path in sorted(Path(sweep_dir).rglob(METRICS_FILE)):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", path)
            continue
        if m.get("complete") is True and "nfe" in m and "label" in m:
            m["_path"], m["_mtime"] = str(path), path.stat().st_mtime
            cells.append(m)
    return cells


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


def build_rows(cells: list[dict]) -> tuple[list[int], "OrderedDict[str, dict[int, dict]]"]:
    """(sorted NFEs, {row label: {nfe: cell}}), rows in the paper's order; the newest cell wins a tie.

    A row is a solver plus the overrides that differ between cells (e.g. a swept schedule.rho)."""
    common = set(common_overrides(cells))
    keyed = {}
    for m in cells:
        extra = ", ".join(o for o in _distinguishing(m.get("overrides")) if o not in common)
        label = m["label"] + (f" [{extra}]" if extra else "")
        order = SOLVER_ORDER.index(m["solver"]) if m.get("solver") in SOLVER_ORDER else len(SOLVER_ORDER)
        slot = keyed.setdefault(label, {"order": (order, m.get("solver", ""), label), "cells": {}})
        nfe = int(m["nfe"])
        old = slot["cells"].get(nfe)
        if old is not None:
            log.warning("two cells for %s NFE %d: %s and %s; the newer is used", label, nfe, old["_path"], m["_path"])
        if old is None or m["_mtime"] >= old["_mtime"]:
            slot["cells"][nfe] = m
    rows = OrderedDict((label, slot["cells"]) for label, slot in sorted(keyed.items(), key=lambda kv: kv[1]["order"]))
    nfes = sorted({n for r in rows.values() for n in r})
    return nfes, rows


def _value(cell: dict | None, metric: str):
    v = None if cell is None else cell.get(metric)
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def best_per_column(rows, nfes, metric: str) -> dict[int, float | None]:
    """The lowest value of ``metric`` at each NFE (lower is better for FID, KID and RMSE)."""
    return {n: min((v for r in rows.values() if (v := _value(r.get(n), metric)) is not None), default=None) for n in nfes}


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def markdown_table(rows, nfes, metric: str) -> str:
    best = best_per_column(rows, nfes, metric)
    lines = ["| NFE | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for label, cells in rows.items():
        out = []
        for n in nfes:
            v = _value(cells.get(n), metric)
            out.append(f"**{fmt(v)}**" if v is not None and v == best[n] else fmt(v))
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
               "{": r"\{", "}": r"\}"}
    return "".join(special.get(ch, ch) for ch in s)


def latex_table(rows, nfes, metric: str, caption: str) -> str:
    best = best_per_column(rows, nfes, metric)
    lines = [f"% {caption}", "% needs \\usepackage{booktabs}", "\\begin{tabular}{l" + "c" * len(nfes) + "}", "\\toprule",
             "NFE & " + " & ".join(str(n) for n in nfes) + r" \\", "\\midrule"]
    for label, cells in rows.items():
        out = []
        for n in nfes:
            v = _value(cells.get(n), metric)
            text = "--" if v is None else fmt(v)
            out.append(f"\\textbf{{{text}}}" if v is not None and v == best[n] else text)
        lines.append(_tex_escape(label) + " & " + " & ".join(out) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


CSV_FIELDS = ("solver", "label", "nfe", "fid", "kid_mean", "kid_std", "rmse", "num_samples", "feature_extractor",
              "schedule", "rho", "best_fid", "best_kid_mean", "best_rmse", "metrics_file")


def csv_table(rows, nfes) -> str:
    best = {m: best_per_column(rows, nfes, m) for m in ("fid", "kid_mean", "rmse")}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for label, cells in rows.items():
        for n in nfes:
            c = cells.get(n)
            if c is None:
                continue
            sched = c.get("schedule") or {}
            w.writerow({
                "solver": c.get("solver"), "label": label, "nfe": n, "fid": c.get("fid"), "kid_mean": c.get("kid_mean"),
                "kid_std": c.get("kid_std"), "rmse": c.get("rmse"), "num_samples": c.get("num_samples"),
                "feature_extractor": c.get("feature_extractor"), "schedule": sched.get("kind"), "rho": sched.get("rho"),
                **{f"best_{m}": int(_value(c, m) is not None and _value(c, m) == best[m][n]) for m in best},
                "metrics_file": c.get("_path"),
            })
    return buf.getvalue()


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


def write_tables(sweep_dir, out_dir=None, metrics=("fid", "rmse")) -> dict:
    """Collect, format and write everything; returns {"markdown", "paths", "rows", "nfes", "cells"}."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep_dir={str(sweep_dir)!r}: no such directory")
    metrics = [str(m) for m in metrics]
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"table.metrics contains {m!r}; accepted: {', '.join(METRICS)}")
    cells = collect(sweep_dir)
    if not cells:
        raise ValueError(f"sweep_dir={str(sweep_dir)!r} holds no complete {METRICS_FILE}; run the sweep first "
                         "(e.g. python -m amedlab -m experiments=table2_digits)")
    nfes, rows = build_rows(cells)
    out = Path(out_dir) if out_dir else sweep_dir
    about = describe(cells)
    md_parts, tex_parts = [], []
    for m in metrics:
        title = f"{METRICS[m]} ({about}); best per column in bold"
        md_parts.append(f"**{title}**\n\n{markdown_table(rows, nfes, m)}")
        tex_parts.append(latex_table(rows, nfes, m, title))
    markdown = "\n\n".join(md_parts) + "\n"
    paths = {
        "markdown": atomic_write_text(out / "table2.md", markdown),
        "latex": atomic_write_text(out / "table2.tex", "\n\n".join(tex_parts) + "\n"),
        "csv": atomic_write_text(out / "table2.csv", csv_table(rows, nfes)),
    }
    for m in metrics:
        series = {label: {n: _value(c, m) for n, c in cells_.items()} for label, cells_ in rows.items()}
        paths[f"{m}_plot"] = metric_vs_nfe_png(series, out / f"{m}_vs_nfe.png", METRICS[m],
                                               title=f"{METRICS[m]} vs NFE ({sweep_dir.name})")
    return {"markdown": markdown, "paths": paths, "rows": rows, "nfes": nfes, "cells": cells}


def run(cfg):
    from ..validation import check_stage

    check_stage(cfg, "table")
    if cfg.get("sweep_dir") in (None, ""):
        raise ValueError("stage=table needs sweep_dir=<a sweep directory> (e.g. sweep_dir=outputs/table2_digits)")
    tcfg = cfg.get("table") or {}
    result = write_tables(cfg.sweep_dir, tcfg.get("out_dir"), list(tcfg.get("metrics") or ["fid", "rmse"]))
    rows, nfes = result["rows"], result["nfes"]
    main = list(tcfg.get("metrics") or ["fid"])[0]
    sweep_name = Path(str(cfg.sweep_dir)).resolve().name
    out_dir = Path(tcfg.get("out_dir") or cfg.sweep_dir)
    with make_logger(cfg.get("logger"), f"table-{sweep_name}", sweep_name, "table", out_dir) as logger:
        columns = ["solver"] + [f"NFE {n}" for n in nfes]
        for m in tcfg.get("metrics") or ["fid"]:
            logger.log_table(f"table2/{m}", columns, [[label] + [_value(cells.get(n), m) for n in nfes]
                                                      for label, cells in rows.items()])
            logger.log_image(f"table2/{m}_vs_nfe", result["paths"].get(f"{m}_plot"))
    print(result["markdown"])
    print("written:\n" + "\n".join(f"  {kind}: {p}" for kind, p in result["paths"].items()))
    best = [v for r in rows.values() for n in nfes if (v := _value(r.get(n), main)) is not None]
    return min(best) if best else None
