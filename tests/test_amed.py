"""AMED: predictor, plug-in step rules, trajectory cache, distillation."""
import logging

import pytest
import torch

from amedlab.amed import AMEDPredictor
from amedlab.amed.distill import distill, interval_losses
from amedlab.amed.predictor import num_parameters
from amedlab.data.trajectories import TrajectoryCache, cached_trajectories, trajectory_key, trajectory_spec
from amedlab.models import counting
from amedlab.models.analytic import default_mixture
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver, num_points_for

POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def _noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80.0


def _half_predictor(feature_dim=4):
    """g_phi forced to r = 1/2, c = a = 1 (zero head, no scale heads)."""
    p = AMEDPredictor(feature_dim=feature_dim).double()
    torch.nn.init.zeros_(p.head_r.weight)
    torch.nn.init.zeros_(p.head_r.bias)
    return p


def test_paper_sizes_about_9k_parameters_and_output_ranges():
    p = AMEDPredictor(feature_dim=64, s_dir=0.01, s_time=0.2)
    assert num_parameters(p) == 8971
    r, c, a = p(torch.randn(5, 64) * 10, torch.full((5,), 10.0), torch.full((5,), 2.0))
    assert r.shape == c.shape == a.shape == (5,)
    assert ((r > 0) & (r < 1)).all() and ((c >= 0.99) & (c <= 1.01)).all() and ((a >= 0.8) & (a <= 1.2)).all()


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_any_batch_size_and_afs_zeros(batch):
    p = AMEDPredictor(feature_dim=4)
    r, c, a = p(None, torch.full((batch,), 80.0), torch.full((batch,), 9.0))
    assert r.shape == (batch,) and torch.equal(c, torch.ones(batch))


@pytest.mark.parametrize("solver,options", [("amed", {}), ("amed_plugin", {"base": "dpm2"})])
def test_forced_half_reproduces_dpm_solver_2_exactly(solver, options):
    model = default_mixture()
    sigmas = make_sigmas("polynomial", 5)
    x = _noise(64)
    ref = make_solver("dpm2", afs=True).sample(model, x, sigmas)
    out = make_solver(solver, afs=True, predictor=_half_predictor(), **options).sample(model, x, sigmas)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("base,options", [("euler", {}), ("ipndm", {"max_order": 4}), ("dpmpp", {"order": 3})])
def test_plugin_at_zero_split_time_is_its_base_solver_on_the_refined_grid(base, options):
    """Forcing t_mid to known times makes the plug-in the base solver on the merged grid."""
    model = default_mixture()
    coarse = make_sigmas("polynomial", 4)
    fine = torch.stack([coarse[:-1], torch.sqrt(coarse[:-1] * coarse[1:])], 1).reshape(-1)
    fine = torch.cat([fine, coarse[-1:]])
    x = _noise(16)
    name = {"euler": "euler", "ipndm": "ipndm", "dpmpp": "dpmpp"}[base]
    ref = make_solver(name, **options).sample(model, x, fine)
    out = make_solver("amed_plugin", afs=False, predictor=_half_predictor(), base=base, **options).sample(model, x, coarse)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver,options", [("amed", {}), ("amed_plugin", {"base": "euler"}), ("amed_plugin", {"base": "ipndm"}),
                                            ("amed_plugin", {"base": "dpmpp", "order": 3}), ("amed_plugin", {"base": "dpm2"})])
def test_counted_nfe(solver, options):
    model = counting(default_mixture())
    for nfe, points in zip((3, 5, 7, 9), (3, 4, 5, 6)):
        assert num_points_for(solver, nfe, afs=True, predictor=_half_predictor(), **options) == points
        model.reset()
        make_solver(solver, afs=True, predictor=_half_predictor(), **options).sample(model, _noise(4), make_sigmas("polynomial", points))
        assert model.calls == nfe


@pytest.mark.parametrize("solver,options", [("amed", {}), ("amed_plugin", {"base": "euler"}), ("amed_plugin", {"base": "ipndm"}),
                                            ("amed_plugin", {"base": "dpmpp"}), ("amed_plugin", {"base": "dpm2"})])
