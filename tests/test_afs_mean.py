"""AFS with the data mean: D(x_T, sigma_max) taken as E[x0] instead of GENIE's zero-mean assumption."""
import pytest
import torch

from amedlab.models import counting
from amedlab.models.analytic import default_mixture
from amedlab.models.base import data_mean
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver, num_points_for


def test_mean_afs_uses_the_exact_mean_of_analytic_models_and_counts_like_afs():
    model = counting(default_mixture())
    exact = (model.inner.weights[:, None] * model.inner.means).sum(0)
    torch.testing.assert_close(data_mean(model, 80.0, torch.zeros(1, dtype=torch.float64)), exact)
    states = []
    n = num_points_for("ipndm", 5, afs="mean")
    assert n == num_points_for("ipndm", 5, afs=True) == 7
    make_solver("ipndm", afs="mean").sample(model, torch.randn(8, 2, dtype=torch.float64) * 80, make_sigmas("polynomial", n), callback=states.append)
    assert model.calls == 5
    torch.testing.assert_close(states[0].denoised, exact.expand(8, 2))


def test_mean_afs_beats_genie_afs_on_the_non_centred_digits():
    model = load_denoiser(SHIPPED_TEACHER)
    mean = data_mean(model, 80.0, torch.zeros(1))
    assert -0.5 < mean.mean().item() < -0.3  # digits in [-1, 1] are mostly background: far from zero-mean
    counted = counting(model)
    x = torch.randn(64, *model.sample_shape, generator=torch.Generator().manual_seed(0)) * 80
    with torch.no_grad():
        ref = make_solver("heun").sample(model, x, make_sigmas("polynomial", 33))
        errs = {}
        for afs in (True, "mean"):
            counted.reset()
            out = make_solver("ipndm", afs=afs).sample(counted, x, make_sigmas("polynomial", 7))
            assert counted.calls == 5  # the mean's one-off calibration is not a per-sample NFE
            errs[afs] = (out - ref).pow(2).flatten(1).mean(1).sqrt().mean().item()
    assert errs["mean"] < 0.8 * errs[True], errs


def test_bad_afs_value():
    with pytest.raises(ValueError, match=r"solver.afs='yes'; accepted: false, true \(GENIE's AFS\), mean"):
        make_solver("euler", afs="yes")
