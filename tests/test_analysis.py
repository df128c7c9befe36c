"""Trajectory geometry (PCA, deviations) and the mean-direction oracle, on closed-form cases."""
import json
import math

import pytest
import torch

from amedlab.analysis.oracle import OracleSearch, best_scale, mid_time, oracle_step, ratio_of_mid_time, search_minimum
from amedlab.analysis.pca import trajectory_geometry
from amedlab.analysis.trajectories import (
    coarse_num_points,
    fine_steps_for,
    oracle_on_grid,
    sample_trajectories,
)
from amedlab.models.analytic import Gaussian, default_mixture
from amedlab.schedules import make_sigmas
from amedlab.solvers import afs_point, evaluate, make_solver


def _x_T(n, dim, seed=0):
    return 80.0 * torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gaussian_traj():
    model = Gaussian(dim=8, mean=0.3, std=0.5)
    sigmas = make_sigmas("polynomial", 61)
    return model, sigmas, sample_trajectories(model, make_solver("heun"), _x_T(32, 8), sigmas)


@pytest.fixture(scope="module")
def mixture_traj():
    model = default_mixture(dim=2)
    sigmas = make_sigmas("polynomial", 121)
    return model, sigmas, sample_trajectories(model, make_solver("heun"), _x_T(64, 2), sigmas)


def test_callback_collects_every_state(gaussian_traj):
    model, sigmas, traj = gaussian_traj
    assert traj.shape == (32, 61, 8)
    assert torch.equal(traj[:, -1], make_solver("heun").sample(model, _x_T(32, 8), sigmas))
    # Heun with 60 steps: within 1e-2 of the exact solution (|x_T| ~ 200)
    assert (traj[:, -1] - model.reference(_x_T(32, 8), 80.0, 0.002)).abs().max() < 1e-2


def test_gaussian_trajectories_are_straight_lines(gaussian_traj):
    # x(sigma) = mu + sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (x_T - mu): every state on one line
    _, _, traj = gaussian_traj
    g = trajectory_geometry(traj)
    assert g["explained_variance"][:, 0].min() > 0.9999
    assert g["unexplained_variance"][:, 0].max() < 1e-20
    assert g["rel_error"][:, 0].max() < 1e-12
    assert g["max_line_deviation"].max() < 1e-12
    assert g["max_plane_deviation"].max() < 1e-12
    assert torch.allclose(g["arc_to_chord"], torch.ones(32, dtype=torch.float64), atol=1e-12)


def test_quarter_circle_geometry():
    # a quarter circle of radius 2 placed in a random 2-D plane of R^10: exactly planar, and its
    # largest distance from the chord is R (1 - cos 45 deg) = R (1 - 1/sqrt 2), chord R sqrt 2.
    theta = torch.linspace(0, math.pi / 2, 181, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    X = (2.0 * torch.stack([theta.cos(), theta.sin()], -1)) @ basis.T + 0.5
    g = trajectory_geometry(X[None], max_components=4)
    assert g["max_line_deviation"].item() == pytest.approx((1 - 1 / math.sqrt(2)) / math.sqrt(2), rel=1e-12)
    assert g["max_plane_deviation"].item() < 1e-12
    assert g["explained_variance"][0, 1].item() == pytest.approx(1.0, abs=1e-14)
    assert 0.9 < g["explained_variance"][0, 0].item() < 0.99  # a quarter circle is not a line
    assert g["rel_error"][0, 1:].max() < 1e-12
    assert g["arc_to_chord"].item() == pytest.approx((math.pi / 2) / math.sqrt(2), rel=1e-4)
    # the rebuild error from the tail singular values equals the explicit projection residual
    Xc = X - X.mean(0)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    resid = Xc - Xc @ Vh[:1].T @ Vh[:1]
    assert g["rel_error"][0, 0].item() == pytest.approx((resid.norm() / X.norm()).item(), rel=1e-10)


def test_mixture_geometry_in_plausible_band(mixture_traj):
    # 2-D data: the top 2 components are everything; one component keeps almost everything
    _, _, traj = mixture_traj
    g = trajectory_geometry(traj)
    ev1 = g["explained_variance"][:, 0]
    assert 0.999 < ev1.median() < 0.99999
    assert ev1.min() > 0.99
    assert g["explained_variance"][:, 1].min() > 1 - 1e-12
    dev = g["max_line_deviation"]
    assert 1e-3 < dev.median() < 2e-2  # measured 0.0042 with 256 trajectories
    assert dev.max() < 0.3
    assert (g["arc_to_chord"] >= 1).all() and g["arc_to_chord"].median() < 1.02


def test_search_minimum_is_parallel_and_exact():
    targets = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.93, 1.0], dtype=torch.float64)
    r, f = search_minimum(lambda r: (r - targets) ** 2 + 1, 6, grid_points=9, iters=30)
    assert torch.allclose(r, targets, atol=1e-6)
    assert torch.allclose(f, torch.ones(6, dtype=torch.float64), atol=1e-12)
    # the final parabolic step is exact on a quadratic even after 2 golden steps
    r, _ = search_minimum(lambda r: 3 * (r - targets) ** 2, 6, grid_points=9, iters=2)
    assert torch.allclose(r, targets, atol=1e-12)
    # a bracket at an end of [0, 1] and a kink (|r - t|) still converge to the golden precision
    r, _ = search_minimum(lambda r: (r - targets).abs(), 6, grid_points=9, iters=20)
    assert torch.allclose(r, targets, atol=0.25 * 0.62**20)


