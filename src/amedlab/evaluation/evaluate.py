"""One cell of Table 2 (a model, a solver, an NFE, a schedule): the library of ``stage=evaluate``
(:mod:`amedlab.stages.evaluate`).

The stage samples ``eval.seeds`` (one generator per seed), quantises them as the paper does, and writes to the
run directory ``metrics.json`` (FID and KID through torch-fidelity against cached real-data
statistics, the RMSE against a cached high-NFE solution from the same noise, the schedule and grid
actually used, the counted NFE, timings) and ``samples.png``. A cell whose rule needs a trained part
asks the rule's ``trained`` hook for it (:mod:`amedlab.solvers.trained`): an AMED cell loads its
predictor (``solver.predictor``), or reuses one distilled earlier for the same settings
(``<cache_dir>/predictors``), or distills it (teacher trajectories cached in
``<cache_dir>/trajectories``, shared by all cells); a learned-solver cell its grid + coefficients
(``<cache_dir>/learned``).

A run directory that already holds a complete ``metrics.json`` for the same cell (same key: the
settings that determine the numbers) is not recomputed: re-running a sweep skips finished cells
and a killed sweep resumes where it stopped. ``metrics.json`` is written atomically, last.

A cell whose sampler is exactly ``eval.ode_reference`` (:func:`is_limit_cell`) is the *limit cell*:
it samples nothing and takes the cached reference as its samples (:func:`limit_samples`; RMSE 0),
scored as any cell; ``metrics.json`` records ``"limit": true`` (absent: false) and the label
:func:`limit_label`. The table shows it as a bound, not a competitor (:mod:`.table`).

Each cell also keeps ``preview.npz``: its first :data:`PREVIEW_COUNT` images (uint8) and their seeds,
the cell's part of the sweep's ``samples_by_solver.png`` (``stage=table``); ``metrics.json`` records
its seeds and sha256 (``preview``), which the table verifies. A finished cell from before previews
were kept gains one without recomputing its metrics (:func:`preview_from_outputs`, else the stage
samples the first batch again): ``preview`` is added and ``metrics.json`` sealed again.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..cache import seeds_spec
from ..schedules import check_schedule_node
from ..io import plain
from ..solvers import Solver
from ..solvers.trained import key_content
from . import uncertainty
from .extractors import create_extractor, extract_features
from .metrics import feature_statistics, fid_from_statistics, kid, rmse
from .plots import grid_tiles, sample_grid_png
from ..data.reference import ode_reference
from .reference import real_reference

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
#: 2: sealed with a digest (amedlab.cache.seal), ``seed`` in the key, the shapes and the bits' environment recorded
#: (``preview`` is optional within format 2: a cell without one is still tabulated, only not pictured)
METRICS_FORMAT = 2
#: the cell's first images, kept for the sweep's picture (stage=table: samples_by_solver.png)
PREVIEW_FILE = "preview.npz"
#: how many: the same first seeds in every cell of a sweep (cells share ``eval.seeds``), small enough
#: to keep in every cell
PREVIEW_COUNT = 8


# ------------------------------------------------------------------------------------------------
# What a cell is
# ------------------------------------------------------------------------------------------------

def cell_schedule(schedule: Mapping, solver_name: str, per_solver: Mapping | None) -> dict:
    """The run's schedule with ``eval.schedule_per_solver[solver_name]`` applied on top."""
    out = plain(dict(schedule))
    override = (per_solver or {}).get(solver_name)
    if override:
        unknown = set(override) - {"kind", "rho", "sigma_min", "sigma_max"}
        if unknown:
            raise ValueError(f"eval.schedule_per_solver.{solver_name} has unknown keys {sorted(unknown)}; "
                             "accepted: kind, rho, sigma_min, sigma_max")
        out.update(plain(dict(override)))
    check_schedule_node(out)
    return out