def test_gradients_flow_through_the_step(solver, options):
    model = default_mixture().float()
    p = AMEDPredictor(feature_dim=4, s_dir=0.05, s_time=0.1)
    out = make_solver(solver, afs=True, predictor=p, **options).sample(model, _noise(8).float(), make_sigmas("polynomial", 4))
    out.pow(2).sum().backward()
    for name in ("head_r", "head_c", "head_a", "enc", "time_layer"):
        grad = getattr(p, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_saved_predictor_checks_model_grid_and_afs(tmp_path):
    model = default_mixture().float()
    sigmas = make_sigmas("polynomial", 4)
    p = _half_predictor()
    p.meta = {"sigmas": sigmas.tolist(), "schedule": POLY, "afs": True, "model_identity": model.identity(), "model_name": "gaussian_mixture"}
    path = p.save(tmp_path / "pred.pt")
    loaded = AMEDPredictor.load(path)
    torch.testing.assert_close(loaded.state_dict(), p.float().state_dict())
    solver = make_solver("amed", predictor=path)
    assert solver.afs is True  # taken from the predictor
    solver.sample(model.float(), _noise(2).float(), sigmas)
    with pytest.raises(ValueError, match="grid"):
        solver.sample(model.float(), _noise(2).float(), make_sigmas("time_uniform", 4, rho=1.0))
    with pytest.raises(ValueError, match="distilled for model 'gaussian_mixture'"):
        make_solver("amed", predictor=path).sample(default_mixture(seed=1).float(), _noise(2).float(), sigmas)
    with pytest.raises(ValueError, match="afs=True"):
        make_solver("amed", predictor=path, afs=False).sample(model.float(), _noise(2).float(), sigmas)
    with pytest.raises(FileNotFoundError, match="solver.predictor"):
        make_solver("amed", predictor=tmp_path / "missing.pt")


def test_trajectory_cache_hit_miss_and_corruption(tmp_path, caplog):
    model = default_mixture().float()
    teacher = {"name": "heun", "afs": False, "options": {}}
    args = (model, teacher, POLY, 4, 2, range(32), tmp_path)
    data, cached = cached_trajectories(*args)
    assert not cached and data["states"].shape == (32, 4, 2)
    # the student's grid points are every (M+1)-th teacher point: the last one is the teacher's end point
    end = make_solver("heun").sample(model, data["noise"], make_sigmas("polynomial", 3 * 3 + 1))
    torch.testing.assert_close(data["states"][:, -1], end)
    again, cached = cached_trajectories(*args)
    assert cached and torch.equal(again["states"], data["states"])
    # a different M is a different key: a miss
    _, cached = cached_trajectories(model, teacher, POLY, 4, 1, range(32), tmp_path)
    assert not cached
    # corrupt the file: detected, removed, regenerated identically
    spec = trajectory_spec(model.identity(), teacher, POLY, 4, 2, list(range(32)), torch.float32)
    path = TrajectoryCache(tmp_path).path(trajectory_key(spec))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        regen, cached = cached_trajectories(*args)
    assert not cached and torch.equal(regen["states"], data["states"])
    assert "regenerating" in caplog.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    _, cached = cached_trajectories(*args)
    assert not cached
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("solver", ["amed", "amed_plugin"])
def test_tiny_distillation_lowers_the_loss(solver, tmp_path):
    model = default_mixture().float()
    kwargs = dict(solver=solver, nfe=5, schedule=POLY, num_trajectories=256, batch_size=64, epochs=4, cache_dir=tmp_path, seed=0)
    trained = distill(model, **kwargs)
    torch.manual_seed(0)
    untrained = AMEDPredictor(feature_dim=4, s_dir=trained.s_dir, s_time=trained.s_time)
    held_out, _ = cached_trajectories(model, trained.meta["teacher"], POLY, 4, trained.meta["M"], range(5000, 5256), tmp_path)
    sigmas = torch.tensor(trained.meta["sigmas"])
    opts = trained.meta["solver_options"]
    before = interval_losses(model, make_solver(solver, predictor=untrained, afs=True, **opts).rule, held_out["states"], sigmas, True)
    after = interval_losses(model, make_solver(solver, predictor=trained, **opts).rule, held_out["states"], sigmas, True)
    assert trained.meta["updates"] == 4 * 4 * 3  # epochs x batches x intervals
    assert sum(after) < 0.8 * sum(before), (before, after)
