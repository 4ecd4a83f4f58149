"""The reference's decoders: a static KV cache of R rows, ADSA emulated exactly by attention masks.

`Decoder` holds what every decoder shares: the cache, the condition tokens, the eviction layout, `prefill` and
`step`. `TrackerDecoder` decides evictions with one `SequenceTracker` per row (the ground truth, as the vLLM path
does: begin_step -> kept_blocks (the mask) -> scoring_request at every single-token forward, the requested
candidates scored in every layer, in layer order, right after that layer's K/V are cached); `BatchedDecoder`
(batched.py) makes the same decisions for all rows at once.
"""

from __future__ import annotations

import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import BlockLayout, SequenceTracker, resolve_scorers
from adsa_vllm.reference.model import LlamaGenReference


def evicting_layout(adsa: ADSAConfig | None, config: LlamaGenConfig, block_size: int,
                    cond_len: int | None = None) -> BlockLayout | None:
    """The layout of `adsa` if it ever evicts, else None (full attention; budget None means "never evict", and
    then no layout is built at all, so no layout setting can be rejected for a run that evicts nothing).
    cond_len: the condition's length in the sequence (default cls_token_num; a compact t2i caption: its rows)."""
    if adsa is None or adsa.budget is None:
        return None
    cls = config.cls_token_num if cond_len is None else cond_len
    layout = adsa.layout(block_size=block_size, cls_token_num=cls, grid_size=config.grid_size)
    return layout if layout.evicts else None


class Decoder:
    """Static cache of R rows; `prefill()` and `step()` return float32 logits [R, V]. A subclass implements
    `_single(h, pos)`, the single-position forward in which ADSA is consulted, and sets `trackers` if it has
    per-row ones."""

    trackers: list[SequenceTracker] | None = None

    def __init__(self, model: LlamaGenReference, cond: torch.Tensor, length: int, adsa: ADSAConfig | None,
                 block_size: int, pairs: int = 0):
        """cond: [R, T, dim] condition embeddings (`model.embed_cond(class ids)`, or `model.embed_caption(rows)`:
        a compact caption of T rows, whose RoPE rows start at `config.position_offset(T)` and whose ADSA layout
        has cls_token_num = T); pairs > 0: rows r and r + pairs are the halves of one CFG pair and make one
        selection together, from both halves' heads (conditional heads first), as the vLLM path does."""
        config = model.config
        self.model, self.bs, self.T, self.pairs = model, block_size, cond.shape[1], pairs
        dev = model.tok_embeddings.weight.device
        self.cond, self.rows = cond.to(dev), cond.shape[0]
        self.rope_offset = model.config.position_offset(self.T)
        self.L = length                                                   # cache slots: positions [0, L)
        shape = (self.rows, config.kv_heads, length, config.head_dim)
        self.caches = [(torch.zeros(shape, dtype=model.dtype, device=dev),
                        torch.zeros(shape, dtype=model.dtype, device=dev)) for _ in range(config.n_layer)]
        self.slots = torch.arange(length, device=dev)
        self.layout = evicting_layout(adsa, config, block_size, self.T)
        self.deciders = pairs or self.rows                               # rows that own a selection
        # ADSA is consulted from the first single-token forward on: position 0 when the condition is one token,
        # else T (a multi-token prefill is plain causal, as in the vLLM path).
        self.first = 0 if self.T == 1 else self.T

    def prefill(self) -> torch.Tensor:
        h = self.cond                                                     # [R, T, dim]
        if self.T == 1:
            return self._single(h, 0)
        pos = torch.arange(self.T, device=h.device)
        mask = (self.slots[None, :] <= pos[:, None])[None, None]          # [1, 1, T, L]
        return self.model.forward_hidden(h, pos, self.caches, mask, rope_offset=self.rope_offset)[:, -1]

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens: [R] ids fed at position `pos` -> logits [R, V] predicting position pos + 1."""
        return self._single(self.model.tok_embeddings(tokens)[:, None], pos)

    def _single(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        raise NotImplementedError


class TrackerDecoder(Decoder):
    """One `SequenceTracker` per decider, driven in Python at every step: exact, and slow for many rows."""

    def __init__(self, model: LlamaGenReference, cond: torch.Tensor, length: int, adsa: ADSAConfig | None,
                 block_size: int, pairs: int = 0):
        super().__init__(model, cond, length, adsa, block_size, pairs)
        lay = self.layout
        if lay is not None:
            self.trackers = [SequenceTracker(lay, resolve_scorers(lay)[0]) for _ in range(self.deciders)]
        self._requests: list[tuple[int, SequenceTracker, torch.Tensor]] = []
        self._pos = 0

    def _single(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        causal = self.slots <= pos                                        # [L]
        self._requests, self._pos = [], pos
        if self.trackers is None:
            mask = causal[None, None, None].expand(h.shape[0], 1, 1, self.L)
        else:
            rows = []
            for r, tr in enumerate(self.trackers):
                tr.begin_step(pos)
                keep = torch.zeros(self.L // self.bs + 1, dtype=torch.bool, device=h.device)
                keep[tr.kept_blocks(pos)] = True
                rows.append(keep[self.slots // self.bs] & causal)
                cands = tr.scoring_request(pos)
                if cands is not None:
                    idx = (torch.tensor(cands, device=h.device)[:, None] * self.bs
                           + torch.arange(self.bs, device=h.device)).flatten()    # [n * bs] token positions
                    self._requests.append((r, tr, idx))
            if self.pairs:
                rows = rows + rows                                        # both halves keep the same blocks
            mask = torch.stack(rows)[:, None, None]                       # [R, 1, 1, L]
            if self.layout.token_edges:   # prefix and window at token granularity (policy/layout.py)
                mask = mask & self.layout.attended(pos, self.slots)
        pos_t = torch.tensor([pos], device=h.device)
        hook = self._score if self._requests else None
        return self.model.forward_hidden(h, pos_t, self.caches, mask, hook=hook, rope_offset=self.rope_offset)[:, -1]

    def _score(self, layer: int, q: torch.Tensor) -> None:
        """Layer hook: q [R, H, 1, D] post-RoPE; the layer's K/V for this position are already cached."""
        k_cache, v_cache = self.caches[layer]
        scale = self.model.config.head_dim ** -0.5
        hd = k_cache.shape[-1]
        for r, tr, idx in self._requests:
            if layer and not tr.scorer.reads_kv:
                continue  # a position-only score is added once per selection, not once per layer (as in vLLM)
            n = idx.numel() // self.bs
            rows = [r, r + self.pairs] if self.pairs else [r]             # a pair: [cond heads, uncond heads]

            def blocks(cache):  # [heads, n*bs, D] -> [n, bs, heads, D], the paged-cache layout the scorers expect
                return torch.cat([cache[i][:, idx] for i in rows]).transpose(0, 1).reshape(n, self.bs, -1, hd)
            tr.score_layer(blocks(k_cache), blocks(v_cache), torch.cat([q[i, :, 0] for i in rows]), self._pos,
                           scale=scale, layer=layer)


