"""Intervals for a cell's FID, KID and RMSE, and paired comparisons of two cells (same seeds).

A cell's numbers come from a finite set of samples (``eval.seeds``) compared with a finite real set,
so they carry sampling noise. Everything here reuses what the cell already computed (no model call):

- **FID, KID** (Heusel et al. 2017; Binkowski et al. 2018): a bootstrap. Replicate ``b`` resamples
  the *seed indices* ``0..n-1`` with replacement (counts ``w_b``) and, in a separate stream, the
  real set's indices (counts ``v_b``). Three spreads are reported apart: ``samples`` (generated
  resampled, real set fixed: another draw of seeds), ``real`` (real resampled, generated fixed:
  another real set of the same size) and ``total`` (both at once). A per-cell interval is the normal
  one, ``estimate +- z * se`` with ``se`` the replicates' standard deviation. KID's bootstrapped
  statistic is the unbiased MMD^2 of the polynomial kernel over *all* samples (``kid_full``; the
  reported ``kid_mean`` is torch-fidelity's average over random subsets of the same sets).
- **RMSE** against the high-NFE solution: per-sample mean squared errors ``e_i`` (seed ``i``);
  RMSE = sqrt(mean e_i), standard error by the delta method, ``std(e) / (2 RMSE sqrt(n))``.
- **Paired differences**: every cell of a sweep uses the same seeds and the same real set, and the
  replicates are drawn from ``(bootstrap seed, n, m)`` alone, so replicate ``b`` of two cells used the
  same resampled indices: ``fid_A[b] - fid_B[b]`` is a paired bootstrap of the difference, with no
  recomputation. Its interval is the percentile interval of those differences. RMSE: the paired
  per-sample delta method, ``(RMSE_A - RMSE_B) +- z * std(e_A/(2 RMSE_A) - e_B/(2 RMSE_B)) / sqrt(n)``.
- **Paired ratios** (the table's ratio view, a cell over the limit cell): ``fid_A[b] / fid_B[b]`` from
  the same paired replicates, its percentile interval centred on the ratio (FID and KID; no RMSE ratio).
- **Training replicates** (one trained row from k training seeds, :func:`pooled_interval` and the
  functions after it): the interval over training and evaluation seeds pools the k cells' stored
  replicates, each centred on its own value, with equal weight (RMSE: the mixture of the k normals);
  a claim that one row is lower must hold for every replicate pair (:func:`replicate_diff`).

Cost: one replicate is one weighted covariance of the generated features (n d^2) and of the real
features (m d^2), three symmetric eigenproblems of size d, and three kernel-weighted sums (n^2 + nm
+ m^2) for KID. Digits features (d = 64, n = 2000, m = 1437): a few milliseconds per replicate.
Inception features (d = 2048, n = 50000): about 4e11 flops per replicate on the covariances alone
(a minute or two per replicate on one CPU core; on a GPU, ``device``, not measured), and KID's
n x n kernel matrix is skipped above ``kid_max_samples``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..cache import digest, seeds_spec
from ..io import atomic_write_bytes
from ..progress import progress
from .fid import frechet, psd_root
from .metrics import per_sample_mse

FILE = "uncertainty.npz"
FORMAT = 2  # part of a cell's key: a change here recomputes the cells
#: the replicate streams: 0 = generated seed indices, 1 = real-set indices (never change: pairing)
GEN_STREAM, REAL_STREAM = 0, 1
DEFAULTS = {"enabled": True, "resamples": 500, "seed": 0, "level": 0.95, "real": True, "kid": True,
            "kid_max_samples": 5000, "keep_features": "auto", "max_feature_mb": 64}
#: settings that change the replicates (the others only change what is kept on disk)
NUMERIC_KEYS = ("enabled", "resamples", "seed", "level", "real", "kid", "kid_max_samples")


def settings(node: Mapping | None) -> dict:
    """``eval.bootstrap`` with defaults filled in, checked (a bad value names the key)."""
    from ..limits import MAX_RESAMPLES, SEED_LIMIT

    out = dict(DEFAULTS)
    if isinstance(node, bool):  # eval.bootstrap=false: off; true: the defaults
        return {**out, "enabled": node}
    if node is not None and not isinstance(node, Mapping):
        raise ValueError(f"eval.bootstrap={node!r}; accepted: false, true, or a mapping of {', '.join(DEFAULTS)}")
    unknown = set(node or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"eval.bootstrap has unknown keys {sorted(unknown)}; accepted: {', '.join(DEFAULTS)}")
    out.update({k: v for k, v in dict(node or {}).items()})
    if not isinstance(out["resamples"], int) or isinstance(out["resamples"], bool) or not 20 <= out["resamples"] <= MAX_RESAMPLES:
        raise ValueError(f"eval.bootstrap.resamples={out['resamples']!r}; accepted: an integer in [20, {MAX_RESAMPLES}] (e.g. 500)")
    if not isinstance(out["level"], (int, float)) or not 0.5 <= float(out["level"]) < 1:
        raise ValueError(f"eval.bootstrap.level={out['level']!r}; accepted: a number in [0.5, 1), e.g. 0.95")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool) or not 0 <= out["seed"] < SEED_LIMIT:
        raise ValueError(f"eval.bootstrap.seed={out['seed']!r}; accepted: an integer in [0, 2^32)")
    for key in ("kid_max_samples", "max_feature_mb"):
        v = out[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1e12:
            raise ValueError(f"eval.bootstrap.{key}={v!r}; accepted: a number >= 0")
    if out["keep_features"] not in (True, False, "auto"):
        raise ValueError(f"eval.bootstrap.keep_features={out['keep_features']!r}; accepted: true, false, auto")
    for key in ("enabled", "real", "kid"):
        if not isinstance(out[key], bool):
            raise ValueError(f"eval.bootstrap.{key}={out[key]!r}; accepted: true, false")
    out["level"] = float(out["level"])
    return out


def z_value(level: float) -> float:
    """Two-sided normal quantile: 1.96 for level 0.95."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bootstrap counts: n indices drawn with replacement from 0..n-1."""
    return np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)


