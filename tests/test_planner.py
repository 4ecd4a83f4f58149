"""The worker's bulk planner (`plan_step` + `SlotTrackers` + batched top-k) against per-sequence `SequenceTracker`s.

No vLLM engine: an `ADSARuntime` is driven through many decode steps of many staggered sequences (different budgets
and policies per request, some rows not managed by ADSA, some prefill chunks, finished requests replaced). Beside
it, one plain tracker per request is driven the way the reference drives it (begin_step -> kept_blocks ->
scoring_request, scores from the same scorer). At every step and row the compacted block table, seq_lens and the
reported evictions must be exactly the trackers' — including ties, which a three-valued scorer makes frequent.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.settings import ADSASettings
from adsa_vllm.policy import BlockScorer, ScoreInputs, SequenceTracker, top_blocks, top_blocks_rows
from adsa_vllm.policy.slot_trackers import SlotTrackers
from adsa_vllm.worker.kept_tables import KeptTables, compacted_block_table
from adsa_vllm.worker.planner import plan_step
from adsa_vllm.worker.runtime import ADSARuntime


@dataclass(frozen=True)
class ThreeValued(BlockScorer):
    """Position-only scores with many ties: the tie-breaking (to the more recent block) decides most selections."""
    reads_kv = False

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return ((x.block_index * 7 + x.positions[:, None]) % 3).float()


def _scores(scorer, cands: list[int], pos: int) -> torch.Tensor:
    idx = torch.tensor([cands])
    return scorer.score(ScoreInputs(keys=None, values=None, valid=torch.ones_like(idx, dtype=torch.bool),
                                    block_index=idx, positions=torch.tensor([pos]), query=None, scale=0.0))[0]


OVERRIDES = [None, {"budget": 0.25}, {"budget": 0.75, "refresh": 40}, {"policy": "random", "seed": 5},
             {"budget": None}, {"budget": 0.3, "refresh": 5, "local": 20}]


@pytest.mark.parametrize("grid,bs", [(16, 16), (24, 16), (16, 32)])
@pytest.mark.parametrize("policy", ["streaming", "ties"])
def test_bulk_planner_equals_the_trackers(grid, bs, policy):
    rows, steps, cls = 12, 3 * grid * grid // 2, 1
    rng = np.random.default_rng(grid * bs)
    rt = ADSARuntime(ADSASettings(ADSAConfig(budget=0.5, policy="streaming"), block_size=bs, cls_token_num=cls,
                                  grid_size=grid), num_layers=1)
    rt.trackers = SlotTrackers(capacity=2, width=1)    # start tiny: growth is part of what is tested
    if policy == "ties":   # the engine default's entry of the worker's scorer cache (ADSARuntime._scorers_of)
        rt._scorers[("streaming", "diverse", 0, "block")] = (ThreeValued(), None)
    seq_len = cls + grid * grid
    width = -(-seq_len // bs)
    ids = [None] * rows
    shadow: dict[str, SequenceTracker] = {}
    pos = rng.integers(cls, seq_len - 2, rows)
    counter = iter(range(10**6))

    def start(i):
        rid = f"r{next(counter)}"
        over = OVERRIDES[int(rng.integers(len(OVERRIDES)))]
        params = SimpleNamespace(extra_args={"adsa": over} if over else None)
        rt._start(rid, params, first_block=1000 + i)
        shadow[rid] = SequenceTracker(rt._by_req[rid].layout, rt._by_req[rid].scorer)
        ids[i] = rid
        bt[i] = torch.from_numpy(rng.permutation(10 * rows * width)[:width]).to(torch.int32)   # its own blocks

    bt = torch.zeros(rows, width, dtype=torch.int32)    # rewritten in place, like the runner's

    for i in range(rows):
        start(i)
    unmanaged = [3]          # while set, this row's request is not ADSA's to plan (e.g. the runner padded the batch)
    rt.batch_req_ids = lambda n: [None if i in unmanaged else r for i, r in enumerate(ids[:n])]
    tables, reused = KeptTables(), 0
    layer = SimpleNamespace(kv_cache=torch.zeros(1, 1, bs, 16), head_size=8, impl=SimpleNamespace(scale=1.0))
    evictions_seen = 0
    for step in range(steps):
        prefill = int(rng.integers(rows)) if step % 7 == 0 else -1    # one row runs a 3-token chunk
        unmanaged[:] = [3] if step % 80 < 20 else []
        q = np.where(np.arange(rows) == prefill, 3, 1)
        qsl = torch.from_numpy(np.concatenate([[0], np.cumsum(q)])).to(torch.int32)
        cm = SimpleNamespace(num_reqs=rows, query_start_loc_cpu=qsl, block_table_tensor=bt,
                             seq_lens_cpu_upper_bound=torch.from_numpy(pos + 1).to(torch.int32))
        plan = plan_step(rt, cm, [layer], "none")
        compacted = compacted_block_table(bt, plan.rows, plan.kept_index(), torch.empty_like(bt))
        reused += plan.key is not None and tables._table_key is not None and tables._table_key[0] == plan.key
        table, kernel_lens = tables.update(bt, cm.seq_lens_cpu_upper_bound, plan, rows)
        assert torch.equal(table, compacted), step     # the kept tables, rewritten only when needed, are current
        assert kernel_lens.tolist() == plan.seq_lens.tolist(), step
        reported = rt.drain_evictions()
        for i in range(rows):
            p = int(pos[i])
            tr = shadow[ids[i]]
            if i in unmanaged or q[i] != 1:
                assert plan.seq_lens[i] == p + 1 and torch.equal(compacted[i], bt[i])
                continue
            newly = tr.begin_step(p)
            kept = tr.kept_blocks(p)
            assert reported.get(ids[i], []) == newly, (step, i)
            evictions_seen += len(newly)
            assert plan.seq_lens[i] == (len(kept) - 1) * bs + p % bs + 1, (step, i)
            assert compacted[i, : len(kept)].tolist() == bt[i, kept].tolist(), (step, i)
            cands = tr.scoring_request(p)
            if cands is not None:
                tr.add_layer_scores(_scores(tr.scorer, cands, p))
        assert not set(reported) - {ids[i] for i in range(rows)}
        for i in range(rows):
            if q[i] == 1:
                pos[i] += 1
            if pos[i] >= seq_len - 1:                     # finished: a new request takes the row
                rt._drop(ids[i])
                pos[i] = cls
                start(i)
    assert evictions_seen > 0
    assert reused > 0, "no step reused the kept tables: the shortcut went untested"


@pytest.mark.parametrize("seed", range(20))
def test_batched_top_k_equals_top_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    r, c = 6, 30
    lens = torch.randint(1, c + 1, (r,), generator=g)
    index = torch.full((r, c), -1, dtype=torch.int64)
    scores = torch.randn(r, c, generator=g)
    for i in range(r):
        index[i, : lens[i]] = torch.randperm(80, generator=g)[: lens[i]] + 1
        scores[i, : lens[i]] = torch.randint(0, 3, (int(lens[i]),), generator=g).float()   # ties everywhere
    k = torch.randint(0, c + 2, (r,), generator=g)
    keep = top_blocks_rows(index, scores, k)
    for i in range(r):
        n = int(lens[i])
        want = set(index[i, :n][top_blocks(index[i, :n], scores[i, :n], int(k[i]))].tolist())
        assert set(index[i][keep[i]].tolist()) == want


def test_row_lookup_follows_a_restarted_request():
    """The batch's rows -> sequences answer is reused while the batch ids are unchanged; a request restarted under
    the same id (preempted and resumed; a benchmark reusing ids) must map to its new tracker, not the old one."""
    rt = ADSARuntime(ADSASettings(ADSAConfig(budget=0.5), block_size=16, cls_token_num=1, grid_size=16))
    ids = ["a", "b"]
    rt.batch_req_ids = lambda n: ids[:n]
    for i, rid in enumerate(ids):
        rt._start(rid, None, first_block=i + 1)
    seqs, slots = rt.row_sequences(2, None)
    assert seqs == [rt._by_req["a"], rt._by_req["b"]] and list(slots) == [seqs[0].slot, seqs[1].slot]
    assert rt.row_sequences(2, None)[0] is seqs   # reused
    rt._start("a", None, first_block=7)           # same id, same batch order
    seqs, slots = rt.row_sequences(2, None)
    assert seqs[0] is rt._by_req["a"] and slots[0] == rt._by_req["a"].slot
    assert rt.row_sequences(3, None)[0][2] is None   # a padded row holds no request


def _schedule(new=(), cached=(), resumed=(), preempted=(), finished=()):
    """A SchedulerOutput with what ADSARuntime.on_schedule reads. new: (req id, params, first block, prompt rows);
    cached: (req id, first new block) of running or resumed requests."""
    news = [SimpleNamespace(req_id=r, sampling_params=p, block_ids=([b],), prompt_embeds=torch.zeros(v, 4),
                            prompt_token_ids=None) for r, p, b, v in new]
    ids = [r for r, _ in cached]
    cached_reqs = SimpleNamespace(req_ids=ids, resumed_req_ids=set(resumed),
                                  new_block_ids=[([b],) if r in resumed else None for r, b in cached])
    return SimpleNamespace(scheduled_new_reqs=news, scheduled_cached_reqs=cached_reqs,
                           preempted_req_ids=set(preempted), finished_req_ids=set(finished))


def test_a_preempted_request_resumes_with_its_own_settings_and_condition_length():
    """A t2i request (9 caption rows, budget 0.25) preempted and resumed in a later step: the worker must start it
    again with the layout it had, not the engine defaults (budget 0.5) nor the model's 24-row condition."""
    rt = ADSARuntime(ADSASettings(ADSAConfig(budget=0.5), block_size=16, cls_token_num=24, grid_size=16))
    params = SimpleNamespace(extra_args={"adsa": {"budget": 0.25}})
    rt.on_schedule(_schedule(new=[("a", params, 3, 9), ("b", None, 5, 24)]))
    before = rt._by_req["a"].layout
    assert (before.budget_blocks, before.prefix_tokens) == (4, 9 + 16) and rt._by_req["b"].layout.budget_blocks == 8
    rt.on_schedule(_schedule(cached=[("b", 0)], preempted=["a"]))
    assert "a" not in rt._by_req
    rt.on_schedule(_schedule(cached=[("b", 0)]))                     # a step later it is still waiting
    rt.on_schedule(_schedule(cached=[("b", 0), ("a", 11)], resumed=["a"]))
    seq = rt._by_req["a"]
    assert seq.layout == before and seq.first_block == 11 and seq.prompt_len == 9 and seq.params is params
    assert not rt._resume
    rt.on_schedule(_schedule(cached=[("b", 0)], preempted=["a"]))
    rt.on_schedule(_schedule(cached=[("b", 0)], finished=["a"]))     # aborted while preempted: nothing kept
    assert "a" not in rt._by_req and not rt._resume
