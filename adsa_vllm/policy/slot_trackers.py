"""`SequenceTracker`s of many sequences as arrays, one slot (row) per sequence, each step decided in bulk.

The vLLM worker plans up to max_num_seqs sequences at every step; asking one Python tracker per sequence costs
tens of microseconds each whenever a selection is requested or decided (for all of them in the same step when a
batch was admitted together). Here the tracker state is numpy arrays indexed by slot:
    evicted [S, W] bool, pending request (position, candidate mask, scores), last selection, layout numbers,
so a step is a few vectorised operations over the rows that have work, whatever their positions. The protocol and
every decision are exactly `SequenceTracker`'s (tests/test_planner.py runs one tracker per sequence beside it at
every step): a selection keeps the `topk_blocks` best-scored candidates (ties to the more recent block, the same
two stable sorts via `top_blocks_rows`), and a request is made when the candidates outnumber the top-k slots and
`refresh` steps have passed.

`wake` holds, per slot, the first position at which a call can do anything (a pending request, or the first
position the refresh rule and the candidate count allow a new one, `SequenceTracker._quiet_until`), so a caller
passes only the rows at or past it. `version` changes whenever a slot's kept blocks change (start, eviction).
"""

from __future__ import annotations

import numpy as np
import torch

from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.tracker import top_blocks_rows

NEVER = np.iinfo(np.int64).max
NO_SELECTION = -(1 << 40)     # last selection of a sequence that never selected: every refresh test passes


def pack_rows(mask: np.ndarray, width: int | None = None) -> np.ndarray:
    """Mask [R, W] bool -> [R, width] int64: each row's True columns, ascending, packed to the left (0 beyond
    them). `width` defaults to the largest count of a row; it must be at least that."""
    r, c = np.nonzero(mask)
    rank = (np.cumsum(mask, axis=1) - 1)[r, c]
    out = np.zeros((mask.shape[0], int(mask.sum(1).max(initial=0)) if width is None else width), dtype=np.int64)
    out[r, rank] = c
    return out


