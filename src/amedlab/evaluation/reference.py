"""The real data every cell's FID and KID compare with: its feature statistics (FID) and features
(KID), computed once per (data, feature extractor) and cached in
``<cache_dir>/real_stats/<extractor>-<key>.pt``. (The high-NFE solution every cell's RMSE is measured
against is :mod:`amedlab.data.reference`.)

Keys hash everything that determines the content (the model's identity, the images' bytes, the
extractor's weights, the seeds, ...; :func:`amedlab.cache.digest`). Files are written atomically and
verified on load; a lock file makes concurrent cells (parallel launchers) compute an entry once and
wait for it (:mod:`amedlab.cache`).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..cache import digest, file_digest, load_verified, locked, save_verified, sha256_file
from ..io import plain
from .extractors import DIGITS, create_extractor, extract_features
from .metrics import feature_statistics, quantize

log = logging.getLogger(__name__)
CACHE_FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_SPLITS = ("train", "held_out", "all")


# ------------------------------------------------------------------------------------------------
# Real-data reference (FID statistics, KID features)
# ------------------------------------------------------------------------------------------------

def real_images_digits(dataset: Mapping, split: str) -> torch.Tensor:
    """The built-in digits (fixed split) as uint8 images, quantised like the samples."""
    from ..data.digits import digits_split, load_digits_tensors

    if split not in DIGITS_SPLITS:
        raise ValueError(f"eval.real.split={split!r}; accepted: {', '.join(DIGITS_SPLITS)}")
    images, _ = load_digits_tensors(int(dataset.get("image_size", 8)), str(dataset.get("upsample_mode", "bilinear")))
    if split != "all":
        train, held_out = digits_split(float(dataset.get("held_out_fraction", 0.2)), int(dataset.get("split_seed", 0)))
        images = images[train if split == "train" else held_out]
    return quantize(images)


def _array_to_images(array: np.ndarray, where: str) -> torch.Tensor:
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, C] or [N, C, H, W]; got {array.dtype} {array.shape}")
    t = torch.from_numpy(np.ascontiguousarray(array))
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2).contiguous()
    return t


def real_source_from_path(path) -> tuple[str, dict]:
    """Inspect ``eval.real.path``: ("stats", {mu, sigma}) | ("images", {tensor}) | ("folder", {files}).

    Raises a clear error for a missing path or an unreadable kind, before any compute.
    """
    if path in (None, ""):
        raise ValueError("eval.real.source=path needs eval.real.path: a folder of images, a .npz/.npy of uint8 "
                         "images, or a .npz with mu and sigma (FID statistics)")
    p = Path(str(path)).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"eval.real.path={str(path)!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return "folder", {"files": files}
    if not p.is_file():
        raise FileNotFoundError(f"eval.real.path={str(path)!r}: no such file or folder")
    try:
        return _read_array_source(p, path)
    except ValueError as err:
        if "pickled" in str(err):  # numpy's message suggests allow_pickle; we never unpickle a data file
            raise ValueError(f"eval.real.path={str(path)!r}: the file holds pickled Python objects; it is refused and "
                             "nothing in it was run (accepted: uint8 image arrays, or mu and sigma)") from None
        raise
    except Exception as err:  # noqa: BLE001 - a damaged header makes numpy raise anything (OSError, BadZipFile, TokenError ...)
        raise ValueError(f"eval.real.path={str(path)!r}: not a readable {p.suffix} file ({err})") from None


def _read_array_source(p: Path, path) -> tuple[str, dict]:
    if p.suffix == ".npz":
        with np.load(p) as data:
            if "mu" in data and "sigma" in data:
                return "stats", {"mu": np.asarray(data["mu"], np.float64), "sigma": np.asarray(data["sigma"], np.float64)}
            key = "images" if "images" in data else ("arr_0" if "arr_0" in data else None)
            if key is None:
                raise ValueError(f"eval.real.path={str(path)!r}: a .npz needs mu and sigma, or images (or arr_0)")
            return "images", {"images": _array_to_images(data[key], f"eval.real.path={str(path)!r}")}
    if p.suffix == ".npy":
        return "images", {"images": _array_to_images(np.load(p), f"eval.real.path={str(path)!r}")}
    raise ValueError(f"eval.real.path={str(path)!r}: accepted: a folder of images, .npz or .npy")


def real_reference(real: Mapping, dataset: Mapping, extractor: str, weights_path: str | None,
                   cache_dir, device: str = "cpu", batch_size: int = 500, need_features: bool = True) -> dict:
    """Statistics ``{"mu", "sigma"}``, features (or None) and a description of the real data, cached."""
    source = str(real.get("source", "dataset"))
    if source == "dataset":
        name = dataset.get("name")
        if name != "digits":
            raise ValueError(f"eval.real.source=dataset supports dataset=digits (got {name!r}); "
                             "for other data set eval.real.source=path and eval.real.path")
        split = str(real.get("split", "train"))
        images = real_images_digits(dataset, split)
        desc = {"source": "dataset", "dataset": plain(dict(dataset)), "split": split}
        content = {"images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()[:24]}
        kind, payload = "images", {"images": images}
    elif source == "path":
        kind, payload = real_source_from_path(real.get("path"))
        p = Path(str(real["path"])).expanduser().resolve()
        desc = {"source": "path", "path": str(p), "kind": kind}
        if kind == "folder":
            content = {"files": digest([(f, file_digest(f, Path(cache_dir) / "file_digests")) for f in payload["files"]])}
        else:
            content = {"sha256": sha256_file(p)[:24]}
    else:
        raise ValueError(f"eval.real.source={source!r}; accepted: dataset, path")

    if kind == "stats":  # precomputed statistics: FID only, in the user's feature space
        return {"mu": payload["mu"], "sigma": payload["sigma"], "features": None,
                "description": {**desc, "num_images": None, "shape": None, "feature_dim": len(payload["mu"]),
                                "extractor": extractor, "cached": False}}
    if kind == "folder":
        from PIL import Image

        with Image.open(payload["files"][0]) as im:  # the folder's shapes were checked before sampling
            desc["shape"] = [len(im.getbands()), im.height, im.width]
    else:
        desc["shape"] = list(payload["images"].shape[1:])

    weights = {"file": sha256_file(weights_path)[:24] if weights_path else ("shipped" if extractor == DIGITS else None)}
    spec = plain({"format": CACHE_FORMAT, "extractor": extractor, "weights": weights, "data": desc, "content": content})
    path = Path(cache_dir) / "real_stats" / f"{extractor}-{digest(spec)}.pt"
    with locked(path):
        blob = load_verified(path, spec, what="cache file")
        cached = blob is not None
        if blob is None:
            fe = create_extractor(extractor, weights_path, device)
            if kind == "folder":
                from torch_fidelity.datasets import ImagesPathDataset

                data = ImagesPathDataset(payload["files"])
            else:
                data = payload["images"]
            features = extract_features(fe, data, batch_size)
            stats = feature_statistics(features)
            blob = {"spec": spec, "mu": torch.from_numpy(np.asarray(stats["mu"])), "sigma": torch.from_numpy(np.asarray(stats["sigma"])),
                    "features": features.float(), "num_images": len(features)}
            save_verified(path, blob)
            log.info("real-data statistics (%s, %d images) cached in %s", extractor, len(features), path)
    return {"mu": blob["mu"].numpy(), "sigma": blob["sigma"].numpy(),
            "features": blob["features"].double() if need_features else None,
            "description": {**desc, "num_images": int(blob["num_images"]), "extractor": extractor,
                            "cache_file": str(path), "cached": cached}}
