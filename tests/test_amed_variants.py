"""The corrected AMED variants: variable-step Adams-Bashforth weights, the trajectory objective,
the convergence signal, and their Table 2 labels / cache keys."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from amedlab.amed import AMEDPredictor
from amedlab.amed.distill import distill
from amedlab.amed.objectives import convergence
from amedlab.training.loss import trajectory_loss
from amedlab.specs.config import load_group
from amedlab.data.trajectories import cached_trajectories
from amedlab.specs import DistillSpec, distill_spec, solver_label
from amedlab.models.analytic import Gaussian, default_mixture
from amedlab.schedules import make_sigmas
from amedlab.solvers import Point, make_solver
from amedlab.solvers.multistep import IPNDM_WEIGHTS, adams_bashforth_weights

POLY = {"kind": "polynomial", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [-0.37, 0.25])
def test_variable_step_weights_are_the_fixed_ones_on_equal_steps(order, h):
    t0 = torch.tensor([3.0, 7.5, 12.0], dtype=torch.float64)
    times = [t0 - j * h for j in range(order)]
    weights = adams_bashforth_weights(times, t0 + h)
    for w, fixed in zip(weights, IPNDM_WEIGHTS[order - 1]):
        torch.testing.assert_close(w, torch.full_like(t0, fixed), rtol=0, atol=1e-13)  # round-off of (t_j - t_0) / h


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_variable_step_weights_integrate_polynomials_of_the_order_exactly(order):
    """h sum_j w_j p(t_j) = int_{t_0}^{t_next} p for every p of degree < order, unequal per-sample steps."""
    g = torch.Generator().manual_seed(order)
    t0 = 1.0 + torch.rand(5, generator=g, dtype=torch.float64)
    gaps = 0.1 + torch.rand(order, 5, generator=g, dtype=torch.float64)  # earlier nodes lie above t0 (sigma falls)
    times = [t0] + [t0 + gaps[: j].sum(0) for j in range(1, order)]
    t_next = t0 - 0.2 - 0.5 * torch.rand(5, generator=g, dtype=torch.float64)
    weights = adams_bashforth_weights(times, t_next)
    for degree in range(order):
        coef = torch.randn(degree + 1, generator=g, dtype=torch.float64)
        p = lambda t: sum(c * t**k for k, c in enumerate(coef))  # noqa: E731
        antider = lambda t: sum(c * t ** (k + 1) / (k + 1) for k, c in enumerate(coef))  # noqa: E731
        quad = (t_next - t0) * sum(w * p(t) for w, t in zip(weights, times))
        torch.testing.assert_close(quad, antider(t_next) - antider(t0), rtol=1e-12, atol=1e-12)


def test_variable_step_weights_are_differentiable_in_the_times():
    times = [torch.tensor([2.0], dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with torch.no_grad():
        times[1] += 0.3
        times[2] += 0.9
    t_next = torch.tensor([1.6], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.stack(adams_bashforth_weights([a, b, c], t_next)), times)


def test_variable_step_ipndm_is_fourth_order_on_unequal_steps_from_exact_history():
    """Measured order on the EDM grid (rho 7), warm-started from the exact solution of a Gaussian:
    the variable-step weights give order ~4, the fixed weights ~2 (they assume equal steps)."""
    model = Gaussian(dim=2, std=0.5)

    def error(steps, variable):
        rule = make_solver("ipndm", max_order=4, variable_step=variable).rule
        x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5 / 16
        sig = make_sigmas("polynomial", steps + 1, sigma_min=0.05, sigma_max=5.0, rho=7.0)
        ones = torch.ones(64, dtype=torch.float64)
        history, x = [], None
        for i in range(steps):
            x = model.reference(x_T, 5.0, float(sig[i])) if i < 4 else x
            cur = Point(sig[i] * ones, x, model(x, sig[i] * ones))
            x, new = rule.step(model, cur, sig[i + 1] * ones, history, steps - i)
            history = (history + new)[-3:]
        return (x - model.reference(x_T, 5.0, float(sig[-1]))).pow(2).sum(-1).mean().sqrt().item()

    variable = math.log2(error(64, True) / error(128, True))
    fixed = math.log2(error(64, False) / error(128, False))
    assert variable > 3.6, variable
    assert fixed < 2.5, fixed


def test_variable_step_is_identical_to_fixed_weights_on_a_uniform_grid():
    model = default_mixture()
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    sig = make_sigmas("polynomial", 9, rho=1.0)  # equal steps in sigma
    fixed = make_solver("ipndm", max_order=4).sample(model, x, sig)
    variable = make_solver("ipndm", max_order=4, variable_step=True).sample(model, x, sig)
    torch.testing.assert_close(variable, fixed, rtol=1e-12, atol=1e-10)


def test_variable_step_option_is_checked():
    with pytest.raises(ValueError, match="variable_step"):
        make_solver("ipndm", variable_step="yes")


def test_trajectory_objective_gradient_reaches_every_interval():
    """Loss on the final sample only: every interval's r (not just the last one) gets a gradient."""
    model = default_mixture().float()
    predictor = AMEDPredictor(feature_dim=4, s_dir=0.01, s_time=0.2)
    solver = make_solver("amed_plugin", afs=True, predictor=predictor, base="ipndm", max_order=4, variable_step=True)
    sigmas = make_sigmas("polynomial", 6)
    data, _ = cached_trajectories(model, {"name": "ipndm", "options": {"max_order": 4}}, POLY, 6, 2, range(32), None)
    loss, errors = trajectory_loss(solver, model, data["states"], sigmas, intermediate_weight=0.0)
    assert len(errors) == 5 and torch.equal(loss, errors[-1])
    outputs = solver.rule.last_outputs
    assert len(outputs) == 5
    for r, _, _ in outputs:
        r.retain_grad()
    loss.backward()
    for i, (r, _, _) in enumerate(outputs):
        assert r.grad is not None and r.grad.abs().sum() > 0, f"interval {i}"
    assert predictor.head_r.weight.grad.abs().sum() > 0


