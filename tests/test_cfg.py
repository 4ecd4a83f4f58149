"""Classifier-free guidance on vllm.LLM (CPU, fp32) against the plain-PyTorch reference CFG.

Under CFG a request is a conditional/unconditional pair inside one sequence (adsa_vllm/llamagen/model.py): the
scheduler admits, preempts, aborts and finishes it as one unit and one token is sampled for both branches, so
"both members emit the same token" holds by construction. What can go wrong, and is tested here, is everything
the pair computes: the null-class branch, the guided logits u + s (c - u) per request, the interval, the seeded
sampler, ADSA's shared selection for the pair, and recomputation after preemption.

Engines (one alive at a time, see conftest.py): cfg16 (guidance, full attention), cfg16_adsa_block (guidance + ADSA
50%), cfg16_adsa_token (the same at token granularity), cfg16_small (guidance, a pool of 3 sequences for 8 images: preemption must happen), plain16 (no guidance).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.llamagen.convert import load_reference
from adsa_vllm.engine.observe import SchedulerWatch, engine_scheduler
from adsa_vllm.guidance import GuidanceConfigError
from adsa_vllm.guidance.api import generate_images
from adsa_vllm.reference.generate import generate, score_tokens
from greedy_match import assert_greedy_matches_reference, check_greedy, teacher_forced_logprobs

CLASSES = list(range(8))
SCALE = 3.0
SAMPLING = dict(seed=11, top_k=20, temperature=1.0, logprobs=5)
ADSA50 = ADSAConfig(budget=0.5)
TOKEN50 = ADSAConfig(budget=0.5, granularity="token")


def _cfg_engine(engines, model16, key="cfg16", **kw):
    model_dir, config = model16
    kw.setdefault("additional_config", {"cfg": {"scale": SCALE}})
    return engines.get(key, model_dir, **kw), config


def _mismatch(a, b):
    bad = (torch.as_tensor(a) != torch.as_tensor(b)).nonzero()
    return None if bad.numel() == 0 else bad[0].tolist()


@pytest.fixture(scope="module")
def ref_model(model16):
    return load_reference(model16[0])


def _check_against_reference(outputs, tokens, ref_logprobs):
    """Every returned logprob (sampled token and top-5) equals the reference guided distribution to 1e-4."""
    worst = 0.0
    for i, o in enumerate(outputs):
        for j, step in enumerate(o.outputs[0].logprobs):
            assert int(tokens[i, j]) in step
            for t, lp in step.items():
                worst = max(worst, abs(lp.logprob - float(ref_logprobs[i, j, t])))
    assert worst < 1e-4, worst


# ---------------------------------------------------------------- greedy, ADSA off and on

def _adsa_engine(engines, model16, adsa: ADSAConfig):
    """The CFG engine with these ADSA engine defaults (budget, and granularity when token)."""
    defaults = {"budget": adsa.budget} | ({"granularity": "token"} if adsa.granularity == "token" else {})
    return _cfg_engine(engines, model16, key=f"cfg16_adsa_{adsa.granularity}", attention_backend="adsa",
                       additional_config={"cfg": {"scale": SCALE}, "adsa": defaults})


@pytest.mark.parametrize("adsa", [None, ADSA50, TOKEN50], ids=["full", "adsa50", "token50"])
def test_greedy_cfg_equals_reference(adsa, engines, model16, ref_model):
    if adsa is None:
        llm, _ = _cfg_engine(engines, model16)
    else:
        llm, _ = _adsa_engine(engines, model16, adsa)
        manager = llm.llm_engine.engine_core.engine_core.scheduler.adsa_managers[0]
        freed0 = manager.total_freed
    got = generate_images(llm, CLASSES, greedy=True, logprobs=1)
    want = generate(ref_model, CLASSES, greedy=True, cfg_scale=SCALE, adsa=adsa, cfg_selection="shared",
                    return_logprobs=True)
    assert got.tokens.shape == (8, 256)
    # Token equality except at near-ties (tests/greedy_match.py), on the reference teacher-forced on vLLM's tokens.
    lp = teacher_forced_logprobs(got.tokens, ref_model, CLASSES, own=want, cfg_scale=SCALE, adsa=adsa,
                                 cfg_selection="shared")
    check_greedy(got.tokens, lp, cfg_scale=SCALE, label=f"adsa={adsa}")
    _check_against_reference(got.outputs, torch.as_tensor(got.tokens), lp)
    if adsa is not None:
        assert manager.total_freed - freed0 > 0, "ADSA freed nothing: the test proves nothing about eviction"
        # The guided images differ from the unguided ones (the null branch really is used).
        plain = generate(ref_model, CLASSES[:2], greedy=True, adsa=adsa)
        assert not torch.equal(plain.tokens, want.tokens[:2])


@pytest.mark.parametrize("adsa", [
    ADSAConfig(budget=0.5, policy="topk_v", keep="similar", granularity="token"),
    ADSAConfig(budget=0.5, policy="streaming", granularity="token"),
    ADSAConfig(budget=0.5, policy="random", seed=3, granularity="token"),
    ADSAConfig(budget=0.5, policy="attention_mass", granularity="token"),
], ids=lambda a: f"{a.policy}-{a.keep}")
def test_token_granularity_cfg_pairs_select_per_head_together_like_the_reference(adsa, engines, model16, ref_model):
    """Every policy at token granularity under CFG (engine default token, policy per request): a pair's halves
    decide together by the sum of their heads' scores, as the reference's shared selection."""
    from vllm import SamplingParams
    llm, config = _adsa_engine(engines, model16, TOKEN50)
    classes = CLASSES[:2]
    overrides = {"policy": adsa.policy, "keep": adsa.keep, "seed": adsa.seed}
    params = SamplingParams(temperature=0.0, max_tokens=config.image_tokens, detokenize=False,
                            extra_args={"adsa": overrides})
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c in classes], params, use_tqdm=False)
    got = torch.tensor([list(o.outputs[0].token_ids) for o in outs])
    want = generate(ref_model, classes, greedy=True, cfg_scale=SCALE, adsa=adsa, cfg_selection="shared",
                    return_logprobs=True)
    assert_greedy_matches_reference(got, ref_model, classes, cfg_scale=SCALE, own=want, adsa=adsa,
                                    cfg_selection="shared", label=adsa.policy)
    block = generate(ref_model, classes, greedy=True, cfg_scale=SCALE, adsa=replace(adsa, granularity="block"),
                     cfg_selection="shared")
    assert torch.equal(got, block.tokens) == (adsa.policy == "streaming")


def test_aborted_pairs_free_everything_and_leave_the_others_exact(engines, model16, ref_model):
    """An abort ends the whole pair (one request); with ADSA evicting, nothing leaks and the rest stay exact."""
    from vllm import SamplingParams
    llm, config = _adsa_engine(engines, model16, ADSA50)
    eng = llm.llm_engine
    pool = eng.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    ids = [f"pair{c}" for c in CLASSES[:4]]
    for c, rid in zip(CLASSES[:4], ids):
        eng.add_request(rid, {"prompt_token_ids": config.prompt(c)},
                        SamplingParams(max_tokens=config.image_tokens, temperature=0.0, detokenize=False))
    for _ in range(3):
        eng.step()
    eng.abort_request([ids[0]])                       # before any eviction
    for _ in range(150):                              # past the 50% budget: evictions happened
        eng.step()
    eng.abort_request([ids[1]])
    finished = {}
    while eng.has_unfinished_requests():
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert sorted(finished) == ids[2:]
    assert pool.get_num_free_blocks() == free0, f"leaked {free0 - pool.get_num_free_blocks()} blocks"
    got = torch.tensor([list(finished[r].outputs[0].token_ids) for r in ids[2:]])
    assert_greedy_matches_reference(got, ref_model, CLASSES[2:4], cfg_scale=SCALE, adsa=ADSA50, cfg_selection="shared")


# ---------------------------------------------------------------- seeded sampling

@pytest.fixture(scope="module")
def sampled(engines, model16):
    llm, _ = _cfg_engine(engines, model16)
    first = generate_images(llm, CLASSES, **SAMPLING)
    again = generate_images(llm, CLASSES, **SAMPLING)
    other = generate_images(llm, CLASSES, **{**SAMPLING, "seed": 12})
    return first, again, other


def test_seeded_sampling_is_reproducible(sampled):
    first, again, other = sampled
    assert (first.tokens == again.tokens).all(), "the same seed gave different images"
    assert not (first.tokens == other.tokens).all(), "another seed gave the same images"
    assert len({tuple(r) for r in first.tokens.tolist()}) == len(CLASSES)  # image i uses seed + i


def test_seeded_sampling_guided_distributions_match_reference(sampled, ref_model):
    first, _, _ = sampled
    tokens = torch.as_tensor(first.tokens)
    lp = score_tokens(ref_model, CLASSES, tokens, cfg_scale=SCALE, cfg_selection="shared")
    _check_against_reference(first.outputs, tokens, lp)
    # top-k 20 really applied: every sampled token is among the 20 most likely of the guided distribution.
    rank = (lp > lp.gather(-1, tokens[..., None])).sum(-1)
    assert int(rank.max()) < 20


def test_cfg_interval_matches_reference(engines, model16, ref_model):
    llm, _ = _cfg_engine(engines, model16)
    got = generate_images(llm, CLASSES[:2], greedy=True, cfg_interval=3)
    # Tolerance of the largest scale used (SCALE, for the first tokens); the rest are conditional.
    assert_greedy_matches_reference(got.tokens, ref_model, CLASSES[:2], cfg_scale=SCALE, cfg_interval=3)
    always = generate(ref_model, CLASSES[:2], greedy=True, cfg_scale=SCALE)
    assert not torch.equal(torch.as_tensor(got.tokens), always.tokens), \
        "interval 3 changed nothing: the test proves nothing"


def test_per_request_scale_one_is_the_conditional_model(engines, model16, ref_model):
    llm, _ = _cfg_engine(engines, model16)
    got = generate_images(llm, CLASSES[:2], greedy=True, cfg_scale=1.0)
    assert_greedy_matches_reference(got.tokens, ref_model, CLASSES[:2], cfg_scale=1.0)


# ---------------------------------------------------------------- bad input: clear errors, engine keeps serving

@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg_scale=-1.0), "scale=-1.0: use a finite number >= 0"),
    (dict(cfg_interval=-2), "interval=-2: use -1"),
])
def test_bad_guidance_fails_the_request_only(kwargs, match, engines, model16, ref_model):
    llm, config = _cfg_engine(engines, model16)
    with pytest.raises(GuidanceConfigError, match=match):
        generate_images(llm, [1], greedy=True, **kwargs)
    from vllm import SamplingParams
    with pytest.raises(ValueError, match="unknown cfg setting"):   # through vLLM's own input checks
        llm.generate([{"prompt_token_ids": config.prompt(1)}],
                     SamplingParams(max_tokens=4, temperature=0.0, extra_args={"cfg": {"scael": 2.0}}))
    got = generate_images(llm, [1], greedy=True)
    assert_greedy_matches_reference(got.tokens, ref_model, [1], cfg_scale=SCALE)


# ---------------------------------------------------------------- preemption

def test_preempted_pairs_resume_in_step_and_equal_the_unpreempted_run(engines, model16, sampled):
    first, _, _ = sampled
    # 16x16: a sequence needs cdiv(257, 16) = 17 blocks; room for 3 of the 8 images (+ the null block).
    llm, _ = _cfg_engine(engines, model16, key="cfg16_small", num_gpu_blocks_override=3 * 17 + 1)
    sched = engine_scheduler(llm)
    with SchedulerWatch(sched) as watch:
        got = generate_images(llm, CLASSES, **SAMPLING)
    assert watch.preemptions > 0, "no preemption happened: the pool is too large for this test"
    assert (got.tokens == first.tokens).all(), _mismatch(got.tokens, first.tokens)
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 3 * 17   # nothing leaked


# ---------------------------------------------------------------- guidance off

def test_guidance_off_rejects_cfg_requests_with_the_fix(engines, model16):
    model_dir, config = model16
    llm = engines.get("plain16", model_dir)
    with pytest.raises(GuidanceConfigError, match='additional_config={"cfg"'):
        generate_images(llm, [1], cfg_scale=2.0)
    from vllm import SamplingParams
    with pytest.raises(ValueError, match="runs without classifier-free guidance"):
        llm.generate([{"prompt_token_ids": config.prompt(1)}],
                     SamplingParams(max_tokens=4, temperature=0.0, extra_args={"cfg": {"scale": 2.0}}))
    out = llm.generate([{"prompt_token_ids": config.prompt(1)}], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4
