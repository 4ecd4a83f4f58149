"""Per-sequence eviction state machine, shared verbatim by the vLLM worker and the plain-PyTorch reference.

Protocol for a sequence whose query is at position `pos` (one step = one single-token forward):
  1. `begin_step(pos)`  -> logical blocks evicted now. If the previous forward scored the candidates for `pos`,
     keep the `topk_blocks` best and evict the rest. Evictions are permanent (the blocks go back to the pool).
  2. `kept_blocks(pos)` -> the logical blocks this forward attends to (prefix, top-k survivors, window, tail).
  3. `scoring_request(pos)` -> the candidates of the *next* position if a selection is due there, else None.
     The caller then scores them inside this forward (every layer, `add_layer_scores`), and the next
     `begin_step` selects. Scoring during the forward lets the attention-mass policy use the real query.
A selection is due at `pos` when the candidates outnumber the top-k slots and at least `refresh` steps have passed
since the last selection; so right after any selection the sequence holds at most `budget_blocks`.
"""

from __future__ import annotations

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.layout import BlockLayout


def top_blocks(block_index: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into block_index) of the k best blocks; ties go to the more recent block. Deterministic."""
    order = torch.argsort(block_index, descending=True, stable=True)
    order = order[torch.argsort(scores[order], descending=True, stable=True)]
    return order[:k]


class SequenceTracker:
    def __init__(self, layout: BlockLayout, scorer: BlockScorer):
        self.layout = layout
        self.scorer = scorer
        self.evicted: set[int] = set()
        self.last_selection: int | None = None
        self._pending_pos: int | None = None
        self._pending_blocks: list[int] = []
        self._pending_scores: torch.Tensor | None = None
        self._kept_key: tuple[int, int] | None = None
        self._kept: list[int] = []
        self._quiet_key: tuple | None = None
        self._quiet = 0

    # 1.
    def begin_step(self, pos: int) -> list[int]:
        if self._pending_pos is None:
            return []       # the common case, on every decode step of every sequence: nothing requested
        if self._pending_pos != pos or self._pending_scores is None:
            self._clear_pending()
            return []
        blocks = torch.tensor(self._pending_blocks, dtype=torch.int64)
        keep = set(blocks[top_blocks(blocks, self._pending_scores.cpu(), self.layout.topk_blocks)].tolist())
        newly = [b for b in self._pending_blocks if b not in keep]
        self.evicted.update(newly)
        self.last_selection = pos
        self._clear_pending()
        return newly

    # 2.
    def kept_blocks(self, pos: int) -> list[int]:
        # Called for every decode row at every step: recompute only when a block was added or evicted.
        key = (self.layout.num_blocks(pos), len(self.evicted))
        if key != self._kept_key:
            self._kept_key = key
            self._kept = [j for j in range(key[0]) if j not in self.evicted]
        return self._kept

    # 3.
    def scoring_request(self, pos: int) -> list[int] | None:
        nxt = pos + 1
        if nxt < self._quiet_until():
            return None     # fast path: provably no selection due yet (the checks below would all say so)
        # The last image token (position seq_len - 1) is emitted but never fed, so no step runs there.
        if nxt >= self.layout.seq_len - 1 or not self.layout.evicts:
            return None
        if self.last_selection is not None and nxt - self.last_selection < self.layout.refresh:
            return None
        cands = [j for j in self.layout.candidate_range(nxt) if j not in self.evicted]
        if len(cands) <= self.layout.topk_blocks:
            return None
        self._pending_pos, self._pending_blocks, self._pending_scores = nxt, cands, None
        return cands

    def _quiet_until(self) -> int:
        """The first position a selection can be due at, from the refresh rule and the candidate count alone.
        Evicted blocks all lie below the window (they were candidates), so at `nxt` the candidates number
        max(0, local_start(nxt) - prefix_blocks) - len(evicted), which exceeds topk once
        local_start(nxt) >= topk + prefix_blocks + len(evicted) + 1. Cached until the next eviction."""
        key = (len(self.evicted), self.last_selection)
        if key != self._quiet_key:
            lay = self.layout
            first = (lay.topk_blocks + lay.prefix_blocks + len(self.evicted) + 1) * lay.block_size \
                + lay.local_tokens - 1
            if self.last_selection is not None:
                first = max(first, self.last_selection + lay.refresh)
            self._quiet_key, self._quiet = key, first
        return self._quiet

    def add_layer_scores(self, scores: torch.Tensor) -> None:
        """Add one layer's (or an already summed batch of layers') scores for the requested candidates."""
        s = scores.detach().to(torch.float32)
        self._pending_scores = s if self._pending_scores is None else self._pending_scores + s

    def score_layer(self, keys, values, query, pos: int, scale: float) -> None:
        """Score one layer for a single sequence: keys/values [n, bs, Hkv, D] of the requested candidates (in
        `pending_blocks` order), query [H, D] or None."""
        dev = values.device
        idx = torch.tensor([self._pending_blocks], dtype=torch.int64, device=dev)
        x = ScoreInputs(keys=keys[None], values=values[None], valid=torch.ones_like(idx, dtype=torch.bool),
                        block_index=idx, positions=torch.tensor([pos], device=dev),
                        query=None if query is None else query[None], scale=scale)
        self.add_layer_scores(self.scorer.score(x)[0])

    def pending_for(self, pos: int) -> bool:
        """Whether candidates were requested for a selection at `pos` and still await their scores."""
        return self._pending_pos == pos and self._pending_scores is None

    @property
    def pending_blocks(self) -> list[int]:
        return self._pending_blocks

    def _clear_pending(self):
        self._pending_pos, self._pending_blocks, self._pending_scores = None, [], None
