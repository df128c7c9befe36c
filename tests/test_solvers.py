"""Solver correctness: convergence order against exact solutions, NFE accounting, golden numbers."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amedlab.models import counting
from amedlab.models.analytic import Gaussian, default_mixture
from amedlab.schedules import make_sigmas
from amedlab.solvers import Point, afs_point, make_solver, nfe_for, num_points_for

CLASSICAL = ["euler", "heun", "midpoint", "dpm2", "ipndm", "dpmpp2m", "dpmpp3m", "unipc"]


def _x_T(n=128, dim=2, seed=0):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 80.0


def _rmse(a, b):
    return (a - b).pow(2).sum(-1).mean().sqrt().item()


def _observed_order(model, name, steps=(64, 128, 256, 512), **opts):
    """Least-squares slope of log(error) against log(steps)."""
    x = _x_T()
    ref = model.reference(x, 80.0, 0.002)
    errs = [_rmse(make_solver(name, **opts).sample(model, x, make_sigmas("polynomial", n + 1)), ref) for n in steps]
    lx = torch.log(torch.tensor(steps, dtype=torch.float64))
    ly = torch.log(torch.tensor(errs, dtype=torch.float64))
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    return -slope.item(), errs


# theory order per solver; multistep ones of order 3 are held to 2 by their first-order warm-up step
THEORY = {"euler": 1, "heun": 2, "midpoint": 2, "dpm2": 2, "dpmpp2m": 2, "dpmpp3m": 2, "ipndm": 2, "unipc": 2}


@pytest.mark.parametrize("name", CLASSICAL)
def test_convergence_order_gaussian_exact(name):
    order, errs = _observed_order(Gaussian(dim=2, std=0.5), name)
    assert order >= THEORY[name] - 0.3, (order, errs)
    assert errs[-1] < 1e-2


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "dpmpp2m", "ipndm"])
def test_convergence_order_mixture_reference(name):
    order, errs = _observed_order(default_mixture(dim=2, std=0.5), name, steps=(64, 128, 256))
    assert order >= THEORY[name] - 0.3, (order, errs)


def test_ipndm_measured_order_is_two():
    # Fixed Adams-Bashforth weights ignore the unequal steps of the EDM grid: globally 2nd order.
    order, _ = _observed_order(Gaussian(dim=2, std=0.5), "ipndm", steps=(64, 128, 256, 512))
    assert 1.9 < order < 2.3


def _exact_warm_start_error(rule, model, num_steps, kind, rho=1.0, warm=4):
    """Run a step rule whose first ``warm`` points come from the exact solution (exact history)."""
    x_T = _x_T(64) / 16
    sig = make_sigmas(kind, num_steps + 1, sigma_min=0.05, sigma_max=5.0, rho=rho)
    ones = torch.ones(x_T.shape[0], dtype=torch.float64)
    exact = lambda s: model.reference(x_T, 5.0, float(s))  # noqa: E731
    history, x = [], None
    for i in range(num_steps):
        t = sig[i] * ones
        x = exact(sig[i]) if i < warm else x
        cur = Point(t, x, model(x, t))
        x, new = rule.step(model, cur, sig[i + 1] * ones, history, num_steps - i)
        history = (history + new)[-rule.history_size or None :] if rule.history_size else []
    return _rmse(x, exact(sig[-1]))


def _order_from_exact_history(name, kind, steps=(64, 128, 256), **options):
    model, rule = Gaussian(dim=2, std=0.5), make_solver(name, **options).rule
    e1, e2, e3 = (_exact_warm_start_error(rule, model, n, kind) for n in steps)
    return math.log2(e2 / e3)


@pytest.mark.parametrize("name,options,kind", [
    ("dpmpp3m", {"lower_order_final": False, "taylor_d2": True}, "logsnr"),
    ("ipndm", {"max_order": 3}, "polynomial"),  # rho=1: uniform steps, where fixed AB weights are exact
    ("ipndm", {"max_order": 4}, "polynomial"),
    ("unipc", {"order": 3, "lower_order_final": False}, "logsnr"),
])
def test_third_order_with_exact_history(name, options, kind):
    """Warm-started from exact history, the order-3 multistep methods show their order 3."""
    assert _order_from_exact_history(name, kind, **options) >= 2.7


def test_published_dpmpp3m_is_second_order_even_from_exact_history():
    """The reference 3M formula halves the D2 term (see DPMSolverPP): order 2, not 3."""
    order = _order_from_exact_history("dpmpp3m", "logsnr", lower_order_final=False)
    assert 1.7 < order < 2.3


@pytest.mark.parametrize("name", CLASSICAL)
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("final_step", ["sigma_min", "denoise"])
def test_counted_nfe_equals_declared(name, afs, final_step):
    model = counting(default_mixture())
    reached = 0
    for nfe in range(3, 11):
        try:
            n = num_points_for(name, nfe, afs=afs, final_step=final_step)
        except ValueError as err:
            assert "reachable" in str(err)
            continue
        model.reset()
        make_solver(name, afs=afs, final_step=final_step).sample(model, _x_T(4), make_sigmas("polynomial", n))
        assert model.calls == nfe == nfe_for(name, n, afs=afs, final_step=final_step)
        reached += 1
    assert reached >= 4


def test_unreachable_nfe_lists_reachable():
    with pytest.raises(ValueError, match=r"nfe=4 is not reachable by solver=heun.*reachable: 1, 3, 5, 7"):
        num_points_for("heun", 4, afs=True)
    assert num_points_for("dpm2", 5, afs=True) == 4  # NFE 3/5/7/9 = 3/4/5/6 points with AFS: NFE = 2(N-1) - 1
    assert num_points_for("ipndm", 5) == 6


def test_afs_formula():
    x = _x_T(8)
    t = torch.full((8,), 80.0, dtype=torch.float64)
    p = afs_point(x, t)
    torch.testing.assert_close(p.slope, x / math.sqrt(1 + 80.0**2))
    # AFS is exact for data N(0, I): D(x, sigma) = x / (1 + sigma^2), slope = x sigma / (1 + sigma^2) ...
    # ... and for large sigma x/sqrt(1+sigma^2) matches that slope to O(1/sigma^2).
    exact = Gaussian(dim=2, std=1.0)(x, t)
    torch.testing.assert_close(p.slope, (x - exact) / 80.0, rtol=1e-3, atol=0)


def test_afs_saves_one_evaluation_and_stays_close():
    model = counting(Gaussian(dim=2, std=1.0))
    x = _x_T(16)
    sig = make_sigmas("polynomial", 6)
    plain = make_solver("ipndm").sample(model, x, sig)
    assert model.calls == 5
    model.reset()
    afs = make_solver("ipndm", afs=True).sample(model, x, sig)
    assert model.calls == 4
    assert _rmse(plain, afs) < 1e-2


def test_callback_sees_every_grid_point():
    states = []
    sig = make_sigmas("polynomial", 5)
    out = make_solver("heun").sample(default_mixture(), _x_T(4), sig, callback=states.append)
    assert [s.index for s in states] == [0, 1, 2, 3, 4]
    assert [round(s.sigma, 6) for s in states] == [round(float(v), 6) for v in sig]
    assert states[0].denoised is not None and states[-1].denoised is None
    torch.testing.assert_close(states[-1].x, out)


def test_per_sample_times_broadcast():
    """Step rules accept a different time per sample (needed by AMED's per-sample t_mid)."""
    model = Gaussian(dim=2, std=0.5)
    x = _x_T(2)
    t_cur = torch.tensor([10.0, 20.0], dtype=torch.float64)
    t_next = torch.tensor([5.0, 2.0], dtype=torch.float64)
    rule = make_solver("dpm2").rule
    both, _ = rule.step(model, Point(t_cur, x, model(x, t_cur)), t_next, [], 1)
    for i in range(2):
        one, _ = rule.step(model, Point(t_cur[i : i + 1], x[i : i + 1], model(x[i : i + 1], t_cur[i : i + 1])), t_next[i : i + 1], [], 1)
        torch.testing.assert_close(both[i : i + 1], one)


def test_bad_options_name_key_and_accepted():
    with pytest.raises(ValueError, match=r"solver.name='rk45'.*accepted: .*dpm2.*euler"):
        make_solver("rk45")
    with pytest.raises(ValueError, match=r"no option order; accepted: afs, final_step"):
        make_solver("euler", order=2)
    with pytest.raises(ValueError, match=r"solver.max_order=5; accepted: 1, 2, 3, 4"):
        make_solver("ipndm", max_order=5)
    with pytest.raises(ValueError, match=r"solver.final_step='zero'; accepted: sigma_min, denoise"):
        make_solver("euler", final_step="zero")


def test_steps_is_the_walk_sample_takes_and_restarts_from_given_states():
    model, sigmas, x = default_mixture(), make_sigmas("polynomial", 6), _x_T(16, seed=3)
    solver = make_solver("ipndm", afs=True)
    walk = list(solver.steps(model, x, sigmas))
    assert [iv.index for iv in walk] == [0, 1, 2, 3, 4] and [iv.remaining for iv in walk] == [5, 4, 3, 2, 1]
    assert torch.equal(walk[-1].x_next, solver.sample(model, x, sigmas))
    # restart: interval i > 0 starts from states[:, i] whatever the previous step produced (0: from x)
    states = torch.stack([x] + [x * s / 80.0 for s in sigmas[1:]], 1)
    for iv in make_solver("heun").steps(model, x, sigmas, restart=states):
        assert torch.equal(iv.cur.x, states[:, iv.index])
    # detach: start points and carried history are constants, the step itself keeps its graph
    y = x.clone().requires_grad_(True)
    walk = list(make_solver("ipndm").steps(model, y, sigmas, detach=True))
    assert all(not iv.cur.denoised.requires_grad for iv in walk)
    assert walk[0].x_next.requires_grad and not walk[1].cur.x.requires_grad


def test_parse_dtype_names_the_key_and_the_accepted_values():
    from amedlab.models.base import parse_dtype

    assert parse_dtype("float32", "compare.dtype") is torch.float32
    assert parse_dtype("auto", "analysis.dtype", default_mixture()) is torch.float64  # exact reference: float64
    with pytest.raises(ValueError, match=r"compare.dtype='half'; accepted: float32, float64$"):
        parse_dtype("half", "compare.dtype")
    with pytest.raises(ValueError, match=r"analysis.dtype='half'; accepted: auto, float32, float64$"):
        parse_dtype("half", "analysis.dtype", default_mixture())


def test_plugin_solvers_are_imported_on_first_use_only():
    """The classical solvers never import AMED (it imports them); its names resolve lazily."""
    code = (
        "import sys\n"
        "from amedlab.solvers import available_solvers, make_solver\n"
        "make_solver('euler')\n"
        "assert {'amed', 'amed_plugin', 'euler'} <= set(available_solvers())\n"
        "assert not any(m.startswith('amedlab.amed') for m in sys.modules), sorted(sys.modules)\n"
        "try:\n"
        "    make_solver('amed')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "assert 'amedlab.amed.solvers' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "solver.predictor is required for AMED" in out.stdout


# Golden full-loop numbers (diffusers-style): mean of the final sample and of |x| for a fixed
# mixture, fixed noise, polynomial rho=7 grid of 6 points. A silent change of any formula moves them.
GOLDEN = {
    "euler": (-0.0472629834, 0.7525420181),
    "heun": (-0.1163468807, 1.6383113964),
    "midpoint": (-0.0892767199, 1.0653307899),
    "dpm2": (-0.0843940447, 1.3544537429),
    "ipndm": (-0.0865446621, 1.2258411800),
    "dpmpp2m": (-0.0739960668, 1.1004370619),
    "dpmpp3m": (-0.0833726403, 1.1446712010),
    "unipc": (-0.0868856626, 1.1648707677),
}


@pytest.mark.parametrize("name", CLASSICAL)
def test_golden_full_loop(name):
    out = make_solver(name).sample(default_mixture(), _x_T(64, seed=1), make_sigmas("polynomial", 6))
    torch.testing.assert_close(torch.tensor([out.mean().item(), out.abs().mean().item()]),
                               torch.tensor(GOLDEN[name]), rtol=0, atol=1e-8)
