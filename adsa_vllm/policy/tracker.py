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


def top_blocks_rows(block_index: torch.Tensor, scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`top_blocks` for many rows at once: block_index [R, C] (padding -1), scores [R, C], k [R] -> keep mask
    [R, C], the same blocks `top_blocks` picks row by row (same two stable sorts, so the same tie-breaking; padding
    sorts last in both, as it holds the smallest index and the score -inf)."""
    scores = torch.where(block_index >= 0, scores.float(), -torch.inf)
    order = torch.argsort(block_index, dim=1, descending=True, stable=True)
    order = order.gather(1, torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True))
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return (rank < k[:, None]) & (block_index >= 0)


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
        due = self.due_selection(pos)
        if due is None:
            return []
        blocks = torch.tensor(due[0], dtype=torch.int64)
        keep = set(blocks[top_blocks(blocks, due[1].cpu(), self.layout.topk_blocks)].tolist())
        return self.apply_selection(pos, keep)

    # 1, in two halves, so a caller can decide many sequences in one batched top-k (`top_blocks_rows`).
    def due_selection(self, pos: int) -> tuple[list[int], torch.Tensor] | None:
        """(candidates, their scores) if a selection is decided at `pos`; drops a request that cannot be."""
        if self._pending_pos is None:
            return None     # the common case, on every decode step of every sequence: nothing requested
        if self._pending_pos != pos or self._pending_scores is None:
            self._clear_pending()
            return None
        return self._pending_blocks, self._pending_scores

    def apply_selection(self, pos: int, keep: set[int]) -> list[int]:
        """Evict every pending candidate not in `keep`; returns the newly evicted blocks."""
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

    def wake(self) -> int:
        """The first position whose step needs `begin_step` or `scoring_request` to do anything: before it, both
        return nothing and the kept blocks are `kept_runs()`'s. Lets a caller skip idle sequences in bulk."""
        return self._pending_pos if self._pending_pos is not None else self._quiet_until() - 1

    def kept_runs(self) -> tuple[list[int], int]:
        """The kept blocks as (survivors below m, m): `kept_blocks(pos)` == survivors + range(m, num_blocks(pos)),
        because every evicted block lies below m = 1 + the highest evicted block (0 if none)."""
        m = max(self.evicted) + 1 if self.evicted else 0
        return [j for j in range(m) if j not in self.evicted], m

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

    def score_layer(self, keys, values, query, pos: int, scale: float, layer: int = 0) -> None:
        """Score one layer for a single sequence: keys/values [n, bs, Hkv, D] of the requested candidates (in
        `pending_blocks` order), query [H, D] or None; layer: its index."""
        dev = values.device
        idx = torch.tensor([self._pending_blocks], dtype=torch.int64, device=dev)
        x = ScoreInputs(keys=keys[None], values=values[None], valid=torch.ones_like(idx, dtype=torch.bool),
                        block_index=idx, positions=torch.tensor([pos], device=dev),
                        query=None if query is None else query[None], scale=scale, layer=layer)
        self.add_layer_scores(self.scorer.score(x)[0])

    @property
    def pending_blocks(self) -> list[int]:
        return self._pending_blocks

    def _clear_pending(self):
        self._pending_pos, self._pending_blocks, self._pending_scores = None, [], None
