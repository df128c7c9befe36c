"""Training replicates (issue "Science v2", part 2): a trained row (AMED's predictor, the learned solver)
moves when it is trained again, as much as its interval over the evaluation seeds. The top-level ``seed``
is the training replicate r: its own teacher trajectories (AMED 100000 + r * num_trajectories.., the
learned solver first_seed + r * num_trajectories..) as well as its own initialisation and batch order,
with r = 0 exactly as before. The table pools the replicates of a row: the mean, an interval over
training and evaluation seeds from the replicates the cells stored, the training spread, and bold only
when it holds for every replicate. The sweeps of (b) and (c) are written here from drawn features, as
stage=evaluate writes them; (d) trains two tiny learned solvers for real."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from amedlab.amed.spec import DistillSpec
from amedlab.cache import digest, seal
from amedlab.errors import ConfigError
from amedlab.evaluation import compare_cells as CC
from amedlab.evaluation import table as T
from amedlab.evaluation import uncertainty as U
from amedlab.evaluation.evaluate import METRICS_FORMAT
from amedlab.evaluation.metrics import feature_statistics, fid_from_statistics
from amedlab.learned.settings import check_learned_settings
from amedlab.models.digits import make_digits_denoiser, save_denoiser
from amedlab.specs import check_stage

REPO = Path(__file__).resolve().parents[1]
LEVEL = 0.95
Q = [(1 - LEVEL) / 2, (1 + LEVEL) / 2]


# ------------------------------------------------------------------------------------------------
# (a) the seeds each replicate trains on; seed 0 keeps today's settings and cache keys
# ------------------------------------------------------------------------------------------------

def old_distill_settings(s: DistillSpec) -> dict:
    """DistillSpec.settings() as it was before training replicates (commit 7bb7efa), verbatim."""
    out = {"solver": s.solver, "nfe": int(s.nfe), "schedule": s.schedule, "afs": s.afs,
           "solver_options": dict(s.solver_options or {}), "teacher": s.teacher, "M": s.M,
           "s_dir": s.s_dir, "s_time": s.s_time, "num_trajectories": int(s.num_trajectories),
           "batch_size": int(s.batch_size), "lr": float(s.lr), "epochs": int(s.epochs),
           "predictor_sizes": dict(s.predictor_sizes or {}), "seed": int(s.seed)}
    for k, neutral in s.OPTIONAL_KEYS.items():
        value = getattr(s, k)
        if value is not None and value != neutral:
            out[k] = value
    return out


def old_learned_settings(cfg, spec) -> dict:
    """LearnedTraining.cell_settings() as it was before training replicates (commit 7bb7efa)."""
    cell = spec.trained_cell
    settings = check_learned_settings(dict(cell.solver.get("distill") or {}), cell.eval_seeds)
    ref = {k: v for k, v in cell.ode_reference.items() if k != "chunk_size"}
    return {"nfe": int(cell.nfe), "schedule": dict(cell.schedule), "afs": cell.solver.get("afs", False),
            "max_order": int((cell.solver.get("options") or {}).get("max_order", 4)), "teacher": ref,
            "dtype": str(cell.dtype), "seed": int(cell.seed), **settings}


def _spec(compose_cfg, *overrides):
    return check_stage(compose_cfg("stage=evaluate", "experiments=table2_digits", "nfe=5", *overrides), "evaluate")


@pytest.mark.parametrize("solver", ["amed", "amed_plugin_vs"])
def test_amed_seed_0_keeps_its_settings_and_key_and_seed_1_distils_from_other_trajectories(compose_cfg, tmp_path,
                                                                                           monkeypatch, solver):
    monkeypatch.chdir(tmp_path)
    s0 = _spec(compose_cfg, f"solver={solver}").trained_settings
    s1 = _spec(compose_cfg, f"solver={solver}", "seed=1").trained_settings
    identity = "model-id"
    assert s0.settings() == old_distill_settings(s0) and "trajectory_seeds" not in s0.settings()
    assert s0.key(identity) == digest({"model_identity": identity, **old_distill_settings(s0)})  # today's cache key
    assert s0.trajectory_seeds() == list(range(100000, 101024))  # 1024 trajectories (the experiment), as before
    # seed 1: the next block of 1024 seeds, disjoint from seed 0's and from the evaluation seeds 0-1999
    assert s1.trajectory_seeds() == list(range(101024, 102048))
    assert s1.settings() == {**old_distill_settings(s1), "trajectory_seeds": "101024-102047"}
    assert s1.key(identity) != s0.key(identity) != digest({"model_identity": identity, **old_distill_settings(s1)})
    assert dataclasses.replace(s1, seed=2).trajectory_seeds()[0] == 102048


def test_the_digits_sweeps_amed_key_at_seed_0_is_the_one_pinned_before_replicates(compose_cfg):
    """The digest tests/test_specs.py pins from before the specs existed: make run's predictors are found again."""
    from omegaconf import OmegaConf

    from amedlab.evaluation.evaluate import cell_schedule
    from amedlab.specs import distill_spec

    cfg = compose_cfg("experiments=table2_digits", "solver=amed", "nfe=3")
    node = OmegaConf.to_container(cfg.solver, resolve=True)
    spec = distill_spec(cfg, node, cell_schedule(cfg.schedule, "amed", cfg.eval.get("schedule_per_solver")))
    assert spec.key("model-abc") == "3e530d0b94c6373c18c4fcee"
    assert dataclasses.replace(spec, seed=1).key("model-abc") != "3e530d0b94c6373c18c4fcee"


