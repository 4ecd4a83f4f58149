"""`SequenceTracker`s of many sequences that advance in lockstep, decided on [R, ...] tensors in one batched top-k.

Rows that sit at the same position at every step (a batch of teacher-forced images, or of samples generated
together) share their selection schedule: whether a selection is due depends only on the position and on how many
candidates survive, never on which, and every selection keeps `topk_blocks` of them. So the schedule comes from one
real `SequenceTracker` fed dummy scores (`selection_schedule`), and only *which* blocks survive is per row: a row's
candidates are its live blocks of `candidate_range`, its survivors `top_blocks_rows` of its scores (the same
tie-breaking as `top_blocks`). Each row ends with exactly the evicted set of its own tracker fed the same scores
(tests/test_lockstep.py). The reference's batched decoder (adsa_vllm/reference/batched.py) drives this.
"""

from __future__ import annotations

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.tracker import SequenceTracker, top_blocks_rows


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
        self.layout, self.scorer = layout, scorer
        self.schedule = selection_schedule(layout, first)
        self.evicted = torch.zeros(rows, layout.num_blocks(layout.seq_len - 1), dtype=torch.bool, device=device)
        self.selections = 0
        self._pending: tuple[int, torch.Tensor, torch.Tensor | None] | None = None   # (pos, cands, summed scores)
        self._k = torch.full((rows,), layout.topk_blocks, dtype=torch.int64, device=device)

    # 1.
    def begin_step(self, pos: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != pos or pending[2] is None:
            return
        _, cands, scores = pending
        keep = top_blocks_rows(cands, scores, self._k)
        self.evicted.scatter_(1, cands, ~keep)   # candidates are live, so a kept one stays False
        self.selections += 1

    # 3.
    def scoring_request(self, pos: int) -> torch.Tensor | None:
        n = self.schedule.get(pos)
        if n is None:
            return None
        rng = self.layout.candidate_range(pos + 1)
        alive = ~self.evicted[:, rng.start:rng.stop]
        if not bool((alive.sum(1) == n).all()):
            raise RuntimeError(f"rows disagree on the candidate count at position {pos}: expected {n} "
                               "(rows not in lockstep?)")
        cands = torch.arange(rng.start, rng.stop, device=alive.device).expand_as(alive)[alive].view(-1, n)
        self._pending = (pos + 1, cands, None)
        return cands

    def add_layer_scores(self, scores: torch.Tensor) -> None:
        """Add one layer's scores [rows, C] of the requested candidates."""
        pos, cands, acc = self._pending
        s = scores.detach().to(torch.float32)
        self._pending = (pos, cands, s if acc is None else acc + s)

    def score_layer(self, keys, values, query, pos: int, scale: float) -> None:
        """Score one layer: keys/values [rows, C, bs, Hkv, D] of the requested candidates (in `pending_blocks`
        order), query [rows, H, D] or None; pos is this forward's position (the request's)."""
        cands = self.pending_blocks
        x = ScoreInputs(keys=keys, values=values, valid=torch.ones_like(cands, dtype=torch.bool),
                        block_index=cands, positions=torch.full((len(cands),), pos, device=cands.device),
                        query=query, scale=scale)
        self.add_layer_scores(self.scorer.score(x))

    @property
    def pending_blocks(self) -> torch.Tensor:
        return self._pending[1]

    def evicted_sets(self) -> list[set[int]]:
        """Each row's evicted blocks, as `SequenceTracker.evicted`."""
        return [set(torch.nonzero(row).flatten().tolist()) for row in self.evicted.cpu()]
