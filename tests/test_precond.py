"""EDM preconditioning: the identities of Karras et al. 2022 (Table 1) and feature capture."""
import copy

import pytest
import torch
from torch import nn

from amedlab.models.base import CountingDenoiser
from amedlab.models.precond import EDMPrecond, edm_coefficients, edm_loss, edm_loss_weight


class Affine(nn.Module):
    """F(x, c_noise) = a x + b c_noise, with a named inner block to hook."""

    def __init__(self, a=0.3, b=0.7):
        super().__init__()
        self.a, self.b = a, b
        self.inner = nn.Identity()
        self.calls = 0

    def forward(self, x, c_noise):
        self.calls += 1
        h = self.inner(x * 2.0)
        return self.a * x + self.b * c_noise.reshape(-1, 1, 1, 1) + 0 * h


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)


@pytest.mark.parametrize("sigma_data", [0.5, 0.75])
def test_coefficient_identities(sigma_data):
    c_skip, c_out, c_in, c_noise = edm_coefficients(SIGMAS, sigma_data)
    sd = sigma_data
    # unit-variance network input: c_in^2 (sigma^2 + sd^2) = 1
    torch.testing.assert_close(c_in**2 * (SIGMAS**2 + sd**2), torch.ones_like(SIGMAS))
    # unit-variance effective training target: (1 - c_skip)^2 sd^2 + c_skip^2 sigma^2 = c_out^2
    torch.testing.assert_close((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2, c_out**2)
    # loss weight lambda = 1 / c_out^2
    torch.testing.assert_close(edm_loss_weight(SIGMAS, sd), 1 / c_out**2)
    torch.testing.assert_close(c_noise, SIGMAS.log() / 4)
    # limits: sigma -> 0 gives D = x; sigma large gives D ~ sd * F
    assert c_skip[0] == pytest.approx(1.0, abs=2e-5) and c_out[0] == pytest.approx(0.002, rel=1e-4)
    assert c_skip[-1] < 1e-4 and c_out[-1] == pytest.approx(sd, rel=1e-4)


def test_denoiser_matches_formula_and_captures_features():
    torch.manual_seed(0)
    net = Affine()
    den = EDMPrecond(net, sigma_data=0.5, sample_shape=(1, 4, 4), feature_block="inner").double()
    assert den.feature_dim == 16
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in edm_coefficients(sigma, 0.5))
    expected = c_skip * x + c_out * (0.3 * c_in * x + 0.7 * c_noise)
    counted = CountingDenoiser(den)
    net.calls = 0
    out = counted(x, sigma)
    torch.testing.assert_close(out, expected)
    # features: channel-mean of the hooked block's output (here 2 c_in x, one channel), from the same call
    torch.testing.assert_close(counted.last_features, (2 * c_in * x).mean(1).flatten(1))
    assert counted.calls == 1 and net.calls == 1
    # a zero network gives D = c_skip x
    den0 = EDMPrecond(Affine(a=0.0, b=0.0), sigma_data=0.5, sample_shape=(1, 4, 4)).double()
    torch.testing.assert_close(den0(x, sigma), c_skip * x)
    assert den0.last_features is None and den0.feature_dim == 0


def test_deepcopy_captures_its_own_features():
    """The EMA copy must capture features of its own forward pass, not the original's."""
    den = EDMPrecond(Affine(), sigma_data=0.5, sample_shape=(1, 4, 4), feature_block="inner")
    twin = copy.deepcopy(den)
    x = torch.randn(2, 1, 4, 4)
    twin(x, 1.0)
    assert twin.last_features is not None and den.last_features is None


def test_edm_loss_matches_direct_formula():
    """edm_loss = mean of lambda(sigma) (D(y + n, sigma) - y)^2 with ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2)."""
    y = torch.linspace(-1, 1, 64 * 16).reshape(64, 1, 4, 4)
    den = EDMPrecond(Affine(a=0.0, b=0.0), sigma_data=0.5, sample_shape=(1, 4, 4))  # D = c_skip x
    loss = edm_loss(den, y, p_mean=-1.2, p_std=1.2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # same draws, same order: sigma then noise
    sigma = torch.exp(torch.randn(64, generator=gen) * 1.2 - 1.2).reshape(-1, 1, 1, 1)
    n = torch.randn(y.shape, generator=gen) * sigma
    c_skip = 0.25 / (sigma**2 + 0.25)
    expected = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (c_skip * (y + n) - y) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0.5  # F = 0 is far from the optimum: lambda (D - y)^2 ~ 1 on average
