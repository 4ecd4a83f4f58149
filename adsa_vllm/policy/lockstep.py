"""`SlotTrackers` for many sequences that advance in lockstep, with the tensor interface the reference's batched
decoder (adsa_vllm/reference/batched.py) drives.

Rows that sit at the same position at every step (a batch of teacher-forced images, or of samples generated
together) share their selection schedule: whether a selection is due depends only on the position and on how many
candidates survive, never on which, and every selection keeps `topk_blocks` of them. So the schedule is known in
advance from one real `SequenceTracker` fed dummy scores (`selection_schedule`; the decoder feeds every position
between two selections in one forward), while which blocks survive is decided per row by `SlotTrackers`, the same
engine the vLLM worker plans with. Each row ends with exactly the evicted set of its own tracker fed the same
scores (tests/test_lockstep.py).
"""

from __future__ import annotations

import numpy as np
import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.slot_trackers import SlotTrackers, pack_rows
from adsa_vllm.policy.tracker import SequenceTracker


def selection_schedule(layout: BlockLayout, first: int) -> dict[int, int]:
    """{p: number of candidates} for every step p >= first at which a tracker requests scores (the selection
    itself happens at p + 1), for a sequence whose tracker is consulted from position `first` on."""
    proto = SequenceTracker(layout, scorer=None)
    out = {}
    for pos in range(first, layout.seq_len - 1):   # the last image token is emitted, never fed: no step there
        proto.begin_step(pos)
        cands = proto.scoring_request(pos)
        if cands is not None:
            out[pos] = len(cands)
            proto.add_layer_scores(torch.zeros(len(cands)))
    return out


class LockstepTrackers:
    """The `SequenceTracker` protocol for `rows` sequences at the same position, whose tracker is consulted from
    position `first` on (every step from there, as the reference does):
      1. `begin_step(pos)`: select if scores for `pos` were requested and added, else drop the request.
      2. `evicted` [rows, blocks] bool: the blocks no row attends to any more (kept = the rest, up to the tail).
      3. `scoring_request(pos)` -> candidates [rows, C] int64, ascending per row, if a selection is due at
         pos + 1, else None; then `score_layer` / `add_layer_scores` ([rows, C]) inside this forward.
    """

    def __init__(self, layout: BlockLayout, scorer: BlockScorer, rows: int, *, first: int = 0,
                 device: torch.device | str | None = None):
        self.layout, self.scorer, self.device = layout, scorer, device
        self.schedule = selection_schedule(layout, first)
        self.selections = 0
        self._blocks = layout.num_blocks(layout.seq_len - 1)   # one more than max_blocks when the last block is full
        self._engine = SlotTrackers(capacity=rows, width=self._blocks)
        self._slots = np.array([self._engine.add(layout) for _ in range(rows)])
        self._cands: torch.Tensor | None = None
        self._index: np.ndarray | None = None   # `_cands` on the host

    def _at(self, pos: int) -> np.ndarray:
        return np.full(len(self._slots), pos, dtype=np.int64)

    # 1.
    def begin_step(self, pos: int) -> None:
        evict_rows, _ = self._engine.decide(self._slots, self._at(pos))
        self.selections += bool(len(evict_rows))   # a selection always evicts (candidates outnumber the slots)

    # 2.
    @property
    def evicted(self) -> torch.Tensor:
        return torch.from_numpy(self._engine.evicted[self._slots, : self._blocks].copy()).to(self.device)

    # 3.
    def scoring_request(self, pos: int) -> torch.Tensor | None:
        rows, cand = self._engine.request(self._slots, self._at(pos))
        if not len(rows):
            return None
        counts = cand.sum(1)
        if len(rows) != len(self._slots) or (counts != counts[0]).any():
            raise RuntimeError(f"rows disagree on the selection at position {pos} (rows not in lockstep?)")
        self._index = pack_rows(cand)
        self._cands = torch.from_numpy(self._index).to(self.device)
        return self._cands

    def add_layer_scores(self, scores: torch.Tensor) -> None:
        """Add one layer's scores [rows, C] of the requested candidates (their index stays on the host from the
        request on: no device-to-host copy per layer)."""
        index = self._index
        self._engine.add_scores(self._slots, self._engine.epoch[self._slots], self._engine.pending_pos[self._slots],
                                index, np.ones(index.shape, dtype=bool),
                                scores.detach().to(torch.float32).cpu().numpy())

    def score_layer(self, keys, values, query, pos: int, scale: float, layer: int = 0) -> None:
        """Score one layer: keys/values [rows, C, bs, Hkv, D] of the requested candidates (in `pending_blocks`
        order), query [rows, H, D] or None; pos is this forward's position (the request's)."""
        cands = self.pending_blocks
        x = ScoreInputs(keys=keys, values=values, valid=torch.ones_like(cands, dtype=torch.bool),
                        block_index=cands, positions=torch.full((len(cands),), pos, device=cands.device),
                        query=query, scale=scale, layer=layer)
        self.add_layer_scores(self.scorer.score(x))

    @property
    def pending_blocks(self) -> torch.Tensor:
        return self._cands

    def evicted_sets(self) -> list[set[int]]:
        """Each row's evicted blocks, as `SequenceTracker.evicted`."""
        return [set(np.nonzero(row)[0].tolist()) for row in self._engine.evicted[self._slots]]