def test_amed_distillation_samples_the_replicates_trajectories(monkeypatch):
    """distill() asks the trajectory cache for the replicate's block (stopped there: no training)."""
    from amedlab.amed import distill as D
    from amedlab.models.analytic import default_mixture

    asked = []

    def stop(denoiser, teacher, schedule, num_points, M, seeds, *args):
        asked.append(list(seeds))
        raise KeyboardInterrupt  # the seeds are all this test needs

    monkeypatch.setattr(D, "cached_trajectories", stop)
    model = default_mixture()
    for seed, first in ((0, 100000), (1, 100008), (3, 100024)):
        with pytest.raises(KeyboardInterrupt):
            D.distill(model, solver="amed", nfe=3, num_trajectories=8, batch_size=4, seed=seed)
        assert asked[-1] == list(range(first, first + 8))
    # a replicate whose block passes 2^32: a named error before any compute
    asked.clear()
    with pytest.raises(ConfigError, match=r"seed=4294967295.*beyond 2\^32") as err:
        D.distill(model, solver="amed", nfe=3, num_trajectories=8, batch_size=4, seed=2**32 - 1)
    assert err.value.key == "seed" and not asked


def test_learned_seed_0_keeps_its_settings_and_key_and_seed_1_trains_on_other_teacher_solutions(compose_cfg, tmp_path,
                                                                                                monkeypatch):
    from amedlab.learned.train import LearnedCell
    from amedlab.training.fit import cache_path

    monkeypatch.chdir(tmp_path)
    cfg0 = compose_cfg("stage=evaluate", "experiments=table2_digits", "nfe=5", "solver=learned")
    spec0 = check_stage(cfg0, "evaluate")
    spec1 = _spec(compose_cfg, "solver=learned", "seed=1")
    assert spec0.trained_settings == old_learned_settings(cfg0, spec0)  # today's settings, hence today's cache key
    cell = lambda s: LearnedCell(spec0.model, s, spec0.ode_reference, 1000, "digits_unet", tmp_path)  # noqa: E731
    assert cache_path(cell(spec0.trained_settings), tmp_path) == cache_path(cell(old_learned_settings(cfg0, spec0)), tmp_path)
    assert spec0.trained_settings["first_seed"] == 200000 and spec0.trained_settings["seed"] == 0
    # seed 1: teacher solutions 200256..200511 (256 per replicate), its own shuffling seed, another cache entry
    assert spec1.trained_settings == {**spec0.trained_settings, "first_seed": 200256, "seed": 1}
    assert cache_path(cell(spec1.trained_settings), tmp_path) != cache_path(cell(spec0.trained_settings), tmp_path)
    assert set(range(200256, 200512)).isdisjoint(range(200000, 200256))
    # an untrained rule has no trained settings at any seed: its numbers do not depend on the replicate
    assert _spec(compose_cfg, "solver=ipndm").trained_settings is None is _spec(compose_cfg, "solver=ipndm", "seed=2").trained_settings


