"""Swap preemption is exact (CPU, fp32): a request preempted at any point and resumed from host memory produces the
same tokens as one never preempted, and the reference's (adsa_vllm/engine/swap.py).

Preemptions are forced between engine steps through vLLM's own `_preempt_request` (the path its scheduler takes
when the pool runs short), at several points of a sequence's life: during the prefix (nothing evicted yet), just
after eviction starts, and late; block and token granularity, with and without CFG, greedy and seeded sampling.
Two mutations show the comparison can fail: a swap-in that loses the copied blocks, and a worker that forgets the
sequence's eviction state. Natural preemptions under the preempting admission rules ("overcommit" and
"average"): a pool of 4 bounds running 8 requests.

Engines: swap16 (ADSA 50% TopK-V; other policies and token granularity per request), swap16_cfg (the same with
CFG), swap16_peak (peak admission: vLLM's recompute is what a preemption would do there), swap16_small_* (a pool of
37 blocks, per preempting rule).
"""

from __future__ import annotations

import time

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.engine.observe import engine_scheduler
from greedy_match import assert_greedy_matches_reference

ENGINE = {"budget": 0.5, "policy": "topk_v"}
CLASSES = (2, 7)
# (label, per-request overrides, class): every row runs in every batch below.
ROWS = [("topk_v", None, 2), ("token", {"granularity": "token"}, 7),
        ("random", {"policy": "random", "seed": 3}, 7), ("token_mass", {"granularity": "token",
                                                                        "policy": "attention_mass"}, 2)]
# Steps at which every still-running request is preempted (16x16: 256 image tokens; TopK-V 50% first evicts near
# token 150): during the prefix, at the first evictions, and late.
PREEMPT_AT = (3, 150, 155, 190, 240)
HOLD = 3


def _engine(engines, model16, key="swap16", extra=None, adsa=None):
    model_dir, config = model16
    additional = {"adsa": {"admission": "overcommit"} | (adsa or ENGINE)} | (extra or {})   # preempts by swap
    return engines.get(key, model_dir, attention_backend="adsa", additional_config=additional), config


def _params(config, overrides, sampling=None):
    from vllm import SamplingParams
    kw = dict(temperature=0.0) if sampling is None else dict(sampling)
    return SamplingParams(max_tokens=config.image_tokens, detokenize=False, ignore_eos=True, **kw,
                          extra_args=None if overrides is None else {"adsa": overrides})


def _run(llm, config, rows, preempt_at=(), sampling=None, hold=HOLD):
    """Generate one image per row through the engine's step loop, preempting every running request at the given
    step numbers and keeping them waiting (on the host) for `hold` steps. -> ({label: tokens}, preemptions done)."""
    eng, sched = llm.llm_engine, engine_scheduler(llm)
    ids = {f"{label}-{time.monotonic_ns()}": label for label, _, _ in rows}
    for (rid, label), (_, overrides, cls) in zip(ids.items(), rows):
        eng.add_request(rid, {"prompt_token_ids": config.prompt(cls)}, _params(config, overrides, sampling))
    tokens, step, done, cap, release = {}, 0, 0, sched.max_num_running_reqs, -1
    while eng.has_unfinished_requests():
        if step in preempt_at:
            for req in list(sched.running):
                sched.running.remove(req)
                sched._preempt_request(req, time.monotonic())
                done += 1
            sched.max_num_running_reqs, release = 0, step + hold   # nothing resumes for a while
        if step == release:
            sched.max_num_running_reqs = cap
        for out in eng.step():
            if out.finished:
                tokens[ids[out.request_id]] = torch.tensor(list(out.outputs[0].token_ids))
        step += 1
    return tokens, done


def _assert_books_balance(llm):
    sched = engine_scheduler(llm)
    m = sched.adsa_managers[0]
    assert m.block_pool.get_num_free_blocks() == m.block_pool.num_gpu_blocks - 1, "KV blocks leaked"
    assert not m.requests and not m.swapped and not sched.running and not sched.waiting
    rt = _runtime(llm)
    # The worker hears of the last step's finished requests with the next step: only those may still be there.
    assert set(rt.host.copies) | set(rt._parked) | set(rt._by_req) <= sched.finished_req_ids


def _runtime(llm):
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return runner.get_model().adsa_runtime


@pytest.fixture(scope="module")
def unpreempted(engines, model16):
    llm, config = _engine(engines, model16)
    tokens, done = _run(llm, config, ROWS)
    assert done == 0
    return tokens