def _streams(seed: int, n: int, m: int | None):
    """One generator per stream, determined by (seed, stream, set size) only: two cells with the same
    seeds and real set draw the same indices in every replicate (what makes them paired)."""
    gen = np.random.default_rng([int(seed), GEN_STREAM, int(n)])
    real = np.random.default_rng([int(seed), REAL_STREAM, int(m)]) if m else None
    return gen, real


# ------------------------------------------------------------------------------------------------
# FID from weighted statistics
# ------------------------------------------------------------------------------------------------

def _stats(f: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased covariance) of rows of ``f`` repeated ``w`` times (w None: once each); with
    ``w`` of shape [B, n], a batch of B replicates ([B, d], [B, d, d]). ``f`` should be centred (by
    its plain mean), which keeps the float64 sums accurate."""
    if w is None:
        n = f.shape[0]
        mu = f.mean(0)
        c = f - mu
        return mu, (c.T @ c) / (n - 1)
    n = w.sum(-1)
    mu = (w @ f) / n[:, None]
    rows = max(1, 2**24 // f.shape[1])  # rows per product: bounds the [d, rows] temporary (Inception: 50k x 2048)
    # one product per replicate: faster on a CPU than one batched [B, d, n] product
    s = torch.stack([sum((f[i:i + rows].T * wb[i:i + rows]) @ f[i:i + rows] for i in range(0, f.shape[0], rows))
                     for wb in w])
    s = s - n[:, None, None] * mu[:, :, None] * mu[:, None, :]
    return mu, s / (n - 1)[:, None, None]


# ------------------------------------------------------------------------------------------------
# KID (unbiased MMD^2, polynomial kernel (x.y/d + 1)^3 as torch-fidelity) with bootstrap weights
# ------------------------------------------------------------------------------------------------

def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _kid_terms(gen: torch.Tensor, real: torch.Tensor):
    kgg, krr, kgr = _kernel(gen, gen), _kernel(real, real), _kernel(gen, real)
    return kgg, torch.diagonal(kgg).clone(), krr, torch.diagonal(krr).clone(), kgr


def _kid_parts(terms, w: torch.Tensor | None, v: torch.Tensor | None):
    """The three means of the unbiased MMD^2 (torch-fidelity's ``mmd2``, unequal set sizes) for bootstrap
    count vectors ``w [B, n]`` / ``v [B, m]`` (None: every sample once)."""
    kgg, dgg, krr, drr, kgr = terms
    n, m = kgg.shape[0], krr.shape[0]
    # pairs of copies of one sample are left out (k(x, x) is no distance): sums over pairs of distinct
    # original indices, divided by their number, sum(w)^2 - sum(w^2); with w = 1 this is n (n - 1)
    if w is None:
        gg = ((kgg.sum() - dgg.sum()) / (n * (n - 1))).reshape(1)
    else:
        gg = (((w @ kgg) * w).sum(1) - (w * w) @ dgg) / (w.sum(1) ** 2 - (w * w).sum(1))
    if v is None:
        rr = ((krr.sum() - drr.sum()) / (m * (m - 1))).reshape(1)
    else:
        rr = (((v @ krr) * v).sum(1) - (v * v) @ drr) / (v.sum(1) ** 2 - (v * v).sum(1))
    if w is None and v is None:
        gr = kgr.sum().reshape(1)
    elif v is None:
        gr = w @ kgr.sum(1)
    elif w is None:
        gr = v @ kgr.sum(0)
    else:
        gr = ((w @ kgr) * v).sum(1)
    return gg, rr, gr / (n * m)


def _kid(terms, w: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD^2 (KID) for a batch of count vectors (None: the sets as they are)."""
    gg, rr, gr = _kid_parts(terms, w, v)
    return gg + rr - 2 * gr


# ------------------------------------------------------------------------------------------------
# One cell
# ------------------------------------------------------------------------------------------------

def per_sample_sq_errors(samples: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Mean squared error of each sample over its pixels (:func:`.metrics.per_sample_mse`): RMSE = sqrt(mean)."""
    return per_sample_mse(samples, reference).numpy()


def rmse_interval(sq_err: np.ndarray, level: float = 0.95) -> dict:
    """RMSE and its delta-method standard error over samples."""
    e = np.asarray(sq_err, np.float64)
    n = len(e)
    r = math.sqrt(e.mean())
    se = float(e.std(ddof=1) / math.sqrt(n) / (2 * r)) if r > 0 and n > 1 else 0.0
    z = z_value(level)
    return {"estimate": r, "se": se, "ci": [r - z * se, r + z * se], "method": "delta method over per-sample MSE"}


def _summary(estimate: float | None, reps: np.ndarray, z: float) -> dict | None:
    if estimate is None or reps.size == 0:
        return None
    se = float(reps.std(ddof=1))
    return {"se": se, "ci": [estimate - z * se, estimate + z * se], "replicate_mean": float(reps.mean())}


def real_digest(real_features: torch.Tensor | None, real_mu=None, real_sigma=None) -> str:
    """A short hash of the real set (its features, else its statistics): cells pair only on equal ones."""
    h = hashlib.sha256()
    if real_features is not None:
        h.update(np.ascontiguousarray(real_features.detach().cpu().float().numpy()).tobytes())
    else:
        h.update(np.ascontiguousarray(np.asarray(real_mu, np.float32)).tobytes())
        h.update(np.ascontiguousarray(np.asarray(real_sigma, np.float32)).tobytes())
    return h.hexdigest()[:24]


def cell_bootstrap(gen_features: torch.Tensor, real_mu, real_sigma, real_features: torch.Tensor | None,
                   boot: Mapping | None = None, device: str = "cpu") -> tuple[dict, dict]:
    """Bootstrap replicates of FID and KID for one cell.

    Returns (summary, arrays): summary has the point estimates, ``se`` and normal interval of each
    spread (``samples``, ``real``, ``total``); arrays has the replicates (``fid_samples``, ...) that
    a later paired comparison subtracts. ``real_features`` None (statistics only): FID over samples.
    """
    boot = settings(boot)
    t0 = time.perf_counter()
    dev = torch.device(device)
    gen = gen_features.detach().to(dev, torch.float64)
    n = gen.shape[0]
    real = None if real_features is None else real_features.detach().to(dev, torch.float64)
    m = None if real is None else real.shape[0]
    B, z = int(boot["resamples"]), z_value(boot["level"])
    use_real = bool(boot["real"]) and real is not None
    # centre both sets by one common shift (FID is translation invariant): accurate float64 sums
    shift = gen.mean(0)
    gen = gen - shift
    if real is not None:
        real = real - shift
        mu_r, s_r = _stats(real, None)  # the real statistics from the same features (equal to the cached ones)
    else:
        mu_r = torch.as_tensor(np.asarray(real_mu), dtype=torch.float64, device=dev) - shift
        s_r = torch.as_tensor(np.asarray(real_sigma), dtype=torch.float64, device=dev)
    root_r, tr_r = psd_root(s_r), torch.trace(s_r)
    mu_g, s_g = _stats(gen, None)
    root_g, tr_g = psd_root(s_g), torch.trace(s_g)
    fid_hat = float(frechet(mu_g, s_g, mu_r, root_r, tr_r))
    do_kid = bool(boot["kid"]) and real is not None and n <= int(boot["kid_max_samples"]) and m <= int(boot["kid_max_samples"])
    terms = _kid_terms(gen + shift, real + shift) if do_kid else None  # the kernel is not translation invariant
    kid_hat = float(_kid(terms)[0]) if do_kid else None

    rng_g, rng_r = _streams(boot["seed"], n, m)
    W = np.stack([_counts(rng_g, n) for _ in range(B)])          # replicate b: the same draws in every cell
    V = np.stack([_counts(rng_r, m) for _ in range(B)]) if use_real else None
    fid_s, fid_r, fid_t = np.empty(B), np.empty(B if use_real else 0), np.empty(B if use_real else 0)
    d = gen.shape[1]
    chunk = max(1, min(B, 2**22 // (d * d)))  # replicates per batch: bounds the [chunk, d, d] covariances
    # a bar on a terminal only, per chunk of replicates (digits: one chunk; Inception: minutes per replicate)
    with progress(total=B, desc=f"bootstrap FID, {n} samples", unit="rep", leave=False) as bar:
        for b0 in range(0, B, chunk):
            sl = slice(b0, min(B, b0 + chunk))
            mu_gb, s_gb = _stats(gen, torch.as_tensor(W[sl], device=dev))
            fid_s[sl] = frechet(mu_gb, s_gb, mu_r, root_r, tr_r).cpu().numpy()
            if use_real:
                mu_rb, s_rb = _stats(real, torch.as_tensor(V[sl], device=dev))
                fid_r[sl] = frechet(mu_rb, s_rb, mu_g, root_g, tr_g).cpu().numpy()  # generated fixed, real resampled
                tr_rb = torch.diagonal(s_rb, dim1=-2, dim2=-1).sum(-1)
                fid_t[sl] = frechet(mu_gb, s_gb, mu_rb, psd_root(s_rb), tr_rb).cpu().numpy()
            bar.update(sl.stop - sl.start)
    arrays = {"fid_samples": fid_s, "fid_real": fid_r, "fid_total": fid_t,
              "kid_samples": np.empty(0), "kid_real": np.empty(0), "kid_total": np.empty(0)}
    if do_kid:  # each big product once: the samples / real / total replicates share them
        Wt = torch.as_tensor(W, device=dev)
        gg_w, rr_1, gr_w1 = _kid_parts(terms, Wt, None)
        arrays["kid_samples"] = (gg_w + rr_1 - 2 * gr_w1).cpu().numpy()
        if use_real:
            Vt = torch.as_tensor(V, device=dev)
            gg_1, rr_v, gr_1v = _kid_parts(terms, None, Vt)
            gr_wv = ((Wt @ terms[4]) * Vt).sum(1) / (n * m)
            arrays["kid_real"] = (gg_1 + rr_v - 2 * gr_1v).cpu().numpy()
            arrays["kid_total"] = (gg_w + rr_v - 2 * gr_wv).cpu().numpy()
    summary = {
        "fid_estimate": fid_hat, "kid_full": kid_hat,
        "fid": {k: _summary(fid_hat, arrays[f"fid_{k}"], z) for k in ("samples", "real", "total")},
        "kid": {k: _summary(kid_hat, arrays[f"kid_{k}"], z) for k in ("samples", "real", "total")},
        "num_samples": n, "num_real": m, "seconds": time.perf_counter() - t0,
    }
    if do_kid is False and bool(boot["kid"]):
        summary["kid_note"] = ("no real features (statistics only)" if real is None else
                               f"sets larger than eval.bootstrap.kid_max_samples={boot['kid_max_samples']}")
    return summary, arrays


def pairing_key(seeds_key: str, n: int, real_id: str, m: int | None, boot: Mapping) -> str:
    """Cells with equal keys drew the same indices in every replicate: their replicates pair."""
    boot = settings(boot)
    blob = {"format": FORMAT, "seeds": seeds_key, "n": n, "real": real_id, "m": m,
            **{k: boot[k] for k in NUMERIC_KEYS}}
    return digest(blob)


def evaluate_cell(out_dir, seeds, gen_features, real: Mapping, samples, reference, boot: Mapping | None,
                  device: str = "cpu") -> dict | None:
    """What ``stage=evaluate`` stores: the bootstrap, the RMSE interval, and ``uncertainty.npz`` (per-sample
    squared errors and the replicates by seed, the features when small). Returns the ``uncertainty``
    entry of ``metrics.json`` (None when ``eval.bootstrap.enabled`` is false)."""
    boot = settings(boot)
    if not boot["enabled"]:
        return None
    t0 = time.perf_counter()
    sq_err = per_sample_sq_errors(samples, reference)
    summary, arrays = cell_bootstrap(gen_features, real["mu"], real["sigma"], real.get("features"), boot, device)
    rm = rmse_interval(sq_err, boot["level"])
    real_id = real_digest(real.get("features"), real["mu"], real["sigma"])
    feats = gen_features.detach().cpu().float().numpy()
    size_mb = feats.nbytes / 2**20
    keep = boot["keep_features"] is True or (boot["keep_features"] == "auto" and size_mb <= float(boot["max_feature_mb"]))
    spec = seeds_spec(seeds)
    key = pairing_key(spec, len(sq_err), real_id, summary["num_real"], boot)
    meta = {"format": FORMAT, "pairing_key": key, "seeds": spec, "settings": {k: boot[k] for k in NUMERIC_KEYS},
            "fid_estimate": summary["fid_estimate"], "kid_full": summary["kid_full"], "rmse": rm["estimate"]}
    buf = io.BytesIO()
    np.savez_compressed(buf, seeds=np.asarray(list(seeds), np.int64), sq_err=sq_err,
                        features=feats if keep else np.empty((0, feats.shape[1]), np.float32),
                        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                        **{k: np.asarray(v, np.float64) for k, v in arrays.items()})
    data = buf.getvalue()
    atomic_write_bytes(Path(out_dir) / FILE, data)
    return {
        "method": ("bootstrap: seed indices (samples) and real-set indices (real) resampled with replacement, "
                   "separately and together (total); interval = estimate +- z * se (se = std of the replicates); "
                   "RMSE: delta method over per-sample MSE; KID: unbiased MMD^2 over all samples (kid_full)"),
        "level": boot["level"], "z": z_value(boot["level"]), "resamples": int(boot["resamples"]), "seed": int(boot["seed"]),
        "pairing_key": key, "real_digest": real_id,
        "fid": summary["fid"], "fid_estimate": summary["fid_estimate"],
        "kid": summary["kid"], "kid_full": summary["kid_full"], **({"kid_note": summary["kid_note"]} if "kid_note" in summary else {}),
        "rmse": rm, "num_samples": summary["num_samples"], "num_real": summary["num_real"],
        "file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "file_bytes": len(data),
        "features_kept": bool(keep), "features_mb": round(size_mb, 2),
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------
# Reading a cell back, and paired differences
# ------------------------------------------------------------------------------------------------

class CellData:
    """A finished cell's per-sample data (``uncertainty.npz``), checked against ``metrics.json``."""

    def __init__(self, metrics: Mapping, arrays: Mapping, meta: Mapping):
        self.metrics, self.arrays, self.meta = metrics, arrays, meta
        self.pairing_key = meta["pairing_key"]

    def reps(self, metric: str, source: str) -> np.ndarray:
        name = {"fid": "fid", "kid_mean": "kid", "kid": "kid"}[metric]
        return self.arrays[f"{name}_{source}"]


def load_cell(metrics: Mapping, cell_dir) -> tuple[CellData | None, str | None]:
    """(data, None) or (None, why not): no uncertainty recorded (an older cell), file missing, or corrupt."""
    info = metrics.get("uncertainty")
    if not info:
        return None, "no per-sample data (evaluated without intervals)"
    path = Path(cell_dir) / info.get("file", FILE)
    if not path.is_file():
        return None, f"{path} is missing"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.get("sha256"):
        return None, f"{path} does not match the digest in metrics.json (changed or truncated)"
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(bytes(z["meta"]).decode())
    return CellData(metrics, arrays, meta), None


def diff_from_replicates(est_a: float, est_b: float, reps_a: np.ndarray, reps_b: np.ndarray, level: float = 0.95) -> dict:
    """A - B with the percentile interval of the paired replicate differences."""
    d = np.asarray(reps_a, np.float64) - np.asarray(reps_b, np.float64)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(est_a - est_b), "lo": float(lo), "hi": float(hi), "se": float(d.std(ddof=1)),
            "significant": bool(lo > 0 or hi < 0), "method": "paired bootstrap, percentile interval"}


def rmse_diff(sq_a: np.ndarray, sq_b: np.ndarray, level: float = 0.95) -> dict:
    """RMSE_A - RMSE_B from per-sample squared errors of the same seeds (paired delta method)."""
    a, b = np.asarray(sq_a, np.float64), np.asarray(sq_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"per-sample errors of different lengths: {a.shape} vs {b.shape}")
    ra, rb = math.sqrt(a.mean()), math.sqrt(b.mean())
    u = (a / (2 * ra) if ra > 0 else 0 * a) - (b / (2 * rb) if rb > 0 else 0 * b)
    se = float(u.std(ddof=1) / math.sqrt(len(u))) if len(u) > 1 else 0.0
    z = z_value(level)
    d = ra - rb
    return {"diff": d, "lo": d - z * se, "hi": d + z * se, "se": se, "significant": bool(d - z * se > 0 or d + z * se < 0),
            "method": "paired per-sample delta method"}


def _paired_replicates(a: CellData, b: CellData, metric: str, source: str) -> tuple[tuple | None, str | None]:
    """((value A, value B, replicates A, replicates B, source used), None) or (None, why they do not pair):
    the FID or KID replicates two cells drew with the same resampled indices (same seeds, same pairing
    key). ``source`` ``total`` falls back to ``samples`` when a cell kept no real-set replicates."""
    if a.pairing_key != b.pairing_key:
        return None, "replicates not paired (different real data or eval.bootstrap settings)"
    src = source
    if src == "total" and (a.reps(metric, "total").size == 0 or b.reps(metric, "total").size == 0):
        src = "samples"
    ra, rb = a.reps(metric, src), b.reps(metric, src)
    if ra.size == 0 or rb.size == 0:
        return None, f"no {metric} replicates"
    if metric == "fid":
        va, vb = a.metrics.get("fid"), b.metrics.get("fid")
    else:  # the replicates are of the full-sample MMD^2, so is the comparison (not of kid_mean's subsets)
        va, vb = a.meta.get("kid_full"), b.meta.get("kid_full")
    if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
        return None, f"no {metric} value"
    return (va, vb, ra, rb, src), None


def paired_diff(a: CellData, b: CellData, metric: str, level: float = 0.95, source: str = "total") -> tuple[dict | None, str | None]:
    """(difference of ``metric`` between two cells, None) or (None, why it cannot be paired).

    ``source``: ``total`` (seeds and real set resampled together; falls back to ``samples`` when the
    cells kept no real-set replicates) or ``samples`` (real set held fixed)."""
    if not np.array_equal(a.arrays["seeds"], b.arrays["seeds"]):
        return None, "different seeds"
    if metric == "rmse":
        return rmse_diff(a.arrays["sq_err"], b.arrays["sq_err"], level), None
    got, why = _paired_replicates(a, b, metric, source)
    if got is None:
        return None, why
    va, vb, ra, rb, src = got
    out = diff_from_replicates(va, vb, ra, rb, level)
    out["source"] = src
    return out, None


def ratio_from_replicates(est_a: float, est_b: float, reps_a: np.ndarray, reps_b: np.ndarray, level: float = 0.95) -> dict:
    """A / B with the percentile interval of the paired replicate ratios A[b] / B[b], centred on A / B
    (B's replicates must be positive: a ratio to a value that the resampling can bring to 0 has no
    interval). Centred because bootstrap FID is biased upward, most for the smallest FIDs: the limit in
    the denominator would pull raw replicate ratios below A / B (FID 4.1 limit, digits: the raw interval
    of a cell at 37.8x was [19.6, 49.1]); a difference's bias cancels, a ratio's does not. The same
    centring as the pooled rows (:func:`pooled_interval`)."""
    a, b = np.asarray(reps_a, np.float64), np.asarray(reps_b, np.float64)
    if est_b <= 0 or not np.all(b > 0):
        raise ValueError(f"the denominator's value ({est_b:.4g}) or some of its replicates (min {b.min():.4g}) are not "
                         "positive: no ratio interval")
    r = a / b
    centred = est_a / est_b + (r - r.mean())
    lo, hi = np.quantile(centred, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": float(est_a / est_b), "a": float(est_a), "b": float(est_b), "lo": float(lo), "hi": float(hi),
            "se": float(r.std(ddof=1)), "method": "paired bootstrap of the ratio, percentile interval centred on the ratio"}


def paired_ratio(a: CellData, b: CellData, metric: str, level: float = 0.95, source: str = "total") -> tuple[dict | None, str | None]:
    """(``metric`` of A as a multiple of B's, None) or (None, why not), paired as :func:`paired_diff`: the
    same resampled seeds (and real set, ``source=total``) in both cells' replicate b, so A[b] / B[b] is a
    bootstrap of the ratio with no recomputation. FID and KID (KID: of ``kid_full``, as the difference);
    the table's ratio view divides every cell by its limit cell (:mod:`.table`)."""
    if not np.array_equal(a.arrays["seeds"], b.arrays["seeds"]):
        return None, "different seeds"
    if metric == "rmse":
        return None, "no RMSE ratio (RMSE is a delta-method interval, no replicates; the limit's RMSE is 0)"
    got, why = _paired_replicates(a, b, metric, source)
    if got is None:
        return None, why
    va, vb, ra, rb, src = got
    try:
        out = ratio_from_replicates(va, vb, ra, rb, level)
    except ValueError as err:
        return None, str(err)
    out["source"] = src
    return out, None


# ------------------------------------------------------------------------------------------------
# Training replicates: one trained row from k training seeds (docs/evaluation.md, training replicates)
# ------------------------------------------------------------------------------------------------
#
# A trained row (AMED's predictor, the learned solver) moves when it is trained again, by as much as its
# interval over the evaluation seeds. Its k replicates (the same cell trained from seed = 0 .. k-1, each on
# its own teacher trajectories) are pooled here from what each cell stored: no model call, no second
# bootstrap. The pooled distribution picks a replicate r uniformly, then one of its bootstrap replicates
# centred on r's own value: value_r + (rep_r[b] - mean_b rep_r) -- centred, as a single cell's interval
# (value +- z se) is centred on its value and never on the replicates' mean, which the resampling biases
# upwards (FID of a resample with repeated seeds: about +1 on digits, as much as the se).

def pooled_samples(values, reps) -> np.ndarray:
    """The pooled bootstrap distribution over training and evaluation seeds: every replicate r's
    replicates centred on its value (``values[r] + reps[r] - mean(reps[r])``), all replicates with equal
    weight (they must hold the same number of replicates: the same eval.bootstrap settings)."""
    reps = [np.asarray(r, np.float64) for r in reps]
    if len(values) != len(reps) or not reps or len({r.size for r in reps}) != 1 or reps[0].size == 0:
        raise ValueError(f"pooling needs one non-empty set of replicates of equal size per value; got sizes "
                         f"{[r.size for r in reps]} for {len(values)} values")
    return np.concatenate([float(v) + (r - r.mean()) for v, r in zip(values, reps)])


def pooled_interval(values, reps, level: float = 0.95) -> dict:
    """Mean over the replicates' ``values`` and the ``level`` percentile interval of :func:`pooled_samples`."""
    pooled = pooled_samples(values, reps)
    lo, hi = np.quantile(pooled, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(np.mean(values)), "lo": float(lo), "hi": float(hi), "se": float(pooled.std(ddof=1)),
            "method": "pooled bootstrap over training replicates (each centred on its value), percentile interval"}


def normal_mixture_interval(means, ses, level: float = 0.95) -> dict:
    """Mean of ``means`` and the ``level`` interval of the equal mixture of N(means[r], ses[r]^2): the
    pooled interval of a delta-method statistic (RMSE), whose replicates are not stored. Its quantiles
    are found by bisection on the mixture's distribution function (exact to 1e-12 of the spread)."""
    from scipy.stats import norm

    m, s = np.asarray(means, np.float64), np.asarray(ses, np.float64)
    scale = max(float(s.max()), float(np.abs(m).max()), 1e-300)
    s = np.maximum(s, 1e-12 * scale)  # a zero se is a point mass: a steep normal in its place

    def quantile(q: float) -> float:
        lo, hi = float((m - 10 * s).min()), float((m + 10 * s).max())
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if norm.cdf((mid - m) / s).mean() < q:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * scale:
                break
        return 0.5 * (lo + hi)

    return {"value": float(m.mean()), "lo": quantile((1 - level) / 2), "hi": quantile((1 + level) / 2),
            "method": "equal mixture of the replicates' delta-method normals"}


def training_spread(values) -> dict | None:
    """The spread of a trained row over its k training seeds: k, min, max and sd (ddof 1) of the
    replicate values (None when a value is missing)."""
    if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    v = np.asarray(values, np.float64)
    return {"k": len(v), "min": float(v.min()), "max": float(v.max()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _pairs(a, b, one):
    """[(i, j, result)] of ``one(a[i], b[j])`` over every replicate pair, or (None, why) at the first that fails."""
    out = []
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            got, why = one(x, y)
            if got is None:
                return None, (why if len(a) * len(b) == 1 else f"replicates {i + 1} and {j + 1}: {why}")
            out.append((i, j, got))
    return out, None


def replicate_diff(a, b, metric: str, level: float = 0.95, source: str = "total") -> tuple[dict | None, str | None]:
    """A - B where A and B are rows given by their replicates' :class:`CellData` (sequences; one cell:
    a sequence of one). One cell each: :func:`paired_diff`, unchanged. Otherwise every replicate pair is
    compared as one cell with another (paired as today) and the result holds over the training seeds:
    ``lo``/``hi`` are the lowest and highest ends over the pairs, ``significant`` only if every pair's
    interval excludes 0 on the same side (the table's bold rule); ``pooled`` is the interval over
    training and evaluation seeds (:func:`pooled_diff`). ``diff``: the difference of the means."""
    a, b = list(a), list(b)
    if len(a) == 1 and len(b) == 1:
        return paired_diff(a[0], b[0], metric, level, source)
    pairs, why = _pairs(a, b, lambda x, y: paired_diff(x, y, metric, level, source))
    if pairs is None:
        return None, why
    ds = [d for _, _, d in pairs]
    lo, hi = min(d["lo"] for d in ds), max(d["hi"] for d in ds)
    out = {"diff": float(np.mean([d["diff"] for d in ds])), "lo": lo, "hi": hi, "se": max(d["se"] for d in ds),
           "significant": bool(lo > 0 or hi < 0), "replicates": [len(a), len(b)], "pairs": len(ds),
           "method": f"{ds[0]['method']}, for every one of the {len(a)} x {len(b)} replicate pairs (lo/hi: the extreme "
                     "ends over the pairs)"}
    if "source" in ds[0]:
        out["source"] = ds[0]["source"]
    pooled, why = pooled_diff(a, b, metric, level, source)
    out["pooled"] = pooled
    return out, None


def pooled_diff(a, b, metric: str, level: float = 0.95, source: str = "total") -> tuple[dict | None, str | None]:
    """A - B over training and evaluation seeds, A and B rows given by their replicates' :class:`CellData`:
    the difference of the means, and the percentile interval of the equal mixture over replicate pairs
    (r, s) of each pair's paired replicate differences centred on its own difference (FID, KID); RMSE:
    the mixture of the pairs' paired delta-method normals. One cell each: as :func:`paired_diff`."""
    a, b = list(a), list(b)
    if len(a) == 1 and len(b) == 1:
        return paired_diff(a[0], b[0], metric, level, source)
    if metric == "rmse":
        pairs, why = _pairs(a, b, lambda x, y: paired_diff(x, y, metric, level, source))
        if pairs is None:
            return None, why
        ds = [d for _, _, d in pairs]
        out = normal_mixture_interval([d["diff"] for d in ds], [d["se"] for d in ds], level)
        out["method"] = "paired per-sample delta method, " + out["method"] + " over the replicate pairs"
    else:
        def one(x, y):
            if not np.array_equal(x.arrays["seeds"], y.arrays["seeds"]):
                return None, "different seeds"
            return _paired_replicates(x, y, metric, source)

        pairs, why = _pairs(a, b, one)
        if pairs is None:
            return None, why
        got = [g for _, _, g in pairs]
        out = pooled_interval([va - vb for va, vb, *_ in got], [ra - rb for _, _, ra, rb, _ in got], level)
        out["method"] = "paired bootstrap, " + out["method"] + " over the replicate pairs"
        out["source"] = got[0][4]
    diff = out.pop("value")
    out.update(diff=diff, significant=bool(out["lo"] > 0 or out["hi"] < 0), replicates=[len(a), len(b)])
    return out, None


def pooled_ratio(a, b: CellData, metric: str, level: float = 0.95, source: str = "total") -> tuple[dict | None, str | None]:
    """Row A (its replicates' :class:`CellData`) as a multiple of cell B (the limit). One cell: as
    :func:`paired_ratio`, unchanged. k > 1: each replicate's paired ratio (:func:`paired_ratio`), then
    pooled as the table pools a trained row: ``ratio`` the mean of the k ratios (``a`` the mean of A's
    values), the interval the percentile one of :func:`pooled_samples` of the replicates' ratio replicates."""
    a = list(a)
    if len(a) == 1:
        return paired_ratio(a[0], b, metric, level, source)
    ratios, reps = [], []
    for i, x in enumerate(a):
        r, why = paired_ratio(x, b, metric, level, source)
        if r is None:
            return None, f"replicate {i + 1}: {why}"
        ratios.append(r)
        va, vb, ra, rb, _ = _paired_replicates(x, b, metric, r["source"])[0]
        reps.append(np.asarray(ra, np.float64) / np.asarray(rb, np.float64))
    pooled = pooled_interval([r["ratio"] for r in ratios], reps, level)
    return {"ratio": pooled["value"], "a": float(np.mean([r["a"] for r in ratios])), "b": ratios[0]["b"],
            "lo": pooled["lo"], "hi": pooled["hi"], "se": pooled["se"], "source": ratios[0]["source"],
            "replicates": len(a), "method": "paired bootstrap of the ratio per replicate, " + pooled["method"]}, None
