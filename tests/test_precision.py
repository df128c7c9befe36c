import pytest
import torch

from amedlab.models.base import AutocastDenoiser, with_precision
from amedlab.models.digits import SHIPPED_TEACHER, load_denoiser
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver


def test_bf16_autocast_sampling_is_close_to_fp32_and_counts_nfe():
    model = load_denoiser(SHIPPED_TEACHER)
    x = torch.randn(16, *model.sample_shape, generator=torch.Generator().manual_seed(0)) * 80
    sigmas = make_sigmas("polynomial", 6)
    ref = make_solver("ipndm").sample(model, x, sigmas)
    mixed = AutocastDenoiser(model, "bf16")
    out = make_solver("ipndm").sample(mixed, x, sigmas)
    assert out.dtype == torch.float32 and mixed.calls == 5
    err = (out - ref).abs().max().item()
    assert 1e-6 < err < 0.1  # bf16 really ran (not bit-identical), and stays close
    assert mixed.last_features is not None and mixed.identity() == model.identity()


def test_precision_option_is_checked():
    model = load_denoiser(SHIPPED_TEACHER)
    assert with_precision(model, "fp32") is model
    with pytest.raises(ValueError, match="precision='int8'; accepted: fp32, bf16, fp16"):
        with_precision(model, "int8")