def test_swapped_requests_equal_unpreempted_and_reference(engines, model16, unpreempted, reference):
    llm, config = _engine(engines, model16)
    sched = engine_scheduler(llm)
    before = (sched.swaps.swapped_out, sched.swaps.swapped_in, sched.swaps.recomputed)
    got, done = _run(llm, config, ROWS, PREEMPT_AT)
    assert done >= len(ROWS) * len(PREEMPT_AT) - 2   # every row was preempted at almost every point
    out, into, recomputed = (a - b for a, b in zip((sched.swaps.swapped_out, sched.swaps.swapped_in,
                                                    sched.swaps.recomputed), before))
    assert (out, into, recomputed) == (done, done, 0), "every preemption must be a swap, and come back"
    for label, overrides, cls in ROWS:
        assert torch.equal(got[label], unpreempted[label]), \
            f"{label}: first mismatch at token {int((got[label] != unpreempted[label]).nonzero()[0, 0])}"
        adsa = ADSAConfig.from_dict(ENGINE).merged(overrides)
        own = reference.greedy(model16[0], (cls,), adsa)   # the reference's own run (cached), then teacher-forced
        assert_greedy_matches_reference(got[label][None], reference.models[str(model16[0])], [cls], own=own,
                                        adsa=adsa, block_size=16, label=label)
    assert _runtime(llm).host.bytes_out > 0 and _runtime(llm).host.bytes_in > 0
    _assert_books_balance(llm)


def test_lost_swapped_blocks_change_the_image(engines, model16, unpreempted, monkeypatch):
    """Mutation: the swap-in writes zeros instead of the copied blocks. The comparison above must see it."""
    from adsa_vllm.worker.host_kv import HostKV
    llm, config = _engine(engines, model16)
    swap_in = HostKV.swap_in

    def zeroed(self, req_id, logical, physical, caches, summaries):
        self.kv.zero_()
        return swap_in(self, req_id, logical, physical, caches, summaries)
    monkeypatch.setattr(HostKV, "swap_in", zeroed)
    got, _ = _run(llm, config, ROWS[:1], PREEMPT_AT)
    assert not torch.equal(got["topk_v"], unpreempted["topk_v"])
    _assert_books_balance(llm)


def test_forgotten_eviction_state_changes_the_image(engines, model16, unpreempted, monkeypatch):
    """Mutation: the worker restarts a resumed sequence with a fresh slot (what a recompute does): its kept set and
    pending selection are gone, and so is the equality."""
    from adsa_vllm.worker.runtime import ADSARuntime
    llm, config = _engine(engines, model16)
    unpark = ADSARuntime._unpark

    def fresh(self, req_id, logical, physical):
        seq = self._parked[req_id]
        unpark(self, req_id, logical, physical)
        self._start(req_id, seq.params, physical[0], seq.prompt_len)
    monkeypatch.setattr(ADSARuntime, "_unpark", fresh)
    got, _ = _run(llm, config, ROWS[:1], PREEMPT_AT)
    assert not torch.equal(got["topk_v"], unpreempted["topk_v"])


def _preempt_gone(llm, config, steps: int):
    """Requests "gone" and "stays" run `steps` steps; then "gone" is preempted. -> (engine, scheduler, victim)"""
    eng, sched = llm.llm_engine, engine_scheduler(llm)
    eng.add_request("gone", {"prompt_token_ids": config.prompt(1)}, _params(config, None))
    eng.add_request("stays", {"prompt_token_ids": config.prompt(2)}, _params(config, None))
    for _ in range(steps):
        eng.step()
    victim = next(r for r in sched.running if r.request_id.startswith("gone"))
    sched.running.remove(victim)
    sched._preempt_request(victim, time.monotonic())
    return eng, sched, victim


def test_abort_while_swapped_frees_host_and_pool(engines, model16):
    llm, config = _engine(engines, model16)
    eng, sched, victim = _preempt_gone(llm, config, 160)
    cap, sched.max_num_running_reqs = sched.max_num_running_reqs, 1   # "stays" runs, "gone" waits on the host
    eng.step()                                   # the worker copies it out
    assert victim.request_id in sched.adsa_managers[0].swapped and victim.request_id in _runtime(llm).host
    eng.abort_request(["gone"])
    sched.max_num_running_reqs = cap
    finished = []
    while eng.has_unfinished_requests():
        finished += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in finished] == ["stays"]
    _assert_books_balance(llm)
    assert not _runtime(llm).host.copies


def test_abort_before_the_copy_out_leaves_nothing_on_the_host(engines, model16):
    """Preempted and aborted before the next step: the copy out is cancelled, not run for a finished request."""
    llm, config = _engine(engines, model16)
    eng, _, _ = _preempt_gone(llm, config, 20)
    eng.abort_request(["gone"])
    while eng.has_unfinished_requests():
        eng.step()
    _assert_books_balance(llm)
    assert not _runtime(llm).host.copies


