"""Adapters for users' checkpoints: diffusers (UNet2DModel + DDPM scheduler) and NVlabs EDM pickles.

Both are exercised with stand-ins built here (a tiny randomly initialised UNet2DModel saved with
``save_pretrained``; a pickle of the same structure as NVlabs' files). No real checkpoint is loaded.
"""
import pickle
import sys
import textwrap

import diffusers
import pytest
import torch

from amedlab.models import build_model, counting
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver



def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=None,
    )


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddpm")
    _tiny_unet().save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    return root


def test_diffusers_loads_samples_counts_and_captures(diffusers_dir):
    den = build_model({"name": "diffusers", "path": str(diffusers_dir), "scheduler_path": None,
                       "feature_block": "mid_block"})
    assert den.sample_shape == (1, 8, 8) and den.feature_dim == 16  # mid_block runs at 4x4
    # the VP table: linear betas 1e-4..0.02 over 1000 steps -> sigma from 0.01 to ~157
    assert den.sigma_min == pytest.approx(0.0100, rel=1e-2) and 150 < den.sigma_max < 160
    counted = counting(den)
    sigmas = make_sigmas("polynomial", 4, sigma_min=0.02, sigma_max=80.0)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80.0
    with torch.no_grad():
        out = make_solver("euler").sample(counted, x, sigmas)
    assert counted.calls == 3 and out.shape == x.shape and torch.isfinite(out).all()
    assert counted.last_features.shape == (3, 16)
    # D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)) exactly
    unet = den.unet
    xs, sig = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        eps = unet(xs / (sig**2 + 1).sqrt().reshape(-1, 1, 1, 1), den.sigma_to_t(sig)).sample
        torch.testing.assert_close(den(xs, sig), xs - sig.reshape(-1, 1, 1, 1) * eps)
        # features = channel-mean of mid_block's output in that same call (no extra forward)
        captured = []
        handle = unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o))
        den(xs, sig)
        handle.remove()
    assert len(captured) == 1
    torch.testing.assert_close(den.last_features, captured[0].mean(1).flatten(1))


def test_diffusers_sigma_timestep_conversion(diffusers_dir):
    den = build_model({"name": "diffusers", "path": str(diffusers_dir / "unet")})  # scheduler found in ../scheduler
    table = den.log_sigmas.exp()
    idx = torch.tensor([0, 1, 10, 500, 999])
    torch.testing.assert_close(den.sigma_to_t(table[idx]), idx.float(), atol=1e-3, rtol=0)
    t = torch.tensor([0.0, 0.25, 17.5, 998.9])
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    # continuous: halfway in log sigma between two entries is t = k + 0.5
    mid = (den.log_sigmas[41] + den.log_sigmas[42]).div(2).exp()
    assert den.sigma_to_t(mid.reshape(1)).item() == pytest.approx(41.5, abs=1e-3)
    # outside the table the timestep clamps to the ends
    assert den.sigma_to_t(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]


