"""Intervals and paired comparisons (amedlab.evaluation.uncertainty), the significance-aware table and
stage=compare_cells, on features drawn here with fixed seeds (no model)."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch_fidelity.metric_kid import kid_features_to_metric

from amedlab.cache import digest, seal
from amedlab.specs import CONF_DIR
from amedlab.evaluation.evaluate import METRICS_FORMAT
from amedlab.evaluation import compare_cells as compare_stage
from amedlab.stages import compare_cells as compare_cells_stage
from amedlab.evaluation import uncertainty as U
from amedlab.evaluation.metrics import feature_statistics, fid_from_statistics, rmse
from amedlab.evaluation.table import write_tables

D = 8
MIX = np.random.default_rng(1).normal(size=(D, D)) / np.sqrt(D)



def draw(z, noise):
    """A smooth non-linear map of a latent plus noise: features whose FID is not trivially Gaussian."""
    return torch.from_numpy(np.tanh(z @ MIX) + noise)


def test_point_estimates_match_torch_fidelity_and_the_bootstrap_is_reproducible():
    rng = np.random.default_rng(0)
    real = draw(rng.normal(size=(300, D)), 0.3 * rng.normal(size=(300, D))) + 2.0   # KID is not shift invariant
    gen = draw(1.4 * rng.normal(size=(300, D)), 0.4 * rng.normal(size=(300, D))) + 2.0
    stats = feature_statistics(real)
    cfg = {"resamples": 50, "seed": 3}
    s1, a1 = U.cell_bootstrap(gen, stats["mu"], stats["sigma"], real, cfg)
    assert s1["fid_estimate"] == pytest.approx(fid_from_statistics(feature_statistics(gen), stats), rel=1e-7)
    # KID over all samples = torch-fidelity's KID with one subset holding every sample (n = m)
    tf = kid_features_to_metric(gen, real, kid_subsets=1, kid_subset_size=300, verbose=False)
    assert s1["kid_full"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-9)
    s2, a2 = U.cell_bootstrap(gen, stats["mu"], stats["sigma"], real, cfg)
    for k in a1:
        assert np.array_equal(a1[k], a2[k]), k                                  # same seed: bitwise the same
    assert all(a1[f"fid_{k}"].shape == (50,) for k in ("samples", "real", "total"))
    _, a3 = U.cell_bootstrap(gen, stats["mu"], stats["sigma"], real, {**cfg, "seed": 4})
    assert not np.array_equal(a1["fid_samples"], a3["fid_samples"])
    # the spreads are separate: resampling the real set only, or the samples only, each gives less than both
    se = {k: s1["fid"][k]["se"] for k in ("samples", "real", "total")}
    assert 0 < se["samples"] < se["total"] and 0 < se["real"] < se["total"], se
    # statistics only (no real features): FID over samples, no KID, no real-set spread
    s4, a4 = U.cell_bootstrap(gen, stats["mu"], stats["sigma"], None, cfg)
    assert np.allclose(a4["fid_samples"], a1["fid_samples"], rtol=1e-9) and a4["fid_real"].size == 0 and s4["kid_full"] is None


def test_rmse_interval_is_the_delta_method_over_samples():
    rng = np.random.default_rng(0)
    x, ref = torch.from_numpy(rng.normal(size=(400, 1, 4, 4))), torch.zeros(400, 1, 4, 4, dtype=torch.float64)
    e = U.per_sample_sq_errors(x, ref)
    out = U.rmse_interval(e)
    assert out["estimate"] == pytest.approx(rmse(x, ref), rel=1e-12)
    # sd of e_i (chi^2_16 / 16) is sqrt(2/16); se of RMSE = sd(e) / (2 RMSE sqrt(n)) with RMSE ~ 1
    assert out["se"] == pytest.approx(np.sqrt(2 / 16) / 2 / np.sqrt(400), rel=0.15)
    assert out["ci"][0] < 1.0 < out["ci"][1]


def _cells(rng, n, m, scale, noise_b=0.35):
    real = draw(rng.normal(size=(m, D)), 0.3 * rng.normal(size=(m, D)))
    z = scale * rng.normal(size=(n, D))                          # the shared noise seeds of the two cells
    a = draw(z, 0.35 * rng.normal(size=(n, D)))
    b = draw(z, noise_b * rng.normal(size=(n, D)))
    return real, a, b


def test_paired_interval_covers_zero_at_the_nominal_rate_when_the_cells_are_alike():
    """Two cells from one distribution (paired by seed): the 95% paired interval of the FID difference
    covers 0 in about 95% of 200 draws, and the RMSE one too; a real difference is detected."""
    rng = np.random.default_rng(2024)
    runs, covered_fid, covered_rmse = 200, 0, 0
    for r in range(runs):
        real, a, b = _cells(rng, 300, 300, 1.6)
        cfg = {"resamples": 200, "seed": r, "real": False, "kid": False}
        (sa, ra), (sb, rb) = (U.cell_bootstrap(x, None, None, real, cfg) for x in (a, b))
        d = U.diff_from_replicates(sa["fid_estimate"], sb["fid_estimate"], ra["fid_samples"], rb["fid_samples"])
        covered_fid += d["lo"] <= 0 <= d["hi"]
        ea = rng.chisquare(16, 500) / 16
        eb = 0.5 * ea + 0.5 * rng.chisquare(16, 500) / 16      # correlated, same distribution
        dr = U.rmse_diff(ea, eb)
        covered_rmse += dr["lo"] <= 0 <= dr["hi"]
    assert 0.91 <= covered_fid / runs <= 0.99, covered_fid
    assert 0.91 <= covered_rmse / runs <= 0.99, covered_rmse
    # power: cell b noisier (0.5 vs 0.35) is found worse in most draws (measured: 40 of 40)
    found = 0
    for r in range(40):
        real, a, b = _cells(rng, 300, 300, 1.6, noise_b=0.5)
        cfg = {"resamples": 200, "seed": r, "real": False, "kid": False}
        (sa, ra), (sb, rb) = (U.cell_bootstrap(x, None, None, real, cfg) for x in (a, b))
        d = U.diff_from_replicates(sb["fid_estimate"], sa["fid_estimate"], rb["fid_samples"], ra["fid_samples"])
        found += d["lo"] > 0
    assert found >= 30, found


def _write_cell(root, solver, label, nfe, gen, real, sq_err=None, with_data=True, seeds="0-299"):
    """A finished cell as stage=evaluate writes it: metrics.json and uncertainty.npz from features."""
    cell = root / f"nfe={nfe},solver={solver}"
    cell.mkdir(parents=True, exist_ok=True)
    n = len(gen)
    stats = feature_statistics(real)
    sq = torch.from_numpy(np.sqrt(sq_err if sq_err is not None else np.full(n, 0.04))).reshape(n, 1, 1, 1)
    metrics = {"complete": True, "label": label, "solver": solver, "nfe": nfe, "num_samples": n,
               "fid": fid_from_statistics(feature_statistics(gen), stats), "kid_mean": 0.0,
               "rmse": (sq.double() ** 2).mean().sqrt().item(), "model": {"name": "test"},
               "overrides": [f"solver={solver}", f"nfe={nfe}"], "format": METRICS_FORMAT,
               "solver_config": {"name": solver}, "cell_key": digest([solver, nfe, seeds]), "uncertainty": None}
    if with_data:
        unc = U.evaluate_cell(cell, range(n), gen, {"mu": stats["mu"], "sigma": stats["sigma"], "features": real},
                              sq, torch.zeros_like(sq), {"resamples": 200, "seed": 0})
        metrics["uncertainty"] = unc
    (cell / "metrics.json").write_text(json.dumps(seal(metrics)))  # sealed, as stage=evaluate writes it
    return cell


@pytest.fixture()
def sweep(tmp_path):
    """NFE 3: cell A far better than C (bold); NFE 5: A and B drawn alike (tied), C worse."""
    rng = np.random.default_rng(7)
    n, m = 300, 300
    real = draw(rng.normal(size=(m, D)), 0.3 * rng.normal(size=(m, D)))
    z = 1.3 * rng.normal(size=(n, D))
    a = draw(z, 0.35 * rng.normal(size=(n, D)))
    b = draw(z, 0.35 * rng.normal(size=(n, D)))
    c = draw(2.5 * z, 0.35 * rng.normal(size=(n, D)))
    ea = rng.chisquare(16, n) / 16 * 0.04
    root = tmp_path / "sweep"
    _write_cell(root, "ipndm", "iPNDM", 3, a, real, ea)
    _write_cell(root, "euler", "DDIM (Euler)", 3, c, real, 2 * ea)
    _write_cell(root, "ipndm", "iPNDM", 5, a, real, ea)
    _write_cell(root, "unipc", "UniPC", 5, b, real, ea[::-1].copy())
    _write_cell(root, "euler", "DDIM (Euler)", 5, c, real, 2 * ea)
    return root, (a, b, c, real)


def test_identical_cells_give_exactly_zero_paired_difference(tmp_path):
    rng = np.random.default_rng(0)
    real, a, _ = _cells(rng, 300, 300, 1.6)
    e = rng.chisquare(16, 300) / 16
    for name in ("x", "y"):
        _write_cell(tmp_path / name, "ipndm", "iPNDM", 5, a, real, e)
    cx, cy = (json.loads((tmp_path / k / "nfe=5,solver=ipndm" / "metrics.json").read_text()) for k in ("x", "y"))
    dx, _ = U.load_cell(cx, tmp_path / "x" / "nfe=5,solver=ipndm")
    dy, _ = U.load_cell(cy, tmp_path / "y" / "nfe=5,solver=ipndm")
    for metric in ("fid", "kid_mean", "rmse"):
        d, why = U.paired_diff(dx, dy, metric)
        assert why is None and d["diff"] == 0.0 and d["lo"] == 0.0 and d["hi"] == 0.0 and not d["significant"], metric
    # a changed file is refused (its digest is in metrics.json), not silently used
    path = tmp_path / "y" / "nfe=5,solver=ipndm" / U.FILE
    path.write_bytes(path.read_bytes()[:-10])
    data, why = U.load_cell(cy, path.parent)
    assert data is None and "digest" in why


def test_table_bolds_only_a_significant_best_and_marks_the_tied_group(sweep):
    root, _ = sweep
    result = write_tables(root, metrics=["fid", "rmse"])
    marks = result["marks"]["fid"]
    assert marks[3]["status"] == "significant" and marks[3]["best"] == "iPNDM"
    assert marks[5]["status"] == "tied" and sorted(marks[5]["tied"]) == ["UniPC", "iPNDM"]
    d = marks[5]["diffs"]["DDIM (Euler)"]
    assert d["lo"] > 0 and d["significant"]
    md = result["markdown"]
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ") and " ± " in line}
    fid_ipndm = [line for line in md.splitlines() if line.startswith("| iPNDM |")][0]
    cells = fid_ipndm.split(" | ")
    assert cells[1].startswith("**") and " ± " in cells[1]            # NFE 3: bold, with its interval
    assert cells[2].startswith("*") and not cells[2].startswith("**")  # NFE 5: tied (italics)
    assert lines and "paired bootstrap, the same resampled seeds for both cells" in md and "95% interval" in md
    # RMSE: UniPC's errors are iPNDM's in another order (same mean, unpaired): tied; Euler's are double
    rm = result["marks"]["rmse"]
    assert rm[3]["status"] == "significant" and rm[5]["status"] == "tied"
    tex = (root / "table2.tex").read_text()
    assert "\\textbf{" in tex and "\\textit{" in tex and "$\\pm$" in tex
    rows = list(csv.DictReader(io.StringIO((root / "table2.csv").read_text())))
    by = {(r["label"], r["nfe"]): r for r in rows}
    assert by[("iPNDM", "3")]["mark_fid"] == "best" and by[("iPNDM", "3")]["best_fid"] == "1"
    assert by[("iPNDM", "5")]["mark_fid"] == "tied" and by[("UniPC", "5")]["mark_fid"] == "tied"
    assert by[("DDIM (Euler)", "5")]["mark_fid"] == "" and float(by[("DDIM (Euler)", "5")]["fid_minus_lowest_lo"]) > 0
    lo, hi, v = (float(by[("iPNDM", "3")][k]) for k in ("fid_lo", "fid_hi", "fid"))
    assert lo < v < hi and by[("iPNDM", "3")]["fid_real_lo"] != ""


def test_a_cell_without_per_sample_data_is_never_called_significantly_worse(sweep):
    root, (a, b, c, real) = sweep
    # Euler at NFE 3 re-evaluated by an older version: no uncertainty recorded
    _write_cell(root, "euler", "DDIM (Euler)", 3, c, real, with_data=False)
    marks = write_tables(root, metrics=["fid"])["marks"]["fid"]
    assert marks[3]["status"] == "tied" and marks[3]["why"]["DDIM (Euler)"] == "no per-sample data"


def test_compare_cells_stage(sweep, tmp_path, capsys):
    root, _ = sweep
    res = compare_stage.compare_rows(root, "ipndm", "euler", ["fid", "rmse"])
    assert res["a"] == "iPNDM" and res["b"] == "DDIM (Euler)" and res["nfes"] == [3, 5]
    for line in res["metrics"]["fid"] + res["metrics"]["rmse"]:
        assert line["diff"] < 0 and line["hi"] < 0 and line["significant"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=compare_cells", f"sweep_dir={root}", "compare_cells.rows=[iPNDM,unipc]"])
        out = compare_cells_stage.run(cfg)
        assert [ln["nfe"] for ln in out["metrics"]["fid"]] == [5] and not out["metrics"]["fid"][0]["significant"]
        printed = capsys.readouterr().out
        assert "iPNDM minus UniPC" in printed and "not significant" in printed
        assert (root / "compare_ipndm_vs_unipc.md").is_file() and (root / "compare_ipndm_vs_unipc.json").is_file()
        for rows, match in ((["ipndm"], "two rows"), (["ipndm", "heun"], "no row 'heun'")):
            cfg = compose("config", overrides=["stage=compare_cells", f"sweep_dir={root}", f"compare_cells.rows=[{','.join(rows)}]"])
            with pytest.raises(ValueError, match=match):
                compare_cells_stage.run(cfg)


def test_bad_bootstrap_settings_are_named():
    with pytest.raises(ValueError, match="eval.bootstrap.resamples"):
        U.settings({"resamples": 5})
    with pytest.raises(ValueError, match="eval.bootstrap.level"):
        U.settings({"level": 95})
    with pytest.raises(ValueError, match="unknown keys"):
        U.settings({"n_boot": 100})


def test_compare_cells_picks_a_row_by_solver_config_then_by_solver_kind():
    """Two rows of one solver kind (the paper's plug-in and the variable-step one) are told apart by
    their solver config; the kind alone names the row whose config has that name."""
    rows = {"AMED-Plugin (on iPNDM)": {5: {"solver": "amed_plugin", "overrides": ["solver=amed_plugin", "nfe=5"]}},
            "AMED-Plugin (on iPNDM, variable-step)": {5: {"solver": "amed_plugin", "overrides": ["solver=amed_plugin_vs", "nfe=5"]}},
            "iPNDM": {5: {"solver": "ipndm", "overrides": ["solver=ipndm", "nfe=5"]}}}
    assert compare_stage.pick_row(rows, "amed_plugin_vs") == "AMED-Plugin (on iPNDM, variable-step)"
    assert compare_stage.pick_row(rows, "amed_plugin") == "AMED-Plugin (on iPNDM)"
    assert compare_stage.pick_row(rows, "iPNDM") == "iPNDM"
    with pytest.raises(ValueError, match="no row 'heun'.*amed_plugin_vs"):
        compare_stage.pick_row(rows, "heun")
