"""Files are written atomically: a reader never sees a half-written file that looks complete.
Config nodes become plain values (:func:`plain`) before they are written or hashed."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _to_builtin(obj):
    from omegaconf import OmegaConf

    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def plain(obj):
    """Builtins only (config nodes, tuples and paths become dicts, lists and strings)."""
    return json.loads(json.dumps(obj, default=_to_builtin))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            from .errors import DiskFullError

            raise DiskFullError(f"no space left on the device writing {path} ({len(data)} bytes); nothing was written "
                                "there: free space, or move hydra.run.dir / cache_dir (AMEDLAB_CACHE) elsewhere") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def run_dir(outside_hydra: str | os.PathLike | None = None) -> Path:
    """The Hydra run directory; outside Hydra (tests, the Python API) ``outside_hydra`` (created),
    else the current directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        if outside_hydra is None:
            return Path.cwd()
        path = Path(outside_hydra)
        path.mkdir(parents=True, exist_ok=True)
        return path