class ChunkedDecoder(Decoder):
    """A decoder whose `forward(h, start)` runs positions [start, start + S) of all rows in one forward (the
    batched and token-mode decoders); `_single` is a one-position chunk, the exact oracle of the vLLM path. A
    subclass sets `schedule` (the scoring positions), `_request` (this forward's scoring request, or None) and
    `_score` (the layer hook that scores it)."""

    schedule: dict = {}
    _request = None

    def _single(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        return self.forward(h, pos)[:, -1]

    def _chunk(self, h: torch.Tensor, start: int) -> tuple[int, torch.Tensor]:
        """The chunk's last position and its positions. A chunk must end at each scoring position it reaches: the
        selection requested there is decided before the next position."""
        end = start + h.shape[1] - 1
        if any(start <= p < end for p in self.schedule):
            raise ValueError(f"chunk [{start}, {end}] crosses a scoring position; split it there")
        return end, torch.arange(start, start + h.shape[1], device=h.device)

    def _attend(self, h: torch.Tensor, pos: torch.Tensor, mask) -> torch.Tensor:
        """The forward over the written slots [0, pos[-1]] only: views of the static cache (the model writes
        through them), so a step reads ~half the cache on average; later slots are masked out in TrackerDecoder,
        i.e. contribute exactly zero there, so this changes no result. `mask`: a tensor or layer -> tensor."""
        n = int(pos[-1]) + 1
        caches = [(k[:, :, :n], v[:, :, :n]) for k, v in self.caches]
        hook = self._score if self._request is not None else None
        return self.model.forward_hidden(h, pos, caches, mask, hook=hook, rope_offset=self.rope_offset)

    def _score(self, layer: int, q: torch.Tensor) -> None:
        raise NotImplementedError