def test_distillation_with_the_trajectory_objective_records_and_lowers_the_final_error(tmp_path):
    model = default_mixture().float()
    kwargs = dict(solver="amed_plugin", nfe=5, schedule=POLY, num_trajectories=256, batch_size=32, epochs=3,
                  cache_dir=tmp_path, seed=0, solver_options={"base": "ipndm", "max_order": 4, "variable_step": True})
    trained = distill(model, objective="trajectory", **kwargs)
    m = trained.meta
    assert m["objective"] == "trajectory" and m["updates"] == 3 * 8 * 3  # epochs x batches x intervals (records)
    conv = m["convergence"]
    assert [e["interval"] for e in conv["intervals"]] == [0, 1, 2]
    assert all(0 < e["r_end"] < 1 for e in conv["intervals"])
    held_out, _ = cached_trajectories(model, m["teacher"], POLY, 4, m["M"], range(5000, 5256), tmp_path)
    sigmas = torch.tensor(m["sigmas"])
    torch.manual_seed(0)
    untrained = AMEDPredictor(feature_dim=4, s_dir=trained.s_dir, s_time=trained.s_time)
    opts = m["solver_options"]
    with torch.no_grad():
        before = trajectory_loss(make_solver("amed_plugin", afs=True, predictor=untrained, **opts), model, held_out["states"], sigmas)[0]
        after = trajectory_loss(make_solver("amed_plugin", predictor=trained, **opts), model, held_out["states"], sigmas)[0]
    assert after < 0.8 * before, (before, after)
    with pytest.raises(ValueError, match="distill.objective"):
        distill(model, objective="final", **kwargs)