def input_files(spec, memo_dir=None) -> dict:
    """Content digests of the files a cell reads (model, predictor, extractor weights, real data):
    replacing a file at the same path makes another cell, never a skipped one. ``spec``: the cell's
    :class:`~amedlab.specs.EvaluateSpec` (as every function here)."""
    from ..cache import file_digest

    return {"model": file_digest(spec.model_path, memo_dir), "predictor": file_digest(spec.solver_node.get("predictor"), memo_dir),
            "extractor_weights": file_digest(spec.weights, memo_dir), "real": file_digest(spec.real_path, memo_dir)}


def cell_spec(spec, files: dict) -> dict:
    """Everything that determines a cell's numbers (not the batch size, threads or logger), files by
    content (:func:`input_files`): the cell key's content."""
    out = {
        "files": files,  # input_files(): the inputs by content
        "format": METRICS_FORMAT, "model": spec.model_config, "solver": spec.solver_node, "nfe": int(spec.nfe),
        "seed": int(spec.seed),  # KID's random subsets (and a distillation's trajectories) use it
        "schedule": spec.schedule, "seeds": seeds_spec(spec.seeds), "dtype": spec.dtype_name,
        "precision": spec.precision, "extractor": spec.extractor, "extractor_weights": spec.weights,
        "real": spec.real, "dataset": spec.dataset if spec.real.get("source") == "dataset" else None,
        "kid": [spec.kid, spec.kid_subsets, spec.kid_subset_size],
        "ode_reference": {k: v for k, v in spec.ode_reference.items() if k != "chunk_size"},
    }
    boot = spec.bootstrap  # the intervals' settings (not what is kept on disk)
    out["bootstrap"] = {"format": uncertainty.FORMAT, **{k: boot[k] for k in uncertainty.NUMERIC_KEYS}}
    if spec.trained is not None and spec.trained_settings is not None:  # a cell that trains its rule's part:
        # what it is trained for, under the hook's key (AMED: DistillSpec.settings() under distill)
        out[spec.trained.key] = key_content(spec.trained, spec.trained_settings)
    return out


def check_finite(metrics: Mapping, what: str) -> None:
    """A complete metrics.json never holds NaN or inf (anywhere in it): such a result is an error,
    and nothing is written."""
    from ..errors import ResultError

    bad = {}

    def walk(node, path):
        if isinstance(node, float) and not math.isfinite(node):
            bad[path] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(metrics, "")
    if bad:
        raise ResultError(f"{what}: non-finite values {bad}; metrics.json is not written (the samples or the real "
                          "statistics hold NaN/inf: check the model, eval.dtype and eval.precision)")


def extra_outputs(out_dir: Path, sample_grid: int, save_samples: bool) -> list[Path]:
    """The files a cell's settings ask for besides metrics.json (a finished cell lacking one is redone)."""
    return ([out_dir / "samples.png"] if sample_grid > 0 else []) + ([out_dir / "samples.npz"] if save_samples else [])


def finished_metrics(out_dir: Path, key: str, outputs=()) -> dict | None:
    """The cell's metrics if ``out_dir`` holds a sealed, complete metrics.json for the same key and
    every file of ``outputs``; otherwise None, with the reason logged when a metrics.json is there."""
    from ..cache import seal_problem

    path = out_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = f"unreadable ({type(err).__name__})"
    else:
        reason = seal_problem(metrics)
        if reason is None and not (metrics.get("complete") is True and metrics.get("format") == METRICS_FORMAT):
            reason = "incomplete or of another format version"
        elif reason is None and metrics.get("cell_key") != key:
            reason = "made for other settings (another cell key)"
        elif reason is None and (missing := [str(p.name) for p in outputs if not Path(p).is_file()]):
            reason = f"{', '.join(missing)} asked for and missing"
    if reason is None:
        return metrics
    log.warning("%s is not reused: %s; the cell is computed", path, reason)
    return None


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def cell_solver(spec, model, files: Mapping, use_cache: bool) -> tuple[Solver, dict | None]:
    """The cell's solver and a record of where its trained part came from. A rule that needs one is
    asked through its ``trained`` hook (:mod:`amedlab.solvers.trained`): the part given as a file
    (``solver.predictor``, opened by the checks), or the hook's ``prepare`` (cached or trained now:
    AMED's predictor, the learned grid + coefficients, a user's)."""
    hook = spec.trained
    if hook is None:
        return spec.solver.build(), None
    if spec.trained_part is not None:
        part, info = spec.trained_part, {"source": "file", "path": spec.solver.predictor, "sha256": files["predictor"],
                                         "records": []}
    else:
        part, info = hook.prepare(model, spec.trained_settings, spec.trained_cell, use_cache)
    return spec.solver.build(**hook.build_kwargs(part, spec.device)), info


