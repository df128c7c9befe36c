import pytest
import torch

from amedlab.schedules import make_sigmas


@pytest.mark.parametrize("kind,rho,expected", [
    ("polynomial", 7.0, [80.0, 9.7232, 0.4700, 0.002]),   # N=4 grid of the AMED paper's setup
    ("time_uniform", 1.0, [80.0, 6.9502, 1.2867, 0.002]),  # N=4 grid of the AMED paper's setup
    ("logsnr", 7.0, [80.0, 2.3392, 0.0684, 0.002]),        # exp(linspace(log 80, log 0.002, 4))
])
def test_grids_to_four_decimals(kind, rho, expected):
    s = make_sigmas(kind, 4, rho=rho)
    assert s.dtype == torch.float64
    assert s.round(decimals=4).tolist() == expected


@pytest.mark.parametrize("kind", ["polynomial", "time_uniform", "logsnr"])
def test_descending_with_exact_ends(kind):
    s = make_sigmas(kind, 18, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    assert s[0] == 10.0 and s[-1] == 0.01
    assert (s[1:] < s[:-1]).all()


def test_time_uniform_is_uniform_in_vp_time():
    # invert sigma(t) = sqrt(exp(b_d t^2/2 + b_min t) - 1): the VP times must be equally spaced
    s = make_sigmas("time_uniform", 9, rho=1.0)
    big, small, eps = torch.log1p(torch.tensor(80.0**2, dtype=torch.float64)), torch.log1p(torch.tensor(0.002**2, dtype=torch.float64)), 1e-3
    b_d = 2 * (small / eps - big) / (eps - 1)
    b_min = big - 0.5 * b_d
    t = (torch.sqrt(b_min**2 + 2 * b_d * torch.log1p(s**2)) - b_min) / b_d
    torch.testing.assert_close(t[1:] - t[:-1], torch.full((8,), (eps - 1) / 8, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "cosine"}, r"schedule.kind='cosine'.*accepted: polynomial, time_uniform, logsnr"),
    ({"sigma_min": 80.0}, r"schedule.sigma_min=80.0 must be smaller than schedule.sigma_max=80.0"),
    ({"rho": 0.0}, r"schedule.rho=0.0 must be > 0"),
    ({"rho": -1.0}, r"schedule.rho=-1.0 must be > 0"),
    ({"num_points": 1}, r"num_points=1"),
])
def test_bad_arguments(kwargs, match):
    args = {"kind": "polynomial", "num_points": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_sigmas(**args)
