"""The path checks shared by the model builders: one wording for every path-taking option.

A missing path is "no such file" or "no such folder" (a :class:`MissingFileError`); an existing path
of the other kind is "is a folder, expected a file" or "is a file, expected a folder" (a
:class:`ConfigError`), so that "no such file" is never said of an existing folder, nor the reverse.
Each message names the key, the value and what is accepted.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, MissingFileError


def existing_file(key: str, value, accepted: str) -> Path:
    """``value`` as an existing file, or a named error saying what it is instead."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={str(value)!r} is a folder, expected a file; accepted: {accepted}", key)
    if not path.exists():
        raise MissingFileError(f"{key}={str(value)!r}: no such file; accepted: {accepted}", key)
    if not path.is_file():
        raise ConfigError(f"{key}={str(value)!r} is not a regular file (a device or a pipe); accepted: {accepted}", key)
    return path


def existing_folder(key: str, value, accepted: str) -> Path:
    """``value`` as an existing folder, or a named error saying what it is instead."""
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={str(value)!r} is a file, expected a folder; accepted: {accepted}", key)
    if not path.is_dir():
        raise MissingFileError(f"{key}={str(value)!r}: no such folder; accepted: {accepted}", key)
    return path
