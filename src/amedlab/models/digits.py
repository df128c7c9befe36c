"""The built-in digits teacher (``model.name=digits_unet``) and the project's checkpoint format.

A checkpoint is the weights plus the config needed to rebuild the network, in one file:
- ``.safetensors``: tensors + string metadata ``{"kind", "config" (JSON), ...}``;
- ``.pt``: ``torch.save({"kind", "config", "state_dict", "metadata"})``, loaded with ``weights_only=True``.
Neither format runs code when loaded.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..io import atomic_write_bytes
from .factory import register_model
from .paths import existing_file
from .precond import EDMPrecond
from .unet import SmallUNet

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_TEACHER = ASSETS_DIR / "digits_teacher.safetensors"
TEACHER_KIND = "amedlab.digits_unet"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt")


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], kind: str, config: dict,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write weights + config atomically (``amedlab.io.atomic_write_bytes``)."""
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"checkpoint path {str(path)!r} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(tensors, metadata={**meta, "kind": kind, "config": json.dumps(config)})
    else:
        buf = io.BytesIO()
        torch.save({"kind": kind, "config": config, "state_dict": tensors, "metadata": meta}, buf)
        data = buf.getvalue()
    return atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike, kind: str) -> tuple[dict, dict, dict]:
    """Return ``(state_dict, config, metadata)``; checks that the file holds a ``kind`` checkpoint.
    Unreadable files raise a ValueError saying what the file is not (nothing in it is ever run)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            state_dict = load_file(str(path))
            config = json.loads(meta.pop("config", "null"))
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
        found = meta.pop("kind", None)
    else:
        from ..cache import read_tensors

        try:
            blob = read_tensors(path)
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: {err}") from None
        if not isinstance(blob, dict):
            raise ValueError(f"{str(path)!r} is not a {kind} checkpoint (it holds a {type(blob).__name__})")
        state_dict, config, found = blob.get("state_dict"), blob.get("config"), blob.get("kind")
        meta = dict(blob.get("metadata") or {})
    if found != kind or config is None:
        raise ValueError(f"{str(path)!r} is not a {kind} checkpoint (found kind={found!r})")
    return state_dict, config, meta


def make_digits_denoiser(net_config: Mapping, sigma_data: float = 0.5) -> EDMPrecond:
    """A fresh (untrained) digits U-Net inside EDM preconditioning, with feature capture."""
    net = SmallUNet(**dict(net_config))
    res = int(net.config()["img_resolution"])
    return EDMPrecond(net, sigma_data=sigma_data, sample_shape=(net.config()["in_channels"], res, res),
                      feature_block=net.feature_block)


def save_denoiser(denoiser: EDMPrecond, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    return save_checkpoint(path, denoiser.state_dict(), TEACHER_KIND, denoiser.config(), metadata)


def load_denoiser(path: str | os.PathLike) -> EDMPrecond:
    """Rebuild a digits denoiser from a checkpoint written by :func:`save_denoiser`; eval mode, frozen."""
    state_dict, config, _ = load_checkpoint(path, TEACHER_KIND)
    try:
        denoiser = make_digits_denoiser(config["net"], sigma_data=config["sigma_data"])
        denoiser.load_state_dict(state_dict)
    except (KeyError, TypeError, RuntimeError) as err:  # a config or tensor shape that does not fit
        raise ValueError(f"{str(path)!r}: its weights do not fit the network its config describes "
                         f"({str(err).splitlines()[0]})") from None
    return denoiser.eval().requires_grad_(False)


def resolve_checkpoint_path(value, key: str, default: Path) -> Path:
    """``value`` (None = the shipped default) -> an existing checkpoint file, or a clear error."""
    if value in (None, ""):
        if not default.is_file():
            raise FileNotFoundError(f"{key}=null means the shipped checkpoint {default}, which is missing; "
                                    "reinstall the package or pass a path")
        return default
    path = existing_file(key, value, f"a {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint written by the project, "
                         "or null for the shipped one")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"{key}={str(value)!r}: accepted file types are {', '.join(CHECKPOINT_SUFFIXES)}")
    return path


@register_model("digits_unet")
def build_digits_unet(node: Mapping) -> EDMPrecond:
    """``model: {name: digits_unet, path: null | <file>}``; null loads the shipped teacher."""
    unknown = set(node) - {"name", "path"}
    if unknown:
        raise ValueError(f"model.name=digits_unet does not take {sorted(unknown)}; accepted keys: name, path")
    return load_denoiser(resolve_checkpoint_path(node.get("path"), "model.path", SHIPPED_TEACHER))
