"""ADSA core on vllm.LLM (CPU, fp32): exact against the mask-based reference, evicted blocks really go back to the
pool (and are never read again), the per-request bound holds, nothing leaks, and the freed memory buys concurrency.

Engines (one alive at a time, see conftest.py), in file order:
  adsa16   16x16, engine default budget 0.5 / topk_v diverse; other policies and budgets through per-request
           overrides, all in one batch (`main16`), with a recorder of held blocks after every schedule().
           Token granularity (issue 12, worker/token_gather.py) rides in the same batch as per-request overrides;
           so does every policy of the registry at every granularity (test_every_policy_evicts_at_every_granularity).
  adsa24   24x24, engine default policy streaming (so an engine-level policy other than the default is covered);
           token granularity per request.
  none16   budget None at engine level.
  cap_*    exact small pools (num_gpu_blocks_override) for capacity, leak and abort checks.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from adsa_vllm.config import GRANULARITIES, ADSAConfig
from adsa_vllm.policy import POLICIES
from adsa_vllm.engine.observe import SchedulerWatch
from greedy_match import assert_greedy_matches_reference
from recorded_run import HeldRecorder, generate, manager, recorded_run, sampling_params, scheduler

C16 = (2, 7)
C24 = (1,)
ADSA_ON = dict(attention_backend="adsa")


def _kv_caches(llm):
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    caches = list(runner.kv_caches)
    ctx = runner.vllm_config.compilation_config.static_forward_context
    layer_ptrs = {l.kv_cache.data_ptr() for l in ctx.values() if isinstance(getattr(l, "kv_cache", None),
                                                                              torch.Tensor)}
    assert caches and {c.data_ptr() for c in caches} == layer_ptrs, "model_runner.kv_caches are not the layers' KV"
    return caches


def _mismatch(a, b):
    bad = (a != b).nonzero()
    return None if bad.numel() == 0 else int(bad[0, 0])


class GarbageWriter:
    """Wraps the ADSAManager instance's evict(): right after blocks are freed, overwrite those physical blocks in
    every layer's KV cache. With `kept=True` (the control) it instead overwrites a block the request still
    holds and attends to (logical block 0, a prefix block), to prove that garbage is visible when read."""

    def __init__(self, llm, value=1e4, kept=False):
        self.m, self.caches, self.value, self.kept = manager(llm), _kv_caches(llm), value, kept
        self.written: list[int] = []
        self.calls = 0
        self._orig = self.m.evict

        def evict(req_id, logical_blocks):
            blocks = self.m.req_to_blocks.get(req_id) or []
            phys = [blocks[j].block_id for j in logical_blocks if j < len(blocks) and not blocks[j].is_null]
            freed = self._orig(req_id, logical_blocks)
            if self.kept:
                phys = [blocks[0].block_id] if blocks and not blocks[0].is_null and freed else []
            if phys:
                idx = torch.tensor(phys)
                for kv in self.caches:
                    kv[idx] = self.value
                self.written.extend(phys)
            self.calls += 1
            return freed
        self.m.evict = evict

    def remove(self):
        del self.m.evict


# ====================================================================== adsa16: one batch, many checks

MAIN_REQUESTS = ([("diverse", c, None) for c in C16]
                 + [("similar", c, {"keep": "similar"}) for c in C16]
                 + [("streaming", c, {"policy": "streaming"}) for c in C16]
                 + [("random", C16[0], {"policy": "random", "seed": 3}),
                    ("attention_mass", C16[0], {"policy": "attention_mass"}),
                    ("refresh32", C16[0], {"refresh": 32}),       # slack 2: two blocks may enter between selections
                    ("budget0.25", C16[0], {"budget": 0.25}),
                    ("budget0.25json", C16[1], '{"budget": 0.25}'),   # the HTTP (vllm_xargs) JSON-string form
                    ("cover", C16[0], {"budget": 257}),           # int budget covering the whole sequence
                    ("cover_frac", C16[1], {"budget": 1.0})]      # fraction 1.0 also keeps everything
                 + [("tok_diverse", c, {"granularity": "token"}) for c in C16]
                 + [("tok_similar", C16[0], {"granularity": "token", "keep": "similar"}),
                    ("tok_streaming", C16[0], {"granularity": "token", "policy": "streaming"}),
                    ("tok_random", C16[1], {"granularity": "token", "policy": "random", "seed": 3}),
                    ("tok_attention_mass", C16[0], {"granularity": "token", "policy": "attention_mass"}),
                    # with fewer slots: both attention-mass rows score in the same forwards with other candidate
                    # counts (one scoring group each)
                    ("tok_attention_mass96", C16[1], {"granularity": "token", "policy": "attention_mass",
                                                      "budget": 96}),
                    ("tok_budget0.25", C16[1], {"granularity": "token", "budget": 0.25}),   # no top-k slot
                    ("tok_budget96", C16[1], {"granularity": "token", "budget": 96}),
                    # head classes given (the registry entries below would run head_split with every head a sink)
                    ("head_split", C16[1], {"policy": "head_split", "heads": "LS/SL"}),
                    ("tok_head_split", C16[0], {"granularity": "token", "policy": "head_split", "heads": "SL/LS"})])
ENGINE16 = {"budget": 0.5, "policy": "topk_v"}   # adsa16's engine defaults


def _settings16(overrides) -> ADSAConfig:
    """What a MAIN_REQUESTS entry runs with: adsa16's defaults and its overrides (a dict, or the JSON string)."""
    return ADSAConfig.from_dict(ENGINE16).merged(json.loads(overrides) if isinstance(overrides, str) else overrides)


