"""The reference decoder for `ADSAConfig.granularity="token"`: ADSA emulated with a mask per layer and KV head.

Semantics in adsa_vllm/policy/token_select.py. Every row is its own decider, or with pairs = B rows r and r + B
(the halves of a CFG pair) decide together. Like `BatchedDecoder`, `forward(h, start)` runs positions
[start, start + S) of all rows in one forward, a chunk ending at every scoring position; `_single` (what `prefill` / `step`, hence `score_tokens` / `generate`,
use) is the one-token-per-step forward of the vLLM path, the exact oracle. The masks are per (row, layer, head):
LlamaGen's attention is MHA, so KV head = attention head; under GQA a KV head's mask covers its query heads.
"""

from __future__ import annotations

import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.policy import resolve_scorers
from adsa_vllm.policy.token_scores import TokenScorer
from adsa_vllm.policy.token_select import TokenTrackers
from adsa_vllm.reference.decoder import ChunkedDecoder
from adsa_vllm.reference.model import LlamaGenReference


class TokenDecoder(ChunkedDecoder):
    """`selection` holds every row's token-mode state (None: full attention); `scorer` overrides the policy's
    token scorer (tests)."""

    def __init__(self, model: LlamaGenReference, cond: torch.Tensor, length: int, adsa: ADSAConfig | None,
                 block_size: int, scorer: TokenScorer | None = None, pairs: int = 0):
        super().__init__(model, cond, length, adsa, block_size, pairs=pairs)
        lay, config = self.layout, model.config
        self.selection = None if lay is None else TokenTrackers(
            lay, scorer or resolve_scorers(lay)[1], self.rows, config.n_layer, config.kv_heads, first=self.first,
            pairs=pairs, device=self.slots.device)
        self.schedule = {} if lay is None else self.selection.schedule
        self._rep = config.n_head // config.kv_heads
        self._request: tuple[int, int, int] | None = None                # this forward's (pos, lo, hi)

    def forward(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """h [R, S, dim] at positions [start, start + S) -> float32 logits [R, S, V]."""
        end, pos = self._chunk(h, start)
        self._request = None
        n = end + 1                                                       # attend over the written slots only
        causal = (self.slots[:n][None, :] <= pos[:, None])[None, None]   # [1, 1, S, n]
        if self.selection is None:
            mask = causal.expand(h.shape[0], 1, len(pos), n)
        else:
            self.selection.begin_step(start)
            req = self.selection.scoring_request(end)
            if req is not None:
                self._request = (end, *req)
            kept = ~self.selection.evicted[..., :n]                       # [R, layers, Hkv, n]
            if self._rep > 1:
                kept = kept.repeat_interleave(self._rep, dim=2)

            if self.layout.token_edges:   # prefix and window at token granularity (policy/layout.py)
                causal = causal & self.layout.attended(pos[:, None], self.slots[:n][None, :])

            def mask(layer):                                              # [R, H, S, n], built layer by layer
                return causal & kept[:, layer, :, None, :]
        return self._attend(h, pos, mask)

    def _score(self, layer: int, q: torch.Tensor) -> None:
        """Layer hook: q [R, H, S, D] post-RoPE; this layer's K/V of the chunk are already cached. The scoring
        query is the chunk's last position."""
        pos, lo, hi = self._request
        k_cache, v_cache = self.caches[layer]                             # [R, Hkv, L, D]
        scale = self.model.config.head_dim ** -0.5
        self.selection.score_layer(layer, k_cache[:, :, lo:hi].transpose(1, 2), v_cache[:, :, lo:hi].transpose(1, 2),
                                   q[:, :, -1], pos, scale=scale)

    def evicted_tokens(self) -> torch.Tensor:
        """[R, layers, Hkv, positions] bool (all False without eviction)."""
        if self.selection is None:
            return torch.zeros(self.rows, self.model.config.n_layer, self.model.config.kv_heads, self.L,
                               dtype=torch.bool)
        return self.selection.evicted


__all__ = ["TokenDecoder"]