@pytest.mark.parametrize("overrides,match", [
    # learned: the replicate's block passes 2^32 (seed 16777215: 200000 + 16777215 * 256 > 2^32)
    (["solver=learned", "seed=16777215"], r"seed=16777215: training replicate 16777215 .* beyond 2\^32; accepted: seed <= 16776433"),
    # learned: replicate 1's block 2256..2511 reaches the evaluation seeds 2300-2399 (replicate 0's does not)
    (["solver=learned", "solver.distill.first_seed=2000", "eval.seeds=2300-2399", "seed=1"],
     r"seed=1: .* 2256 \.\. 2511, which overlap the evaluation seeds \(e.g. 2300\)"),
    # AMED: 100000 + seed * 1024 beyond 2^32
    (["solver=amed", "seed=4194300"], r"seed=4194300: .* beyond 2\^32; accepted: seed <= 4194205"),
    # AMED: replicate 1 distils from 101024..102047, which holds the evaluation seeds 101500-101509
    (["solver=amed_plugin", "eval.seeds=101500-101509", "seed=1"], r"seed=1: .*seeds 101024-102047\) overlap the evaluation seeds"),
])
def test_a_replicate_whose_training_seeds_leave_their_range_is_a_named_error_before_compute(compose_cfg, tmp_path,
                                                                                           monkeypatch, overrides, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=match) as err:
        _spec(compose_cfg, f"cache_dir={tmp_path / 'cache'}", *overrides)
    assert err.value.key == "seed" and not list(tmp_path.glob("cache/*/*.pt"))  # nothing trained
    seedless = [o for o in overrides if not o.startswith("seed=")]
    assert _spec(compose_cfg, f"cache_dir={tmp_path / 'cache'}", *seedless).trained_settings is not None  # seed 0 is fine


# ------------------------------------------------------------------------------------------------
# (b), (c) the table of a sweep with one trained row at 3 seeds
# ------------------------------------------------------------------------------------------------

D = 8
MIX = np.random.default_rng(1).normal(size=(D, D)) / np.sqrt(D)
N = 300
BOOT = {"resamples": 200, "seed": 0}
LEARNED = "Learned grid + coefficients (iPNDM base, AFS)"


def draw(z, noise):
    return torch.from_numpy(np.tanh(z @ MIX) + noise)


def write_cell(root: Path, solver: str, label: str, nfe: int, gen, real, sq_err, seed: int | None = None,
               trained: bool = False, limit: bool = False, **changes) -> Path:
    """A finished cell as stage=evaluate writes it (metrics.json sealed, uncertainty.npz from the features);
    ``seed``: the ``seed=`` override of a training replicate (None: the default, as make run)."""
    name = ",".join([f"nfe={nfe}"] + ([f"seed={seed}"] if seed is not None else []) + [f"solver={solver}"])
    cell = root / name
    cell.mkdir(parents=True, exist_ok=True)
    stats = feature_statistics(real)
    sq = torch.from_numpy(np.sqrt(sq_err)).reshape(N, 1, 1, 1)
    unc = U.evaluate_cell(cell, range(N), gen, {"mu": stats["mu"], "sigma": stats["sigma"], "features": real},
                          sq, torch.zeros_like(sq), BOOT)
    metrics = {"complete": True, "format": METRICS_FORMAT, "label": label, "solver": solver, "nfe": nfe,
               "fid": fid_from_statistics(feature_statistics(gen), stats), "kid_mean": unc["kid_full"], "kid_std": 0.0,
               "rmse": unc["rmse"]["estimate"], "num_samples": N, "seeds": "0-299", "model": {"name": "test", "identity": "m0"},
               "feature_extractor": "test", "real_data": {"split": "train", "cached": seed is None}, "precision": "fp32",
               "schedule": {"kind": "polynomial", "rho": 7.0},
               "solver_config": {"name": solver, "afs": trained, "distill": {"epochs": 2} if trained else None},
               "overrides": [f"solver={solver}", f"nfe={nfe}"] + ([f"seed={seed}"] if seed is not None else []),
               "cell_key": digest([solver, nfe, seed]), "uncertainty": unc,
               "predictor": {"source": "trained"} if trained else None, **({"limit": True} if limit else {})}
    metrics.update(changes)
    (cell / "metrics.json").write_text(json.dumps(seal(metrics)))
    return cell


