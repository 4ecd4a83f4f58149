"""Token-level scores for `granularity="token"`: every (layer, KV head) rates its own candidate tokens; higher = keep.
Pure torch, no vLLM.

The per-token counterparts of the block scorers (same names, same settings), each using only its own head:
  topk_v          the token's unit value vector · the mean unit value vector of *that head's* candidates (the
                  formula TopKV applies per block, here per token and head, not averaged); keep="diverse" negates.
  attention_mass  the head's softmax probability of the token under the current query, over that head's candidates
                  only (AttentionMass per head and token, not summed over a block nor averaged over heads); query
                  heads that share a KV head (GQA) are averaged, as AttentionMass averages heads.
  random          an integer hash of (seed, layer, KV head, token position, query position): reproducible, and
                  independent between heads and layers.
  streaming       the token position: the newest aged tokens win, which keeps exactly what block mode keeps.
A score is computed for every token of the aged range [lo, hi); `valid` [R, Hkv, N] marks each head's candidates
(the tokens it has not evicted); scores elsewhere are ignored by the selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adsa_vllm.policy.base import from_settings
from adsa_vllm.policy.dense_attention import query_key_logits

_MASK = (1 << 31) - 1


@dataclass(frozen=True)
class TokenInputs:
    keys: torch.Tensor | None   # [R, N, Hkv, D] the aged tokens [lo, hi) of one layer (post-RoPE); the vLLM path
    values: torch.Tensor | None # [R, N, Hkv, D]   reads only what the scorer `reads` (None otherwise)
    valid: torch.Tensor         # [R, Hkv, N] bool, each head's candidates
    positions: torch.Tensor     # [N] or [R, Hkv, N] int64 each candidate's token position (the reference passes
                                # lo .. hi-1; the vLLM path per head, as its top-k slots hold each head's own tokens)
    query_pos: int | torch.Tensor   # position of the query whose forward scores (or [R] int64, one per row)
    query: torch.Tensor | None  # [R, H, D] decode queries (post-RoPE)
    scale: float
    layer: int | torch.Tensor   # the layer (or [R] int64, one per row: the vLLM path scores all layers at once)
    head_offset: int = 0        # the model's index of KV head 0 here (tensor parallelism gives each rank a slice)


class TokenScorer:
    name: ClassVar[str]
    needs_query: ClassVar[bool] = False   # scored with the decode query (saved by the forward)
    reads: ClassVar[tuple[str, ...]] = ()  # of the candidates' "keys" / "values", what score() uses
    registry: ClassVar[dict[str, type["TokenScorer"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "name", None):
            TokenScorer.registry[cls.name] = cls

    def score(self, x: TokenInputs) -> torch.Tensor:
        """[R, Hkv, N] float32."""
        raise NotImplementedError


@dataclass(frozen=True)
class TokenTopKV(TokenScorer):
    name = "topk_v"
    reads = ("values",)
    keep: str = "diverse"

    def score(self, x: TokenInputs) -> torch.Tensor:
        v = torch.nn.functional.normalize(x.values.float(), dim=-1)             # [R, N, H, D]
        w = x.valid.to(v.dtype)                                                  # [R, H, N]
        mean = torch.einsum("rnhd,rhn->rhd", v, w) / w.sum(-1).clamp(min=1)[..., None]
        sim = torch.einsum("rnhd,rhd->rhn", v, mean)
        return -sim if self.keep == "diverse" else sim


@dataclass(frozen=True)
class TokenAttentionMass(TokenScorer):
    name = "attention_mass"
    needs_query = True
    reads = ("keys",)

    def score(self, x: TokenInputs) -> torch.Tensor:
        r, n, hkv, _ = x.keys.shape
        return query_probs(x).reshape(r, hkv, -1, n).mean(2)


def query_probs(x: TokenInputs) -> torch.Tensor:
    """[R, Hq, N] float32: each query head's softmax probability of each candidate token under the current query
    (over that head's own candidates: its KV head's, repeated for GQA); a head with no candidate: 0."""
    logits = query_key_logits(x.query, x.keys, x.scale)                          # [R, Hq, N]
    valid = x.valid.repeat_interleave(logits.shape[1] // x.keys.shape[2], dim=1)  # [R, Hq, N]
    return logits.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)


@dataclass(frozen=True)
class TokenRandom(TokenScorer):
    name = "random"
    seed: int = 0

    def score(self, x: TokenInputs) -> torch.Tensor:
        r, hkv, n = x.valid.shape
        head = torch.arange(hkv, device=x.valid.device, dtype=torch.int64) + x.head_offset
        qpos, layer = (torch.as_tensor(v, dtype=torch.int64, device=x.valid.device) for v in (x.query_pos, x.layer))
        qpos, layer = (v.view(-1, 1, 1) if v.dim() else v for v in (qpos, layer))   # per row: [R, 1, 1]
        h = (x.positions.to(torch.int64) * 2654435761 + (qpos * 40503 + self.seed * 97 + 12345)
             + (layer * 1009 + head[:, None]) * 69069)                            # [Hkv, N] or [R, Hkv, N]
        for _ in range(3):  # the xorshift-multiply rounds of RandomBlocks, in 31 bits
            h = (h ^ (h >> 13)) & _MASK
            h = (h * 1103515245 + 12345) & _MASK
        return (h.to(torch.float32) / _MASK).expand(r, hkv, n)


@dataclass(frozen=True)
class TokenStreaming(TokenScorer):
    name = "streaming"

    def score(self, x: TokenInputs) -> torch.Tensor:
        r, hkv, n = x.valid.shape
        return x.positions.to(torch.float32).expand(r, hkv, n)


def make_token_scorer(policy: str, **settings) -> TokenScorer:
    """The token scorer of `policy`, built from the settings it has fields for (as `make_scorer` does for blocks)."""
    cls = TokenScorer.registry.get(policy)
    if cls is None:
        raise ValueError(f"policy {policy!r} has no token-level scorer; choose one of {sorted(TokenScorer.registry)}")
    return from_settings(cls, settings)
