"""Masked dense attention: the one definition the reference decoders (reference/model.py) and the worker's
token-edge rows (worker/token_edges.py) share, so the rows the vLLM path recomputes are computed exactly as the
reference computes them; and the query-key logits the query-dependent scorers share. Pure torch."""

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


def query_key_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[R, Hq, N] float32 scaled logits of each query head against the candidates: query [R, Hq, D], keys
    [R, N, Hkv, D] (GQA: KV head g serves query heads g * Hq/Hkv ..., never copied per query head).

    Half-precision query and keys on CUDA (the cache dtype the scoring reads, worker/query_scoring.py) multiply in
    that dtype with float32 accumulation and output (`bmm(out_dtype=float32)`): the product of two bf16 / fp16
    values is exact in float32, so the logits are those of upcasting first (up to summation order), without the
    float32 copy of every key that upcasting costs. Elsewhere (CPU, float32, an fp8 cache) they are computed in
    float32."""
    r, n, hkv, d = keys.shape
    rep = query.shape[1] // hkv
    if keys.is_cuda and query.dtype == keys.dtype and keys.dtype in (torch.bfloat16, torch.float16):
        k = keys.permute(0, 2, 1, 3).reshape(r * hkv, n, d)                    # one copy, in the cache dtype
        logits = torch.bmm(query.reshape(r * hkv, rep, d), k.transpose(1, 2), out_dtype=torch.float32)
    else:
        q = query.float().reshape(r, hkv, rep, d)                               # [R, Hkv, rep, D]: GQA groups
        logits = torch.einsum("rgkd,rngd->rgkn", q, keys.float())
    return logits.reshape(r, hkv * rep, n) * scale


__all__ = ["masked_attention", "query_key_logits"]
