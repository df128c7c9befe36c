"""The user errors: what the command line prints as one line (no traceback) with exit status 2.

Raised by the checks of :mod:`amedlab.specs` before any compute, and by the library where a
result must not be recorded. Kept apart so any module can raise them without importing the checks.
"""
from __future__ import annotations

import contextlib

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Base of the errors the command line prints as their message alone (no traceback)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(" ".join(str(message).split()))  # one line
        self.key = key


class ConfigError(UserError, ValueError):
    """A user error, raised before any compute; its message names the key, the value and what is
    accepted."""


class MissingFileError(UserError, FileNotFoundError):
    """A ConfigError's twin for a path that does not exist (a FileNotFoundError to callers)."""


class ResultError(UserError, RuntimeError):
    """A result that must not be recorded (a NaN or infinite metric); nothing is written."""


class DiskFullError(UserError, OSError):
    """No space (or quota) left while writing a file: nothing partial is left (writes are atomic)."""


@contextlib.contextmanager
def user_errors(key: str):
    """Turn a library's error about a user's value into a ConfigError naming ``key`` (a UserError passes
    unchanged). Used by the checks of :mod:`amedlab.specs` and by a trained rule's hook checking a
    cell's settings (:mod:`amedlab.solvers.trained`)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError, KeyError, OSError, ModuleNotFoundError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, KeyError):
            msg = f"missing entry {msg}"
        if key not in msg:
            msg = f"{key}: {msg}"
        raise (MissingFileError if isinstance(err, FileNotFoundError) else ConfigError)(msg, key) from err


class ExportError(UserError, ValueError):
    """An exported solver (``solver.json``, :mod:`amedlab.interop`) used or made where it does not
    belong. The subclasses name what is wrong."""


class SchemaVersionError(ExportError):
    """A ``solver.json`` of a schema version this amedlab does not read."""


class DigestMismatchError(ExportError):
    """A ``solver.json`` whose content does not match its digest (edited or damaged)."""


class WrongModelError(ExportError):
    """A solver trained for another model than the one given."""


class WrongNFEError(ExportError):
    """A solver asked for another number of model evaluations than it was trained for."""


class ParametrisationError(ExportError):
    """A scheduler used with a model of another parametrisation (epsilon, v, sample; VP vs EDM)."""
