"""The small U-Net: size, shapes, the named lowest-resolution block, feature capture without extra NFE."""
import torch

from amedlab.models.base import CountingDenoiser
from amedlab.models.digits import make_digits_denoiser
from amedlab.models.unet import SmallUNet

NET = dict(img_resolution=8, model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4])



def test_size_and_named_blocks():
    net = SmallUNet(**NET)
    num_params = sum(p.numel() for p in net.parameters())
    assert 0.8e6 < num_params < 1.5e6, num_params  # "about 1M parameters"
    assert net.feature_block == "enc.4x4_block1"
    assert list(net.enc) == ["8x8_conv", "8x8_block0", "8x8_block1", "4x4_down", "4x4_block0", "4x4_block1"]
    assert net.get_submodule(net.feature_block) is net.enc["4x4_block1"]
    out = net(torch.randn(5, 1, 8, 8), torch.randn(5))
    assert out.shape == (5, 1, 8, 8)
    # the output conv starts at zero (EDM init): F = 0 at initialisation
    assert out.abs().max().item() == 0.0


def test_16px_variant_has_a_4x4_feature_block():
    net = SmallUNet(**{**NET, "img_resolution": 16, "channel_mult": [1, 2, 2]})
    assert net.feature_block == "enc.4x4_block1"
    assert net(torch.randn(2, 1, 16, 16), torch.zeros(2)).shape == (2, 1, 16, 16)


def test_feature_capture_adds_no_nfe():
    torch.manual_seed(0)
    den = make_digits_denoiser(NET, sigma_data=0.75)
    for p in den.parameters():  # non-trivial weights, so the features depend on x and sigma
        torch.nn.init.normal_(p, std=0.05)
    block_runs, net_runs = [], []
    den.net.enc["4x4_block1"].register_forward_hook(lambda *a: block_runs.append(1))
    den.net.register_forward_hook(lambda *a: net_runs.append(1))
    counted = CountingDenoiser(den)
    x, sigma = torch.randn(6, 1, 8, 8), torch.linspace(0.1, 10, 6)
    out = counted(x, sigma)
    feats = counted.last_features
    assert counted.calls == 1 and len(net_runs) == 1 and len(block_runs) == 1
    assert out.shape == x.shape and feats.shape == (6, 16) and den.feature_dim == 16
    # the features are exactly the channel-mean of the 4x4 block's output in that pass
    captured = []
    handle = den.net.enc["4x4_block1"].register_forward_hook(lambda m, i, o: captured.append(o))
    den(x, sigma)
    handle.remove()
    torch.testing.assert_close(feats, captured[0].mean(1).flatten(1))
    assert feats.std(0).mean() > 0  # per-sample, not constant