def _evicts16(adsa: ADSAConfig) -> bool:
    return adsa.layout(block_size=16, cls_token_num=1, grid_size=16).evicts


# Every policy the settings accept (the scorer registry, not a hand list) at every granularity evicts in the main
# batch: a combination no entry above covers gets one here, so a new policy is tested without editing this file.
_COVERED = {(a.policy, a.granularity) for a in map(_settings16, (ov for _, _, ov in MAIN_REQUESTS)) if _evicts16(a)}
MAIN_REQUESTS += [(f"{g}_{p}", C16[0], {"policy": p, "granularity": g})
                  for p in POLICIES for g in GRANULARITIES if (p, g) not in _COVERED]


def _adsa16(engines, model16):
    model_dir, config = model16
    return engines.get("adsa16", model_dir, **ADSA_ON, additional_config={"adsa": ENGINE16}), config, model_dir


@pytest.fixture(scope="module")
def main16(engines, model16):
    llm, config, _ = _adsa16(engines, model16)
    return recorded_run(llm, config, MAIN_REQUESTS)


def _by_label(main, label):
    return {lab: rid for rid, lab in main["labels"].items()}[label]


def _assert_matches(reference, model_dir, got, classes, adsa=None, label="", block_size=16):
    """vLLM's greedy tokens [B, n] equal the reference's (adsa None: full attention) token for token, except at
    near-ties of the reference teacher-forced on them (tests/greedy_match.py)."""
    got = torch.as_tensor(got).reshape(len(classes), -1)
    own = reference.greedy(model_dir, tuple(classes), adsa) if block_size == 16 else None   # cached, with logprobs
    assert_greedy_matches_reference(got, reference.models[str(model_dir)], list(classes), own=own, adsa=adsa,
                                    block_size=block_size, label=label)


def _assert_equals_reference(tokens, label, adsa, model, classes, reference):
    """vLLM's greedy ADSA images equal the reference ADSA's (near-ties aside) and differ from full attention."""
    model_dir, config = model
    got = torch.stack([tokens[f"{label}/{c}"] for c in classes])
    want = reference.greedy(model_dir, classes, adsa).tokens
    full = reference.greedy(model_dir, classes).tokens
    assert got.shape == (len(classes), config.image_tokens)
    _assert_matches(reference, model_dir, got, classes, adsa, label)
    # The check can fail: ADSA at 50% changes the image somewhere (else equality above would prove nothing).
    assert not torch.equal(want, full), f"{label}: reference ADSA equals full attention; pick another seed"
    assert not torch.equal(got, full)


