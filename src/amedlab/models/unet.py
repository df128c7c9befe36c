"""A small EDM-style U-Net (Karras et al. 2022, DDPM++ blocks) for the built-in digits teacher.

The raw network ``F(x_in, c_noise)``; EDM preconditioning (:mod:`amedlab.models.precond`) turns it
into a denoiser. Blocks are named like EDM's ``SongUNet`` (``enc['8x8_block0']``, ``enc['4x4_down']``,
...) so the last encoder block at the lowest resolution, :attr:`SmallUNet.feature_block`, can be
hooked for AMED's features exactly as the paper hooks ``enc['8x8_block3']`` of the CIFAR-10 model.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 32, dividing the channel count."""
    return math.gcd(channels, 32)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level c_noise (as in EDM's NCSN++); fixed, not trained."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        x = c_noise.to(self.freqs.dtype).outer(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Pre-activation residual block with a noise-conditioned scale/shift, optional down/up-sampling
    and optional self-attention (EDM's ``UNetBlock``, simplified)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, down: bool = False,
                 up: bool = False, attention: bool = False, dropout: float = 0.0, num_heads: int = 1) -> None:
        super().__init__()
        self.down, self.up = down, up
        self.norm0 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels or down or up else None
        )
        self.num_heads = num_heads
        if attention:
            self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = nn.Conv2d(out_channels, out_channels, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.qkv = None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        x = self.conv1(self.dropout(x))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (x + skip) * math.sqrt(0.5)
        if self.qkv is not None:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = (x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))) * math.sqrt(0.5)
        return x


class SmallUNet(nn.Module):
    """U-Net ``F(x_in, c_noise) -> F_x`` with ``len(channel_mult)`` resolutions.

    ``enc`` and ``dec`` are ordered dicts of blocks named ``'{res}x{res}_{kind}{i}'``; the encoder's
    last block at the lowest resolution is :attr:`feature_block` (a dotted module name).
    """

    def __init__(self, img_resolution: int = 8, in_channels: int = 1, out_channels: int = 1,
                 model_channels: int = 64, channel_mult: tuple[int, ...] = (1, 2), num_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (4,), dropout: float = 0.0,
                 embedding_scale: float = 16.0) -> None:
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**(len(channel_mult)-1)="
                f"{2 ** (len(channel_mult) - 1)}"
            )
        self._config = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                            model_channels=model_channels, channel_mult=list(channel_mult),
                            num_blocks=num_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
                            embedding_scale=embedding_scale)
        emb_channels = 4 * model_channels
        self.map_noise = FourierEmbedding(model_channels, scale=embedding_scale)
        self.map_layer0 = nn.Linear(model_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        kw = dict(emb_channels=emb_channels, dropout=dropout)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(in_channels, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **kw)
        low = img_resolution >> (len(channel_mult) - 1)
        self.feature_block = f"enc.{low}x{low}_block{num_blocks - 1}"
        skips = [_out_channels(block) for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **kw)
        self.out_norm = nn.GroupNorm(_groups(cout), cout)
        self.out_conv = nn.Conv2d(cout, out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.map_layer0(self.map_noise(c_noise).to(x.dtype)))
        emb = F.silu(self.map_layer1(emb))
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def _out_channels(block: nn.Module) -> int:
    return block.out_channels if isinstance(block, nn.Conv2d) else block.conv0.out_channels