@pytest.mark.parametrize("objective", ["interval", "trajectory"])
def test_the_cosine_rate_falls_to_zero_over_training_and_enters_the_cache_key(objective, tmp_path):
    model = default_mixture().float()
    kwargs = dict(solver="amed_plugin", nfe=5, schedule=POLY, num_trajectories=128, batch_size=32, epochs=2, lr=4e-3,
                  cache_dir=tmp_path, seed=0, objective=objective)
    lrs = [rec["lr"] for rec in distill(model, **kwargs).records if rec["interval"] == 0]
    assert lrs == [4e-3] * 8  # constant, the paper's: 2 epochs x 4 batches
    cosine = distill(model, lr_schedule="cosine", **kwargs)
    lrs = [rec["lr"] for rec in cosine.records if rec["interval"] == 0]
    # one value per batch, the same for every interval of a batch: 4e-3 * (1 + cos(pi k / 8)) / 2
    assert lrs == pytest.approx([4e-3 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)], rel=1e-12)
    assert cosine.meta["lr_schedule"] == "cosine"
    base = DistillSpec.create(**kwargs)
    assert "lr_schedule" not in base.settings()  # the paper's constant rate keeps the key it always had
    assert DistillSpec.create(lr_schedule="cosine", **kwargs).key("m") != base.key("m")
    with pytest.raises(ValueError, match="distill.lr_schedule='linear'; accepted: constant, cosine"):
        distill(model, lr_schedule="linear", **kwargs)


def _records(r, loss, interval=0):
    return [{"interval": interval, "loss": float(lo), "r_mean": float(rv)} for rv, lo in zip(r, loss)]


def test_convergence_signal():
    g = torch.Generator().manual_seed(0)
    n = 100
    noisy_loss = (1 + 0.3 * torch.randn(n, generator=g)).abs()
    flat = convergence(_records(0.4 + 0.002 * torch.randn(n, generator=g), noisy_loss))
    assert flat["converged"] is True and flat["intervals"][0]["tail_updates"] == 10
    drifting_r = convergence(_records(torch.linspace(0.8, 0.3, n), noisy_loss))
    assert drifting_r["converged"] is False and drifting_r["intervals"][0]["r_change"] < -0.02
    falling_loss = convergence(_records(torch.full((n,), 0.4), torch.linspace(5.0, 1.0, n)))
    assert falling_loss["converged"] is False and falling_loss["intervals"][0]["loss_rel_change"] < -0.1
    assert convergence(_records([0.5], [1.0]))["converged"] is None  # one update: not judged


def test_convergence_pairs_the_last_tenth_with_the_same_batches_one_epoch_earlier():
    # 4 epochs of 40 batches; each batch's trajectories have their own difficulty, the same every
    # epoch (the data module's fixed order), and the last tenth happens to hold easy ones
    g = torch.Generator().manual_seed(0)
    difficulty = 1 + 0.3 * torch.randn(40, generator=g).abs()
    difficulty[-16:] = 0.7 + 0.02 * torch.randn(16, generator=g)
    r = 0.4 + 0.001 * torch.randn(160, generator=g)

    def recs(loss_per_epoch):
        return [{"interval": 0, "epoch": e, "loss": float(loss_per_epoch[e] * difficulty[b]), "r_mean": float(r[40 * e + b])}
                for e in range(4) for b in range(40)]

    settled = recs([1.0, 1.0, 1.0, 1.0])
    unpaired = convergence([{k: v for k, v in rec.items() if k != "epoch"} for rec in settled])
    assert unpaired["converged"] is False  # the window before holds harder batches: read as a falling loss
    paired = convergence(settled)["intervals"][0]
    assert paired["converged"] is True and paired["paired_with_previous_epoch"] and abs(paired["loss_rel_change"]) < 1e-12
    still_falling = convergence(recs([1.6, 1.4, 1.2, 1.0]))["intervals"][0]  # the same batches, 17% lower
    assert still_falling["converged"] is False and still_falling["loss_rel_change"] == pytest.approx(1 / 1.2 - 1)


def test_labels_and_cache_keys_of_the_variants():
    faithful, vs, traj = (OmegaConf.to_container(load_group("solver", n)) for n in ("amed_plugin", "amed_plugin_vs", "amed_plugin_vs_traj"))
    assert solver_label(faithful) == "AMED-Plugin (on iPNDM)"
    assert solver_label(vs) == "AMED-Plugin (on iPNDM, variable-step)"
    assert solver_label(traj) == "AMED-Plugin (on iPNDM, variable-step, trajectory objective)"
    assert solver_label(OmegaConf.to_container(load_group("solver", "amed"))) == "AMED-Solver"

    def settings(node):
        cfg = OmegaConf.create({"solver": node, "nfe": 5, "seed": 0, "predictor": {},
                                "distill": {"num_trajectories": 8, "batch_size": 4, "lr": 1e-3, "epochs": 1}})
        return distill_spec(cfg, node, POLY).settings()

    assert "objective" not in settings(faithful)  # the paper's rows keep their cache keys
    assert settings(traj)["objective"] == "trajectory" and settings(vs) != settings(faithful)


