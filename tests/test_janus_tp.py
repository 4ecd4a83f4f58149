"""Janus under a real tensor_parallel_size=2 engine on CPU (two gloo worker processes), as test_tp_engine.py does for
LlamaGen: with guidance (cond and uncond heads in one sequence, split over the ranks) and ADSA at 50%, greedy image
tokens equal one process's at block and at token granularity, and both ranks report the same eviction digest through
`collective_rpc("adsa_rank_digest")`.

The tiny random Janus of test_vllm_janus.py, widened to GQA with whole KV heads per rank (4 heads, 2 KV heads of 32:
each rank holds 2 query heads and 1 KV head per branch). About 25 s on two cores (two engines, six 256-token
images each); ADSA_SKIP_TP_ENGINE=1 skips it, with test_tp_engine.py. Each rank gets half of this process's CPUs
(test_tp_engine.py says why).
"""

from __future__ import annotations

import os

import pytest
import torch

from test_vllm_janus import CODEBOOK, GRID, PROMPTS, SCALE, tiny_config

pytestmark = pytest.mark.skipif(os.environ.get("ADSA_SKIP_TP_ENGINE") == "1", reason="ADSA_SKIP_TP_ENGINE=1")

HIDDEN, HEADS, KV_HEADS = 128, 4, 2
ADSA_HALF = dict(attention_backend="adsa", additional_config={"cfg": {"scale": SCALE}, "adsa": {"budget": 0.5}})
# Per request: the engine's block granularity, then token granularity with a head-dependent policy (random hashes
# the model's head index: a rank must use its heads' global indices) and TopK-V.
OVERRIDES = (None, {"granularity": "token", "policy": "random", "seed": 3}, {"granularity": "token"})


@pytest.fixture(scope="module")
def janus_tp(tmp_path_factory):
    """Folder of a random tiny Janus whose heads split evenly over two ranks."""
    from transformers import JanusConfig, JanusForConditionalGeneration
    d = tiny_config().to_dict()
    d["text_config"].update(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                            head_dim=HIDDEN // HEADS)
    d["vq_config"].update(projection_dim=HIDDEN, image_token_embed_dim=HIDDEN)   # the aligner and head are as wide
    d["vision_config"].update(projection_dim=HIDDEN)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(**d)).eval()
    with torch.no_grad():
        for p in model.parameters():
            # std 0.2 as test_vllm_janus.py: at 0.1 this model repeats one code whatever is evicted
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("janus_tp")
    model.save_pretrained(folder)
    return folder


def _greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams
    reqs = [(p, ov) for ov in OVERRIDES for p in PROMPTS[:2]]
    params = [SamplingParams(temperature=0.0, max_tokens=GRID * GRID, detokenize=False,
                             extra_args=None if ov is None else {"adsa": ov}) for _, ov in reqs]
    outs = llm.generate([{"prompt_token_ids": [CODEBOOK + t for t in p]} for p, _ in reqs], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_janus_tp2_matches_tp1_with_guidance_and_the_ranks_report_the_same_evictions(engines, janus_tp,
                                                                                      monkeypatch):
    from adsa_vllm.family import load_config
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two CPU workers need two CPUs")
    spec = load_config(janus_tp)
    assert (spec.n_head, spec.kv_heads, spec.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    one = _greedy(engines.get("janus_tp1", janus_tp, **ADSA_HALF))
    half = len(cpus) // 2
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{','.join(map(str, cpus[:half]))}|"
                                                     f"{','.join(map(str, cpus[half:]))}")
    llm = engines.get("janus_tp2", janus_tp, tensor_parallel_size=2, distributed_executor_backend="mp", **ADSA_HALF)
    two = _greedy(llm)
    digests = llm.collective_rpc("adsa_rank_digest")
    engines.close()
    assert all(len(t) == GRID * GRID and all(0 <= c < CODEBOOK for c in t) for t in one)
    assert len(set(map(tuple, one))) == len(one), "requests gave equal images: the test proves nothing"
    assert two == one, "TP=2 greedy tokens differ from TP=1"
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert digests[0]["checks"] > 0 and digests[0]["mismatches"] == 0, digests
    assert digests[0]["digest"] != f"{0:016x}", "no evictions: the digest checked nothing"
