"""``stage=cache``: what the one cache folder (``cache_dir``) holds, per kind, with its size;
``cache.clear=<kind>`` or ``cache.clear=all`` empties it. The library part is in :mod:`amedlab.cache`."""
from __future__ import annotations

from ..cache import cache_kinds, clear_cache, human_bytes
from ..specs import check_stage


def _table(rows: list[dict]) -> str:
    lines = [f"  {'kind':<18} {'entries':>8} {'size':>11}"]
    lines += [f"  {r['kind']:<18} {r['entries']:>8} {human_bytes(r['bytes']):>11}" for r in rows]
    total = sum(r["bytes"] for r in rows)
    lines.append(f"  {'total':<18} {sum(r['entries'] for r in rows):>8} {human_bytes(total):>11}")
    return "\n".join(lines)


def run(cfg):
    spec = check_stage(cfg, "cache")
    if spec.clear is not None:
        gone = clear_cache(spec.root, spec.clear)
        print(f"cleared from {spec.root}:\n{_table(gone)}")
        return {"cleared": gone}
    rows = cache_kinds(spec.root)
    print(f"cache_dir: {spec.root}" + ("" if rows else " (empty)"))
    if rows:
        print(_table(rows))
    return {"kinds": rows}
