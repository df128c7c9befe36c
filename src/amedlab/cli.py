"""The single Hydra entry point: ``python -m amedlab stage=<stage> ...``.

Each stage is a plain function ``run(cfg) -> float | dict`` in its own module, ``amedlab.stages.<stage>``;
this file only composes the config and dispatches ``stage=<name>`` to it (the stage checks the config
first). The returned value is what sweepers optimise. Data flows downwards: cli -> stages -> specs ->
library (README, "Architecture").

A user error (a bad value, an unknown key, an unusable file or directory; Hydra's own override and
composition errors) is printed as its message alone, on stderr, with exit status 2: no traceback.
``HYDRA_FULL_ERROR=1`` shows the full trace. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .configs import CONF_DIR
from .stages import STAGE_NAMES

log = logging.getLogger(__name__)

#: stage name -> "module:function" (one module per stage in amedlab.stages)
STAGES = {name: f"amedlab.stages.{name}:run" for name in STAGE_NAMES}


def resolve_stage(name: str):
    if name not in STAGES:
        from .errors import ConfigError

        raise ConfigError(f"stage={name!r} is not a known stage; accepted: {', '.join(STAGES)}", "stage")
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


_FULL_ERROR = "HYDRA_FULL_ERROR"
_user_full_error = False  # the user asked for full tracebacks


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    from .errors import UserError

    try:
        return resolve_stage(cfg.stage)(cfg)
    except UserError as err:
        if _user_full_error or _multirun():  # a sweep reports which cell failed (see main)
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error_message(err: BaseException) -> str | None:
    """The message to print for a user error, or None for anything else (a bug: keep its traceback)."""
    from .errors import UserError

    if isinstance(err, UserError):
        return f"error: {err}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):  # override syntax, unknown group option, ...
        cause = err.__cause__
        text = str(err).split("Config search path")[0]
        if isinstance(cause, OmegaConfBaseException):
            text += "\n" + str(cause).split("\n")[0]
        parts = [line.strip() for line in text.splitlines() if line.strip()]
        if len(parts) > 2 and parts[1].startswith("Available options"):
            parts = [parts[0], f"{parts[1].rstrip(':')}: {', '.join(parts[2:])}"]
        return "error: " + "; ".join(parts)
    if isinstance(err, OSError) and getattr(err, "filename", None):  # e.g. Hydra cannot create the run dir
        return f"error: cannot use {err.filename!r}: {err.strerror} (check hydra.run.dir / hydra.sweep.dir)"
    return None


def main() -> None:
    """``python -m amedlab``: Hydra's main with user errors as one message and exit status 2."""
    global _user_full_error
    if os.environ.get(_FULL_ERROR) == "1":
        _user_full_error = True
        hydra_main()
        return
    os.environ[_FULL_ERROR] = "1"  # Hydra re-raises; we decide what deserves a traceback
    try:
        hydra_main()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop(_FULL_ERROR, None)


if __name__ == "__main__":
    main()
