"""``stage=table sweep_dir=...``: Table 2 (markdown, LaTeX, CSV) and the metric-vs-NFE plots from a sweep.

Written into ``table.out_dir`` (default: the sweep directory); the main table is printed. The
library part is :mod:`amedlab.evaluation.table` (what each file holds is described there).
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.table import _value, significance_settings, write_tables
from ..io import plain
from ..wandb_logger import make_logger
from ..specs import check_stage


def run(cfg):
    check_stage(cfg, "table")  # every key, the sweep directory and the output directory (amedlab.specs)
    tcfg = cfg.get("table") or {}
    level, source = significance_settings(plain(tcfg))
    result = write_tables(cfg.sweep_dir, tcfg.get("out_dir"), list(tcfg.get("metrics") or ["fid", "rmse"]), level, source)
    rows, nfes = result["rows"], result["nfes"]
    main = list(tcfg.get("metrics") or ["fid"])[0]
    sweep_name = Path(str(cfg.sweep_dir)).resolve().name
    out_dir = Path(tcfg.get("out_dir") or cfg.sweep_dir)
    with make_logger(plain(cfg.get("logger") or {}), f"table-{sweep_name}", sweep_name, "table", out_dir) as logger:
        columns = ["solver"] + [f"NFE {n}" for n in nfes]
        for m in tcfg.get("metrics") or ["fid"]:
            logger.log_table(f"table2/{m}", columns, [[label] + [_value(cells.get(n), m) for n in nfes]
                                                      for label, cells in rows.items()])
            logger.log_image(f"table2/{m}_vs_nfe", result["paths"].get(f"{m}_plot"))
    print(result["markdown"])
    print("written:\n" + "\n".join(f"  {kind}: {p}" for kind, p in result["paths"].items()))
    best = [v for r in rows.values() for n in nfes if (v := _value(r.get(n), main)) is not None]
    return min(best) if best else None