def test_label_of_the_standalone_variable_step_base():
    node = OmegaConf.to_container(load_group("solver", "ipndm"))
    assert solver_label(node) == "iPNDM"
    node["options"]["variable_step"] = True
    assert solver_label(node) == "iPNDM (variable-step)"


# -- AMED on a learned coarse grid (solver.distill.learn_grid; amedlab.training.grid) --

def test_learned_grid_starts_at_the_schedule_and_stays_monotone_with_fixed_ends():
    from amedlab.training.grid import LearnedGrid

    base = make_sigmas("polynomial", 6)
    grid = LearnedGrid(base)
    assert torch.allclose(grid.sigmas(), base, rtol=1e-12, atol=0)
    with torch.no_grad():  # any logits, even extreme ones: still decreasing, ends unchanged
        grid.grid_logits.copy_(torch.tensor([30.0, -30.0, 0.0, 5.0, -50.0], dtype=torch.float64))
    s = grid.sigmas()
    assert s[0].item() == base[0].item() and s[-1].item() == base[-1].item()
    assert bool((s[1:] < s[:-1]).all())
    assert not torch.allclose(s, base)


def test_learn_grid_gradient_reaches_the_grid_logits_and_the_predictor():
    from amedlab.amed.distill import AMEDDistillation

    model = default_mixture().float()
    predictor = AMEDPredictor(feature_dim=4, s_dir=0.01)
    solver = make_solver("amed", afs=True, predictor=predictor)
    sigmas = make_sigmas("time_uniform", 4, rho=1.0)
    data, _ = cached_trajectories(model, {"name": "heun"}, {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0,
                                                            "rho": 1.0}, 4, 1, range(16), None)
    module = AMEDDistillation(model, solver.rule, sigmas, True, objective="trajectory", learn_grid=True, grid_lr=0.05)
    assert [g["lr"] for g in module.optimizer_groups()] == [5e-3, 0.05]  # predictor, grid
    assert {id(p) for p in module.trained_parameters()} >= {id(module.grid.grid_logits), id(predictor.head_r.weight)}
    loss, _ = trajectory_loss(solver, model, data["states"], module.current_sigmas())
    loss.backward()
    assert module.grid.grid_logits.grad is not None and module.grid.grid_logits.grad.abs().sum() > 0
    assert predictor.head_r.weight.grad.abs().sum() > 0


def test_distillation_with_learn_grid_samples_on_its_own_grid_only(tmp_path):
    model = default_mixture().float()
    schedule = {"kind": "time_uniform", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 1.0}
    kwargs = dict(solver="amed", nfe=5, schedule=schedule, num_trajectories=128, batch_size=32, epochs=2, lr=2e-2,
                  cache_dir=tmp_path, seed=0)
    trained = distill(model, objective="trajectory", learn_grid=True, **kwargs)
    m = trained.meta
    start = make_sigmas("time_uniform", 4, rho=1.0)
    own = make_solver("amed", predictor=trained).rule.own_grid()
    assert m["learned_grid"] is True and torch.equal(own, torch.tensor(m["sigmas"], dtype=torch.float64))
    assert torch.allclose(torch.tensor(m["schedule_sigmas"], dtype=torch.float64), start)
    assert own[0] == start[0] and own[-1] == start[-1] and bool((own[1:] < own[:-1]).all())
    assert (own - start).abs().max() > 1e-6  # the inner times moved
    # the inner teacher states are on the schedule's grid: every interval records the final error
    assert len(set(m["final_interval_loss"])) == 1 and len(m["final_interval_loss"]) == 3
    x = 80.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    solver = make_solver("amed", predictor=trained)
    with torch.no_grad():
        assert torch.isfinite(solver.sample(model, x, own)).all()
        with pytest.raises(ValueError, match="learned its own"):
            solver.sample(model, x, start)
    # a saved one, given as solver.predictor, is checked against its own grid (the cell samples on it)
    from amedlab.specs import check_predictor_file

    path = trained.save(tmp_path / "predictor.pt")
    assert check_predictor_file(path, {"name": "amed", "afs": True}, 5, start, model).meta["sigmas"] == m["sigmas"]
    # an ordinary predictor reports no grid of its own: the schedule decides, as before
    assert make_solver("amed", predictor=AMEDPredictor(feature_dim=4)).rule.own_grid() is None


