"""A request that fails inside the worker fails alone: the engine, the other requests and the pool are unharmed.

Settings are validated in the API process (adsa_vllm/request_validation.py), so to reach the worker's last line of
defence (adsa_vllm/worker/failures.py) these tests switch that validation off for the requests they send.
"""

from __future__ import annotations

import pytest
from vllm import SamplingParams

import adsa_vllm.request_validation as request_validation

BAD_SETTINGS = [{"adsa": {"policy": "random", "seed": "3"}},   # a TypeError in the worker before the guard
                {"cfg": {"scale": "x"}},
                {"adsa": {"budget": -4}}]


@pytest.fixture(scope="module")
def guided(engines, model16):
    model_dir, config = model16
    llm = engines.get("cfg-adsa-failures", model_dir, attention_backend="adsa",
                      additional_config={"adsa": {"budget": 0.5}, "cfg": {"scale": 2.0}})
    return llm, config


def _params(config, extra_args=None):
    return SamplingParams(temperature=0.0, max_tokens=config.image_tokens, detokenize=False, extra_args=extra_args)


def _free_blocks(llm) -> int:
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=["seed-string", "cfg-scale-string", "budget-negative"])
def test_bad_request_in_the_worker_fails_alone(bad, guided, monkeypatch):
    llm, config = guided
    good = [{"prompt_token_ids": config.prompt(c)} for c in (1, 2)]
    alone = [list(o.outputs[0].token_ids) for o in llm.generate(good, _params(config), use_tqdm=False)]
    free0 = _free_blocks(llm)

    monkeypatch.setattr(request_validation, "validate_request", lambda params, limits, prompt_len=None: None)
    outs = llm.generate([good[0], {"prompt_token_ids": config.prompt(3)}, good[1]],
                        [_params(config), _params(config, bad), _params(config)], use_tqdm=False)
    monkeypatch.undo()

    assert outs[1].outputs[0].finish_reason == "error", outs[1].outputs[0]
    assert len(outs[1].outputs[0].token_ids) < config.image_tokens
    # The requests batched with it ran to the end and equal their run without it.
    assert [list(outs[i].outputs[0].token_ids) for i in (0, 2)] == alone
    assert _free_blocks(llm) == free0
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    assert sched.num_worker_failures >= 1
    # And the engine keeps serving.
    again = [list(o.outputs[0].token_ids) for o in llm.generate(good, _params(config), use_tqdm=False)]
    assert again == alone


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_a_query_policy_whose_forward_saved_no_query_fails_alone(granularity, guided, monkeypatch):
    """As on a GPU engine with a query-free default whose attention replays from CUDA graphs (validation refuses
    such requests there; switched off here): the forward saves no query, so the selection cannot be scored. The
    request fails instead of scoring stale queries; the others run on unharmed. The first forward that asks does save
    (its buffer then exists, as after an eager step of a real engine), no later one does."""
    from adsa_vllm.worker.saved_queries import SavedQueries
    real_save = SavedQueries.save

    def save_once(self, layer, query, planned=True):
        if self.saved_step[layer] == -1:
            real_save(self, layer, query, planned)
    llm, config = guided
    good = [{"prompt_token_ids": config.prompt(c)} for c in (1, 2)]
    alone = [list(o.outputs[0].token_ids) for o in llm.generate(good, _params(config), use_tqdm=False)]
    free0 = _free_blocks(llm)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    failures0 = sched.num_worker_failures

    monkeypatch.setattr(request_validation, "validate_request", lambda params, limits, prompt_len=None: None)
    monkeypatch.setattr(SavedQueries, "save", save_once)
    query_policy = {"adsa": {"policy": "attention_mass", "granularity": granularity}}
    outs = llm.generate([good[0], {"prompt_token_ids": config.prompt(3)}, good[1]],
                        [_params(config), _params(config, query_policy), _params(config)], use_tqdm=False)
    monkeypatch.undo()

    assert outs[1].outputs[0].finish_reason == "error", outs[1].outputs[0]
    assert [list(outs[i].outputs[0].token_ids) for i in (0, 2)] == alone
    assert _free_blocks(llm) == free0 and sched.num_worker_failures > failures0