@pytest.mark.parametrize("label,adsa", [
    ("diverse", ADSAConfig(budget=0.5, policy="topk_v", keep="diverse")),
    ("similar", ADSAConfig(budget=0.5, policy="topk_v", keep="similar")),
    ("streaming", ADSAConfig(budget=0.5, policy="streaming")),
])
def test_adsa_greedy_equals_reference_16x16(label, adsa, main16, model16, reference):
    _assert_equals_reference(main16["tokens"], label, adsa, model16, C16, reference)
    for c in C16:
        rid = _by_label(main16, f"{label}/{c}")
        assert main16["stats"]["requests"][rid]["freed_blocks"] > 0


@pytest.mark.parametrize("module,labels", [("summaries", ("diverse", "similar")),
                                           ("token_gather", ("tok_diverse", "tok_random"))])
def test_bounded_scratch_memory_changes_nothing(module, labels, main16, engines, model16, monkeypatch):
    """Temporary device memory is bounded by working in chunks (many sequences may reach a selection in one step):
    TopK-V summaries are written and read a few blocks and rows at a time (worker/summaries.py), token-granularity
    scores a few layers at a time (worker/token_gather.py; the random policy's hash must see each row's own layer).
    The smallest chunks (SCRATCH_BYTES 1) give the very same images."""
    import importlib
    llm, config, _ = _adsa16(engines, model16)
    monkeypatch.setattr(importlib.import_module(f"adsa_vllm.worker.{module}"), "SCRATCH_BYTES", 1)
    requests = [r for r in MAIN_REQUESTS if r[0] in labels]
    tokens, _ = generate(llm, config, [(f"{lab}/{c}", c, ov) for lab, c, ov in requests])
    for label, got in tokens.items():
        assert torch.equal(got, main16["tokens"][label]), label


@pytest.mark.parametrize("label,adsa", [
    ("random", ADSAConfig(budget=0.5, policy="random", seed=3)),
    ("attention_mass", ADSAConfig(budget=0.5, policy="attention_mass")),
    ("refresh32", ADSAConfig(budget=0.5, policy="topk_v", refresh=32)),
])
def test_adsa_other_policies_per_request_equal_reference(label, adsa, main16, model16, reference):
    model_dir, _ = model16
    c = C16[0]
    got = main16["tokens"][f"{label}/{c}"]
    _assert_matches(reference, model_dir, got, (c,), adsa, label)
    assert not torch.equal(got, reference.greedy(model_dir, C16).tokens[0])
    assert main16["stats"]["requests"][_by_label(main16, f"{label}/{c}")]["freed_blocks"] > 0


TOKEN16 = [
    ("tok_diverse", ADSAConfig(budget=0.5, policy="topk_v", granularity="token"), C16),   # the engine's policy
    ("tok_similar", ADSAConfig(budget=0.5, policy="topk_v", keep="similar", granularity="token"), C16[:1]),
    ("tok_streaming", ADSAConfig(budget=0.5, policy="streaming", granularity="token"), C16[:1]),
    ("tok_random", ADSAConfig(budget=0.5, policy="random", seed=3, granularity="token"), C16[1:]),
    ("tok_attention_mass", ADSAConfig(budget=0.5, policy="attention_mass", granularity="token"), C16[:1]),
    ("tok_attention_mass96", ADSAConfig(budget=96, policy="attention_mass", granularity="token"), C16[1:]),
    ("tok_budget0.25", ADSAConfig(budget=0.25, policy="topk_v", granularity="token"), C16[1:]),
    ("tok_budget96", ADSAConfig(budget=96, policy="topk_v", granularity="token"), C16[1:]),
]


def _assert_token_mode_equals_reference(tokens, label, adsa, classes, model, reference, stats_of=None):
    """vLLM's token-granularity images equal the reference's (near-ties aside, tests/greedy_match.py); they differ
    from full attention and from block granularity, so the per-head selection is really what ran, except where
    both modes keep the same tokens by construction: streaming, or a budget with no top-k slot."""
    model_dir, config = model
    got = torch.stack([tokens[f"{label}/{c}"] for c in classes])
    _assert_matches(reference, model_dir, got, classes, adsa, label)
    assert not torch.equal(got, reference.greedy(model_dir, classes).tokens), f"{label}: equals full attention"
    block = reference.greedy(model_dir, classes, replace(adsa, granularity="block")).tokens
    layout = adsa.layout(block_size=16, cls_token_num=config.cls_token_num, grid_size=config.grid_size)
    same = adsa.policy == "streaming" or layout.topk_blocks == 0
    assert torch.equal(got, block) == same, f"{label}: token vs block mode"