class SlotTrackers:
    def __init__(self, capacity: int = 64, width: int = 8):
        z = lambda dtype, fill=0: np.full(capacity, fill, dtype=dtype)   # noqa: E731
        # layout numbers per slot
        self.block_size, self.prefix_blocks, self.local_tokens = z(np.int64, 1), z(np.int64), z(np.int64)
        self.topk, self.refresh, self.seq_len, self.evicts = z(np.int64), z(np.int64), z(np.int64), z(bool)
        self.token_edges = z(bool)                               # layout.token_edges (worker/token_edges.py)
        # state
        self.evicted = np.zeros((capacity, width), dtype=bool)
        self.num_evicted = z(np.int64)
        # The kept blocks as `SequenceTracker.kept_runs` gives them: the survivors below tail_from (1 + the highest
        # evicted block; 0 if none), then every block from tail_from on. Updated at each eviction.
        self.tail_from = z(np.int64)
        self.head_len = z(np.int64)
        self.head = np.zeros((capacity, 8), dtype=np.int64)
        self.last_selection = z(np.int64, NO_SELECTION)
        self.pending_pos = z(np.int64, -1)                       # position the pending request decides at
        self.pending = np.zeros((capacity, width), dtype=bool)   # its candidates
        self.scores = np.zeros((capacity, width), dtype=np.float32)   # their summed scores, by block
        self.scored = z(bool)                                    # scores arrived for the pending request
        self.wake = z(np.int64, NEVER)
        self.version = z(np.int64)
        self.epoch = z(np.int64)                                 # bumped when a slot gets a new sequence
        self._free = list(range(capacity - 1, -1, -1))
        self._versions = 0

    # ---- slots ----
    def add(self, layout: BlockLayout) -> int:
        if not self._free:
            self._grow_rows()
        if layout.max_blocks > self.evicted.shape[1]:
            self._grow_cols(layout.max_blocks)
        s = self._free.pop()
        self.block_size[s], self.prefix_blocks[s], self.local_tokens[s] = (layout.block_size, layout.prefix_blocks,
                                                                           layout.local_tokens)
        self.topk[s], self.refresh[s], self.seq_len[s] = layout.topk_blocks, layout.refresh, layout.seq_len
        self.evicts[s], self.token_edges[s] = layout.evicts, layout.token_edges
        self.evicted[s] = self.pending[s] = False
        self.num_evicted[s], self.last_selection[s], self.pending_pos[s], self.scored[s] = 0, NO_SELECTION, -1, False
        self.tail_from[s] = self.head_len[s] = 0
        self.epoch[s] += 1
        self._changed(np.array([s]), kept=np.array([s]))
        return s

    def remove(self, slot: int) -> None:
        self.wake[slot], self.evicts[slot], self.pending_pos[slot] = NEVER, False, -1
        self.token_edges[slot] = False
        self.num_evicted[slot] = self.tail_from[slot] = self.head_len[slot] = 0
        self._free.append(slot)

    # ---- 1. decide (SequenceTracker.begin_step) ----
    def decide(self, slots: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Select for every row whose scored request is due at its `pos`; drop requests that cannot be decided.
        Returns (rows, blocks), two equal-length arrays pairing each newly evicted block with its row: rows index
        `slots` (ascending), blocks ascend within a row."""
        waiting = self.pending_pos[slots] >= 0
        due = waiting & (self.pending_pos[slots] == pos) & self.scored[slots]
        rows = np.nonzero(due)[0]
        evict_rows = evict_blocks = np.zeros(0, dtype=np.int64)
        if len(rows):
            s = slots[rows]
            cand = self.pending[s]
            index = np.where(cand, np.arange(cand.shape[1])[None, :], -1)
            keep = top_blocks_rows(torch.from_numpy(index), torch.from_numpy(self.scores[s]),
                                   torch.from_numpy(self.topk[s])).numpy()
            newly = cand & ~keep
            self.evicted[s] |= newly
            self.num_evicted[s] += newly.sum(1)
            self.last_selection[s] = pos[rows]
            self._runs(s)
            r, evict_blocks = np.nonzero(newly)
            evict_rows = rows[r]
        cleared = slots[waiting]
        self.pending_pos[cleared], self.scored[cleared] = -1, False
        self._changed(cleared, kept=slots[rows])
        return evict_rows, evict_blocks

    # ---- 3. request (SequenceTracker.scoring_request) ----
    def request(self, slots: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Request scores for the rows whose selection is due at pos + 1. Returns (rows, candidates [k, W] mask)."""
        nxt = pos + 1
        bs, prefix = self.block_size[slots], self.prefix_blocks[slots]
        local_start = np.maximum(0, nxt - self.local_tokens[slots] + 1) // bs
        cols = np.arange(self.evicted.shape[1])[None, :]
        cand = (cols >= prefix[:, None]) & (cols < np.maximum(prefix, local_start)[:, None]) & ~self.evicted[slots]
        # The last image token (position seq_len - 1) is emitted but never fed, so no step runs there.
        ok = self.evicts[slots] & (nxt < self.seq_len[slots] - 1) \
            & (nxt - self.last_selection[slots] >= self.refresh[slots]) & (cand.sum(1) > self.topk[slots])
        rows = np.nonzero(ok)[0]
        s = slots[rows]
        self.pending_pos[s], self.pending[s], self.scored[s] = nxt[rows], cand[rows], False
        self.scores[s] = 0.0
        self._changed(s, kept=s[:0])
        return rows, cand[rows]

    def add_scores(self, slots: np.ndarray, epochs: np.ndarray, at_pos: np.ndarray, index: np.ndarray,
                   valid: np.ndarray, scores: np.ndarray) -> None:
        """Scores [k, C] of the candidates `index` [k, C] (where `valid`) requested for `at_pos`, added to the
        slots whose request still stands (a slot that moved on to another sequence or request is left alone)."""
        live = (self.epoch[slots] == epochs) & (self.pending_pos[slots] == at_pos)
        r, c = np.nonzero(valid & live[:, None])
        self.scores[slots[r], index[r, c]] += scores[r, c]
        self.scored[slots[live]] = True

    # ---- 2. kept blocks (SequenceTracker.kept_blocks), for many rows ----
    def kept_count(self, slots: np.ndarray, num_blocks: np.ndarray) -> np.ndarray:
        """Every evicted block lies below the window, so below num_blocks."""
        return num_blocks - self.num_evicted[slots]

    def kept_index(self, slots: np.ndarray, num_blocks: np.ndarray, width: int) -> np.ndarray:
        """[k, width] logical index of each kept block in order (0 beyond the kept ones): the head survivors, then
        tail_from, tail_from + 1, ..."""
        tail_from, head_len = self.tail_from[slots], self.head_len[slots]
        kept = head_len + num_blocks - tail_from
        cols = np.arange(width)[None, :]
        head = np.zeros((len(slots), width), dtype=np.int64)
        w = min(width, self.head.shape[1])
        head[:, :w] = self.head[slots, :w]
        index = np.where(cols < head_len[:, None], head, (tail_from - head_len)[:, None] + cols)
        return np.where(cols < kept[:, None], index, 0)

    # ---- internals ----
    def _changed(self, slots: np.ndarray, kept: np.ndarray) -> None:
        """Recompute `wake` of `slots`; bump `version` of `kept`, the slots whose kept blocks changed."""
        pending = self.pending_pos[slots]
        quiet = (self.topk[slots] + self.prefix_blocks[slots] + self.num_evicted[slots] + 1) * self.block_size[slots] \
            + self.local_tokens[slots] - 1
        quiet = np.maximum(quiet, self.last_selection[slots] + self.refresh[slots])
        self.wake[slots] = np.where(~self.evicts[slots], NEVER, np.where(pending >= 0, pending, quiet - 1))
        self.version[kept] = self._versions + 1 + np.arange(len(kept))
        self._versions += len(kept)

    def _runs(self, slots: np.ndarray) -> None:
        """Recompute tail_from / head of `slots` from their evicted masks."""
        ev = self.evicted[slots]
        width = ev.shape[1]
        tail_from = np.where(ev.any(1), width - np.argmax(ev[:, ::-1], axis=1), 0)
        survivors = ~ev & (np.arange(width)[None, :] < tail_from[:, None])
        head_len = survivors.sum(1)
        if head_len.max(initial=0) > self.head.shape[1]:
            self.head = np.pad(self.head, ((0, 0), (0, max(int(head_len.max()), 2 * self.head.shape[1])
                                                     - self.head.shape[1])))
        head = pack_rows(survivors, self.head.shape[1])
        self.head[slots], self.tail_from[slots], self.head_len[slots] = head, tail_from, head_len

    def _grow_rows(self) -> None:
        n = len(self.wake)
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray) and value.shape[0] == n:
                fill = {"wake": NEVER, "last_selection": NO_SELECTION, "pending_pos": -1, "block_size": 1}.get(name, 0)
                setattr(self, name, np.concatenate([value, np.full_like(value, fill)]))
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _grow_cols(self, width: int) -> None:
        width = max(width, 2 * self.evicted.shape[1])
        for name in ("evicted", "pending", "scores"):
            a = getattr(self, name)
            setattr(self, name, np.pad(a, ((0, 0), (0, width - a.shape[1]))))
