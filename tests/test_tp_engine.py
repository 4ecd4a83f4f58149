"""A real tensor_parallel_size=2 engine on CPU (two gloo worker processes): ADSA at 50% gives the same greedy tokens
as one process, at block and at token granularity (each rank selects for its own heads), and the two ranks report
the same eviction digest through `collective_rpc("adsa_rank_digest")`.

Slow (the TP=2 engine starts in about a minute on two cores); ADSA_SKIP_TP_ENGINE=1 skips it. vLLM binds each CPU
worker to its own NUMA node by default and refuses two workers on a one-node box, so the test hands each rank half
of this process's CPUs (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("ADSA_SKIP_TP_ENGINE") == "1", reason="ADSA_SKIP_TP_ENGINE=1")

CLASSES = (1, 2)
ADSA_HALF = dict(attention_backend="adsa", additional_config={"adsa": {"budget": 0.5}})
# Per request: the engine's block granularity, then token granularity with a head-dependent policy (random hashes
# the model's head index: a rank must use its heads' global indices) and TopK-V.
OVERRIDES = (None, {"granularity": "token", "policy": "random", "seed": 3}, {"granularity": "token"})


def _greedy(llm, config) -> list[list[int]]:
    from vllm import SamplingParams
    reqs = [(c, ov) for ov in OVERRIDES for c in CLASSES]
    params = [SamplingParams(temperature=0.0, max_tokens=config.image_tokens, ignore_eos=True, detokenize=False,
                             extra_args=None if ov is None else {"adsa": ov}) for _, ov in reqs]
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c, _ in reqs], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_tp2_matches_tp1_and_the_ranks_report_the_same_evictions(engines, model16, monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two CPU workers need two CPUs")
    model_dir, config = model16
    one = _greedy(engines.get("adsa_tp1", model_dir, **ADSA_HALF), config)
    half = len(cpus) // 2
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{','.join(map(str, cpus[:half]))}|"
                                                     f"{','.join(map(str, cpus[half:]))}")
    llm = engines.get("adsa_tp2", model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", **ADSA_HALF)
    two = _greedy(llm, config)
    digests = llm.collective_rpc("adsa_rank_digest")
    engines.close()
    assert all(len(t) == config.image_tokens for t in one)
    assert len(set(map(tuple, one))) == len(one), "the granularities gave equal images: the test proves nothing"
    assert two == one, "TP=2 greedy tokens differ from TP=1"
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert digests[0]["checks"] > 0 and digests[0]["mismatches"] == 0, digests
    assert digests[0]["digest"] != f"{0:016x}", "no evictions: the digest checked nothing"