def test_mid_time_round_trip():
    t_cur, t_next = torch.tensor([80.0, 2.0]), torch.tensor([9.7, 0.002])
    r = torch.tensor([0.3, 0.8])
    assert torch.allclose(ratio_of_mid_time(t_cur, t_next, mid_time(t_cur, t_next, r)), r)
    assert torch.allclose(mid_time(t_cur, t_next, torch.tensor([0.5, 0.5])), (t_cur * t_next).sqrt())


def test_best_scale_is_least_squares_and_clipped():
    delta = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(best_scale(delta, v), torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert torch.allclose(best_scale(delta, v, (0.99, 1.01)), torch.tensor([1.01, 0.99], dtype=torch.float64))


def test_oracle_is_exact_on_the_gaussian(gaussian_traj):
    # from a point of the trajectory every slope points along the line to mu, so c*(r*) lands exactly
    # on it; the AFS slope x / sqrt(1 + t^2) does not (mu != 0): there the joint (r, c) search is exact
    model, sigmas, traj = gaussian_traj
    ones = torch.ones(traj.shape[0], dtype=torch.float64)
    for i0, i1, first in ((0, 20, True), (20, 40, False), (40, 60, False)):
        t0 = sigmas[i0] * ones
        cur = afs_point(traj[:, i0], t0) if first else evaluate(model, traj[:, i0], t0)
        o = oracle_step(model, cur, sigmas[i1] * ones, traj[:, i1], OracleSearch(joint_rc=first))
        scale = (traj[:, i1] - traj[:, i0]).norm(dim=-1)
        assert (o.error_rc / scale).max() < 1e-12
        assert (o.error_rc <= o.error).all() and (o.r >= 0).all() and (o.r <= 1).all()
        assert (o.error / scale).max() < (0.1 if first else 1e-3)  # c = 1: r* alone nearly exact too
    assert o.calls == 9 + 2 * (8 + 3 + 1)  # one shared grid pass, refinements for r and the shared r


def test_oracle_restart_beats_dpm2_on_every_interval(mixture_traj):
    model, sigmas, traj = mixture_traj
    points = coarse_num_points([3, 5, 7, 9])
    assert points == {3: 3, 5: 4, 7: 5, 9: 6}
    assert fine_steps_for(list(points.values()), 100) == 120
    rules = {"dpm2": make_solver("dpm2", afs=True), "heun": make_solver("heun", afs=True)}
    res, raw = oracle_on_grid(model, traj, sigmas, 40, rules)  # NFE 5: 4 points, all modes chained
    assert res["num_points"] == 4 and res["sigmas"] == sigmas[::40].tolist()
    for e, r in zip(res["restart"], raw["restart"]):
        rm = e["rmse"]
        assert rm["oracle r*"] <= rm["dpm2"] and e["oracle_r_le_dpm2_fraction"] == 1.0
        assert rm["oracle r*,c*"] <= rm["oracle r*"] <= rm["oracle shared r"]
        assert rm["oracle r*"] < 0.5 * rm["dpm2"]  # measured: 5-30x smaller
        assert e["dpm2_r"]["min"] == pytest.approx(0.5) and e["dpm2_r"]["max"] == pytest.approx(0.5)
        assert (r["r_star"] >= 0).all() and (r["r_star"] <= 1).all()
    # measured with 256 trajectories: r* medians 0.38, 0.37, 0.14; c* ~ 1 except on the last interval
    assert 0.3 < res["restart"][0]["r_star"]["median"] < 0.45
    assert 0.3 < res["restart"][1]["r_star"]["median"] < 0.45
    assert 0.05 < res["restart"][2]["r_star"]["median"] < 0.25
    final = res["chained"]["final_rmse"]
    dpm2_final = (make_solver("dpm2", afs=True).sample(model, traj[:, 0], sigmas[::40]) - traj[:, -1]).pow(2).mean().sqrt()
    assert final["oracle r*,c*"] < final["oracle r*"] < 0.2 * dpm2_final
    assert 0.02 < final["oracle r*,c*"] < 0.2 and 0.05 < final["oracle r*"] < 0.3  # measured 0.082, 0.10


def test_c_bounds_sit_between_c1_and_free_c(mixture_traj):
    model, sigmas, traj = mixture_traj
    ones = torch.ones(traj.shape[0], dtype=torch.float64)
    cur = evaluate(model, traj[:, 40], sigmas[40] * ones)
    free = oracle_step(model, cur, sigmas[80] * ones, traj[:, 80], modes=("rc",))
    tight = oracle_step(model, cur, sigmas[80] * ones, traj[:, 80], OracleSearch(c_bounds=(0.99, 1.01)), modes=("rc",))
    assert tight.c_rc.min() >= 0.99 and tight.c_rc.max() <= 1.01
    assert torch.equal(free.r_rc, tight.r_rc)  # c* is taken at r*
    assert (free.error_rc <= tight.error_rc * (1 + 1e-12)).all()
    assert (tight.error_rc <= tight.error * (1 + 1e-12)).all()
    assert free.r_shared is None and free.error_shared is None
    # the joint search (c = c*(r) at every r) is kept only where it is better
    joint = oracle_step(model, cur, sigmas[80] * ones, traj[:, 80], OracleSearch(joint_rc=True), modes=("rc",))
    assert (joint.error_rc <= free.error_rc).all() and (joint.error_rc < 0.99 * free.error_rc).any()
    assert joint.calls == free.calls + 8 + 3 + 1


def test_stage_writes_json_and_figures(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from amedlab.stages import analyze_trajectories as trajectories
    from amedlab.specs import CONF_DIR
    from amedlab.specs import load_group

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=analyze_trajectories", "model=gaussian_mixture"])
    OmegaConf.set_struct(cfg, False)
    cfg.analysis = load_group("analysis", "default")
    cfg.analysis.update({"num_samples": 16, "nfes": [3, 5], "solvers": ["euler", "dpm2"]})
    cfg.analysis.fine.steps = 24
    cfg.analysis.oracle.update({"grid_points": 5, "iters": 4, "restart_solvers": ["dpm2"]})
    cfg.analysis.amed.enabled = False
    ev2 = trajectories.run(cfg)
    assert ev2 == pytest.approx(1.0)
    out = json.loads((tmp_path / "analysis.json").read_text())
    assert out["fine"]["steps"] == 24 and out["fine"]["nfe"] == 48 and out["fine"]["rmse_vs_reference"] < 0.05
    assert set(out["final_rmse"]) == {"euler", "dpm2", "oracle r*", "oracle r*,c*"}  # chained: [r, rc]
    assert out["final_rmse"]["dpm2"]["5"]["nfe_counted"] == 5
    assert len(out["oracle"]["nfe"]["5"]["restart"]) == 3
    assert out["amed"].startswith("disabled")
    for name in ("trajectory_pca.png", "oracle.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _ImageGaussian(torch.nn.Module):
    """The Gaussian seen as 1x4x4 images: the analysis must flatten per sample."""

    sample_shape = (1, 4, 4)

    def __init__(self):
        super().__init__()
        self.inner = Gaussian(dim=16, mean=0.1, std=0.5)

    def forward(self, x, sigma):
        return self.inner(x.reshape(x.shape[0], -1), sigma).reshape(x.shape)


def test_image_shaped_samples():
    model = _ImageGaussian()
    sigmas = make_sigmas("polynomial", 13)
    x = _x_T(8, 16).reshape(8, 1, 4, 4)
    traj = sample_trajectories(model, make_solver("heun"), x, sigmas)
    assert traj.shape == (8, 13, 1, 4, 4)
    assert trajectory_geometry(traj)["max_line_deviation"].max() < 1e-12
    res, raw = oracle_on_grid(model, traj, sigmas, 4, {"dpm2": make_solver("dpm2", afs=True)}, OracleSearch(iters=6, joint_rc=True))
    for e in res["restart"]:
        assert e["rmse"]["oracle r*,c*"] < 1e-9 * e["rmse"]["dpm2"] + 1e-12
        assert e["rmse"]["oracle r*"] <= e["rmse"]["dpm2"]


def test_config_errors_before_compute():
    from amedlab.analysis.trajectories import analyze
    from amedlab.specs.config import load_group

    schedule = load_group("schedule", "polynomial")
    model = Gaussian(dim=2)
    for key, value, message in (("nfes", [4], "reachable"), ("oracle.chained", ["bogus"], "chained"),
                                ("amed.enabled", "maybe", "amed.enabled"), ("oracle.c_bounds", [1.1, 0.9], "c_bounds"),
                                ("oracle.restart_solvers", ["ipndm"], "restart_solvers")):
        cfg = load_group("analysis", "default")
        node, leaf = (cfg, key) if "." not in key else (cfg[key.split(".")[0]], key.split(".")[1])
        node[leaf] = value
        with pytest.raises(ValueError, match=message):
            analyze(model, cfg, schedule)
