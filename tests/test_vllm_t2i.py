"""Text-to-image LlamaGen on vLLM against the plain-PyTorch reference (fp32, CPU).

A tiny random t2i model (24 caption rows of width 96, 16x16 grid: 256 image tokens); captions of 24, 9 and 1 valid
rows in one batch, so the vLLM path must give every request its own positions (M-RoPE offset), its own null caption
rows under guidance, and its own ADSA layout (condition length = caption rows). Greedy tokens are compared with the
reference teacher-forced on vLLM's tokens (tests/greedy_match.py: equal except at near-ties); with ADSA the blocks
must really be freed and all come back.
"""

from __future__ import annotations

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from greedy_match import check_greedy

T2I_SHAPE = dict(dim=64, n_layer=2, n_head=2, codebook_size=512, grid_size=16, model_type="t2i", cls_token_num=24,
                 caption_dim=96)
LENGTHS = (24, 9, 1)
SCALE = 4.0


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """(model folder, config, reference model, captions)."""
    from adsa_vllm.llamagen.convert import load_reference
    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import LlamaGenConfig
    config = LlamaGenConfig(**T2I_SHAPE)
    model_dir = make_random_model_dir(tmp_path_factory.mktemp("t2i16"), config, seed=0, std=0.1)
    gen = torch.Generator().manual_seed(1)
    captions = [torch.randn(v, config.caption_dim, generator=gen) for v in LENGTHS]
    return model_dir, config, load_reference(model_dir), captions


def _generate(llm, config, captions, **params):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=config.image_tokens, ignore_eos=True, detokenize=False, **params)
    outs = llm.generate([{"prompt_embeds": c} for c in captions], sp, use_tqdm=False)
    return torch.tensor([list(o.outputs[0].token_ids) for o in outs])


CASES = {"full": (None, 1.0), "adsa50": (ADSAConfig(budget=0.5), 1.0), "cfg4": (None, SCALE),
         "cfg4_adsa50": (ADSAConfig(budget=0.5), SCALE)}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_t2i_equals_reference(case, engines, t2i):
    from adsa_vllm.reference import score_tokens_t2i
    model_dir, config, ref, captions = t2i
    adsa, scale = CASES[case]
    extra = {"cfg": {"scale": scale}} if scale > 1 else {}
    kw = {}
    if adsa is not None:
        extra["adsa"] = {"budget": adsa.budget}
        kw["attention_backend"] = "adsa"
    llm = engines.get(("t2i", case), model_dir, additional_config=extra, **kw)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    got = _generate(llm, config, captions)
    assert got.shape == (len(LENGTHS), config.image_tokens)
    lp = score_tokens_t2i(ref, captions, got, adsa=adsa, cfg_scale=scale, cfg_selection="shared")
    check_greedy(got, lp, cfg_scale=scale, label=case)
    assert pool.get_num_free_blocks() == free0, "KV blocks leaked"
    if adsa is not None:
        freed = sched.adsa_managers[0].total_freed
        assert freed > 0, "ADSA freed nothing: the test proves nothing about eviction"


def test_greedy_t2i_with_token_edges_equals_reference(engines, t2i):
    """Token edges on a caption (issue 24): a 9-row caption at 48 tokens, guided. Its prefix (25 tokens) and window
    (17) fit the budget but their 4 whole blocks (64 tokens) do not, so the layout cuts them at token granularity
    (BlockLayout.token_edges; worker/token_edges.py recomputes those rows). vLLM equals the reference, and differs
    from the very same blocks attended whole (budget 64: no edges), so the masking really ran."""
    from vllm import SamplingParams
    from adsa_vllm.reference import score_tokens_t2i
    model_dir, config, ref, captions = t2i
    short = captions[1]
    edges, whole = ADSAConfig(budget=48), ADSAConfig(budget=64)
    lay = edges.layout(block_size=16, cls_token_num=short.shape[0], grid_size=config.grid_size)
    assert lay.token_edges and (lay.prefix_tokens, lay.local_tokens) == (25, 17)
    lay_whole = whole.layout(block_size=16, cls_token_num=short.shape[0], grid_size=config.grid_size)
    assert not lay_whole.token_edges and lay_whole.budget_blocks == lay.budget_blocks == 4   # the same blocks
    # cfg4_adsa50's engine (a 48-token engine default would be refused: the 24-row caption needs 57 tokens)
    llm = engines.get(("t2i", "cfg4_adsa50"), model_dir, attention_backend="adsa",
                      additional_config={"cfg": {"scale": SCALE}, "adsa": {"budget": 0.5}})
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    free0, freed0 = sched.kv_cache_manager.block_pool.get_num_free_blocks(), sched.adsa_managers[0].total_freed
    params = [SamplingParams(temperature=0.0, max_tokens=config.image_tokens, ignore_eos=True, detokenize=False,
                             extra_args={"adsa": {"budget": b}}) for b in (48, 64)]
    outs = llm.generate([{"prompt_embeds": short}] * 2, params, use_tqdm=False)
    got, got_whole = (torch.tensor([list(o.outputs[0].token_ids)]) for o in outs)
    lp = score_tokens_t2i(ref, [short], got, adsa=edges, cfg_scale=SCALE, cfg_selection="shared")
    check_greedy(got, lp, cfg_scale=SCALE, label="t2i token edges")
    assert not torch.equal(got, got_whole), "token edges changed nothing: the rows were not recomputed"
    assert sched.adsa_managers[0].total_freed > freed0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free0, "KV blocks leaked"


