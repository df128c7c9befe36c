"""Progress bars with an ETA, on a terminal only: the one policy every long loop uses.

A bar (tqdm, on stderr) shows when stderr is a terminal and this is the main process of rank 0;
otherwise nothing is printed (CI, pytest, log files, joblib / multiprocessing workers, the other
ranks of torchrun). ``AMEDLAB_PROGRESS=1`` forces bars on, ``0`` off. A bar only counts: it never
touches the numbers computed or any random stream.
"""
from __future__ import annotations

import multiprocessing
import os
import sys

ENV = "AMEDLAB_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):  # set by torchrun / SLURM before any group is up
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def enabled(stream=None) -> bool:
    """Whether bars show: ``AMEDLAB_PROGRESS`` if set, else ``stream`` (default stderr) is a terminal,
    in the main process (a joblib worker inherits the terminal: parallel cells would garble one
    another's bars), on rank 0."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False
    return tty and multiprocessing.parent_process() is None and _rank() == 0


class _Silent:
    """What :func:`progress` gives without an iterable when bars are off: the bar's calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _width(stream) -> dict:
    """tqdm's size: the terminal's, followed as it changes; 100 x 24 on a pseudo-terminal that reports
    0 x 0 (tqdm would draw nothing there); tqdm's default off a terminal (bars forced on)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return {}
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 100, "nrows": 24}


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
             leave: bool = True):
    """``iterable`` with a one-line bar (count, rate, elapsed < ETA) while it is consumed, or
    ``iterable`` itself when bars are off. Without an iterable: a bar to ``update(n)`` by hand, used as
    a context manager (a silent stand-in when off). ``leave=False`` for inner loops."""
    if not enabled():
        return _Silent() if iterable is None else iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, smoothing=0.1,
                **_width(sys.stderr))


__all__ = ["ENV", "enabled", "progress"]
