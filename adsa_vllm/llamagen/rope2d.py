"""LlamaGen's 2D rotary embedding as a (positions -> cos, sin) table for the vLLM model.

Head dim D is split in halves: the first D/4 rotary pairs turn with the image row, the last D/4 with the column
(gpt-fast interleaved pairs (x[2i], x[2i+1]), base `rope_base`). Condition positions [0, cls_token_num) get
cos = sin = 0, as in the official model: their q and k become zero, so every query gives them logit 0.
"""

from __future__ import annotations

import torch


def rope_2d_table(grid_size: int, head_dim: int, base: float, cls_token_num: int) -> torch.Tensor:
    """[cls_token_num + grid², head_dim // 2, 2] float32 (cos, sin) per position and rotary pair."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # [D/4]
    idx = torch.arange(grid_size * grid_size)
    rows, cols = (idx // grid_size).float(), (idx % grid_size).float()
    angles = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)  # [grid², D/2]
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rope_2d(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H*D] (heads flattened); cos_sin: [T, D/2, 2] for the tokens' positions. Computed in float32."""
    t = x.shape[0]
    half = cos_sin.shape[1]
    xs = x.float().reshape(t, -1, half, 2)
    cos, sin = cos_sin[:, None, :, 0], cos_sin[:, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.reshape(t, -1).to(x.dtype)