@pytest.mark.parametrize("label,adsa,classes", TOKEN16, ids=[t[0] for t in TOKEN16])
def test_token_granularity_equals_reference_16x16(label, adsa, classes, main16, model16, reference):
    _assert_token_mode_equals_reference(main16["tokens"], label, adsa, classes, model16, reference)
    for c in classes:
        assert main16["stats"]["requests"][_by_label(main16, f"{label}/{c}")]["freed_blocks"] > 0


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_evicts_at_every_granularity(policy, granularity, main16, model16, reference):
    """No silent fallback (issue 22): every policy the settings accept, at each granularity, through vllm.LLM. Each
    evicting request of it frees blocks, never holds more than its bound, and its image differs from full attention;
    the first equals the reference ADSA with those settings (its evictions decided by that policy's scorer)."""
    model_dir, _ = model16
    runs = [(f"{label}/{c}", c, adsa) for label, c, adsa in ((lab, c, _settings16(ov)) for lab, c, ov in MAIN_REQUESTS)
            if (adsa.policy, adsa.granularity) == (policy, granularity) and _evicts16(adsa)]
    assert runs, f"no evicting request of {policy} at granularity {granularity} in the main batch"
    full = reference.greedy(model_dir, C16).tokens
    for label, c, _ in runs:
        st = main16["stats"]["requests"][_by_label(main16, label)]
        assert st["freed_blocks"] > 0, f"{label}: nothing freed"
        assert 0 < st["peak_held_blocks"] <= st["bound_blocks"], (label, st)
        assert not torch.equal(main16["tokens"][label], full[C16.index(c)]), f"{label}: equals full attention"
    label, c, adsa = runs[0]
    _assert_matches(reference, model_dir, main16["tokens"][label], (c,), adsa, label)


def test_blocks_were_freed_to_the_pool(main16):
    assert main16["stats"]["total_freed_blocks"] > 0
    assert main16["freed"] > 0


def test_budget_covering_sequence_per_request_equals_full_and_frees_nothing(main16, model16, reference):
    model_dir, _ = model16
    for label, row in (("cover", 0), ("cover_frac", 1)):
        c = C16[row]
        got = main16["tokens"][f"{label}/{c}"]
        _assert_matches(reference, model_dir, got, (c,), None, label)
        rid = _by_label(main16, f"{label}/{c}")
        st = main16["stats"]["requests"][rid]
        assert st["freed_blocks"] == 0, st
        # Every block ever allocated stays: the 256 fed positions (the last image token is emitted, never fed).
        assert st["peak_held_blocks"] == 16, st