def test_learn_grid_needs_the_trajectory_objective_and_no_intermediate_weight(tmp_path):
    model = default_mixture().float()
    kwargs = dict(solver="amed", nfe=5, num_trajectories=32, batch_size=32, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"solver\.distill\.learn_grid=true needs solver\.distill\.objective=trajectory"):
        distill(model, learn_grid=True, **kwargs)
    with pytest.raises(ValueError, match=r"solver\.distill\.learn_grid=true needs solver\.distill\.intermediate_weight=0"):
        distill(model, learn_grid=True, objective="trajectory", intermediate_weight=0.5, **kwargs)
    with pytest.raises(ValueError, match=r"solver\.distill\.learn_grid='yes'"):
        distill(model, learn_grid="yes", objective="trajectory", **kwargs)


def test_labels_and_cache_keys_of_the_learned_grid_variants():
    grid, vs_grid, amed_node, traj = (OmegaConf.to_container(load_group("solver", n))
                                      for n in ("amed_grid", "amed_plugin_vs_grid", "amed", "amed_plugin_vs_traj"))
    assert solver_label(grid) == "AMED-Solver (trajectory objective, learned grid)"
    assert solver_label(vs_grid) == "AMED-Plugin (on iPNDM, variable-step, trajectory objective, learned grid)"

    def spec(node, **extra):
        cfg = OmegaConf.create({"solver": node, "nfe": 5, "seed": 0, "predictor": {},
                                "distill": {"num_trajectories": 8, "batch_size": 4, "lr": 1e-3, "epochs": 1}})
        return distill_spec(cfg, node, POLY)

    assert "learn_grid" not in spec(amed_node).settings() and "learn_grid" not in spec(traj).settings()
    assert spec(grid).settings()["learn_grid"] is True
    off = dict(traj, distill={**traj["distill"], "learn_grid": False})  # false: the same predictor as unset
    assert spec(off).key("m") == spec(traj).key("m") != spec(vs_grid).key("m")


@pytest.mark.parametrize("sdist, message", [
    ({"learn_grid": True}, "solver.distill.learn_grid=true needs solver.distill.objective=trajectory, not 'interval'"),
    ({"learn_grid": True, "objective": "trajectory", "intermediate_weight": 1.0}, "intermediate_weight=0"),
    ({"learn_grid": 1, "objective": "trajectory"}, "solver.distill.learn_grid=1; accepted: true, false"),
    ({"grid_lr": 0.01}, "solver.distill.grid_lr=0.01 needs solver.distill.learn_grid=true"),
    ({"learn_grid": True, "objective": "trajectory", "grid_lr": -1}, "solver.distill.grid_lr=-1; accepted: null or a finite number > 0"),
])
def test_learn_grid_config_errors_before_any_compute(sdist, message):
    from amedlab.errors import ConfigError
    from amedlab.specs import check_distill_settings

    cfg = OmegaConf.create({"solver": {"name": "amed", "distill": sdist}, "predictor": {},
                            "distill": {"num_trajectories": 8, "batch_size": 4, "lr": 1e-3, "epochs": 1, "gen_batch_size": 8}})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_distill_settings(cfg)
    check_distill_settings(OmegaConf.merge(cfg, {"solver": {"distill": {"learn_grid": True, "objective": "trajectory",
                                                                          "intermediate_weight": 0.0, "grid_lr": 0.02}}}))
