"""Adapters that turn users' own checkpoints into D(x, sigma). Nothing is downloaded.

- ``diffusers``: a ``UNet2DModel`` saved with ``save_pretrained`` plus its DDPM scheduler config
  (VP, discrete timesteps; epsilon, v or sample prediction). sigma <-> timestep by linear
  interpolation in log sigma over the scheduler's table (as k-diffusion's ``DiscreteSchedule``);
  features: channel-mean of ``mid_block``'s output (what AMED hooks on ADM / LDM models).
- ``edm_pkl``: an NVlabs EDM network pickle (e.g. ``edm-cifar10-32x32-uncond-vp.pkl``). Unpickling
  runs code, so it needs ``model.trust_pickle=true`` and NVlabs' source (``dnnlib``, ``torch_utils``)
  importable via ``model.source_dir``. Features: channel-mean of the last encoder block at the lowest
  resolution, ``enc['8x8_block3']`` for CIFAR-10, as in the official AMED code. A file that cannot be
  such a pickle (EDM's ``training-state-*.pt``, a project checkpoint, an empty, truncated or random
  file) is recognised first, from its bytes, without running anything in it; each unpickling of a
  trusted file is logged (INFO: the file and its sha256).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingFileError
from .base import Denoiser
from .factory import register_model
from .paths import existing_file, existing_folder
from .precond import FeatureHook

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_keys(node: Mapping, name: str, accepted: tuple[str, ...]) -> None:
    unknown = set(node) - set(accepted)
    if unknown:
        raise ValueError(f"model.name={name} does not take {sorted(unknown)}; accepted keys: {', '.join(accepted)}")


# ---------------------------------------------------------------------------------------------
# diffusers


def vp_sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of a discrete VP table: piecewise-linear interpolation of the index in log
    sigma, clamped (also what amedlab.interop.diffusers gives the UNet, so both call it the same way)."""
    log_sigma = sigma.float().log().clamp(log_sigmas[0], log_sigmas[-1])
    idx = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    return (idx - 1).float() + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)


