"""Plain-PyTorch LlamaGen (class- or text-conditional), numerically faithful to the official model.

Mirrors FoundationVision/LlamaGen `autoregressive/models/gpt.py` (reimplemented, not copied): fused `wqkv`,
SwiGLU feed-forward, RMSNorm computed in float32, 2D RoPE on interleaved pairs with zero rotation tables for the
condition tokens (so their queries and keys are exactly zero), no biases, no dropout (inference only).
Parameter names equal the official state-dict keys, so `state_dict()` is the official checkpoint format.

This is the ground truth the vLLM model is tested against; it must never import vLLM.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy.dense_attention import masked_attention

# Called inside every layer once its K/V are in the cache: (layer_idx, q [B, H, S, D] post-RoPE).
LayerHook = Callable[[int, torch.Tensor], None]


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1
                            ) -> torch.Tensor:
    """[cls_token_num + grid_size**2, head_dim // 2, 2] (cos, sin) tables, row-major over the image grid.

    The first head_dim // 4 rotation pairs turn with the row index, the next head_dim // 4 with the column index,
    each with frequencies base**(-4k / head_dim). Condition positions get cos = sin = 0 (official behaviour).
    """
    quarter = head_dim // 4
    inv = 1.0 / (base ** (torch.arange(0, head_dim // 2, 2)[:quarter].float() / (head_dim // 2)))
    angles = torch.outer(torch.arange(grid_size).float(), inv)                       # [G, D/4]
    rows = angles[:, None, :].expand(grid_size, grid_size, quarter)
    cols = angles[None, :, :].expand(grid_size, grid_size, quarter)
    grid = torch.cat([rows, cols], dim=-1)                                           # [G, G, D/2]
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)              # [G*G, D/2, 2]
    return torch.cat([torch.zeros(cls_token_num, head_dim // 2, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]). x: [B, S, H, D]; freqs: [S, D/2, 2]. Computed in float32."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)                                     # [B, S, H, D/2, 2]
    f = freqs.view(1, xp.shape[1], 1, xp.shape[3], 2)
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # Normalise in float32 then cast back *before* the weight multiply, like the official model.
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim, self.dim = config.head_dim, config.dim
        self.wqkv = nn.Linear(config.dim, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def project(self, x: torch.Tensor, freqs: torch.Tensor):
        """x: [B, S, dim] -> q [B, S, H, D], k, v [B, S, Hkv, D]; q and k are post-RoPE."""
        b, s, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(b, s, self.n_head, self.head_dim), freqs)
        k = apply_rotary_emb(k.view(b, s, self.n_kv_head, self.head_dim), freqs)
        return q, k, v.view(b, s, self.n_kv_head, self.head_dim)

    def forward(self, x, freqs, pos=None, cache=None, mask=None, hook=None, layer_idx=0):
        """x: [B, S, dim]; pos: [S] int64 positions; cache: (k, v) each [B, Hkv, L, D], written in place at `pos`;
        mask: [B, 1, S, L] (or [B, 1, S, S] without cache) bool, True = attend. No cache and no mask: causal."""
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x, freqs))               # [B, heads, S, D]
        if cache is not None:
            cache[0][:, :, pos] = k
            cache[1][:, :, pos] = v
            k, v = cache
            if hook is not None:
                hook(layer_idx, q)
        out = masked_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.dim))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs, **attn_kw):
        h = x + self.attention(self.attention_norm(x), freqs, **attn_kw)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """t2i condition: caption rows [.., caption_dim] projected to the model width. `uncond_embedding` is the null
    caption used for classifier-free guidance (a buffer in the official model; a parameter here so `init_random_`
    draws it; the state-dict key is the same)."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        self.uncond_embedding = nn.Parameter(torch.zeros(token_num, caption_dim))


class LlamaGenReference(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.codebook_size, config.dim)
        self.cls_embedding = (CaptionEmbedder(config.caption_dim, config.dim, config.cls_token_num) if config.is_t2i
                              else LabelEmbedder(config.num_classes, config.dim))
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.codebook_size, bias=False)
        # Not a registered buffer, so the state dict stays exactly the official parameter set.
        self.freqs_cis = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base,
                                                 config.cls_token_num)

    @torch.no_grad()
    def init_random_(self, seed: int = 0, std: float = 0.02) -> "LlamaGenReference":
        """Deterministic N(0, std) init of every matrix (output included: the official zero init would make all
        logits equal); norm weights stay 1. Drawn in float32 in sorted-name order, so the values do not depend
        on the module's dtype or device."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in sorted(self.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """cond: [B] class ids in [0, num_classes] -> [B, cls_token_num, dim] (the class repeated, as the
        prompt holds `cls_token_num` copies of the class token)."""
        if self.config.is_t2i:
            raise ValueError("a text-to-image LlamaGen is conditioned on captions: use embed_caption(rows)")
        e = self.cls_embedding.embedding_table(cond)
        return e[:, None, :].expand(-1, self.config.cls_token_num, -1)

    def embed_caption(self, rows: torch.Tensor, null: bool = False) -> torch.Tensor:
        """t2i: rows [..., v, caption_dim], a caption's valid rows (1 <= v <= cls_token_num) -> [..., v, dim].

        null=True embeds the null caption of the same length instead: the last v rows of `uncond_embedding` (the
        rows LlamaGen's left-padded, masked null caption leaves visible); only rows.shape is read then."""
        self.config.check_prompt_embeds(tuple(rows.shape[-2:]), rows.is_floating_point())
        if null:
            v = rows.shape[-2]
            rows = self.cls_embedding.uncond_embedding[-v:].expand(*rows.shape)
        return self.cls_embedding.cap_proj(rows.to(self.dtype))

    def forward_hidden(self, h: torch.Tensor, pos: torch.Tensor, caches=None, mask=None,
                       hook: LayerHook | None = None, rope_offset: int = 0) -> torch.Tensor:
        """h: [B, S, dim] input embeddings at positions pos [S] -> float32 logits [B, S, codebook_size].

        caches: per layer (k, v) [B, Hkv, L, D] static cache (written at `pos`); mask: [B, 1 or H, S, L] bool, or a
        function of the layer index giving that layer's mask (token-granularity ADSA masks per layer and head).
        rope_offset: position p turns by RoPE row p + rope_offset (a compact caption: `LlamaGenConfig.position_offset`).
        """
        freqs = self.freqs_cis.to(h.device)[pos + rope_offset if rope_offset else pos]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, pos=pos, cache=None if caches is None else caches[i],
                      mask=mask(i) if callable(mask) else mask, hook=hook, layer_idx=i)
        return self.output(self.norm(h)).float()

    def forward_full(self, idx: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced causal forward (training / checks). idx: [B, n] image tokens (n <= grid**2 - 1 when
        targets are the next tokens), cond: [B] class ids -> logits [B, n + 1, V]: entry i predicts image token i.

        mask: optional [B, T + n, T + n] bool (True = attend) replacing the causal mask, T = cls_token_num.
        """
        return self.forward_embedded(self.embed_cond(cond), idx, mask)

    def forward_caption(self, idx: torch.Tensor, rows: torch.Tensor, null: bool = False,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """t2i twin of `forward_full` on compact captions: rows [B, v, caption_dim] (the valid rows; `null`: the
        null caption of that length) -> logits [B, n + 1, V]; mask [B, v + n, v + n] as in forward_full."""
        return self.forward_embedded(self.embed_caption(rows, null), idx, mask)

    def forward_embedded(self, cond_h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Teacher-forced forward from condition embeddings cond_h [B, T, dim] and image tokens idx [B, n]
        -> logits [B, n + 1, V], entry i predicting image token i."""
        h = torch.cat([cond_h, self.tok_embeddings(idx)], dim=1)
        pos = torch.arange(h.shape[1], device=h.device)
        logits = self.forward_hidden(h, pos, mask=None if mask is None else mask[:, None],
                                     rope_offset=self.config.position_offset(cond_h.shape[1]))
        return logits[:, cond_h.shape[1] - 1:]


__all__ = ["CaptionEmbedder", "LlamaGenReference", "precompute_freqs_cis_2d", "apply_rotary_emb", "RMSNorm",
           "LayerHook"]
