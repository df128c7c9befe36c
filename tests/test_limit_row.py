"""The limit row (issue "Science v2", part 1): a Table 2 cell whose sampler is exactly ``eval.ode_reference``
is the teacher's own ODE solution scored as a cell. stage=evaluate takes the cached reference as its
samples (no sampling, RMSE 0, NFE 40 by default), the table shows it as the last row in every column,
never marked, and divides every FID / KID by it in the ratio view, whose interval comes from the paired
replicates the cells stored. A sweep without one tabulates as before."""
import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from amedlab.cache import digest, seal
from amedlab.data.reference import ode_reference
from amedlab.evaluation import table as T
from amedlab.evaluation import uncertainty as U
from amedlab.evaluation.evaluate import METRICS_FORMAT, is_limit_cell, limit_label
from amedlab.evaluation.metrics import quantize
from amedlab.specs import CONF_DIR, check_stage
from amedlab.stages import evaluate as evaluate_stage
from amedlab.stages import table as table_stage
from amedlab.wandb_logger import RunLogger

REPO = Path(__file__).resolve().parents[1]
REF_NFE = 6  # eval.ode_reference.nfe in these tiny sweeps (the default is 40)
LABEL = f"ODE reference (Heun, {REF_NFE} NFE)"


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# the entry point in a subprocess and the tiny digits model of the sweep tests (one copy of each)
from test_sweep import amedlab as _amedlab, tiny_model  # noqa: E402,F401 -- tiny_model is a fixture


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model):
    """A tiny Table 2 sweep through the real experiment file and launcher: DDIM and iPNDM at NFE 3 and 5,
    then the limit cell added as make run adds it (``solver=ode_reference nfe=<the reference's NFE>``)."""
    tmp = tmp_path_factory.mktemp("limit")
    cache = tmp / "cache"
    env = {**os.environ, "AMEDLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    root = tmp / "sweep"
    base = ["-m", "experiments=table2_digits", "eval.seeds=0-31", "eval.batch_size=16", f"model.path={tiny_model}",
            f"sweep_dir={root}", f"eval.ode_reference.nfe={REF_NFE}", "eval.kid_subsets=2", "logger=none",
            "hydra.launcher.n_jobs=1"]
    _amedlab(*base, "solver=euler,ipndm", "nfe=3,5", env=env)
    refs = {p.name: p.stat().st_mtime_ns for p in (cache / "ode_references").glob("*.pt")}
    out = _amedlab(*base, "solver=ode_reference", f"nfe={REF_NFE}", env=env)
    again = _amedlab(*base, "solver=ode_reference", f"nfe={REF_NFE}", env=env)  # finished: skipped like any cell
    cells = {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/metrics.json")}
    return SimpleNamespace(root=root, cache=cache, refs_before=refs, out=out, again=again, cells=cells,
                           refs_after={p.name: p.stat().st_mtime_ns for p in (cache / "ode_references").glob("*.pt")})


def _limit(sweep) -> tuple[str, dict]:
    (name, m), = [(n, m) for n, m in sweep.cells.items() if m.get("limit")]
    return name, m


def test_the_limit_cell_lands_in_the_sweep_with_rmse_0_and_the_reference_nfe(sweep):
    assert len(sweep.cells) == 5
    name, m = _limit(sweep)
    assert "solver=ode_reference" in name and f"nfe={REF_NFE}" in name  # one more cell folder of the sweep
    assert m["limit"] is True and m["label"] == LABEL and m["solver"] == "heun"
    assert m["nfe"] == REF_NFE and m["nfe_counted"] == REF_NFE and m["rmse"] == 0.0
    assert m["uncertainty"]["rmse"]["estimate"] == 0.0 and m["uncertainty"]["fid"]["samples"]["se"] > 0
    assert m["fid"] > 0 and m["kid_mean"] is not None and m["num_samples"] == 32
    assert m["schedule"] == {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    # the reference every cell measured its RMSE against: cached by the other cells, not computed again
    assert sweep.refs_after == sweep.refs_before and m["ode_reference"]["cached"] is True
    assert "finished already" in sweep.again
    with np.load(sweep.root / name / U.FILE) as z:
        assert np.all(z["sq_err"] == 0.0)  # every sample equals its reference sample
    for other in (c for c in sweep.cells.values() if c is not m):
        assert "limit" not in other and other["rmse"] > 0  # an ordinary cell's metrics.json is as before


def test_the_limit_cell_is_the_reference_bit_for_bit_and_samples_nothing(tmp_path, monkeypatch, tiny_model, model_calls):
    monkeypatch.setenv("AMEDLAB_CACHE", str(tmp_path / "cache"))  # a cache of its own: nothing cached yet
    base = ["stage=evaluate", "model=digits_unet", f"model.path={tiny_model}", "eval.seeds=0-15", "eval.batch_size=8",
            "eval.kid_subsets=2", f"eval.ode_reference.nfe={REF_NFE}", "eval.bootstrap.resamples=20", "eval.save_samples=true"]
    seen = []
    monkeypatch.setattr(evaluate_stage, "quantize", lambda x: seen.append(x) or quantize(x))

    def run(name, *extra):
        run_dir = tmp_path / name
        run_dir.mkdir(exist_ok=True)
        monkeypatch.chdir(run_dir)  # run_dir() outside Hydra is the current directory
        cfg = _compose(*base, *extra)
        model_calls["n"] = 0
        evaluate_stage.run(cfg)
        return cfg, json.loads((run_dir / "metrics.json").read_text())

    # nothing cached: the reference is computed once (2 batches of 8 seeds x 6 NFE), and that is all
    cfg, m = run("limit", "solver=ode_reference", f"nfe={REF_NFE}")
    assert model_calls["n"] == 2 * REF_NFE and m["limit"] is True and m["rmse"] == 0.0 and m["nfe_counted"] == REF_NFE
    spec = check_stage(cfg, "evaluate")
    reference, _ = ode_reference(spec.model.eval(), spec.ode_reference, 0.002, 80.0, spec.seeds, spec.cache_dir, 8)
    assert torch.equal(seen[-1], reference)  # the cell's samples are the reference's, bit for bit
    with np.load(tmp_path / "limit" / "samples.npz") as z:
        assert np.array_equal(z["images"], quantize(reference).numpy())
    # a second limit cell (another folder) with the reference cached: no model call at all
    _, m2 = run("limit2", "solver=ode_reference", f"nfe={REF_NFE}")
    assert model_calls["n"] == 0 and m2["fid"] == m["fid"] and m2["limit"] is True
    # finished: skipped, no model call
    mtime = (tmp_path / "limit" / "metrics.json").stat().st_mtime_ns
    run("limit", "solver=ode_reference", f"nfe={REF_NFE}")
    assert model_calls["n"] == 0 and (tmp_path / "limit" / "metrics.json").stat().st_mtime_ns == mtime
    # the same rule at another NFE, or on another schedule: an ordinary cell, sampled (Heun has 2 NFE per step)
    for name, extra in (("nfe4", ["nfe=4"]), ("rho5", [f"nfe={REF_NFE}", "schedule.rho=5"])):
        _, m = run(name, "solver=ode_reference", *extra)
        assert "limit" not in m and m["label"] == "EDM (Heun)" and m["rmse"] > 0 and model_calls["n"] == 2 * m["nfe"]


def test_make_run_adds_the_limit_cell_and_the_experiment_keeps_heun_on_the_reference_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make = (REPO / "Makefile").read_text()
    assert "$(PY) -m amedlab -m experiments=table2_digits solver=ode_reference nfe=40 &&" in make
    spec = check_stage(_compose("stage=evaluate", "experiments=table2_digits", "solver=ode_reference", "nfe=40"), "evaluate")
    assert is_limit_cell(spec) and limit_label(spec.ode_reference) == "ODE reference (Heun, 40 NFE)"
    # detected by the settings, not by the config's name: Heun without AFS at 40 NFE is the limit cell too
    for extra, limit in ((["solver=heun", "solver.afs=false", "nfe=40"], True), (["solver=heun", "nfe=41"], False),
                         (["solver=ode_reference", "nfe=20"], False), (["solver=ode_reference", "nfe=40", "schedule.rho=5"], False)):
        spec = check_stage(_compose("stage=evaluate", "experiments=table2_digits", *extra), "evaluate")
        assert is_limit_cell(spec) is limit, extra
    # a reference with AFS is named with its tag, from the reference's own row name
    assert limit_label({"solver": {"name": "heun", "afs": True}, "nfe": 41}) == "ODE reference (Heun, AFS, 41 NFE)"
    assert limit_label({"solver": {"name": "ipndm"}, "nfe": 40}) == "ODE reference (iPNDM, 40 NFE)"


def _reps(cell_dir: Path, metric: str) -> np.ndarray:
    with np.load(cell_dir / U.FILE) as z:
        return z[f"{metric}_samples"]


def test_the_table_shows_the_limit_last_in_every_column_unmarked_and_the_ratio_view(sweep, tmp_path, monkeypatch):
    drawn, plot = {}, T.metric_vs_nfe_png

    def spy(series, path, metric, **kwargs):  # what the table asks the plot to draw
        drawn[metric] = kwargs
        return plot(series, path, metric, **kwargs)

    monkeypatch.setattr(T, "metric_vs_nfe_png", spy)
    result = T.write_tables(sweep.root, tmp_path, metrics=["fid", "kid_mean", "rmse"])
    rows, nfes = result["rows"], result["nfes"]
    assert nfes == [3, 5] and list(rows)[-1] == LABEL and result["limits"] == [LABEL]
    _, lim = _limit(sweep)
    lim_dir = Path(rows[LABEL][3]["_path"]).parent
    assert all(rows[LABEL][n]["cell_key"] == lim["cell_key"] for n in nfes)  # the same cell in every column

    md = result["markdown"]
    for m in ("fid", "kid_mean", "rmse"):
        text = T._cell_text(rows[LABEL][3], m, 0.95)
        assert f"| {LABEL} | {text} | {text} |" in md.splitlines()  # value and interval, never * or **
        assert " ± " in text or m == "rmse"
        for n in nfes:
            assert result["marks"][m][n]["best"] != LABEL and LABEL not in result["marks"][m][n]["tied"]
            assert LABEL not in result["marks"][m][n]["diffs"]
    assert f"| {LABEL} | 0 ± 0 | 0 ± 0 |" in md  # RMSE: the reference against itself
    assert md.count(f"{LABEL} (last row): the limit") == 3 and "bound, not a competitor" in md
    tex = (tmp_path / "table2.tex").read_text()
    assert all("textbf" not in ln and "textit" not in ln for ln in tex.splitlines() if ln.startswith("ODE reference"))

    lines = list(csv.DictReader(io.StringIO((tmp_path / "table2.csv").read_text())))
    (row,) = [r for r in lines if r["limit"] == "1"]
    assert (row["label"], row["nfe"], row["rmse"], row["best_fid"], row["mark_fid"]) == (LABEL, str(REF_NFE), "0.0", "0", "")
    assert len(lines) == 5 and {r["limit"] for r in lines} == {"0", "1"}

    # the ratio view: FID and KID (no RMSE), every other cell over the limit, paired through the replicates
    ratio = list(csv.DictReader(io.StringIO((tmp_path / "table2_ratio.csv").read_text())))
    assert {(r["metric"], r["label"], int(r["nfe"])) for r in ratio} == {
        (m, label, n) for m in ("fid", "kid_mean") for label in ("DDIM (Euler)", "iPNDM") for n in nfes}
    reps_lim = {m: _reps(lim_dir, m) for m in ("fid", "kid")}
    for r in ratio:
        cell = rows[r["label"]][int(r["nfe"])]
        cell_dir = Path(cell["_path"]).parent
        assert r["limit_label"] == LABEL and r["source"] == "samples" and r["why"] == ""
        if r["metric"] == "fid":
            assert float(r["ratio"]) == cell["fid"] / lim["fid"] and float(r["value"]) == cell["fid"]
            reps = _reps(cell_dir, "fid") / reps_lim["fid"]  # replicate b of both: the same resampled seeds
        else:  # KID: of the full-sample MMD^2, whose replicates the cells store
            assert r["statistic"] == "kid_full" and float(r["value"]) == cell["uncertainty"]["kid_full"]
            assert float(r["ratio"]) == cell["uncertainty"]["kid_full"] / lim["uncertainty"]["kid_full"]
            reps = _reps(cell_dir, "kid") / reps_lim["kid"]
        # centred on the ratio (bootstrap FID's upward bias does not cancel in a ratio)
        lo, hi = np.quantile(float(r["ratio"]) + reps - reps.mean(), [0.025, 0.975])
        assert (float(r["ratio_lo"]), float(r["ratio_hi"])) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
        assert float(r["ratio_lo"]) < float(r["ratio"]) < float(r["ratio_hi"])
        if r["metric"] == "fid":  # pairing matters: the limit's replicates in another order give another interval
            rolled = _reps(cell_dir, "fid") / np.roll(reps_lim["fid"], 1)
            shuffled = np.quantile(float(r["ratio"]) + rolled - rolled.mean(), [0.025, 0.975])
            assert not np.allclose(shuffled, [lo, hi], rtol=1e-9)
    ratio_md = (tmp_path / "table2_ratio.md").read_text()
    first = next(r for r in ratio if r["metric"] == "fid" and r["label"] == "iPNDM" and r["nfe"] == "3")
    assert f"{float(first['ratio']):.3g} [{float(first['ratio_lo']):.3g}, {float(first['ratio_hi']):.3g}]" in ratio_md
    assert ratio_md.count(f"of the limit, {LABEL}") == 2 and (tmp_path / "table2_ratio.tex").read_text().count("tabular}") == 4

    # the plot: the limit as a dashed horizontal line with its label, not a curve
    assert drawn["FID"]["limits"] == {LABEL: lim["fid"]}
    from amedlab.evaluation.plots import metric_vs_nfe_figure

    series = {label: {n: c["fid"] for n, c in cells.items()} for label, cells in rows.items() if label != LABEL}
    fig = metric_vs_nfe_figure(series, "FID", limits=drawn["FID"]["limits"])
    try:
        (line,) = [ln for ln in fig.axes[0].lines if ln.get_label() == LABEL]
        assert line.get_linestyle() == "--" and list(line.get_ydata()) == [lim["fid"], lim["fid"]]
        assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [*series, LABEL]  # last, as in the table
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_the_table_stage_logs_the_ratio_view_and_returns_the_best_competitor(sweep, tmp_path, monkeypatch):
    logged = {}

    class Recorder(RunLogger):
        def log_table(self, key, columns, rows):
            logged[key] = (columns, rows)

    monkeypatch.setattr(table_stage, "make_logger", lambda *a, **k: Recorder())
    out = tmp_path / "out"
    best = table_stage.run(_compose("stage=table", f"sweep_dir={sweep.root}", f"table.out_dir={out}"))
    assert best == min(c["fid"] for c in sweep.cells.values() if not c.get("limit"))  # the limit is no competitor
    ratio = list(csv.DictReader(io.StringIO((out / "table2_ratio.csv").read_text())))
    columns, data = logged["table2_ratio/fid"]
    assert columns == ["solver", "limit", "NFE 3", "NFE 3 lo", "NFE 3 hi", "NFE 5", "NFE 5 lo", "NFE 5 hi"]
    by = {(r["label"], int(r["nfe"])): r for r in ratio if r["metric"] == "fid"}
    assert [d[:2] for d in data] == [["DDIM (Euler)", LABEL], ["iPNDM", LABEL]]
    for d in data:
        for j, n in enumerate((3, 5)):
            assert d[2 + 3 * j: 5 + 3 * j] == [float(by[(d[0], n)][k]) for k in ("ratio", "ratio_lo", "ratio_hi")]
    assert len(logged["table2_ratio/cells"][1]) == len(ratio) and "table2_ratio/kid_mean" not in logged  # fid, rmse
    assert logged["table2/fid"][1][-1][0] == LABEL  # Table 2 itself has the limit row


def test_an_old_sweep_without_a_limit_cell_tabulates_as_before(sweep, tmp_path, caplog):
    name, _ = _limit(sweep)
    old = tmp_path / "old"
    shutil.copytree(sweep.root, old, ignore=lambda d, names: [name] if Path(d) == sweep.root else [])
    for suffix in (".md", ".tex", ".csv"):  # a ratio view left from when the sweep had its limit cell
        (old / f"table2_ratio{suffix}").write_text("stale")
    with caplog.at_level(logging.INFO, logger="amedlab.evaluation.table"):
        result = T.write_tables(old, metrics=["fid", "rmse"])
    assert result["limits"] == [] and result["ratio_rows"] == [] and list(result["rows"]) == ["DDIM (Euler)", "iPNDM"]
    assert not list(old.glob("table2_ratio*")) and "ODE reference" not in result["markdown"]
    assert "(last row)" not in result["markdown"] and result["markdown"].count("| iPNDM |") == 2
    hints = [r.getMessage() for r in caplog.records if "no limit cell" in r.getMessage()]
    assert len(hints) == 1 and f"experiments=table2_digits solver=ode_reference nfe={REF_NFE}" in hints[0]
    # the competitors' rows as in the table with the limit cell (values, intervals, bold and italics)
    with_limit = T.write_tables(sweep.root, tmp_path / "with", metrics=["fid", "rmse"])["markdown"]
    rows_of = lambda md: [ln for ln in md.splitlines() if ln.startswith(("| DDIM (Euler) |", "| iPNDM |"))]  # noqa: E731
    assert len(rows_of(result["markdown"])) == 4 and rows_of(result["markdown"]) == rows_of(with_limit)


def test_a_mistyped_limit_field_is_not_tabulated(tmp_path):
    cell = tmp_path / "nfe=3,solver=euler"
    cell.mkdir()
    record = {"complete": True, "format": METRICS_FORMAT, "label": "DDIM (Euler)", "solver": "euler", "nfe": 3, "fid": 9.0,
              "kid_mean": None, "rmse": 0.5, "uncertainty": None, "overrides": [], "solver_config": {"name": "euler"},
              "cell_key": digest("x"), "limit": "yes"}
    (cell / "metrics.json").write_text(json.dumps(seal(record)))
    cells, skipped = T.classify(tmp_path)
    assert cells == [] and skipped[0][1] == "missing or mistyped fields" and "limit='yes'" in skipped[0][2]
