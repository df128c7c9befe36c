"""Everything the caches share: content keys, files that verify their content, locks, file digests.

Keys: :func:`digest` hashes the canonical JSON of a spec (everything that determines an entry);
:func:`seeds_spec` names a list of seeds in it. Every cache blob (teacher trajectories, real-data statistics, high-NFE references, AMED predictors)
is a ``torch.save`` dict written atomically with a ``digest``: sha256 over every other entry
(tensors by dtype, shape and bytes; everything else as canonical JSON). Loading recomputes it, so
flipped bytes anywhere in the payload are detected; the caller logs it, removes the file and
rebuilds the entry. Files are read with ``weights_only=True``: a cache never runs code.

:func:`locked` makes concurrent processes (a parallel launcher's cells) compute an entry once.
``file_digest`` hashes a user's file (or a folder, file by file) by content; the hash is memoised
by (path, size, mtime, ctime, inode) so a large checkpoint is read once, not once per cell.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import re
import time
import warnings
from pathlib import Path

import torch

from .io import atomic_write_bytes, plain

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# content keys and locks
# ------------------------------------------------------------------------------------------------

def digest(obj) -> str:
    """sha256 (24 hex digits) of the canonical JSON of ``obj`` (config nodes as plain values)."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:24]


def seeds_spec(seeds, list_prefix: str = "list:") -> str:
    """``"0-1999"`` for a contiguous range, else ``list_prefix`` + a hash of the list."""
    seeds = list(seeds)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return list_prefix + hashlib.sha256(str(seeds).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path, wait: bool = True):
    """An exclusive lock on ``<path>.lock``; waits while another process holds it, or with
    ``wait=False`` yields False at once instead (and True when the lock was taken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def seal(record: dict) -> dict:
    """``record`` as plain JSON values plus ``"digest"``: :func:`digest` of everything else. A result
    file (a cell's ``metrics.json``) is written sealed, so an edit or damage is detected on reading."""
    body = plain({k: v for k, v in record.items() if k != "digest"})
    return {**body, "digest": digest(body)}


def seal_problem(record) -> str | None:
    """Why ``record`` (read back from JSON) is not a sealed result, or None if its digest matches."""
    if not isinstance(record, dict):
        return f"not a JSON object (a {type(record).__name__})"
    if "digest" not in record:
        return "it has no digest (written by another program or an older version)"
    if record["digest"] != digest({k: v for k, v in record.items() if k != "digest"}):
        return "its content does not match its digest (edited or damaged)"
    return None


# ------------------------------------------------------------------------------------------------
# blobs that verify their content
# ------------------------------------------------------------------------------------------------


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor:{t.dtype}:{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(json.dumps(str(k)).encode() + b":")
            _update(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _update(h, v)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def payload_digest(blob: dict) -> str:
    """sha256 of every entry of ``blob`` but ``digest`` itself."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in blob.items() if k != "digest"})
    return h.hexdigest()


def save_verified(path: str | os.PathLike, blob: dict) -> Path:
    """``torch.save(blob + {"digest"})``, written atomically."""
    buf = io.BytesIO()
    torch.save({**blob, "digest": payload_digest(blob)}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_tensors(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on CPU. A file that needs more than tensors and plain
    values is refused with a ValueError that says so (never with advice to unpickle it anyway)."""
    try:
        with warnings.catch_warnings():  # garbage bytes read as an odd pickle protocol warn before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(f"the file refers to Python code ({found.group(1)}), not only tensors and plain values; "
                             "it is refused and nothing in it was run") from None
        raise ValueError("not a torch file of tensors (unreadable pickle data); nothing in it was run") from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes make the unpickler raise anything (IndexError, struct.error, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"not a readable torch file ({reason})") from None


def verified(blob) -> bool:
    return isinstance(blob, dict) and blob.get("digest") == payload_digest(blob)


def load_verified(path: str | os.PathLike, spec=None, what: str = "cache file") -> dict | None:
    """The blob at ``path`` if it is readable, its digest matches and (if given) it was made for
    ``spec``; otherwise None, with the reason logged and the bad file removed (the caller rebuilds)."""
    path = Path(path)
    if not path.is_file():
        return None
    reason = None
    try:
        blob = read_tensors(path)
        if not verified(blob):
            reason = "its content does not match its digest (corrupted or from an older version)"
        elif spec is not None and blob.get("spec") != json.loads(json.dumps(spec, default=str)):
            reason = "it was made for other settings"
    except ValueError as err:
        reason = str(err)
    if reason is None:
        return blob
    log.warning("%s %s failed verification: %s; removed, regenerating it", what, path, reason)
    path.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------------------------------
# content digests of users' files
# ------------------------------------------------------------------------------------------------

_MEMO: dict[tuple, str] = {}


def sha256_file(path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_digest(path: Path, memo_dir: Path | None) -> str:
    st = path.stat()
    # ctime and inode too: ``cp -p`` or a restore keeps size and mtime, but no user can set ctime
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _MEMO:
        return _MEMO[key]
    memo = None if memo_dir is None else Path(memo_dir) / (hashlib.sha256(key[0].encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(memo.read_text()) if memo is not None else {}
        if [saved["path"], saved["size"], saved["mtime_ns"], saved.get("ctime_ns"), saved.get("inode")] == list(key):
            _MEMO[key] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = sha256_file(path)
    _MEMO[key] = value
    if memo is None:
        return value
    try:
        from .io import atomic_write_json

        atomic_write_json(memo, {"path": key[0], "size": key[1], "mtime_ns": key[2], "ctime_ns": key[3], "inode": key[4],
                                 "sha256": value})
    except OSError:  # a read-only cache only costs the re-hash
        pass
    return value


def file_digest(path: str | os.PathLike | None, memo_dir: str | os.PathLike | None = None) -> str | None:
    """sha256 of a file's content, or of a folder's files (relative names and contents); None for None.
    ``memo_dir``: where the (path, size, mtime) -> hash memo is kept across processes."""
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}:{_file_digest(f, memo_dir)};".encode())
        return h.hexdigest()[:24]
    return _file_digest(p, memo_dir)[:24]


def trained_once(path: Path, what: str, from_blob, train, use_cache: bool = True, new_source: str = "trained", *,
                 settings):
    """(object, info): a trained object (an AMED predictor, a learned solver) cached at ``path``.

    ``settings``: what the object is trained for, the dict whose :func:`digest` is the key in
    ``path``'s name. Under the lock of ``path``: a blob there is used (``use_cache``) only if its digest
    matches (:func:`load_verified`) and its ``spec`` entry holds the same settings: a blob trained for
    other settings (copied or renamed onto this key) or recording none (an older version, a user's
    file) is logged with the file and the first differing setting, removed and trained again. Then
    ``from_blob(blob, path)``. Else ``train()`` -> (object, sidecar dict) (a training that diverges
    raises there, so nothing is written), stored with ``object.save(path, spec=settings,
    records=...)`` and the sidecar written atomically.

    The JSON sidecar (``<path>.json``) is a readable copy: the blob holds the settings, metadata and
    records too, so a damaged or missing sidecar is logged and rewritten from the blob, never a reason
    to retrain. ``info``: source ("cache" or ``new_source``), path, the per-update records and the
    training's wall seconds (0 from the cache).
    """
    from .io import atomic_write_json

    path = Path(path)
    sidecar = path.with_suffix(".json")
    expected = json.loads(json.dumps(plain(settings), default=str))  # as stored (and compared by load_verified)

    def first_difference(found, want, where=""):
        """(setting, found, wanted) of the first difference (keys in sorted order), or None."""
        if isinstance(found, dict) and isinstance(want, dict):
            for k in sorted(set(found) | set(want), key=str):
                sub = f"{where}.{k}" if where else str(k)
                if k not in found or k not in want:
                    return sub, found.get(k, "<absent>"), want.get(k, "<absent>")
                diff = first_difference(found[k], want[k], sub)
                if diff:
                    return diff
            return None
        if isinstance(found, list) and isinstance(want, list) and len(found) == len(want):
            for i, (a, b) in enumerate(zip(found, want)):
                diff = first_difference(a, b, f"{where}[{i}]")
                if diff:
                    return diff
            return None
        same = json.dumps(found, sort_keys=True, default=str) == json.dumps(want, sort_keys=True, default=str)
        return None if same else (where or "settings", found, want)

    def read_sidecar():
        """(records or None, why the sidecar must be rewritten or None)."""
        try:
            side = json.loads(sidecar.read_text())
        except FileNotFoundError:
            return None, "missing"
        except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
            return None, f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if not isinstance(side, dict):
            return None, f"not a JSON object (a {type(side).__name__})"
        records = side.get("records", [])
        return (records if isinstance(records, list) else None), None

    with locked(path):
        # used only if its digest matches (a corrupt one is logged, removed and trained again) ...
        blob = load_verified(path, what=what) if use_cache else None
        if blob is not None:  # ... and it was trained for these settings
            if "spec" not in blob:
                reason = "records no settings (written by an older version or outside the cache)"
            else:
                diff = first_difference(blob["spec"], expected)
                reason = None if diff is None else \
                    f"was trained for other settings: {diff[0]}={diff[1]!r} in the file, {diff[2]!r} expected"
            if reason is not None:
                log.warning("%s %s %s; removed, training it again", what, path, reason)
                path.unlink(missing_ok=True)
                blob = None
        if blob is not None:
            obj = from_blob(blob, path)
            side_records, side_problem = read_sidecar()
            if "records" in blob:
                records = blob["records"]
            else:  # written before the blob held its records: from the sidecar, into the blob from now on
                records = side_records if side_records is not None else []
                save_verified(path, {**{k: v for k, v in blob.items() if k != "digest"}, "records": records})
            if side_problem is not None:
                (log.info if side_problem == "missing" else log.warning)(
                    "%s sidecar %s is %s; rewritten from %s", what, sidecar, side_problem, path.name)
                atomic_write_json(sidecar, {"settings": blob["spec"], "meta": blob.get("meta", {}), "records": records})
            return obj, {"source": "cache", "path": str(path), "records": records, "distill_seconds": 0.0}
        t0 = time.perf_counter()
        obj, side = train()
        seconds = time.perf_counter() - t0
        records = side.get("records", [])
        obj.save(path, spec=expected, records=plain(records))
        atomic_write_json(sidecar, side)
    return obj, {"source": new_source, "path": str(path), "records": records, "distill_seconds": seconds}


# ------------------------------------------------------------------------------------------------
# the cache folder as a whole (stage=cache)
# ------------------------------------------------------------------------------------------------

def cache_kinds(root: str | os.PathLike) -> list[dict]:
    """One row per kind of entry under ``root`` (its top-level folders: ``ode_references``,
    ``real_stats``, ``predictors``, ``learned``, ``trajectories``, ``file_digests`` ...): the number of
    files and their bytes. Lock and probe files are not entries."""
    rows = []
    root = Path(root)
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file() and not f.name.endswith(".lock")
                 and not f.name.startswith(".write-probe-")]
        rows.append({"kind": folder.name, "entries": len(files), "bytes": sum(f.stat().st_size for f in files)})
    return rows


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover -- the loop returns at GiB


def clear_cache(root: str | os.PathLike, kind: str) -> list[dict]:
    """Remove the kind ``kind`` (a folder of :func:`cache_kinds`), or every kind (``all``); the rows
    removed. Every entry is rebuilt on demand, so clearing loses time, never results."""
    import shutil

    rows = cache_kinds(root)
    gone = [r for r in rows if kind in ("all", r["kind"])]
    for r in gone:
        shutil.rmtree(Path(root) / r["kind"])
    return gone