def test_caption_length_matters_and_padding_is_left_out(engines, t2i):
    """The same caption with padding rows appended is a different (longer) prompt; the compact prompt of a padded
    caption (captions.caption_prompt) is exactly the unpadded one, so vLLM gives the same image."""
    from adsa_vllm.llamagen.t5_captions import caption_prompt
    model_dir, config, _, captions = t2i
    llm = engines.get(("t2i", "full"), model_dir, additional_config={})
    rows = captions[1]
    padded = torch.cat([rows, torch.zeros(config.cls_token_num - rows.shape[0], config.caption_dim)])
    mask = torch.arange(config.cls_token_num) < rows.shape[0]
    a, b, c = _generate(llm, config, [rows, caption_prompt(padded, mask), padded])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


BAD = {
    "too many rows": ({"prompt_embeds": torch.randn(25, 96)}, r"1 <= rows <= 24"),
    "wrong width": ({"prompt_embeds": torch.randn(4, 95)}, r"\[rows, 96\]"),
    "integer dtype": ({"prompt_embeds": torch.ones(4, 96, dtype=torch.int64)}, r"non-floating dtype"),
    "token ids": ({"prompt_token_ids": [1, 2, 3]}, r"text-to-image LlamaGen: send the caption as prompt_embeds"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_t2i_prompts_fail_alone_with_the_fix(bad, engines, t2i):
    from vllm import SamplingParams
    model_dir, config, _, captions = t2i
    llm = engines.get(("t2i", "full"), model_dir, additional_config={})
    prompt, match = BAD[bad]
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    assert _generate(llm, config, captions[:1]).shape == (1, config.image_tokens)   # the engine keeps serving


def test_c2i_model_refuses_prompt_embeds_with_the_fix(engines, model16):
    from vllm import SamplingParams
    model_dir, config = model16
    llm = engines.get("c2i_plain", model_dir)
    with pytest.raises(ValueError, match=r"class-to-image LlamaGen: send prompt_token_ids = config.prompt"):
        llm.generate([{"prompt_embeds": torch.randn(1, config.dim)}], SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": config.prompt(3)}], SamplingParams(max_tokens=4, detokenize=False),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.fixture(scope="module")
def t2i_server(t2i, tmp_path_factory):
    import json

    from server_util import launch_server
    model_dir = t2i[0]
    extra = {"adsa": {"budget": 0.5}, "cfg": {"scale": SCALE}}
    yield from launch_server(model_dir, tmp_path_factory.mktemp("t2i_server") / "server.log",
                             "--attention-backend", "adsa", "--additional-config", json.dumps(extra))


def test_http_t2i_equals_reference_and_bad_captions_get_400(t2i_server, t2i):
    """Over HTTP: captions as base64 prompt_embeds (client.encode_caption), guided and ADSA 50% from the server's
    defaults; bad captions get HTTP 400 naming the fix and the server keeps serving."""
    from adsa_vllm.client import ServerError, generate_via_server, image_request, post_json, server_model
    from adsa_vllm.reference import score_tokens_t2i
    _, config, ref, captions = t2i
    got = torch.tensor(generate_via_server(t2i_server, captions=captions, config=config, temperature=0.0))
    lp = score_tokens_t2i(ref, captions, got, adsa=ADSAConfig(budget=0.5), cfg_scale=SCALE, cfg_selection="shared")
    check_greedy(got, lp, cfg_scale=SCALE, label="http")
    url, model = f"{t2i_server}/v1/completions", server_model(t2i_server)
    for rows, match in ((torch.randn(4, 95), r"\[rows, 96\]"), (torch.randn(25, 96), r"1 <= rows <= 24")):
        with pytest.raises(ServerError, match=match) as err:
            post_json(url, image_request(config, caption=rows, model=model, max_tokens=4))
        assert err.value.status == 400
    with pytest.raises(ServerError, match=r"send the caption as prompt_embeds") as err:
        post_json(url, image_request(config, model=model, prompt=[1, 2], max_tokens=4))
    assert err.value.status == 400
    again = generate_via_server(t2i_server, captions=captions[2:], config=config, temperature=0.0)
    assert again[0] == got[2].tolist()


def test_http_t2i_settings_are_checked_against_the_captions_length(t2i_server, t2i):
    """A request's ADSA layout depends on its caption's rows (prefix = rows + one image row by default). Budget 0.25
    is 4 blocks: enough for a 9-row caption (prefix 25 tokens = 2 blocks, local window 2), which must run and match
    the reference. A 24-row caption (prefix 40 + window 17 tokens) needs at least 57 tokens even with token edges
    (issue 24: 0.25 now runs it that way), so a 48-token budget must get HTTP 400 naming both fixes, before the
    engine sees it."""
    from adsa_vllm.client import ServerError, completion_token_ids, image_request, post_json, server_model
    from adsa_vllm.reference import score_tokens_t2i
    _, config, ref, captions = t2i
    url, model = f"{t2i_server}/v1/completions", server_model(t2i_server)
    short, full = captions[1], captions[0]
    assert short.shape[0] == 9 and full.shape[0] == config.cls_token_num
    body = image_request(config, caption=short, model=model, adsa={"budget": 0.25}, temperature=0.0)
    got = torch.tensor([completion_token_ids(post_json(url, body))])
    lp = score_tokens_t2i(ref, [short], got, adsa=ADSAConfig(budget=0.25), cfg_scale=SCALE, cfg_selection="shared")
    check_greedy(got, lp, cfg_scale=SCALE, label="budget 0.25, 9 rows")
    with pytest.raises(ServerError, match=r"raise the budget to at least 80 tokens .*or to at least 57 tokens") as err:
        post_json(url, image_request(config, caption=full, model=model, adsa={"budget": 48}, max_tokens=4))
    assert err.value.status == 400
