"""Experiment logging: ``logger=none`` (nothing) or ``logger=wandb`` (offline unless asked otherwise).

Offline runs need no network and no account; they are written under the run directory and can be
uploaded later with ``wandb sync <dir>/wandb/offline-run-*``. ``logger.mode=online`` asks for a live
run; if wandb cannot start one within ``logger.init_timeout`` seconds (no network, no login) the run
falls back to offline instead of hanging. Every cell of one sweep, and its table, share a wandb group
(the sweep directory's name unless ``logger.group`` says otherwise).

This module builds every logger from one reading of ``conf/logger/*.yaml`` (:func:`logger_settings`):
the :class:`RunLogger` of the evaluation and table stages (:func:`make_logger`) and the Lightning
loggers of the training stages (:func:`lightning_loggers`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .io import plain

log = logging.getLogger(__name__)
MODES = ("offline", "online", "disabled")


class RunLogger:
    """The no-op logger (``logger=none``); :class:`WandbLogger` has the same methods."""

    enabled = False
    mode = "none"

    def log_config(self, config: Mapping) -> None: ...

    def log_metrics(self, metrics: Mapping, summary: bool = False) -> None: ...

    def log_image(self, key: str, path, caption: str | None = None) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None: ...

    def log_distillation(self, records: list[Mapping], prefix: str = "distill") -> None: ...

    def finish(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def check_logger_settings(node: Mapping) -> None:
    """Raise a clear error for a bad ``logger`` config, before any compute."""
    name = node.get("name", "none")
    if name not in ("none", "wandb"):
        raise ValueError(f"logger={name!r}; accepted: none, wandb")
    if name == "wandb":
        mode = str(node.get("mode", "offline"))
        if mode not in MODES:
            raise ValueError(f"logger.mode={mode!r}; accepted: {', '.join(MODES)}")


@dataclass(frozen=True)
class LoggerSettings:
    """The ``logger`` config read once, with its defaults (``conf/logger/wandb.yaml``)."""

    name: str = "none"
    mode: str = "offline"
    project: str = "amedlab"
    entity: str | None = None
    group: str | None = None
    tags: tuple = ()
    dir: str | None = None
    init_timeout: float = 60.0

    @property
    def wandb(self) -> bool:
        """Whether a wandb run is made (``logger=wandb`` and a mode other than disabled)."""
        return self.name == "wandb" and self.mode != "disabled"


def logger_settings(node: Mapping | None) -> LoggerSettings:
    """The checked settings of the ``logger`` node (None or no node: ``logger=none``)."""
    node = node or {"name": "none"}
    check_logger_settings(node)
    return LoggerSettings(
        name=str(node.get("name", "none")), mode=str(node.get("mode", "offline")),
        project=node.get("project") or "amedlab", entity=node.get("entity") or None, group=node.get("group") or None,
        tags=tuple(node.get("tags") or ()), dir=node.get("dir") or None, init_timeout=float(node.get("init_timeout", 60)),
    )


class WandbLogger(RunLogger):
    enabled = True

    def __init__(self, settings: LoggerSettings, name: str, group: str | None, job_type: str, directory: Path) -> None:
        import wandb

        self._wandb = wandb
        mode = settings.mode
        directory = Path(settings.dir or directory)
        directory.mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=settings.project, entity=settings.entity, name=name, group=settings.group or group,
                      job_type=job_type, tags=list(settings.tags), dir=str(directory), reinit="finish_previous")
        quiet = wandb.Settings(silent=True, init_timeout=settings.init_timeout, console="off")
        try:
            self.run = wandb.init(mode=mode, settings=quiet, **kwargs)
        except Exception as err:  # wandb raises several types when it cannot reach its server
            if mode != "online":
                raise
            log.warning("wandb could not start an online run (%s); logging offline instead", err)
            mode = "offline"
            self.run = wandb.init(mode=mode, settings=wandb.Settings(silent=True, console="off"), **kwargs)
        self.mode = mode
        self.directory = directory

    def log_config(self, config: Mapping) -> None:
        self.run.config.update(plain(config), allow_val_change=True)

    def log_metrics(self, metrics: Mapping, summary: bool = False) -> None:
        flat = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float, bool)) or v is None}
        self.run.log(flat)
        if summary:
            for k, v in flat.items():
                self.run.summary[k] = v

    def log_image(self, key: str, path, caption: str | None = None) -> None:
        if path is not None and Path(path).is_file():
            self.run.log({key: self._wandb.Image(str(path), caption=caption)})

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_distillation(self, records: list[Mapping], prefix: str = "distill") -> None:
        """One point per optimizer update: loss and r/c/a statistics of the interval it trained.

        The curves are drawn against ``<prefix>/update`` (``define_metric``), not wandb's own step: the
        records of a cached predictor arrive in one burst, and the cell's metrics are logged after them."""
        if records:
            step = f"{prefix}/update"
            self.run.define_metric(step)
            self.run.define_metric(f"{prefix}/*", step_metric=step)
        for update, rec in enumerate(records):
            i = rec.get("interval", 0)
            point = {f"{prefix}/update": update}
            point.update({f"{prefix}/interval_{i}/{k}": v for k, v in rec.items() if k != "interval"})
            self.run.log(point)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def make_logger(node: Mapping | None, name: str, group: str | None, job_type: str, directory) -> RunLogger:
    """``node``: the ``logger`` settings (plain values); ``none`` (or None) gives the no-op logger."""
    settings = logger_settings(node)
    if not settings.wandb:
        return RunLogger()
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(settings, name, group, job_type, Path(directory))


def lightning_loggers(node: Mapping | None, out: Path) -> list:
    """The training stages' Lightning loggers: CSV metrics in the run directory ``out`` always; wandb
    as well with ``logger=wandb`` (the same settings as :func:`make_logger`: offline unless
    ``logger.mode=online``, none with ``logger.mode=disabled``). ``node``: the ``logger`` settings."""
    from pytorch_lightning.loggers import CSVLogger

    loggers = [CSVLogger(str(out), name="", version="")]
    settings = logger_settings(node)
    if settings.wandb:
        from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(LightningWandbLogger(project=settings.project, entity=settings.entity, group=settings.group,
                                            tags=list(settings.tags), save_dir=str(settings.dir or out),
                                            offline=settings.mode != "online", name=out.name))
    return loggers
