"""``stage=table sweep_dir=...``: Table 2 (markdown, LaTeX, CSV), the metric-vs-NFE plots and the
samples by solver and NFE (``samples_by_solver.png``) from a sweep.

Written into ``table.out_dir`` (default: the sweep directory); the main table is printed. The
library part is :mod:`amedlab.evaluation.table` (what each file holds is described there; a trained row
evaluated at several ``seed`` is one row, pooled over its training replicates). With
``logger=wandb`` the run (the sweep's wandb group) gets every table with its intervals (``table2/<metric>``:
per row, each NFE's value and interval; ``table2/cells``: table2.csv's lines), the ratio view of a sweep
with a limit cell (``table2_ratio/<metric>``: per row, each NFE's ratio to the limit and its interval;
``table2_ratio/cells``: table2_ratio.csv's lines) and the pictures as images.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.table import (CSV_FIELDS, RATIO_FIELDS, _value, bounds, check_metrics, is_limit, significance_settings,
                                write_tables)
from ..io import plain
from ..wandb_logger import make_logger
from ..specs import check_stage


def interval_table(rows, nfes, metric: str, level: float) -> tuple[list[str], list[list]]:
    """(columns, rows) of one metric for wandb: per row label, each NFE's value and the low and high
    ends of its interval (None where the cell or its interval is missing), as the markdown's ``±``."""
    columns = ["solver"] + [f"NFE {n}{end}" for n in nfes for end in ("", " lo", " hi")]
    data = [[label] + [x for n in nfes for x in (_value(cells.get(n), metric), *bounds(cells.get(n), metric, level))]
            for label, cells in rows.items()]
    return columns, data


def ratio_table(ratio_rows: list[dict], nfes, metric: str) -> tuple[list[str], list[list]]:
    """(columns, rows) of one metric's ratio view for wandb, as :func:`interval_table`: per row label
    (and limit row), each NFE's ratio to the limit and the ends of its paired interval."""
    columns = ["solver", "limit"] + [f"NFE {n}{end}" for n in nfes for end in ("", " lo", " hi")]
    got = {(r["label"], r["limit_label"], r["nfe"]): r for r in ratio_rows if r["metric"] == metric}
    data = []
    for label, lim in dict.fromkeys((label, lim) for label, lim, _ in got):
        line = [label, lim]
        for n in nfes:
            r = got.get((label, lim, n)) or {}
            line += [r.get("ratio"), r.get("ratio_lo"), r.get("ratio_hi")]
        data.append(line)
    return columns, data


def run(cfg):
    check_stage(cfg, "table")  # every key, the sweep directory and the output directory (amedlab.specs)
    tcfg = cfg.get("table") or {}
    level, source = significance_settings(plain(tcfg))
    metrics = check_metrics(list(tcfg.get("metrics") or ["fid", "rmse"]))
    result = write_tables(cfg.sweep_dir, tcfg.get("out_dir"), metrics, level, source)
    rows, nfes, paths = result["rows"], result["nfes"], result["paths"]
    main = metrics[0]
    sweep_name = Path(str(cfg.sweep_dir)).resolve().name
    out_dir = Path(tcfg.get("out_dir") or cfg.sweep_dir)
    with make_logger(plain(cfg.get("logger") or {}), f"table-{sweep_name}", sweep_name, "table", out_dir) as logger:
        for m in metrics:
            logger.log_table(f"table2/{m}", *interval_table(rows, nfes, m, level))
            logger.log_image(f"table2/{m}_vs_nfe", paths.get(f"{m}_plot"))
        # every metric with its interval, the marks and the paired differences: table2.csv's lines
        logger.log_table("table2/cells", list(CSV_FIELDS), [[r[f] for f in CSV_FIELDS] for r in result["csv_rows"]])
        for m in dict.fromkeys(r["metric"] for r in result["ratio_rows"]):  # a sweep with a limit cell
            logger.log_table(f"table2_ratio/{m}", *ratio_table(result["ratio_rows"], nfes, m))
        if result["ratio_rows"]:
            logger.log_table("table2_ratio/cells", list(RATIO_FIELDS), [[r[f] for f in RATIO_FIELDS] for r in result["ratio_rows"]])
        seeds = result["picture"]["seeds"]
        logger.log_image("table2/samples_by_solver", paths.get("samples_by_solver"),
                         caption=f"rows: solvers, columns: NFE; seeds {seeds}" if seeds else "no previews")
    print(result["markdown"])
    print("written:\n" + "\n".join(f"  {kind}: {p}" for kind, p in paths.items()))
    best = [v for r in rows.values() for n in nfes if not is_limit(r.get(n)) and (v := _value(r.get(n), main)) is not None]
    return min(best) if best else None
