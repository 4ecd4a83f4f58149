"""The reference's ADSA decisions for many rows at once: `BatchedDecoder` and the teacher-forced
`score_tokens_batched`, for measurements over thousands of images (benchmarks/quality.py).

`TrackerDecoder` drives one `SequenceTracker` per row in Python at every step: exact, but 10k rows x 784 steps is
hours even on a GPU. All rows of a batch sit at the same position, so one `LockstepTrackers` makes every row's
decisions on [R, ...] tensors (the same layout, schedule, scorers on [R, C] candidate batches and top-k rule;
tests/test_lockstep.py). Between two selections nothing changes, so teacher forcing feeds all positions up to
the next scoring step in one chunked forward: keys/values are those of the one-token-per-step path, only the
matmul shapes differ. tests/test_fashion.py checks logprobs, evicted sets and sampled tokens against the trackers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adsa_vllm.config import ADSAConfig
from adsa_vllm.policy import LockstepTrackers, resolve_scorers
from adsa_vllm.reference.decoder import ChunkedDecoder
from adsa_vllm.reference.model import LlamaGenReference
from adsa_vllm.reference.token_decoder import TokenDecoder


class BatchedDecoder(ChunkedDecoder):
    """Block mode for all rows at once; `selection` holds the deciders' ADSA state (None: full attention)."""

    def __init__(self, model: LlamaGenReference, cond: torch.Tensor, length: int, adsa: ADSAConfig | None,
                 block_size: int, pairs: int = 0):
        super().__init__(model, cond, length, adsa, block_size, pairs)
        lay = self.layout
        self.selection = None if lay is None else LockstepTrackers(
            lay, resolve_scorers(lay)[0], self.deciders, first=self.first, device=self.slots.device)
        self.schedule = {} if lay is None else self.selection.schedule
        self._request: tuple[int, torch.Tensor] | None = None             # this forward's (pos, token slots)

    def forward(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """h [R, S, dim] at positions [start, start + S) -> float32 logits [R, S, V]."""
        end, pos = self._chunk(h, start)
        self._request = None
        n = end + 1
        slots = self.slots[:n]
        mask = (slots[None, :] <= pos[:, None])[None, None]                                  # [1, 1, S, n]
        if self.selection is not None:
            self.selection.begin_step(start)
            cands = self.selection.scoring_request(end)
            if cands is not None:
                tok = (cands[:, :, None] * self.bs + torch.arange(self.bs, device=h.device)).flatten(1)
                self._request = (end, tok)                                                   # [deciders, C*bs]
            evicted = self.selection.evicted
            if self.pairs:
                evicted = evicted.repeat(2, 1)                            # both halves keep the same blocks
            mask = mask & (~evicted)[:, slots // self.bs][:, None, None, :]                 # [R, 1, S, n]
            if self.layout.token_edges:   # prefix and window at token granularity (policy/layout.py)
                mask = mask & self.layout.attended(pos[:, None], slots[None, :])
        else:
            mask = mask.expand(h.shape[0], 1, len(pos), n)
        return self._attend(h, pos, mask)

    def _score(self, layer: int, q: torch.Tensor) -> None:
        """Layer hook: q [R, H, S, D] post-RoPE; this layer's K/V of the chunk are already cached. The scoring
        query is the chunk's last position (TrackerDecoder's single-token forward at that position)."""
        if layer and not self.selection.scorer.reads_kv:
            return  # a position-only score is added once per selection, not once per layer (as in vLLM)
        pos, tok = self._request
        k_cache, v_cache = self.caches[layer]
        R, hkv, _, d = k_cache.shape
        P, C = tok.shape[0], tok.shape[1] // self.bs                      # P deciders
        if self.pairs:
            tok = tok.repeat(2, 1)

        def blocks(cache):  # [R, Hkv, C*bs, D] -> [deciders, C, bs, heads, D], the paged layout scorers expect
            t = cache.gather(2, tok[:, None, :, None].expand(R, hkv, tok.shape[1], d))
            t = t.permute(0, 2, 1, 3).reshape(R, C, self.bs, hkv, d)
            return torch.cat([t[:P], t[P:]], dim=3) if self.pairs else t   # a pair: [cond heads, uncond heads]

        query = q[:, :, -1]
        if self.pairs:
            query = torch.cat([query[:P], query[P:]], dim=1)
        scale = self.model.config.head_dim ** -0.5
        self.selection.score_layer(blocks(k_cache), blocks(v_cache), query, pos, scale=scale, layer=layer)

    def evicted_sets(self) -> list[set[int]]:
        """Each decider's evicted blocks, as `[t.evicted for t in TrackerDecoder.trackers]`."""
        return [set() for _ in range(self.deciders)] if self.selection is None else self.selection.evicted_sets()


def _chunks(first: int, last: int, cuts, max_len: int) -> list[tuple[int, int]]:
    """Split positions [first, last] into chunks ending at every cut and no longer than max_len."""
    bounds, s = [], first
    for c in sorted(p for p in cuts if first <= p < last) + [last]:
        while c - s + 1 > max_len:
            bounds.append((s, s + max_len - 1))
            s += max_len
        bounds.append((s, c))
        s = c + 1
    return bounds


@torch.no_grad()
def score_tokens_batched(model: LlamaGenReference, class_ids, tokens: torch.Tensor, *,
                         adsa: ADSAConfig | None = None, block_size: int = 16, max_chunk: int = 128,
                         return_state: bool = False):
    """Batched twin of `score_tokens` (no CFG): logprobs [B, n, V] float32 of tokens [B, n] given their prefix;
    with return_state=True (logprobs, the BatchedDecoder, or the TokenDecoder for granularity "token")."""
    dev = model.tok_embeddings.weight.device
    tokens = tokens.to(dev, torch.int64)
    B, n = tokens.shape
    T = model.config.cls_token_num
    cond = model.embed_cond(torch.as_tensor(class_ids, dtype=torch.int64, device=dev))
    if adsa is not None and adsa.granularity == "token":
        dec = TokenDecoder(model, cond, T + n, adsa, block_size)
    else:
        dec = BatchedDecoder(model, cond, T + n, adsa, block_size)
    h_all = torch.cat([dec.cond, model.tok_embeddings(tokens[:, : n - 1])], dim=1)  # [B, T+n-1, dim]
    out = []
    for s, e in _chunks(0, T + n - 2, dec.schedule, max_chunk):
        logits = dec.forward(h_all[:, s:e + 1], s)
        keep_from = max(s, T - 1)                       # position p predicts image token p - (T - 1)
        if keep_from <= e:
            out.append(F.log_softmax(logits[:, keep_from - s:], dim=-1))
    lp = torch.cat(out, dim=1)
    return (lp, dec) if return_state else lp


__all__ = ["BatchedDecoder", "score_tokens_batched"]
