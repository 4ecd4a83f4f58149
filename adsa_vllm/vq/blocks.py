"""Building blocks of LlamaGen's VQ image decoder (FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py,
itself from taming-transformers). Attribute names are the official ones, so the official state dict loads as-is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """The official `Normalize(..., 'group')`: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv3x3 twice plus a skip; a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 convs as projections), plus a skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW, C]; SDPA's default scale is C**-0.5, the official one.
        q, k, v = (p(n).reshape(b, 1, c, h * w).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (the official `resamp_with_conv=True`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    """One resolution of the decoder: `res` (num_res_blocks + 1 ResnetBlocks), `attn` (one AttnBlock after each
    ResnetBlock, only at the lowest resolution; empty elsewhere), then `upsample` except at the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, with_upsample: bool,
                 dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout)
                                 for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if with_attn else 0))
        self.upsample = Upsample(out_channels) if with_upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.upsample is None else self.upsample(h)


class Decoder(nn.Module):
    """z [B, z_channels, g, g] -> image [B, out_channels, g * 2**(len(ch_mult)-1), ...] in about [-1, 1].

    Channels run ch*ch_mult[-1] (lowest resolution) down to ch*ch_mult[0]; `conv_blocks[0]` is the lowest level."""

    def __init__(self, z_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float,
                 out_channels: int = 3):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        self.conv_in = nn.Conv2d(z_channels, widths[0], kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(widths[0], widths[0], dropout), AttnBlock(widths[0]),
                                  ResnetBlock(widths[0], widths[0], dropout)])
        last = len(widths) - 1
        self.conv_blocks = nn.ModuleList(
            UpLevel(widths[max(i - 1, 0)], w, num_res_blocks + 1, with_attn=i == 0, with_upsample=i != last,
                    dropout=dropout)
            for i, w in enumerate(widths))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))