def vp_denoised(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, c_in: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """D(x, sigma) from a VP UNet's output at input ``c_in * x`` (c_in = 1 / sqrt(1 + sigma^2))."""
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":  # x0 = alpha x_t - sigma_vp v, alpha = c_in, sigma_vp = s c_in
        return c_in * (c_in * x) - s * c_in * out
    return out


class DiffusersVPDenoiser(Denoiser):
    """D(x, sigma) for a VP epsilon/v/sample-prediction ``UNet2DModel`` with a discrete DDPM schedule.

    With alpha_bar_t from the scheduler, the VE noise level is sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    and the model input is x / sqrt(1 + sigma^2). Noise levels outside the table clamp the timestep to
    [0, T-1] (the model never saw them) while sigma itself is used for scaling.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 feature_block: str | None = "mid_block", source: str = "") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.source = source
        sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()
        self.register_buffer("log_sigmas", sigmas.log().float())
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.sample_shape = (int(cfg.in_channels), int(size), int(size))
        if feature_block not in (None, "mid_block"):
            raise ValueError(f"feature_block={feature_block!r}; accepted: mid_block or null")
        self.feature_block = feature_block
        self._hook = FeatureHook(unet.mid_block) if feature_block else None
        # mid_block runs at the last down block's resolution (that block does not downsample)
        low = int(size) >> (len(cfg.block_out_channels) - 1)
        self.feature_dim = low * low if feature_block else 0

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def config(self) -> dict:
        return dict(prediction_type=self.prediction_type, feature_block=self.feature_block, source=self.source,
                    unet=dict(self.unet.config))

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return vp_sigma_to_t(self.log_sigmas, sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().clamp(0, len(self.log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        w = t - lo.float()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s**2 + 1).sqrt()
        dtype = next(self.unet.parameters()).dtype
        if self._hook is not None:
            self._hook.clear()
        out = self.unet((c_in * x).to(dtype), self.sigma_to_t(sigma)).sample.to(x.dtype)
        if self._hook is not None:
            self.last_features = self._hook.pop().to(x.dtype)
        return vp_denoised(out, x, s, c_in, self.prediction_type)


def _find_dir_with(candidates: list[Path], filename: str) -> Path | None:
    return next((c for c in candidates if (c / filename).is_file()), None)


@register_model("diffusers")
def build_diffusers(node: Mapping) -> DiffusersVPDenoiser:
    """``model: {name: diffusers, path: <dir>, scheduler_path: null | <dir>, feature_block: mid_block | null}``.

    ``path``: a ``UNet2DModel.save_pretrained`` directory (``config.json`` + weights) or a pipeline
    directory with a ``unet/`` subfolder. ``scheduler_path``: a directory with ``scheduler_config.json``;
    null looks in ``<path>/scheduler``, ``<path>/../scheduler`` and ``<path>``.
    """
    _check_keys(node, "diffusers", ("name", "path", "scheduler_path", "feature_block"))
    if node.get("path") in (None, ""):
        raise ValueError("model.path=null: set it to a UNet2DModel save_pretrained directory (model=diffusers)")
    root = existing_folder("model.path", node["path"], "a UNet2DModel save_pretrained folder or a pipeline folder "
                           "with unet/ (model=diffusers)")
    unet_dir = _find_dir_with([root, root / "unet"], "config.json")
    if unet_dir is None:
        raise FileNotFoundError(f"model.path={str(root)!r}: no config.json in it or in its unet/ subfolder")
    unet_cfg = json.loads((unet_dir / "config.json").read_text())
    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"model.path={str(unet_dir)!r} holds a {unet_cfg['_class_name']}; accepted: UNet2DModel")
    if unet_cfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"model.path: time_embedding_type={unet_cfg['time_embedding_type']!r} cannot take "
                         "continuous timesteps; accepted: positional (DDPM-style VP models)")
    if unet_cfg.get("num_class_embeds") or unet_cfg.get("class_embed_type"):
        raise ValueError("model.path: class-conditional UNet2DModel is not supported; accepted: unconditional")
    if node.get("scheduler_path") not in (None, ""):
        sched_dir = existing_folder("model.scheduler_path", node["scheduler_path"],
                                    "a folder with the DDPM scheduler's scheduler_config.json, or null")
        if not (sched_dir / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"model.scheduler_path={str(sched_dir)!r}: no scheduler_config.json there")
    else:
        sched_dir = _find_dir_with([root / "scheduler", unet_dir.parent / "scheduler", root], "scheduler_config.json")
        if sched_dir is None:
            raise FileNotFoundError(f"no scheduler_config.json in {root}/scheduler, {unet_dir.parent}/scheduler or "
                                    f"{root}; set model.scheduler_path to the DDPM scheduler's directory")
    sched_cfg = json.loads((sched_dir / "scheduler_config.json").read_text())
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{sched_dir}/scheduler_config.json: prediction_type={prediction_type!r}; "
                         f"accepted: {', '.join(PREDICTION_TYPES)}")
    feature_block = node.get("feature_block", "mid_block") or None
    if feature_block not in (None, "mid_block"):
        raise ValueError(f"model.feature_block={feature_block!r}; accepted: mid_block or null (no features)")
    if importlib.util.find_spec("diffusers") is None:
        raise ModuleNotFoundError("model=diffusers needs the diffusers package: pip install 'amed-lab[diffusers]'")

    from diffusers import DDPMScheduler, UNet2DModel

    scheduler = DDPMScheduler.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    unet = UNet2DModel.from_pretrained(str(unet_dir))
    return DiffusersVPDenoiser(unet.eval().requires_grad_(False), scheduler.alphas_cumprod, prediction_type,
                               feature_block, source=str(unet_dir))


# ---------------------------------------------------------------------------------------------
# NVlabs EDM pickles

_BLOCK = re.compile(r"^(\d+)x(\d+)_(\w+)$")


def lowest_resolution_block(enc: Mapping[str, nn.Module]) -> str:
    """The last encoder block at the lowest resolution, e.g. '8x8_block3' for EDM's CIFAR-10 SongUNet."""
    parsed = [(int(m.group(1)), name) for name in enc if (m := _BLOCK.match(name)) and "block" in m.group(3)]
    if not parsed:
        raise ValueError(f"no '<res>x<res>_block<i>' entry in the encoder; keys: {list(enc)}")
    low = min(res for res, _ in parsed)
    return [name for res, name in parsed if res == low][-1]


class EDMPickleDenoiser(Denoiser):
    """D(x, sigma) = net(x, sigma, class_labels) for an NVlabs ``EDMPrecond`` / ``VPPrecond`` / ... module."""

    def __init__(self, net: nn.Module, feature_block: str | None = None, class_label: int | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.net = net
        self.source = source
        self.sample_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        self.class_label = class_label
        self.feature_block = feature_block
        self._hook = None
        if feature_block:
            self._hook = FeatureHook(net.model.enc[feature_block])
            res = int(_BLOCK.match(feature_block).group(1))
            self.feature_dim = res * res

    def config(self) -> dict:
        return dict(feature_block=self.feature_block, class_label=self.class_label, source=self.source)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        labels = None
        if self.label_dim:
            labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
            labels[:, self.class_label] = 1
        if self._hook is not None:
            self._hook.clear()
        out = self.net(x, sigma, labels).to(x.dtype)
        if self._hook is not None:
            self.last_features = self._hook.pop().to(x.dtype)
        return out


def _ensure_edm_source(source_dir) -> None:
    hint = ("NVlabs' EDM source (github.com/NVlabs/edm: dnnlib/ and torch_utils/; the network code itself is in "
            "the pickle) must be importable to unpickle its networks: clone it and set model.source_dir=<that clone>")
    if source_dir not in (None, ""):
        src = existing_folder("model.source_dir", source_dir, "a clone of github.com/NVlabs/edm (dnnlib/ and "
                              "torch_utils/), or null if it is importable").resolve()
        if not (src / "torch_utils" / "persistence.py").is_file():
            raise MissingFileError(f"model.source_dir={str(source_dir)!r} has no torch_utils/persistence.py. {hint}",
                                   "model.source_dir")
        if str(src) not in sys.path:
            sys.path.insert(0, str(src))
    elif importlib.util.find_spec("torch_utils") is None:
        raise ModuleNotFoundError(f"model.source_dir=null and torch_utils is not importable. {hint}")


EDM_ACCEPTED = ("an NVlabs EDM network pickle (network-snapshot-*.pkl or edm-*.pkl) holding a dict with an 'ema' "
                "network, with model.trust_pickle=true")
# the first pickle of a torch.save(..., _use_new_zipfile_serialization=False) file
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


def _scan_pickle(data: bytes) -> tuple[set[str], object]:
    """Walk the opcodes of the first pickle in ``data`` without running anything (``pickletools``):
    the strings it holds and the first integer it pushes. A truncated or non-pickle stream raises."""
    strings: set[str] = set()
    first_int = None
    for op, arg, _ in pickletools.genops(data):
        if op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
            strings.add(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif first_int is None and op.name in _INT_OPS and isinstance(arg, int):
            first_int = arg
    return strings, first_int


def _project_kind_hint(kind) -> str:
    from .digits import TEACHER_KIND

    if kind == TEACHER_KIND:
        return " (load it with model=digits_unet model.path=<this file>)"
    return ""


def _describe_torch_archive(path: Path, raw: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if member is None:
                return "is a zip archive, not a pickle"
            strings, _ = _scan_pickle(archive.read(member))
    except Exception:  # noqa: BLE001 - damaged archives make zipfile and pickletools raise anything
        return "is a damaged zip archive (a torch.save .pt file?), not a pickle"
    if "optimizer_state" in strings or re.fullmatch(r"training-state-.*\.pt", path.name):
        return ("is EDM's training state (training-state-*.pt: a torch.save of {'net', 'optimizer_state'} for "
                "resuming training), not a network pickle; use the network-snapshot-*.pkl of the same run")
    kinds = sorted(s for s in strings if s.startswith("amedlab."))
    if "kind" in strings and kinds:
        return (f"is a project checkpoint (.pt, kind {kinds[0]!r}), not an NVlabs network pickle"
                + _project_kind_hint(kinds[0]))
    return "is a torch.save archive (.pt), not an NVlabs network pickle"


def _describe_safetensors(raw: bytes) -> str | None:
    size = int.from_bytes(raw[:8], "little")
    if not (2 <= size <= len(raw) - 8 and raw[8:9] == b"{"):
        return None
    try:
        header = json.loads(raw[8:8 + size])
    except ValueError:
        return None
    kind = (header.get("__metadata__") or {}).get("kind") if isinstance(header, dict) else None
    if kind:
        return (f"is a project checkpoint (.safetensors, kind {kind!r}), not an NVlabs network pickle"
                + _project_kind_hint(kind))
    return "is a safetensors file (tensors only, no network), not an NVlabs network pickle"


def _not_a_network_pickle(path: Path, raw: bytes) -> str | None:
    """What the file is, when it cannot be an NVlabs network pickle; None when it may be one. Found from
    magic bytes and a static walk of the pickle opcodes: nothing in the file is run."""
    if not raw:
        return "is an empty file"
    if raw[:4] == b"PK\x03\x04":
        return _describe_torch_archive(path, raw)
    if len(raw) > 9 and (what := _describe_safetensors(raw)):
        return what
    try:
        _, first_int = _scan_pickle(raw)
    except Exception as err:  # noqa: BLE001 - arbitrary bytes make the opcode walk raise anything
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if len(raw) > 1 and raw[0] == 0x80 and 2 <= raw[1] <= pickle.HIGHEST_PROTOCOL:  # a pickle's header
            return f"is a pickle cut short or damaged (copied or downloaded in part?; {reason})"
        return f"is not a pickle ({reason})"
    if first_int == _TORCH_LEGACY_MAGIC:
        return "is a legacy torch.save file (.pt), not an NVlabs network pickle"
    return None


def _unpickle_trusted(path: Path, raw: bytes, given: str, source_dir) -> object:
    """Unpickle a file the user trusts (model.trust_pickle=true); this runs the code embedded in it."""
    digest = hashlib.sha256(raw).hexdigest()[:16]
    log.info("model.path: unpickling the trusted file %s (sha256 %s...): the code embedded in the pickle runs "
             "(model.trust_pickle=true)", path.resolve(), digest)
    try:
        return pickle.loads(raw)  # noqa: S301 -- explicitly trusted by the caller
    except (ImportError, AttributeError) as err:  # a module or class the pickle names is not in the source
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.path={given!r}: unpickling it needs code that model.source_dir={source_dir!r} "
                          f"does not provide ({type(err).__name__}: {reason}); accepted: {EDM_ACCEPTED}, and "
                          "model.source_dir the NVlabs EDM source it was made with", "model.path") from err
    except Exception as err:  # noqa: BLE001 - the file's bytes and its embedded code can raise anything
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.path={given!r} could not be unpickled ({type(err).__name__}: {reason}); "
                          f"accepted: {EDM_ACCEPTED}", "model.path") from err


@register_model("edm_pkl")
def build_edm_pkl(node: Mapping) -> EDMPickleDenoiser:
    """``model: {name: edm_pkl, path: <file.pkl>, trust_pickle: false, source_dir: null, feature_block: null,
    class_label: null}``."""
    _check_keys(node, "edm_pkl", ("name", "path", "trust_pickle", "source_dir", "feature_block", "class_label"))
    if node.get("path") in (None, ""):
        raise ValueError("model.path=null: set it to an NVlabs EDM network pickle, e.g. "
                         "edm-cifar10-32x32-uncond-vp.pkl (nothing is downloaded)")
    given = str(node["path"])
    path = existing_file("model.path", given, EDM_ACCEPTED)
    raw = path.read_bytes()
    what = _not_a_network_pickle(path, raw)  # magic bytes and a static scan of the opcodes: nothing runs
    if what:
        raise ConfigError(f"model.path={given!r} {what}; accepted: {EDM_ACCEPTED}", "model.path")
    if node.get("trust_pickle") is not True:
        raise PermissionError(f"model.trust_pickle={node.get('trust_pickle')!r}: loading {path} runs the code inside "
                              "the pickle; set model.trust_pickle=true only for files you trust")
    _ensure_edm_source(node.get("source_dir"))
    data = _unpickle_trusted(path, raw, given, node.get("source_dir"))
    del raw
    if not isinstance(data, Mapping):
        raise ConfigError(f"model.path={given!r} holds a {type(data).__name__}, not a dict with an 'ema' network; "
                          f"accepted: {EDM_ACCEPTED}", "model.path")
    if "ema" not in data:
        keys = sorted(map(str, data))[:8]
        raise ConfigError(f"model.path={given!r} holds a dict with keys {keys} and no 'ema' network; "
                          f"accepted: {EDM_ACCEPTED}", "model.path")
    net = data["ema"]
    for attr in ("img_resolution", "img_channels", "model"):
        if not hasattr(net, attr):
            raise ConfigError(f"model.path={given!r}: data['ema'] has no {attr!r}, so it is not an NVlabs EDM "
                              f"network; accepted: {EDM_ACCEPTED}", "model.path")
    enc = getattr(net.model, "enc", None)
    feature_block = node.get("feature_block")
    if feature_block in (None, "", "auto"):
        feature_block = lowest_resolution_block(enc) if enc is not None else None
    elif enc is None or feature_block not in enc:
        raise ValueError(f"model.feature_block={feature_block!r} is not in net.model.enc; "
                         f"accepted: {list(enc) if enc is not None else []} or null (auto)")
    class_label = node.get("class_label")
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if label_dim and (class_label is None or not 0 <= int(class_label) < label_dim):
        raise ValueError(f"model.class_label={class_label!r}: this network is class-conditional; "
                         f"accepted: an integer in [0, {label_dim})")
    return EDMPickleDenoiser(net.eval().requires_grad_(False), feature_block,
                             int(class_label) if label_dim else None, source=str(path))