@pytest.fixture(scope="module")
def features():
    """The drawn features: the real set, iPNDM's cell, the three trained replicates (each its own noise:
    another training), and a limit cell close to the real set."""
    rng = np.random.default_rng(11)
    real = draw(rng.normal(size=(N, D)), 0.3 * rng.normal(size=(N, D)))
    z = rng.normal(size=(N, D))
    ipndm = draw(1.6 * z, 0.35 * rng.normal(size=(N, D)))
    reps = [draw(1.05 * z, (0.3 + 0.02 * r) * rng.normal(size=(N, D))) for r in range(3)]
    near_ipndm = ipndm + 0.01 * torch.from_numpy(rng.normal(size=(N, D)))  # a training that went no further than iPNDM
    limit = draw(z, 0.3 * rng.normal(size=(N, D)))
    e = rng.chisquare(16, N) / 16 * 0.04
    return {"real": real, "ipndm": ipndm, "reps": reps, "near_ipndm": near_ipndm, "limit": limit, "e": e, "rng": rng}


def trained_sweep(root: Path, f) -> Path:
    """iPNDM at NFE 3 and 5 (one cell each: untrained), the learned row at seeds 0, 1, 2 (seed 0 without
    an override, as make run leaves it): at NFE 3 every replicate is far below iPNDM; at NFE 5 replicate 2
    is no better than iPNDM, the other two are; and the limit cell."""
    e = f["e"]
    for nfe in (3, 5):
        write_cell(root, "ipndm", "iPNDM", nfe, f["ipndm"], f["real"], 2 * e)
        for r in range(3):
            gen = f["near_ipndm"] if (nfe, r) == (5, 2) else f["reps"][r]
            write_cell(root, "learned", LEARNED, nfe, gen, f["real"], (1 + 0.1 * r) * e if gen is not f["near_ipndm"] else 2 * e,
                       seed=None if r == 0 else r, trained=True)
    write_cell(root, "heun", "ODE reference (Heun, 40 NFE)", 40, f["limit"], f["real"], 0 * e, limit=True)
    return root


def _metrics(cell_dir: Path) -> dict:
    return json.loads((cell_dir / "metrics.json").read_text())


def _reps(cell_dir: Path, name: str) -> np.ndarray:
    with np.load(cell_dir / U.FILE) as z:
        return z[name]


def _replicate_dirs(root: Path, nfe: int) -> list[Path]:
    return [root / f"nfe={nfe},solver=learned", root / f"nfe={nfe},seed=1,solver=learned", root / f"nfe={nfe},seed=2,solver=learned"]


def _mixture_quantile(means, ses, q):
    """The q-quantile of the equal mixture of normals, by a root finder (not the library's bisection)."""
    means, ses = np.asarray(means), np.asarray(ses)
    return brentq(lambda x: norm.cdf((x - means) / ses).mean() - q, means.min() - 20 * ses.max(), means.max() + 20 * ses.max(),
                  xtol=1e-14)


