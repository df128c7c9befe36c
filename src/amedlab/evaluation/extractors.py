"""Feature extractors for FID / KID, through torch-fidelity's registry.

- ``amedlab-digits``: the project's digits classifier (penultimate layer, 64 numbers), registered
  with torch-fidelity as a :class:`torch_fidelity.FeatureExtractorBase`; the default on digits.
- ``inception-v3-compat``: torch-fidelity's port of the 2015-12-05 TF Inception-v3 (2048-d pool
  features), the paper's protocol. Its weights come from a local file (``eval.inception_weights``):
  torch-fidelity downloads them when no path is given, so a missing path is an error here, raised
  before any compute, and never a download.

Both take uint8 images ``[B, C, H, W]`` (C = 1 or 3), as quantised by
:func:`amedlab.evaluation.metrics.quantize`.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from ..models.base import device_of
from ..models.digits_features import load_digits_classifier

DIGITS = "amedlab-digits"
INCEPTION = "inception-v3-compat"
EXTRACTORS = (DIGITS, INCEPTION)
#: the feature layer each extractor uses for FID and KID
FEATURE_LAYER = {DIGITS: "penultimate", INCEPTION: "2048"}


class DigitsFeatureExtractor(FeatureExtractorBase):
    """The digits classifier as a torch-fidelity feature extractor.

    ``feature_extractor_weights_path``: a classifier checkpoint (``stage=train_features``); None =
    the shipped one. Inputs: uint8 ``[B, 1 or 3, S, S]`` (3 channels are averaged), mapped back to
    [-1, 1] as ``u / 127.5 - 1``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "penultimate")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting images as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] in (1, 3), f"Input is not Bx1xHxW or Bx3xHxW: {tuple(x.shape)}")
        device = device_of(self.classifier)
        x = x.to(device, torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        features = self.classifier.features(x / 127.5 - 1.0)
        out = {"penultimate": features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)


if DIGITS not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(DIGITS, DigitsFeatureExtractor)


class UInt8Images(Dataset):
    """A uint8 image tensor ``[N, C, H, W]`` as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: torch.Tensor, channels: int | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        self.images, self.channels = images, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x


def resolve_extractor_name(name: str, real_source: str, dataset_name: str | None) -> str:
    """``auto`` -> amedlab-digits for the digits data set, inception-v3-compat otherwise."""
    if name == "auto":
        return DIGITS if (real_source == "dataset" and dataset_name == "digits") else INCEPTION
    if name not in EXTRACTORS:
        raise ValueError(f"eval.feature_extractor={name!r}; accepted: auto, {', '.join(EXTRACTORS)}")
    return name


def check_extractor_weights(name: str, inception_weights, digits_classifier=None) -> str | None:
    """The weights file the extractor will load (None = the shipped digits classifier); raises a clear
    error, before any compute, when Inception has no local file: torch-fidelity would download it."""
    if name == INCEPTION:
        if inception_weights in (None, ""):
            raise ValueError(
                "eval.inception_weights=null: feature_extractor=inception-v3-compat needs a local weights file "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth); nothing is downloaded. "
                "Pass eval.inception_weights=/path/to/file.pth")
        path = Path(str(inception_weights)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.inception_weights={str(inception_weights)!r}: no such file "
                                    "(a local copy of torch-fidelity's Inception-v3 weights; nothing is downloaded)")
        return str(path)
    if digits_classifier in (None, ""):
        return None
    path = Path(str(digits_classifier)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.digits_classifier={str(digits_classifier)!r}: no such file")
    return str(path)


def create_extractor(name: str, weights_path: str | None, device: str = "cpu") -> FeatureExtractorBase:
    """A torch-fidelity feature extractor (eval mode, frozen) providing the FID/KID layer."""
    if name == INCEPTION and weights_path is None:
        raise ValueError("eval.inception_weights is required for inception-v3-compat (nothing is downloaded)")
    cuda = str(device).startswith("cuda")
    weights = weights_path
    if name == INCEPTION:
        # torch-fidelity unpickles this file with weights_only=False (a crafted file would run code):
        # it gets our own re-serialisation of a tensors-only state dict instead of the user's file
        buf = io.BytesIO()
        torch.save(load_state_dict_file(weights_path, "eval.inception_weights"), buf)
        buf.seek(0)
        weights = buf
    with _current_cuda(device):
        extractor = create_feature_extractor(
            name, [FEATURE_LAYER[name]], cuda=cuda, verbose=False, feature_extractor_weights_path=weights,
            feature_extractor_compile=False)
    return extractor


def _current_cuda(device):
    """torch-fidelity moves the extractor and each batch with ``.cuda()`` (the current CUDA device):
    make ``cuda:<k>`` the current one for the duration, so features are computed on the run's GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def load_state_dict_file(path, key: str) -> dict[str, torch.Tensor]:
    """A plain state dict (names -> tensors) from a ``.safetensors`` or torch file, loaded tensors-only;
    anything else is a ValueError naming ``key``."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            from ..cache import read_tensors

            state = read_tensors(path)
    except Exception as err:  # safetensors and torch raise various types; read_tensors explains pickles
        raise ValueError(f"{key}={path!r}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{key}={path!r}: not a plain state dict (a dict of parameter names to tensors); "
                         f"got {type(state).__name__}")
    return state


def channels_for(name: str) -> int | None:
    """Inception needs RGB: 1-channel images are repeated to 3."""
    return 3 if name == INCEPTION else None


@torch.no_grad()
def extract_features(extractor: FeatureExtractorBase, images, batch_size: int = 500) -> torch.Tensor:
    """Features ``[N, D]`` (float64) of uint8 images (a tensor ``[N, C, H, W]`` or a Dataset of them),
    through torch-fidelity's own extraction loop (no worker processes)."""
    if isinstance(images, torch.Tensor):
        images = UInt8Images(images, channels_for(extractor.get_name()))
    device = device_of(extractor)
    with _current_cuda(device):
        feats = get_featuresdict_from_dataset(images, extractor, int(batch_size), device.type == "cuda", True, False)
    return feats[extractor.get_requested_features_list()[0]].double()