def test_held_blocks_never_exceed_budget_plus_slack(main16):
    rec = main16["rec"]
    assert set(rec.log) == set(main16["labels"])
    for rid, held in rec.log.items():
        layout = rec.layout[rid]
        label = main16["labels"][rid]
        bound = min(rec.bound[rid], layout.max_blocks)
        assert max(held) <= bound, f"{label}: held {max(held)} > budget {layout.budget_blocks} + slack " \
                                   f"{layout.slack_blocks}"
        assert max(held) <= layout.held_bound
        st = main16["stats"]["requests"][rid]
        if st["freed_blocks"]:
            assert max(held) == bound, f"{label}: the bound {bound} is never reached (max held {max(held)})"
        else:   # nothing evicted: all blocks of the fed positions (the last image token is never fed)
            assert max(held) == -(-(layout.seq_len - 1) // layout.block_size), label
        assert st["peak_held_blocks"] == max(held) and st["bound_blocks"] == layout.held_bound


def test_per_request_budget_override(main16, model16, reference):
    model_dir, _ = model16
    c = C16[0]
    lo, hi = _by_label(main16, f"budget0.25/{c}"), _by_label(main16, f"diverse/{c}")
    peak_lo, peak_hi = max(main16["rec"].log[lo]), max(main16["rec"].log[hi])
    assert peak_lo < peak_hi, (peak_lo, peak_hi)
    assert main16["rec"].layout[lo].budget_blocks == 4 and main16["rec"].layout[hi].budget_blocks == 8
    got = main16["tokens"][f"budget0.25/{c}"]
    _assert_matches(reference, model_dir, got, (c,), ADSAConfig(budget=0.25, policy="topk_v"), "budget0.25")
    assert not torch.equal(got, main16["tokens"][f"diverse/{c}"])
    c = C16[1]
    got = main16["tokens"][f"budget0.25json/{c}"]
    _assert_matches(reference, model_dir, got, (c,), ADSAConfig(budget=0.25, policy="topk_v"), "JSON-string override")
    assert main16["rec"].layout[_by_label(main16, f"budget0.25json/{c}")].budget_blocks == 4


def test_no_leak_after_all_requests_finish(main16):
    assert main16["free_after"] == main16["free_before"] == main16["num_blocks"] - 1   # block 0 is the null block
    assert main16["live_after"] == {} and main16["sched_requests_after"] == {}


# ---------------------------------------------------------------------- safety: freed blocks are never read

def test_freed_blocks_overwritten_with_garbage_do_not_change_outputs(engines, model16, main16):
    llm, config, _ = _adsa16(engines, model16)
    reqs = ([(f"diverse/{c}", c, None) for c in C16] + [(f"streaming/{C16[0]}", C16[0], {"policy": "streaming"})]
            + [(f"{lab}/{c}", c, ov) for lab, c, ov in MAIN_REQUESTS if lab in ("tok_diverse", "tok_attention_mass")])
    # Finite garbage: a freed block is typically handed straight to another sequence as its new tail, whose
    # not-yet-written slots the CPU kernel masks by value (NaN there would poison even stock vLLM; see report).
    gw = GarbageWriter(llm, value=1e4)
    try:
        tokens, _ = generate(llm, config, reqs)
    finally:
        gw.remove()
    assert len(gw.written) > 0 and gw.calls > 0, "no block was freed, the test proves nothing"
    for label, _, _ in reqs:
        step = _mismatch(tokens[label], main16["tokens"][label])
        assert torch.equal(tokens[label], main16["tokens"][label]), \
            f"{label}: garbage in freed blocks changed the output at step {step}"


def test_garbage_writer_control_kept_block_changes_output(engines, model16, main16):
    llm, config, _ = _adsa16(engines, model16)
    c = C16[0]
    gw = GarbageWriter(llm, value=1e4, kept=True)
    try:
        tokens, _ = generate(llm, config, [("ctl", c, None)], n=200)
    finally:
        gw.remove()
    assert gw.written, "the control never wrote (no eviction within 200 tokens)"
    assert not torch.equal(tokens["ctl"], main16["tokens"][f"diverse/{c}"][:200]), \
        "garbage in a kept block did not change the output: the writer does not reach the KV the kernel reads"
    # The engine still produces the clean result afterwards (block 0 of that request was freed with it).
    again, _ = generate(llm, config, [("again", c, None)])
    assert torch.equal(again["again"], main16["tokens"][f"diverse/{c}"])


# ====================================================================== adsa24

TOKEN24 = [("tok_diverse", ADSAConfig(budget=0.5, policy="topk_v", granularity="token")),
           ("tok_random", ADSAConfig(budget=0.5, policy="random", seed=5, granularity="token")),
           ("tok_attention_mass", ADSAConfig(budget=0.5, policy="attention_mass", granularity="token"))]

@pytest.fixture(scope="module")
def main24(engines, model24):
    model_dir, config = model24
    llm = engines.get("adsa24", model_dir, **ADSA_ON,
                      additional_config={"adsa": {"budget": 0.5, "policy": "streaming"}})
    reqs = ([(f"streaming/{c}", c, None) for c in C24]
            + [(f"diverse/{c}", c, {"policy": "topk_v"}) for c in C24]
            + [(f"similar/{c}", c, {"policy": "topk_v", "keep": "similar"}) for c in C24]
            + [(f"{label}/{c}", c, {"granularity": "token", "policy": a.policy, "seed": a.seed})
               for label, a in TOKEN24 for c in C24])
    freed0 = manager(llm).total_freed
    tokens, _ = generate(llm, config, reqs)
    return dict(tokens=tokens, freed=manager(llm).total_freed - freed0)


@pytest.mark.parametrize("label,adsa", [
    ("streaming", ADSAConfig(budget=0.5, policy="streaming")),
    ("diverse", ADSAConfig(budget=0.5, policy="topk_v", keep="diverse")),
    ("similar", ADSAConfig(budget=0.5, policy="topk_v", keep="similar")),
])
def test_adsa_greedy_equals_reference_24x24(label, adsa, main24, model24, reference):
    _assert_equals_reference(main24["tokens"], label, adsa, model24, C24, reference)
    assert main24["freed"] > 0


@pytest.mark.parametrize("label,adsa", TOKEN24, ids=[t[0] for t in TOKEN24])
def test_token_granularity_equals_reference_24x24(label, adsa, main24, model24, reference):
    _assert_token_mode_equals_reference(main24["tokens"], label, adsa, C24, model24, reference)


# ====================================================================== budget None at engine level

def test_engine_budget_none_equals_full_attention_and_frees_nothing(engines, model16, reference):
    model_dir, config = model16
    llm = engines.get("none16", model_dir, **ADSA_ON, additional_config={"adsa": {"budget": None}})
    sched = scheduler(llm)
    tokens, outs = generate(llm, config, [(c, c, None) for c in C16])
    _assert_matches(reference, model_dir, torch.stack([tokens[c] for c in C16]), C16, None, "budget None")
    stats = sched.adsa_stats()
    assert stats["enabled"] and stats["total_freed_blocks"] == 0
    assert all(r["freed_blocks"] == 0 and r["peak_held_blocks"] == 16 for r in stats["requests"].values()), stats


# ====================================================================== capacity, leaks, aborts

# 24x24 images: a full-length sequence stores 1 + 576 - 1 = 576 tokens = 36 blocks; ADSA at 50% holds at most
# 18 + 1 (slack) = 19, so the ratio is 1.89. (At 16x16 it is 16 / (8 + 1) = 1.78: below the 1.8 target.)
FULL_BLOCKS = 36
N_FULL = 6                       # the pool holds exactly N_FULL full-length 24x24 sequences
POOL = N_FULL * FULL_BLOCKS + 1  # + the null block
NUM_REQ = 2 * N_FULL
IMAGE = 576


def _capacity_engine(engines, model24, adsa: bool):
    model_dir, config = model24
    kw = dict(**ADSA_ON, additional_config={"adsa": {"budget": 0.5, "policy": "topk_v"}}) if adsa else {}
    llm = engines.get(f"cap_{'adsa' if adsa else 'full'}", model_dir, num_gpu_blocks_override=POOL,
                      max_num_seqs=64, **kw)
    return llm, config


@pytest.fixture(scope="module")
def capacity_numbers():
    return {}


def test_capacity_adsa_runs_more_sequences_without_preemption(engines, model24, reference, capacity_numbers):
    llm, config = _capacity_engine(engines, model24, adsa=True)
    sched, m = scheduler(llm), manager(llm)
    assert m.block_pool.num_gpu_blocks == POOL
    free0 = m.block_pool.get_num_free_blocks()
    assert free0 == POOL - 1
    with SchedulerWatch(sched) as conc:   # max len(running) after schedule() and preemptions, stock scheduler too
        tokens, outs = generate(llm, config, [(i, i % 10, None) for i in range(NUM_REQ)])
    capacity_numbers["adsa"] = (conc.max_running, conc.preemptions)
    msg = f"ADSA: max running {conc.max_running} (scheduler.max_running {sched.max_running}), preemptions " \
          f"{conc.preemptions} (scheduler.num_preemptions {sched.num_preemptions}); need >= {1.8 * N_FULL}"
    assert all(len(t) == IMAGE for t in tokens.values()), msg
    assert sched.max_running >= 1.8 * N_FULL and conc.max_running >= 1.8 * N_FULL, msg
    assert sched.num_preemptions == 0 and conc.preemptions == 0, msg
    # Memory pressure does not change results: same tokens as the reference ADSA.
    _assert_matches(reference, model24[0], torch.stack([tokens[0], tokens[1]]), (0, 1),
                    ADSAConfig(budget=0.5, policy="topk_v"), "capacity")
    # ... and nothing leaked.
    assert m.block_pool.get_num_free_blocks() == free0 and not m.requests


def test_no_leak_after_aborts_mid_generation(engines, model24):
    llm, config = _capacity_engine(engines, model24, adsa=True)
    sched, m, eng = scheduler(llm), manager(llm), llm.llm_engine
    free0 = m.block_pool.get_num_free_blocks()
    assert free0 == POOL - 1
    ids = [f"abort{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, {"prompt_token_ids": config.prompt(i)}, sampling_params(config.image_tokens))
    eng.step()
    eng.step()
    eng.abort_request([ids[0]])                     # early: before any eviction
    freed0 = m.total_freed
    steps = 0
    while m.total_freed == freed0:                  # run until evictions happened
        eng.step()
        steps += 1
        assert steps < IMAGE, "no eviction happened"
    for _ in range(3):
        eng.step()
    held = {r: m.held_blocks(r) for r in m.requests}
    assert held and all(h > 0 for h in held.values())
    eng.abort_request(ids[1:3])                     # after evictions: some blocks already null
    for _ in range(5):
        eng.step()
    eng.abort_request([ids[3]])
    finished = []
    while eng.has_unfinished_requests():
        finished += [o for o in eng.step() if o.finished]
    assert sorted(o.request_id for o in finished) == sorted(ids[4:])
    assert all(len(o.outputs[0].token_ids) == IMAGE for o in finished)
    assert m.block_pool.get_num_free_blocks() == free0, f"leaked {free0 - m.block_pool.get_num_free_blocks()}"
    assert m.requests == {} and sched.requests == {} and not sched.running and not sched.waiting


def test_capacity_full_attention_baseline_cannot_keep_up(engines, model24, capacity_numbers):
    llm, config = _capacity_engine(engines, model24, adsa=False)
    sched = scheduler(llm)
    assert not hasattr(sched, "adsa_managers")  # the stock scheduler
    with SchedulerWatch(sched) as conc:   # max len(running) after schedule() and preemptions, stock scheduler too
        tokens, outs = generate(llm, config, [(i, i % 10, None) for i in range(NUM_REQ)])
    capacity_numbers["full"] = (conc.max_running, conc.preemptions)
    print(f"capacity (max running, preemptions): ADSA {capacity_numbers.get('adsa')}, full {capacity_numbers['full']}")
    msg = f"full attention: max running {conc.max_running}, preemptions {conc.preemptions}; " \
          f"ADSA (max running, preemptions) = {capacity_numbers.get('adsa')}; threshold {1.8 * N_FULL}"
    assert all(len(t) == IMAGE for t in tokens.values()), msg
    assert conc.max_running < 1.8 * N_FULL or conc.preemptions > 0, msg


# ====================================================================== invalid configuration fails at startup

@pytest.mark.parametrize("kwargs,match", [
    (dict(additional_config={"adsa": {"budget": 16}}),
     r"adsa\.budget=16 gives 1 blocks .*raise the budget to at least 64 tokens"),
    (dict(block_size=64, additional_config={"adsa": {"budget": 0.5}}),
     r"block.size 64 is not supported by ADSA; use .*16"),
    (dict(additional_config={"adsa": {"policy": "unknown"}}),
     r"adsa\.policy='unknown' is unknown; choose one of attention_mass, head_split, random, row_anchored, "
     r"streaming, topk_v"),
    (dict(additional_config={"adsa": {"bugdet": 0.5}}),
     r"unknown adsa setting\(s\) \['bugdet'\]; valid keys are .*'budget'"),
    (dict(additional_config={"adsa": {"keep": "both"}}),
     r"adsa\.keep='both' is unknown; choose one of diverse, similar"),
    (dict(additional_config={"adsa": {"admission": "fifo"}}),
     r"adsa\.admission='fifo': use one of peak, overcommit, average"),
    (dict(additional_config={"adsa": {"swap_space_gib": -1}}),
     r"adsa\.swap_space_gib=-1: use a number of GiB >= 0"),
])
def test_invalid_config_fails_at_startup(kwargs, match, engines, model16):
    from vllm import LLM
    engines.close()
    model_dir, _ = model16
    args = dict(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=16, attention_backend="adsa")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):   # pydantic's ValidationError is a ValueError
        LLM(**args)


# A non-object "adsa" value must fail with ADSAConfig's clear message, and null means {} (ADSA on or off).
@pytest.mark.parametrize("adsa_value,backend", [("x", "adsa"), (["budget"], "adsa"), ("x", None)])
def test_adsa_setting_not_an_object_fails_with_clear_message(adsa_value, backend, engines, model16):
    from vllm import LLM
    engines.close()
    model_dir, _ = model16
    with pytest.raises(ValueError, match=r'"adsa" must be a JSON object'):
        LLM(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=16, attention_backend=backend,
            additional_config={"adsa": adsa_value})


@pytest.mark.parametrize("backend", ["adsa", None])
def test_adsa_setting_null_is_accepted_like_empty(backend, model16):
    from vllm.engine.arg_utils import EngineArgs
    model_dir, _ = model16
    vc = EngineArgs(model=str(model_dir), dtype="float32", attention_backend=backend,
                    additional_config={"adsa": None}).create_engine_config()
    from adsa_vllm.settings import EngineSettings
    assert (EngineSettings.from_vllm_config(vc).adsa is not None) == (backend == "adsa")


# ====================================================================== block size 32

def test_block_size_32_equals_reference(engines, model16, reference):
    model_dir, config = model16
    llm = engines.get("adsa16_bs32", model_dir, **ADSA_ON, block_size=32,
                      additional_config={"adsa": {"budget": 0.5, "policy": "topk_v"}})
    rec = HeldRecorder(llm)
    try:
        tokens, _ = generate(llm, config, [(c, c, None) for c in C16])
    finally:
        rec.remove()
    reference.greedy(model_dir, C16[:1])   # loads and caches the reference model
    _assert_matches(reference, model_dir, torch.stack([tokens[c] for c in C16]), C16,
                    ADSAConfig(budget=0.5, policy="topk_v"), "block size 32", block_size=32)
    stats = scheduler(llm).adsa_stats()
    assert stats["total_freed_blocks"] > 0
    for rid, held in rec.log.items():
        layout = rec.layout[rid]
        assert layout.block_size == 32 and max(held) <= layout.budget_blocks + layout.slack_blocks



# ====================================================================== query scoring, one layer per scorer call

def test_query_policies_equal_reference_with_one_layer_per_scoring_call(engines, model16, reference, monkeypatch):
    """The saved-query scoring folds layers into one scorer call (worker/query_scoring.py); with the scratch limit
    at one layer per call every chunk boundary is crossed, and the images still equal the reference's. The engine's
    default needs the query, so its forward copies on every step (what its CUDA graphs replay on a GPU)."""
    import adsa_vllm.worker.token_gather as token_gather
    monkeypatch.setattr(token_gather, "SCRATCH_BYTES", 1)
    model_dir, config = model16
    llm = engines.get("adsa16_query_chunk1", model_dir, **ADSA_ON,
                      additional_config={"adsa": {"budget": 0.5, "policy": "attention_mass"}})
    cases = [("attention_mass", None),
             ("head_split_token", {"policy": "head_split", "heads": "SL/LS", "granularity": "token"}),
             ("row_anchored", {"policy": "row_anchored"})]
    run = recorded_run(llm, config, [(label, C16[0], ov) for label, ov in cases])
    for label, ov in cases:
        adsa = ADSAConfig(budget=0.5, policy="attention_mass").merged(ov)
        _assert_matches(reference, model_dir, run["tokens"][f"{label}/{C16[0]}"], (C16[0],), adsa, label)
    assert run["freed"] > 0 and run["free_after"] == run["free_before"]