def cell_grid(spec, solver: Solver) -> torch.Tensor:
    """The grid the cell samples on (and records): the schedule's, or the one the solver learned."""
    own = solver.rule.own_grid()
    return spec.schedule_spec.grid(spec.num_points) if own is None else own


def save_samples(out_dir: Path, images: torch.Tensor, seeds, grid_size: int, keep: bool) -> Path | None:
    """``samples.png`` (the first ``grid_size`` images) and, if ``keep``, ``samples.npz`` (uint8 images
    and seeds); returns the PNG's path."""
    grid_path = sample_grid_png(images[:grid_size], out_dir / "samples.png") if grid_size > 0 else None
    if keep:
        import io

        import numpy as np

        from ..io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez_compressed(buf, images=images.numpy(), seeds=np.asarray(seeds))
        atomic_write_bytes(out_dir / "samples.npz", buf.getvalue())
    return grid_path


# ------------------------------------------------------------------------------------------------
# The preview: the first images of a cell, for the sweep's picture
# ------------------------------------------------------------------------------------------------

def write_preview(out_dir: Path, images, seeds, source: str = "cell") -> dict:
    """``preview.npz`` (the first :data:`PREVIEW_COUNT` uint8 images ``[K, C, H, W]`` and their seeds);
    returns the ``preview`` entry of ``metrics.json`` (seeds, shape, sha256 of the file, where the
    images came from: ``cell`` when sampled with the metrics, else the file or the regeneration that
    gave them to a finished cell)."""
    import hashlib
    import io
    import zipfile

    import numpy as np

    from ..io import atomic_write_bytes

    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    k = min(PREVIEW_COUNT, len(arr), len(seeds))
    arr, kept = np.ascontiguousarray(arr[:k], dtype=np.uint8), [int(s) for s in list(seeds)[:k]]
    if arr.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W]; got shape {arr.shape}")
    buf = io.BytesIO()
    # an .npz (np.load reads it) with fixed timestamps: the same images give the same bytes, and the same
    # sha256 in metrics.json (np.savez stamps the current time)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, value in (("images", arr), ("seeds", np.asarray(kept, np.int64))):
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(entry, "w") as f:
                np.lib.format.write_array(f, value, allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(Path(out_dir) / PREVIEW_FILE, data)
    return {"file": PREVIEW_FILE, "seeds": kept, "shape": list(arr.shape[1:]), "sha256": hashlib.sha256(data).hexdigest(),
            "source": source}


def read_preview(metrics: Mapping, cell_dir) -> tuple[tuple | None, str | None]:
    """((images uint8 ``[K, C, H, W]``, seeds), None) or (None, why not): no ``preview`` recorded (a cell
    evaluated before previews were kept), its file missing, or not the file ``metrics.json`` recorded."""
    import hashlib
    import io
    import zipfile

    import numpy as np

    info = metrics.get("preview")
    if info is None:
        return None, "no preview (evaluated before previews were kept)"
    if not isinstance(info, Mapping) or not isinstance(info.get("seeds"), list) or not isinstance(info.get("sha256"), str):
        return None, f"preview={info!r} in {METRICS_FILE} (accepted: an object with seeds and sha256)"
    path = Path(cell_dir) / Path(str(info.get("file") or PREVIEW_FILE)).name  # never outside the cell's folder
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"{path} is {'missing' if isinstance(err, FileNotFoundError) else f'unreadable ({err})'}"
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        return None, f"{path} does not match the digest in {METRICS_FILE} (changed or truncated)"
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            images, seeds = z["images"], [int(s) for s in z["seeds"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        return None, f"{path} is not a preview ({type(err).__name__})"
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(seeds) or seeds != info["seeds"]:
        return None, f"{path} holds {images.dtype} {list(images.shape)} for seeds {seeds}, not what {METRICS_FILE} records"
    return (images, seeds), None


def preview_from_outputs(out_dir: Path, metrics: Mapping, seeds) -> tuple[object, str] | None:
    """(the first images of a finished cell, the file they came from) read back from what the cell
    wrote with its metrics: ``samples.npz`` (all images and seeds), else ``samples.png`` (a lossless
    grid of the first ``eval.sample_grid`` images); None when neither holds them. A file newer than
    ``metrics.json`` is not the cell's (another cell's run in the folder, killed before its metrics)."""
    import zipfile

    import numpy as np

    metrics_path = Path(out_dir) / METRICS_FILE
    k = min(PREVIEW_COUNT, len(seeds))
    shape = metrics.get("sample_shape")

    def cells_own(path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime_ns <= metrics_path.stat().st_mtime_ns

    npz = Path(out_dir) / "samples.npz"
    if cells_own(npz):
        try:
            with np.load(npz, allow_pickle=False) as z:
                images, kept = z["images"], [int(s) for s in z["seeds"]]
            if kept[:k] == [int(s) for s in seeds[:k]] and images.dtype == np.uint8 and images.ndim == 4:
                return images[:k], "samples.npz"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("%s is not readable (%s); not used for the preview", npz, type(err).__name__)
    png = Path(out_dir) / "samples.png"
    if metrics.get("sample_grid") and isinstance(shape, list) and len(shape) == 3 and cells_own(png):
        try:
            images = grid_tiles(png, k, shape)
        except OSError as err:
            log.warning("%s is not readable (%s); not used for the preview", png, err)
            images = None
        if images is not None:
            return images, "samples.png"
    return None


def feature_metrics(spec, images: torch.Tensor) -> dict:
    """FID and KID of ``images`` against the real data in the extractor's feature space (torch-fidelity
    features; cached real statistics); also the features and the real reference, for the intervals."""
    boot = spec.bootstrap
    real = real_reference(spec.real, spec.dataset, spec.extractor, spec.weights, spec.cache_dir, spec.device,
                          spec.batch_size, need_features=spec.kid or (boot["enabled"] and boot["real"]))
    fe = create_extractor(spec.extractor, spec.weights, spec.device)
    features = extract_features(fe, images, spec.batch_size)
    out = {"fid": fid_from_statistics(feature_statistics(features), real), "features": features, "real": real,
           "kid": {"kid_mean": None, "kid_std": None, "kid_subset_size": None, "kid_subsets": None}}
    if spec.kid and real["features"] is not None:
        out["kid"] = kid(features, real["features"], spec.kid_subsets, spec.kid_subset_size, seed=spec.seed)
    return out


def trajectory_error(spec, model, solver: Solver, samples: torch.Tensor) -> tuple[float, torch.Tensor, dict]:
    """(RMSE, reference, its description): the samples against the high-NFE solution from the same noise."""
    batch = spec.batch_size
    smin, smax = float(spec.schedule["sigma_min"]), float(spec.schedule["sigma_max"])
    reference, ref_info = ode_reference(model, spec.ode_reference, smin, smax, spec.seeds, spec.cache_dir, batch, spec.dtype)
    if solver.final_step == "denoise":  # the cell ends on D(x, sigma_min): compare like with like
        with torch.no_grad():
            reference = torch.cat([model(r.to(spec.device), smin).cpu() for r in reference.split(batch)])
    return rmse(samples, reference), reference, ref_info


# ------------------------------------------------------------------------------------------------
# The limit cell: the ODE reference scored as a cell
# ------------------------------------------------------------------------------------------------

def is_limit_cell(spec) -> bool:
    """Whether the cell samples exactly as ``eval.ode_reference`` (rule, AFS, final step, options, NFE,
    schedule): then its samples are the reference's, and the cell is the *limit* of the table, the
    teacher's own ODE solution that no ODE solver of it can beat (docs/evaluation.md). The reference
    always ends at sigma_min (:mod:`amedlab.data.reference`), its schedule between the cell's ends."""
    if spec.trained is not None:  # a trained rule is a learned solver, never the plain reference rule
        return False
    ref = spec.ode_reference
    ref_solver, ref_schedule = plain(dict(ref.get("solver") or {})), dict(ref.get("schedule") or {})

    def rule(node: Mapping) -> dict:
        return {"name": node.get("name"), "afs": node.get("afs") or False, "options": dict(node.get("options") or {}),
                "_target_": node.get("_target_")}

    return (rule(spec.solver.node()) == rule(ref_solver) and spec.solver.final_step == "sigma_min"
            and int(spec.nfe) == int(ref["nfe"]) and str(spec.schedule["kind"]) == str(ref_schedule.get("kind"))
            and float(spec.schedule["rho"]) == float(ref_schedule.get("rho", float("nan"))))


def limit_label(ref: Mapping) -> str:
    """The limit row's name, from the reference solver's own row name and NFE: ``EDM (Heun)`` at 40
    NFE gives ``ODE reference (Heun, 40 NFE)`` (the rule's name without its family, tags kept: a
    reference with AFS reads ``Heun, AFS``); a ``label`` given to the reference solver is used as it is."""
    import re

    from ..solvers.spec import solver_label

    node = plain(dict(ref["solver"]))
    full = solver_label(node)
    family = re.fullmatch(r"([^()]+) \([^()]+\)", solver_label({"name": node["name"], "_target_": node.get("_target_")}))
    method = full
    if not node.get("label") and family and full.startswith(family.group(1) + " (") and full.endswith(")"):
        method = full[len(family.group(1)) + 2:-1]
    return f"ODE reference ({method}, {int(ref['nfe'])} NFE)"


def limit_samples(spec, model) -> tuple[torch.Tensor, int]:
    """The limit cell's samples and NFE: the cached ODE reference itself (computed once, as for every
    cell's RMSE, when no cell has yet), no sampling of its own. Its NFE was counted when it was
    computed (:func:`amedlab.data.reference.ode_reference` refuses any other count)."""
    smin, smax = float(spec.schedule["sigma_min"]), float(spec.schedule["sigma_max"])
    reference, _ = ode_reference(model, spec.ode_reference, smin, smax, spec.seeds, spec.cache_dir, spec.batch_size,
                                 spec.dtype)
    return reference, int(spec.ode_reference["nfe"])


def bits_environment(device: str, dtype: torch.dtype) -> dict:
    """What decides a cell's last bits besides its key: the same values give the same bits; trained rows
    may move across CPUs and BLAS builds (docs/reliability.md)."""
    import platform

    import numpy as np

    env = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkl": torch.backends.mkl.is_available(), "torch_threads": torch.get_num_threads(), "dtype": str(dtype),
           "device": device}
    if str(device).startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def summary_line(metrics: Mapping, unc: Mapping | None, path: Path) -> str:
    """The line the stage prints: FID (KID) and RMSE with their intervals, the time, the file."""
    kid_text = f", KID {metrics['kid_mean']:.4g}" if metrics["kid_mean"] is not None else ""
    pm = {k: "" for k in ("fid", "rmse")}
    if unc:
        pm = {"fid": f" ± {unc['z'] * unc['fid']['samples']['se']:.2g}", "rmse": f" ± {unc['z'] * unc['rmse']['se']:.2g}"}
    s = metrics["schedule"]
    return (f"{metrics['label']} NFE {metrics['nfe']} ({s['kind']} rho={s['rho']}, {metrics['num_samples']} samples): "
            f"FID {metrics['fid']:.4g}{pm['fid']}{kid_text}, RMSE vs high-NFE {metrics['rmse']:.4g}{pm['rmse']}  "
            f"[{metrics['timing']['total_s']:.1f} s]\nwritten: {path}")
