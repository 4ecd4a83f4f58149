"""Masked dense attention: the one definition the reference decoders (reference/model.py) and the worker's
token-edge rows (worker/token_edges.py) share, so the rows the vLLM path recomputes are computed exactly as the
reference computes them. Pure torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys `mask` lets through.

    q [B, Hq, S, D]; k, v [B, Hkv, N, D], Hq a multiple of Hkv (GQA: KV head h serves query heads
    h * Hq/Hkv ... (h + 1) * Hq/Hkv - 1); mask [B, 1 or Hq, S, N] bool (True = attend), None = causal (S == N);
    scale None = D ** -0.5. -> [B, Hq, S, D]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:   # MHA needs no copy (repeat_interleave always copies)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


__all__ = ["masked_attention"]