@pytest.mark.parametrize("sampling", [None, dict(temperature=1.0, top_k=20, seed=5)], ids=["greedy", "seeded"])
def test_cfg_pairs_swap_exactly(sampling, engines, model16):
    """A guided pair is one sequence: both branches' kept blocks travel together (block and token granularity)."""
    llm, config = _engine(engines, model16, key="swap16_cfg", extra={"cfg": {"scale": 3.0}})
    rows = ROWS[:2]
    plain, _ = _run(llm, config, rows, sampling=sampling)
    got, done = _run(llm, config, rows, PREEMPT_AT, sampling=sampling)
    assert done >= len(rows) * (len(PREEMPT_AT) - 1)
    for label, _, _ in rows:
        assert torch.equal(got[label], plain[label]), label
    _assert_books_balance(llm)


def test_peak_admission_recomputes(engines, model16):
    """With admission "peak" (no swap) a forced preemption is vLLM's recompute, counted as such."""
    llm, config = _engine(engines, model16, key="swap16_peak", adsa=ENGINE | {"admission": "peak"})
    sched = engine_scheduler(llm)
    _, done = _run(llm, config, ROWS[:1], (150,))
    assert done == 1 and sched.swaps.recomputed == 1 and sched.swaps.swapped_out == 0


def test_late_eviction_of_a_swapped_request_comes_back_null(engines, model16):
    """Under async scheduling the worker's eviction of step s reaches the scheduler after a preemption in step s+1:
    the blocks went to the host whole, and on resume the evicted ones must come back as nulls, not as blocks."""
    llm, config = _engine(engines, model16)
    eng, sched = llm.llm_engine, engine_scheduler(llm)
    m = sched.adsa_managers[0]
    eng.add_request("late", {"prompt_token_ids": config.prompt(3)}, _params(config, None))
    for _ in range(100):
        eng.step()
    req = sched.running[0]
    sched.running.remove(req)
    sched._preempt_request(req, time.monotonic())
    record = m.swapped[req.request_id]
    late = record.logical[-3:-1]
    assert m.evict(req.request_id, late) == 0          # nothing to free now: the blocks left with the swap-out
    assert record.kept == [j for j in record.logical if j not in late]
    free = m.block_pool.get_num_free_blocks()
    logical, physical = m.swap_in(req.request_id)
    assert logical == record.kept and len(physical) == len(logical)
    assert m.block_pool.get_num_free_blocks() == free - len(logical)
    blocks = m.req_to_blocks[req.request_id]
    assert all(blocks[j].is_null for j in late) and m.held_blocks(req.request_id) == len(logical)
    m.undo_swap_in(req.request_id, logical)            # back to the host, and aborted there
    assert m.block_pool.get_num_free_blocks() == free
    eng.abort_request(["late"])
    while eng.has_unfinished_requests():
        eng.step()
    _assert_books_balance(llm)


# A pool that holds 4 sequences at their 50% bound (8 + 1 blocks each); the preempting rules run more of them at
# once and swap when their in-phase ramps outgrow the pool.
SMALL_POOL = 4 * 9 + 1


@pytest.mark.parametrize("admission", ["overcommit", "average"])
def test_preempting_admission_runs_more_and_swaps_exactly(admission, engines, model16, unpreempted):
    """Natural preemptions (no forcing): every one is a swap, more sequences run than peak admission allows, and
    every image equals the unpreempted run (each row twice: 8 requests in phase)."""
    model_dir, config = model16
    llm = engines.get(f"swap16_small_{admission}", model_dir, attention_backend="adsa",
                      additional_config={"adsa": ENGINE | {"admission": admission}},
                      num_gpu_blocks_override=SMALL_POOL, max_num_seqs=16)
    eng, sched = llm.llm_engine, engine_scheduler(llm)
    m = sched.adsa_managers[0]
    bound, labels = None, {}
    for copy in range(2):
        for label, overrides, cls in ROWS:
            rid = f"{label}-{copy}-{time.monotonic_ns()}"
            labels[rid] = label
            eng.add_request(rid, {"prompt_token_ids": config.prompt(cls)}, _params(config, overrides))
    before = (sched.swaps.swapped_out, sched.swaps.recomputed)
    tokens, max_running = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = torch.tensor(list(out.outputs[0].token_ids))
        max_running = max(max_running, len(sched.running))
        if bound is None and m.requests:
            bound = max(e.bound for e in m.requests.values())
    swapped, recomputed = sched.swaps.swapped_out - before[0], sched.swaps.recomputed - before[1]
    assert recomputed == 0 and swapped > 0, (swapped, recomputed)
    assert max_running > (SMALL_POOL - 1) // bound, f"ran {max_running}; peak admission runs {(SMALL_POOL - 1) // bound}"
    for rid, label in labels.items():
        assert torch.equal(tokens[rid], unpreempted[label]), f"{rid}: differs from the unpreempted run"
    _assert_books_balance(llm)
