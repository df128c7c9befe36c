"""``stage=compare_cells sweep_dir=... compare_cells.rows=[A,B]``: is row A better than row B, at each NFE?

The paired difference A - B of each metric at every NFE with its interval (``table.significance``),
printed and written as ``compare_<A>_vs_<B>.md`` and ``.json`` next to the table. The library part
is :mod:`amedlab.evaluation.compare_cells`.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.compare_cells import compare_rows, output_stem, to_markdown
from ..evaluation.table import METRICS, significance_settings
from ..io import atomic_write_json, atomic_write_text


def run(cfg):
    if cfg.get("sweep_dir") in (None, ""):
        raise ValueError("stage=compare_cells needs sweep_dir=<a sweep directory> (e.g. sweep_dir=outputs/table2_digits)")
    sweep = Path(str(cfg.sweep_dir))
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep_dir={str(sweep)!r}: no such directory")
    ccfg = cfg.get("compare_cells") or {}
    rows = list(ccfg.get("rows") or [])
    if len(rows) != 2:
        raise ValueError(f"compare_cells.rows={rows!r}; accepted: two rows, by label or solver name, "
                         "e.g. compare_cells.rows=[ipndm,amed_plugin]")
    metrics = [str(m) for m in (ccfg.get("metrics") or ["fid", "rmse"])]
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"compare_cells.metrics contains {m!r}; accepted: {', '.join(METRICS)}")
    level, source = significance_settings(cfg.get("table") or {})
    result = compare_rows(sweep, rows[0], rows[1], metrics, level, source)
    md = to_markdown(result)
    out = Path(str(ccfg.get("out_dir") or sweep))
    stem = output_stem(result)
    paths = [atomic_write_text(out / f"{stem}.md", md), atomic_write_json(out / f"{stem}.json", result)]
    print(md)
    print("written:\n" + "\n".join(f"  {p}" for p in paths))
    return result
