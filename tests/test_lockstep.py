"""`LockstepTrackers` (the batched selection engine of the reference's BatchedDecoder) against one plain
`SequenceTracker` per row, driven the way the reference drives them (begin_step -> kept_blocks -> scoring_request,
then scores added). At every step each row must request the same candidates, keep the same blocks and end with the
same evicted set as its own tracker fed the same scores — including ties, which integer scores make frequent, so
the tie-breaking (to the more recent block) decides many selections. Pure torch, no model.
"""

from __future__ import annotations

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.policy import LockstepTrackers, SequenceTracker, make_scorer, selection_schedule

# (grid, block size, condition tokens, ADSAConfig fields): default and small budgets, a refresh above and below the
# block size, a larger window, a two-token condition (the trackers are consulted from position T on), 32-token blocks.
LAYOUTS = [(16, 16, 1, dict(budget=0.5)), (16, 16, 1, dict(budget=0.4, refresh=40)),
           (24, 16, 2, dict(budget=0.3, refresh=5, local=20)), (16, 32, 1, dict(budget=0.75)),
           (20, 16, 1, dict(budget=80, prefix=1, local=2))]
ROWS, LAYERS = 6, 3


def _layout(grid, bs, cls, fields):
    return ADSAConfig(policy="streaming", **fields).layout(block_size=bs, cls_token_num=cls, grid_size=grid)


def _drive(layout, cls, scores_of):
    """Steps the engine and ROWS trackers side by side; scores_of(pos, cands [R, C]) -> [LAYERS, R, C] scores.
    Returns the number of selections made."""
    first = 0 if cls == 1 else cls
    engine = LockstepTrackers(layout, scorer=None, rows=ROWS, first=first)
    trackers = [SequenceTracker(layout, scorer=None) for _ in range(ROWS)]
    for pos in range(first, layout.seq_len - 1):
        engine.begin_step(pos)
        for tr in trackers:
            tr.begin_step(pos)
        assert engine.evicted_sets() == [tr.evicted for tr in trackers], pos
        blocks = torch.arange(layout.num_blocks(pos))
        for r, tr in enumerate(trackers):   # what a row attends to: its non-evicted blocks up to the tail
            assert blocks[~engine.evicted[r, : len(blocks)]].tolist() == tr.kept_blocks(pos), (pos, r)
        cands = engine.scoring_request(pos)
        want = [tr.scoring_request(pos) for tr in trackers]
        if cands is None:
            assert want == [None] * ROWS, pos
            continue
        assert cands.tolist() == want, pos
        for layer_scores in scores_of(pos, cands):
            engine.add_layer_scores(layer_scores)
            for r, tr in enumerate(trackers):
                tr.add_layer_scores(layer_scores[r])
    assert engine.selections == len(engine.schedule) > 0
    assert len({frozenset(s) for s in engine.evicted_sets()}) > 1, "rows should differ, else little is tested"
    return engine.selections


@pytest.mark.parametrize("grid,bs,cls,fields", LAYOUTS)
def test_engine_equals_per_row_trackers_on_tied_scores(grid, bs, cls, fields):
    layout = _layout(grid, bs, cls, fields)
    gen = torch.Generator().manual_seed(grid * bs + cls)
    _drive(layout, cls, lambda pos, c: torch.randint(0, 3, (LAYERS, *c.shape), generator=gen).float())


@pytest.mark.parametrize("policy", ["topk_v", "attention_mass", "random"])
@pytest.mark.parametrize("grid,bs,cls,fields", LAYOUTS[:3])
def test_engine_scores_like_the_trackers(policy, grid, bs, cls, fields):
    """score_layer on [R, C] batches (as the batched decoder calls it) against each tracker's own score_layer."""
    layout = _layout(grid, bs, cls, fields)
    scorer = make_scorer(policy, seed=3)
    first = 0 if cls == 1 else cls
    engine = LockstepTrackers(layout, scorer, ROWS, first=first)
    trackers = [SequenceTracker(layout, scorer) for _ in range(ROWS)]
    gen = torch.Generator().manual_seed(7)
    hkv, d = 2, 8
    for pos in range(first, layout.seq_len - 1):
        engine.begin_step(pos)
        for tr in trackers:
            tr.begin_step(pos)
        cands = engine.scoring_request(pos)
        for tr in trackers:
            tr.scoring_request(pos)
        if cands is None:
            continue
        for _ in range(LAYERS):
            k, v = (torch.randn(ROWS, cands.shape[1], bs, hkv, d, generator=gen) for _ in range(2))
            q = torch.randn(ROWS, 2 * hkv, d, generator=gen)
            engine.score_layer(k, v, q, pos, scale=d ** -0.5)
            for r, tr in enumerate(trackers):
                tr.score_layer(k[r], v[r], q[r], pos, scale=d ** -0.5)
    assert engine.selections > 0
    assert engine.evicted_sets() == [tr.evicted for tr in trackers]


def test_schedule_is_a_trackers_and_stale_requests_are_dropped():
    layout = _layout(16, 16, 1, dict(budget=0.5))
    sched = selection_schedule(layout, 0)
    pos, n = min(sched.items())
    assert n == len(layout.candidate_range(pos + 1)) > layout.topk_blocks
    engine = LockstepTrackers(layout, None, 2)
    assert engine.scoring_request(pos - 1) is None
    cands = engine.scoring_request(pos)
    engine.add_layer_scores(torch.zeros(cands.shape))
    engine.begin_step(pos + 2)   # not the position the scores were for: dropped, nothing evicted (as a tracker)
    assert engine.selections == 0 and not engine.evicted.any()
    engine.scoring_request(pos)
    engine.begin_step(pos + 1)   # requested but never scored: dropped too
    assert engine.selections == 0 and not engine.evicted.any()
