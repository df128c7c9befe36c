"""``stage=compare_cells sweep_dir=... compare_cells.rows=[A,B]``: is row A better than row B, at each NFE?

The paired difference A - B of each metric at every NFE with its interval (``table.significance``),
printed and written as ``compare_<A>_vs_<B>.md`` and ``.json`` next to the table. The library part
is :mod:`amedlab.evaluation.compare_cells`. Every input is checked first
(:func:`amedlab.specs.check_compare_cells`); the sweep's files are read as stage=table reads them. A
trained row evaluated at several ``seed`` (training replicates) is compared as the table pools it: the
means, the interval pooled over training and evaluation seeds, and whether every replicate pair agrees.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.compare_cells import compare_rows, output_stem, to_markdown
from ..evaluation.table import significance_settings
from ..io import atomic_write_json, atomic_write_text, plain
from ..specs import check_stage


def run(cfg):
    check_stage(cfg, "compare_cells")
    sweep = Path(str(cfg.sweep_dir))
    ccfg = cfg.compare_cells
    rows = [str(r) for r in ccfg.rows]
    metrics = [str(m) for m in ccfg.metrics]
    level, source = significance_settings(plain(cfg.get("table") or {}))
    result = compare_rows(sweep, rows[0], rows[1], metrics, level, source)
    md = to_markdown(result)
    out = Path(str(ccfg.get("out_dir") or sweep))
    stem = output_stem(result)
    paths = [atomic_write_text(out / f"{stem}.md", md), atomic_write_json(out / f"{stem}.json", result)]
    print(md)
    print("written:\n" + "\n".join(f"  {p}" for p in paths))
    return result
