"""The single Hydra entry point: ``python -m amedlab stage=<stage> ...``.

Each stage is a plain function ``run(cfg) -> float | dict`` in its own module, ``amedlab.stages.<stage>``;
this file only composes the config and dispatches ``stage=<name>`` to it (the stage checks the config
first). The returned value is what sweepers optimise. Data flows downwards: cli -> stages -> specs ->
library (docs/architecture.md).

A user error (a bad value, an unknown key, an unusable file or directory; Hydra's own override and
composition errors) is printed as its message alone, on stderr, with exit status 2: no traceback.
``HYDRA_FULL_ERROR=1`` shows the full trace. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .resources import CONF_DIR
from . import specs as _specs  # noqa: F401 -- registers the resolvers conf/config.yaml uses
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


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def user_error_message(err: BaseException) -> str | None:
    """The message to print for a user error, or None for anything else (a bug: keep its traceback)."""
    from .errors import UserError

    if isinstance(err, UserError):
        return f"error: {err}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):  # override syntax, unknown group option, ...
        import re

        from .specs.values import renamed_key_error

        cause = err.__cause__
        text = str(err).split("Config search path")[0]
        if (m := re.match(r"Could not override '([^']+)'", text)) and (renamed := renamed_key_error(m.group(1))):
            return f"error: {renamed}"
        if "submitit" in text and not _has_module("hydra_plugins.hydra_submitit_launcher"):
            return ("error: hydra/launcher=slurm needs Hydra's submitit launcher, an optional extra: "
                    "pip install 'amed-lab[slurm]' (or hydra-submitit-launcher)")
        if isinstance(cause, OmegaConfBaseException):
            text += "\n" + str(cause).split("\n")[0]
        parts = [line.strip() for line in text.splitlines() if line.strip()]
        if len(parts) > 2 and parts[1].startswith("Available options"):
            parts = [parts[0], f"{parts[1].rstrip(':')}: {', '.join(parts[2:])}"]
        return "error: " + "; ".join(parts)
    if isinstance(err, OSError) and getattr(err, "filename", None):  # e.g. Hydra cannot create the run dir
        return f"error: cannot use {err.filename!r}: {err.strerror} (check hydra.run.dir / hydra.sweep.dir)"
    return None


#: the Hydra plug-ins a config may name (``hydra.launcher`` / ``hydra.sweeper``): Hydra's own and the
#: installed ``hydra_plugins`` packages (e.g. the submitit launcher of conf/hydra/launcher/slurm.yaml)
PLUGIN_PREFIXES = ("hydra._internal.core_plugins.", "hydra_plugins.")


def _factories(node, path: str):
    """(path, value) of every ``()`` factory in a logging config (``logging.config.dictConfig`` calls it)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "()":
                yield f"{path}.()", v
            yield from _factories(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _factories(v, f"{path}[{i}]")


def check_hydra_callbacks(config) -> None:
    """Refuse the Hydra settings that import and run code named in a config file (read with
    ``--config-dir``) or an override, before Hydra acts on them: ``hydra.callbacks``, ``()`` factories
    in ``hydra.job_logging`` / ``hydra.hydra_logging``, and a launcher or sweeper that is not a Hydra
    plug-in (:data:`PLUGIN_PREFIXES`)."""
    from .errors import ConfigError

    def get(key):
        node = OmegaConf.select(config, key, default=None, throw_on_missing=False)
        return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node

    callbacks = get("hydra.callbacks")
    if callbacks:
        raise ConfigError(f"hydra.callbacks={callbacks!r}: a Hydra callback imports and runs the code its _target_ "
                          "names, before any check; this project uses none; accepted: {} (no callbacks: remove "
                          "hydra.callbacks from the experiment file or the overrides)", "hydra.callbacks")
    for key in ("hydra.job_logging", "hydra.hydra_logging"):
        for path, value in _factories(get(key), key):
            raise ConfigError(f"{path}={value!r}: a logging factory imports and runs the code it names; accepted: "
                              "handlers and formatters by class (e.g. class: logging.StreamHandler), no '()' entry", key)
    for key in ("hydra.launcher", "hydra.sweeper"):
        target = (get(key) or {}).get("_target_") if isinstance(get(key), dict) else None
        if target is not None and not str(target).startswith(PLUGIN_PREFIXES):
            raise ConfigError(f"{key}._target_={target!r}: not a Hydra plug-in; accepted: a class under "
                              f"{' or '.join(PLUGIN_PREFIXES)} (e.g. hydra/launcher=slurm)", f"{key}._target_")


def refuse_hydra_callbacks() -> None:
    """Make Hydra refuse ``hydra.callbacks`` before instantiating any of them.

    Hydra builds its ``Callbacks`` object (which instantiates every entry of ``hydra.callbacks``) from
    the composed config, with its hydra node, in ``Hydra.run`` and ``Hydra.multirun``, before the task
    function runs: a check inside a stage would come too late. The wrapped constructor checks that
    config first; single runs and ``-m`` sweeps both go through it (a sweep's launcher reuses the
    object built there). Installed once, by :func:`main`.
    """
    from hydra._internal.callbacks import Callbacks

    if getattr(Callbacks.__init__, "_amedlab_checked", False):
        return
    original = Callbacks.__init__

    @functools.wraps(original)
    def checked_init(self, config=None, *args, **kwargs):
        if config is not None:
            check_hydra_callbacks(config)
        original(self, config, *args, **kwargs)

    checked_init._amedlab_checked = True
    Callbacks.__init__ = checked_init

    # Hydra's own logging is configured while the config is composed, before Callbacks exist: its
    # dictConfig entry point checks each logging config for '()' factories first
    from hydra._internal import logging_config

    configure = logging_config.configure_logging

    @functools.wraps(configure)
    def checked_configure(conf, *args, **kwargs):
        for path, value in _factories(conf, "hydra.hydra_logging / hydra.job_logging"):
            from .errors import ConfigError

            raise ConfigError(f"{path}={value!r}: a logging factory imports and runs the code it names; accepted: "
                              "handlers and formatters by class (e.g. class: logging.StreamHandler), no '()' entry",
                              "hydra.job_logging")
        return configure(conf, *args, **kwargs)

    logging_config.configure_logging = checked_configure


def main() -> None:
    """``python -m amedlab`` (or the ``amedlab`` command): Hydra's main with user errors as one message
    and exit status 2; ``--version`` prints the package's version."""
    global _user_full_error
    if sys.argv[1:] in (["--version"], ["-V"]):
        from . import __version__

        print(f"amedlab {__version__}")
        return
    refuse_hydra_callbacks()
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