def test_diffusers_config_errors(tmp_path, diffusers_dir):
    with pytest.raises(ValueError, match="model.path=null"):
        build_model({"name": "diffusers", "path": None})
    with pytest.raises(FileNotFoundError, match="model.path="):
        build_model({"name": "diffusers", "path": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_model({"name": "diffusers", "path": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="model.scheduler_path="):
        build_model({"name": "diffusers", "path": str(diffusers_dir), "scheduler_path": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="model.feature_block='down_blocks.0'"):
        build_model({"name": "diffusers", "path": str(diffusers_dir), "feature_block": "down_blocks.0"})
    with pytest.raises(ValueError, match="accepted keys"):
        build_model({"name": "diffusers", "path": str(diffusers_dir), "sheduler": "x"})


# --- NVlabs EDM pickles: a stand-in of the same structure -------------------------------------

STANDIN_NETWORKS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, down=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.down = down

    def forward(self, x):
        x = self.conv(x)
        return torch.nn.functional.avg_pool2d(x, 2) if self.down else x


class SongUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"16x16_conv": nn.Conv2d(3, 8, 3, padding=1), "16x16_block0": Block(8, 8),
                                  "8x8_down": Block(8, 8, down=True), "8x8_block0": Block(8, 8),
                                  "8x8_block1": Block(8, 8)})
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x, noise_labels, class_labels=None):
        for block in self.enc.values():
            x = block(x)
        return self.out(torch.nn.functional.interpolate(x, scale_factor=2)) + noise_labels.reshape(-1, 1, 1, 1)


class EDMPrecond(nn.Module):
    """Same interface as NVlabs' training.networks.EDMPrecond."""

    def __init__(self, label_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.sigma_data = 16, 3, label_dim, 0.5
        self.model = SongUNet()

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **kw):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        f = self.model(c_in * x, sigma.log().flatten() / 4, class_labels)
        return c_skip * x + c_out * f
'''


@pytest.fixture()
def edm_standin(tmp_path):
    """A fake NVlabs source tree + a pickle {'ema': EDMPrecond} that needs it to load."""
    src = tmp_path / "edm_src"
    (src / "torch_utils").mkdir(parents=True)
    (src / "torch_utils" / "__init__.py").write_text("")
    (src / "torch_utils" / "persistence.py").write_text("# stand-in\n")
    (src / "dnnlib").mkdir()
    (src / "dnnlib" / "__init__.py").write_text("")
    (src / "training").mkdir()
    (src / "training" / "__init__.py").write_text("")
    (src / "training" / "networks.py").write_text(textwrap.dedent(STANDIN_NETWORKS))
    sys.path.insert(0, str(src))
    try:
        import training.networks as networks

        torch.manual_seed(0)
        pkl = tmp_path / "edm-standin-16x16-uncond.pkl"
        with open(pkl, "wb") as f:
            pickle.dump({"ema": networks.EDMPrecond(), "augment_pipe": None}, f)
        cond = tmp_path / "edm-standin-cond.pkl"
        with open(cond, "wb") as f:
            pickle.dump({"ema": networks.EDMPrecond(label_dim=10)}, f)
    finally:
        sys.path.remove(str(src))
        for name in [m for m in sys.modules if m.split(".")[0] in ("training", "torch_utils", "dnnlib")]:
            del sys.modules[name]
    yield src, pkl, cond
    while str(src.resolve()) in sys.path:
        sys.path.remove(str(src.resolve()))
    for name in [m for m in sys.modules if m.split(".")[0] in ("training", "torch_utils", "dnnlib")]:
        del sys.modules[name]


def test_edm_pkl_loads_samples_counts_and_captures(edm_standin):
    src, pkl, _ = edm_standin
    den = build_model({"name": "edm_pkl", "path": str(pkl), "trust_pickle": True, "source_dir": str(src)})
    assert den.sample_shape == (3, 16, 16)
    assert den.feature_block == "8x8_block1" and den.feature_dim == 64  # last block at the lowest resolution
    counted = counting(den)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 80
    with torch.no_grad():
        out = make_solver("heun").sample(counted, x, make_sigmas("polynomial", 3))
    assert counted.calls == 4 and torch.isfinite(out).all()  # 2 steps x 2 NFE
    assert counted.last_features.shape == (2, 64)
    captured = []
    handle = den.net.model.enc["8x8_block1"].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        d = den(x, torch.tensor([3.0, 0.1]))
    handle.remove()
    assert len(captured) == 1 and d.shape == x.shape
    torch.testing.assert_close(den.last_features, captured[0].mean(1).flatten(1))


def test_edm_pkl_refuses_without_trust_and_source(edm_standin, tmp_path):
    src, pkl, cond = edm_standin
    with pytest.raises(PermissionError, match="model.trust_pickle=False"):
        build_model({"name": "edm_pkl", "path": str(pkl), "trust_pickle": False, "source_dir": str(src)})
    with pytest.raises(FileNotFoundError, match="github.com/NVlabs/edm"):
        build_model({"name": "edm_pkl", "path": str(pkl), "trust_pickle": True, "source_dir": str(tmp_path)})
    with pytest.raises(ModuleNotFoundError, match="model.source_dir=null"):
        build_model({"name": "edm_pkl", "path": str(pkl), "trust_pickle": True, "source_dir": None})
    with pytest.raises(FileNotFoundError, match="model.path="):
        build_model({"name": "edm_pkl", "path": str(tmp_path / "none.pkl"), "trust_pickle": True})
    with pytest.raises(ValueError, match="model.feature_block='4x4_block0'"):
        build_model({"name": "edm_pkl", "path": str(pkl), "trust_pickle": True, "source_dir": str(src),
                     "feature_block": "4x4_block0"})
    with pytest.raises(ValueError, match="model.class_label=None"):
        build_model({"name": "edm_pkl", "path": str(cond), "trust_pickle": True, "source_dir": str(src)})
    den = build_model({"name": "edm_pkl", "path": str(cond), "trust_pickle": True, "source_dir": str(src),
                       "class_label": 3})
    assert den.label_dim == 10 and den(torch.zeros(1, 3, 16, 16), 1.0).shape == (1, 3, 16, 16)