@pytest.fixture(scope="module")
def table(tmp_path_factory, features):
    root = trained_sweep(tmp_path_factory.mktemp("replicates") / "sweep", features)
    result = T.write_tables(root, metrics=["fid", "kid_mean", "rmse"])
    lines = list(csv.DictReader(io.StringIO((root / "table2.csv").read_text())))
    ratio = list(csv.DictReader(io.StringIO((root / "table2_ratio.csv").read_text())))
    return root, result, {(r["label"], int(r["nfe"])): r for r in lines}, ratio


def test_the_table_shows_the_mean_of_the_replicates_with_the_pooled_interval_and_the_training_spread(table):
    root, result, csv_by, _ = table
    assert list(result["rows"]) == ["iPNDM", LEARNED, "ODE reference (Heun, 40 NFE)"]  # one row for the three seeds
    md = result["markdown"]
    for nfe in (3, 5):
        dirs = _replicate_dirs(root, nfe)
        m = [_metrics(d) for d in dirs]
        row = csv_by[(LEARNED, nfe)]
        assert row["replicates"] == "3" and row["train_seeds"] == "0,1,2"
        assert row["metrics_file"] == ";".join(str(d / "metrics.json") for d in dirs)
        for metric, prefix, reps in (("fid", "fid", "fid_samples"), ("kid_mean", "kid", "kid_samples")):
            values = np.array([x[metric] for x in m])
            # the mean, and the interval: replicate r uniformly, then one of its bootstrap replicates centred on its value
            pooled = np.concatenate([v + (_reps(d, reps) - _reps(d, reps).mean()) for v, d in zip(values, dirs)])
            lo, hi = np.quantile(pooled, Q)
            assert float(row[metric]) == pytest.approx(values.mean(), rel=1e-12)
            assert (float(row[f"{prefix}_lo"]), float(row[f"{prefix}_hi"])) == (pytest.approx(lo, rel=1e-12),
                                                                                pytest.approx(hi, rel=1e-12))
            # the training spread: min and max of the three replicate values, and their sd
            assert (float(row[f"{prefix}_train_lo"]), float(row[f"{prefix}_train_hi"])) == (values.min(), values.max())
            assert float(row[f"{prefix}_train_sd"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
            assert values.max() - values.min() > 0  # three trainings, three values
            text = f"{T.fmt(values.mean())} [{T.fmt(lo)}, {T.fmt(hi)}]"
            assert text in md and f"{T.fmt(values.min())} – {T.fmt(values.max())}" in md
        # RMSE: the equal mixture of the replicates' delta-method normals
        rm, se = [x["rmse"] for x in m], [x["uncertainty"]["rmse"]["se"] for x in m]
        assert float(row["rmse"]) == pytest.approx(np.mean(rm), rel=1e-12)
        assert float(row["rmse_lo"]) == pytest.approx(_mixture_quantile(rm, se, Q[0]), rel=1e-9)
        assert float(row["rmse_hi"]) == pytest.approx(_mixture_quantile(rm, se, Q[1]), rel=1e-9)
        assert (float(row["rmse_train_lo"]), float(row["rmse_train_hi"])) == (min(rm), max(rm))
    # the untrained row: one cell, as before (value ± half-width, no spread)
    ip = csv_by[("iPNDM", 3)]
    assert ip["replicates"] == "1" and ip["train_seeds"] == "0" and ip["fid_train_lo"] == ""
    assert f"| iPNDM | {T._cell_text(result['rows']['iPNDM'][3], 'fid', LEVEL)}" in md and " ± " in md
    # the row is named with its k, the legend says how it is pooled and marked, the spread has its table
    assert f"| {LEARNED} (k=3) | " in md and "(k=N): a trained row from N training seeds" in md
    assert md.count("Training spread of FID") == 1 and "every replicate is significantly lower" in md
    assert "one training seed (k=1)" not in md
    tex = (root / "table2.tex").read_text()
    assert "Learned grid + coefficients (iPNDM base, AFS) (k=3) & " in tex and " -- " in tex


def test_a_trained_row_is_bold_only_when_it_is_significantly_lowest_for_every_replicate(table, features, tmp_path):
    root, result, csv_by, _ = table
    data = {n: [U.load_cell(_metrics(d), d)[0] for d in _replicate_dirs(root, n)] for n in (3, 5)}
    ip = {n: U.load_cell(_metrics(root / f"nfe={n},solver=ipndm"), root / f"nfe={n},solver=ipndm")[0] for n in (3, 5)}
    sig = {n: [U.paired_diff(ip[n], rep, "fid", LEVEL, "samples")[0]["lo"] > 0 for rep in data[n]] for n in (3, 5)}
    assert sig == {3: [True, True, True], 5: [True, True, False]}  # iPNDM significantly higher than 3 / 2 of 3 replicates
    marks = result["marks"]["fid"]
    assert marks[3]["best"] == LEARNED and marks[3]["status"] == "significant"
    assert csv_by[(LEARNED, 3)]["mark_fid"] == "best" and csv_by[(LEARNED, 3)]["best_fid"] == "1"
    # NFE 5: the lowest mean, and significantly lower for 2 of its 3 replicates: not bold; tied with iPNDM
    assert marks[5]["best"] == LEARNED and marks[5]["status"] == "tied" and marks[5]["tied"] == [LEARNED, "iPNDM"]
    assert (csv_by[(LEARNED, 5)]["mark_fid"], csv_by[(LEARNED, 5)]["best_fid"], csv_by[("iPNDM", 5)]["mark_fid"]) == ("tied", "0", "tied")
    # the CSV's difference to the lowest: the mean difference, the extreme ends over the 3 replicate pairs
    pairs = [U.paired_diff(ip[5], rep, "fid", LEVEL, "samples")[0] for rep in data[5]]
    row = csv_by[("iPNDM", 5)]
    assert float(row["fid_minus_lowest"]) == pytest.approx(np.mean([p["diff"] for p in pairs]), rel=1e-12)
    assert float(row["fid_minus_lowest_lo"]) == min(p["lo"] for p in pairs) <= 0 < float(row["fid_minus_lowest_hi"])
    md_row = next(ln for ln in result["markdown"].splitlines() if ln.startswith(f"| {LEARNED} (k=3) | "))
    cells = md_row.split(" | ")
    assert cells[1].startswith("**") and cells[2].startswith("*") and not cells[2].startswith("**")
    # the same sweep without replicate 2 at NFE 5: both remaining replicates are significantly lowest: bold
    two = tmp_path / "two"
    shutil.copytree(root, two, ignore=lambda d, names: ["nfe=5,seed=2,solver=learned"] if Path(d) == root else [])
    again = T.write_tables(two, metrics=["fid"])
    assert again["marks"]["fid"][5]["status"] == "significant" and again["marks"]["fid"][5]["best"] == LEARNED
    assert f"| {LEARNED} (k=2-3) | **" in again["markdown"]  # k=3 at NFE 3, k=2 at NFE 5


def test_the_ratio_view_and_compare_cells_pool_the_replicates(table):
    root, result, _, ratio = table
    lim_dir = root / "nfe=40,solver=heun"
    lim = _metrics(lim_dir)
    for nfe in (3, 5):
        dirs = _replicate_dirs(root, nfe)
        (line,) = [r for r in ratio if r["label"] == LEARNED and r["metric"] == "fid" and int(r["nfe"]) == nfe]
        ratios = [_metrics(d)["fid"] / lim["fid"] for d in dirs]
        reps = [_reps(d, "fid_samples") / _reps(lim_dir, "fid_samples") for d in dirs]  # paired: the same resampled seeds
        lo, hi = np.quantile(np.concatenate([r + (b - b.mean()) for r, b in zip(ratios, reps)]), Q)
        assert line["replicates"] == "3" and float(line["ratio"]) == pytest.approx(np.mean(ratios), rel=1e-12)
        assert (float(line["ratio_lo"]), float(line["ratio_hi"])) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    (ip,) = [r for r in ratio if r["label"] == "iPNDM" and r["metric"] == "fid" and r["nfe"] == "3"]
    assert ip["replicates"] == "1"  # a single cell: the ratio view as before
    ip_dir = root / "nfe=3,solver=ipndm"
    raw = _reps(ip_dir, "fid_samples") / _reps(lim_dir, "fid_samples")
    assert float(ip["ratio_lo"]) == pytest.approx(np.quantile(float(ip["ratio"]) + raw - raw.mean(), Q[0]), rel=1e-12)
    assert f"| {LEARNED} (k=3) | " in (root / "table2_ratio.md").read_text()

    # compare_cells: the means, the interval pooled over training and evaluation seeds, and the bold rule
    res = CC.compare_rows(root, "learned", "ipndm", ["fid", "rmse"], LEVEL, "samples")
    for line in res["metrics"]["fid"]:
        dirs, ip_dir = _replicate_dirs(root, line["nfe"]), root / f"nfe={line['nfe']},solver=ipndm"
        d = [_metrics(x)["fid"] - _metrics(ip_dir)["fid"] for x in dirs]
        diffs = [_reps(x, "fid_samples") - _reps(ip_dir, "fid_samples") for x in dirs]
        lo, hi = np.quantile(np.concatenate([v + (b - b.mean()) for v, b in zip(d, diffs)]), Q)
        assert line["replicates"] == [3, 1] and line["diff"] == pytest.approx(np.mean(d), rel=1e-12)
        assert (line["lo"], line["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
        assert line["a"] == pytest.approx(np.mean([_metrics(x)["fid"] for x in dirs]), rel=1e-12)
        assert line["every_pair"]["significant"] is (line["nfe"] == 3) and line["every_pair"]["pairs"] == 3
    md = CC.to_markdown(res)
    assert "every replicate pair: yes" in md and "every replicate pair: no" in md and "pooled over training" in md


def test_one_label_with_another_solver_config_or_model_at_another_seed_is_still_an_error(tmp_path, features):
    f, e = features, features["e"]
    root = tmp_path / "sweep"
    write_cell(root, "learned", LEARNED, 3, f["reps"][0], f["real"], e, trained=True)
    other = write_cell(root, "learned", LEARNED, 3, f["reps"][1], f["real"], e, seed=1, trained=True,
                       solver_config={"name": "learned", "afs": True, "distill": {"epochs": 3}})
    with pytest.raises(ConfigError) as err:
        T.write_tables(root)
    msg = str(err.value)
    assert err.value.key == "solver.label" and msg.startswith(f"solver.label={LEARNED!r}") and "solver_config differs in distill" in msg
    assert str(other / "metrics.json") in msg and "distinct solver.label" in msg
    # the same solver config at another seed, but another model: no replicates of one row either
    write_cell(root, "learned", LEARNED, 3, f["reps"][1], f["real"], e, seed=1, trained=True,
               model={"name": "test", "identity": "m1"})
    with pytest.raises(ConfigError, match=r"seed=0 and seed=1, and differ in more than the seed \(in model\)") as err:
        CC.compare_rows(root, "learned", "ipndm")
    assert err.value.key == "solver.label"
    # the same cell twice (same seed and key): the newer, as before; another key at the same seed: the error
    write_cell(root, "learned", LEARNED, 3, f["reps"][1], f["real"], e, seed=1, trained=True)
    write_cell(root / "copy", "learned", LEARNED, 3, f["reps"][1], f["real"], e, seed=1, trained=True, cell_key="other")
    with pytest.raises(ConfigError, match="their cell_key differs"):
        T.write_tables(root)


def test_a_sweep_with_one_training_seed_tabulates_as_before_with_a_note(tmp_path, features):
    f, e = features, features["e"]
    root = tmp_path / "sweep"
    write_cell(root, "ipndm", "iPNDM", 3, f["ipndm"], f["real"], 2 * e)
    write_cell(root, "learned", LEARNED, 3, f["reps"][0], f["real"], e, trained=True)
    result = T.write_tables(root, metrics=["fid"])
    md = result["markdown"]
    cell = result["rows"][LEARNED][3]
    assert "_replicates" not in cell and f"| {LEARNED} | **{T._cell_text(cell, 'fid', LEVEL)}** |" in md
    assert " ± " in T._cell_text(cell, "fid", LEVEL) and "(k=" not in md.split("\n\n")[1] and "Training spread" not in md
    assert f"Trained rows from one training seed (k=1): {LEARNED}." in md  # iPNDM is not trained
    lines = list(csv.DictReader(io.StringIO((root / "table2.csv").read_text())))
    assert {(r["label"], r["replicates"], r["fid_train_sd"]) for r in lines} == {("iPNDM", "1", ""), (LEARNED, "1", "")}


# ------------------------------------------------------------------------------------------------
# (d) end to end: two stage=evaluate cells of solver=learned at seed 0 and 1, one row of the table
# ------------------------------------------------------------------------------------------------

TINY_NET = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
LEARNED_TINY = ["solver.distill.num_trajectories=32", "solver.distill.batch_size=16", "solver.distill.epochs=2",
                "eval.ode_reference.nfe=20", "eval.seeds=0-31"]


def test_two_seeds_of_the_learned_solver_train_apart_and_tabulate_as_one_row(tmp_path):
    torch.manual_seed(0)
    model = save_denoiser(make_digits_denoiser(TINY_NET, sigma_data=0.75), tmp_path / "tiny.safetensors")
    env = {**os.environ, "AMEDLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    root = tmp_path / "sweep"
    # as make run-full runs its replicates: a multirun over seed, through the experiment file and its launcher
    proc = subprocess.run([sys.executable, "-m", "amedlab", "-m", "experiments=table2_digits", "solver=learned", "nfe=3",
                           "seed=0,1", *LEARNED_TINY, "eval.batch_size=16", f"model.path={model}", f"sweep_dir={root}",
                           "eval.kid_subsets=2", "eval.bootstrap.resamples=50", "logger=none", "hydra.launcher.n_jobs=1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the seed names the folder, with the other swept keys (here also the tiny settings)
    dirs = [next(d for d in root.iterdir() if f",seed={r}," in d.name) for r in (0, 1)]
    assert len(list(root.glob("*/metrics.json"))) == 2
    m = [_metrics(d) for d in dirs]
    meta = [x["predictor"]["meta"] for x in m]
    assert [x["seeds"] for x in meta] == ["200000-200031", "200032-200063"]  # each replicate its own teacher solutions
    assert meta[0]["seed"] == 0 and meta[1]["seed"] == 1 and m[0]["predictor"]["source"] == m[1]["predictor"]["source"] == "trained"
    assert m[0]["sigmas"] != m[1]["sigmas"] and m[0]["cell_key"] != m[1]["cell_key"]  # two different learned grids
    assert m[0]["fid"] != m[1]["fid"]
    assert (m[0]["seed"], m[1]["seed"]) == (0, 1)  # recorded, so a seed set in a config file counts too
    assert T.cell_seed({"seed": 2, "overrides": []}) == 2 and T.cell_seed({"overrides": ["seed=3"]}) == 3
    result = T.write_tables(root, metrics=["fid", "rmse"])
    (label,) = result["rows"]
    cell = result["rows"][label][3]
    assert label == m[0]["label"] and cell["_seeds"] == [0, 1] and cell["fid"] == pytest.approx((m[0]["fid"] + m[1]["fid"]) / 2)
    lines = list(csv.DictReader(io.StringIO((root / "table2.csv").read_text())))
    assert len(lines) == 1 and lines[0]["replicates"] == "2" and lines[0]["train_seeds"] == "0,1"
    assert float(lines[0]["fid_train_lo"]) == min(x["fid"] for x in m) and float(lines[0]["fid_lo"]) < float(lines[0]["fid"])
    assert f"| {label} (k=2) | " in result["markdown"]
