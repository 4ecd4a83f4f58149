"""Janus-Pro text-to-image on vllm.LLM (adsa_vllm/janus/, CPU, fp32) against transformers' own Janus.

A tiny random `JanusForConditionalGeneration` (16x16 image tokens, codebook 128, text vocabulary 64) saved in the
transformers layout is served through the family contract. The oracle is transformers:
`generate(..., generation_mode="image")` with guidance; without guidance transformers has no image mode (its generate
always runs the cond/uncond pair and needs a guidance scale > 1 to merge it), so `hf_greedy` runs the same loop on
transformers' modules (language model with its cache, generation head, generation embeddings + aligner), and is itself
checked against generate() where both exist. Engines (one alive at a time, conftest.py):
  plain   no guidance, full attention: greedy == transformers (conditional only)
  cfg     guidance 3.0, full attention: greedy == transformers' generate, and a per-request scale 1.0 == unguided
  adsa    guidance 3.0 + ADSA with a budget covering the sequence: == transformers; with a real budget (per request):
          evicts, holds at most its bound, and the pool is full again afterwards
"""

from __future__ import annotations

import pytest
import torch

from adsa_vllm.family import load_config
from adsa_vllm.janus.config import JanusConfig

BOS, PAD, BOI = 1, 2, 3
CODEBOOK, TEXT_VOCAB, GRID = 128, 64, 16
MAX_PROMPT = 24
SCALE = 3.0
# Text prompts (tokenizer ids) of different lengths, each ending with the image start token.
PROMPTS = ([BOS, 10, 11, 12, BOI], [BOS] + list(range(20, 37)) + [BOI], [BOS, 40, BOS, 41, BOI])


def tiny_config():
    from transformers import JanusConfig
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,   # head_dim 32, GQA
                         max_position_embeddings=512, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=None,
                         tie_word_embeddings=False),   # no EOS: LlamaConfig's default 2 is an image code here
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0,
                           image_size=16 * GRID, patch_size=16, projection_dim=64, depth=2,
                           num_image_tokens=GRID * GRID),
        vq_config=dict(embed_dim=8, num_embeddings=CODEBOOK, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, latent_channels=32, projection_dim=64, num_hidden_layers=2,
                       image_token_embed_dim=64),
        image_token_id=5, tie_word_embeddings=False, boi_token_id=BOI, max_prompt_tokens=MAX_PROMPT)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    """(folder, transformers model) of a random tiny Janus; every weight random so that no part can be skipped."""
    from transformers import JanusForConditionalGeneration
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("janus")
    model.save_pretrained(folder)
    return folder, model


def hf_greedy(model, ids: list[int], scale: float | None) -> list[int]:
    """Greedy image tokens from transformers' modules; scale None: the conditional model alone."""
    lm, inner = model.model.language_model, model.model
    rows = [ids] if scale is None else [ids, [t if t in (BOS, BOI) else PAD for t in ids]]
    out = lm(input_ids=torch.tensor(rows), use_cache=True)
    tokens = []
    with torch.no_grad():
        for _ in range(GRID * GRID):
            logits = inner.generation_head(out.last_hidden_state[:, -1])
            if scale is not None:
                logits = logits[1] + scale * (logits[0] - logits[1])
            tok = logits.reshape(-1, CODEBOOK)[0].argmax()
            tokens.append(int(tok))
            embeds = model.prepare_embeddings_for_image_generation(tok.repeat(len(rows), 1))
            out = lm(inputs_embeds=embeds, cache=out.past_key_values, use_cache=True)
    return tokens


def hf_generate(model, ids: list[int], scale: float) -> list[int]:
    from transformers import GenerationConfig
    config = GenerationConfig(bos_token_id=BOS, pad_token_id=PAD, do_sample=False, guidance_scale=scale,
                              generation_kwargs={"boi_token_id": BOI})
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_mode="image", generation_config=config)
    return out[0].tolist()


@pytest.fixture(scope="module")
def oracle(janus):
    _, model = janus
    with torch.no_grad():
        return {"cond": [hf_greedy(model, p, None) for p in PROMPTS],
                "cfg": [hf_generate(model, p, SCALE) for p in PROMPTS]}


def _served(ids):
    return [CODEBOOK + t for t in ids]


def _generate(llm, requests):
    """requests: [(prompt, extra_args|None)] -> [image token list] (one batched greedy generate call)."""
    from vllm import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=GRID * GRID, detokenize=False, extra_args=extra)
              for _, extra in requests]
    outs = llm.generate([{"prompt_token_ids": _served(p)} for p, _ in requests], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_spec_reads_the_transformers_config(janus):
    folder, _ = janus
    spec = load_config(folder)
    assert (spec.codebook_size, spec.grid_size, spec.n_head, spec.kv_heads, spec.head_dim, spec.n_layer) == \
        (CODEBOOK, GRID, 2, 1, 32, 2)
    assert spec.input_vocab_size == CODEBOOK + TEXT_VOCAB and spec.cls_token_num == MAX_PROMPT
    prompt = _served(PROMPTS[2])
    spec.check_prompt(prompt)
    assert spec.null_prompt(prompt) == _served([BOS, PAD, BOS, PAD, BOI])   # transformers keeps every BOS and BOI
    # Under guidance the config hook declares 2H heads on the text config; the spec still reads the model's own.
    doubled = {**tiny_config().to_dict()}
    doubled["text_config"] = {**doubled["text_config"], "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 32}
    again = JanusConfig.from_hf_dict(doubled)
    assert (again.n_head, again.kv_heads, again.head_dim) == (2, 1, 32)
    # An EOS among the image codes would stop images early (vLLM stops at the config's EOS as served).
    with pytest.raises(ValueError, match=r"eos_token_id=2 is an image code .* set it .* to null"):
        JanusConfig.from_hf_dict({**doubled, "text_config": {**doubled["text_config"], "eos_token_id": 2}})


@pytest.mark.parametrize("ids, match", [
    ([], "got an empty prompt"),
    (list(range(MAX_PROMPT)) + [BOI], r"got 25 ids: shorten the text, or raise max_prompt_tokens"),
    ([7], "ending with"),                                              # a class-id-like prompt
    ([BOS, 10], "ending with"),                                        # no image start token
])
def test_bad_prompts_name_the_valid_form(janus, ids, match):
    spec = load_config(janus[0])
    with pytest.raises(ValueError, match=match):
        spec.check_prompt(_served(ids))
    with pytest.raises(ValueError, match=r"outside it \(image codes or class ids are not a Janus prompt\)"):
        spec.check_prompt([5, CODEBOOK + BOI])
    with pytest.raises(ValueError, match="not a class id"):
        spec.prompt(3)


def test_the_unguided_loop_is_transformers_generate(janus, oracle):
    """hf_greedy (the oracle without guidance) is transformers' generate() where generate() exists (guided)."""
    _, model = janus
    assert hf_greedy(model, PROMPTS[1], SCALE) == oracle["cfg"][1]


def test_greedy_equals_transformers_without_guidance(engines, janus, oracle):
    llm = engines.get("janus_plain", janus[0])
    assert _generate(llm, [(p, None) for p in PROMPTS]) == oracle["cond"]


def test_bad_requests_fail_alone(engines, janus, oracle):
    llm = engines.get("janus_plain", janus[0])
    from vllm import SamplingParams
    for prompt, match in (([CODEBOOK + t for t in range(MAX_PROMPT + 1)], "shorten the text"),
                          ([CODEBOOK + 4], "class ids are not a Janus prompt")):
        with pytest.raises(ValueError, match=match):
            llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"unknown extra_args / vllm_xargs key\(s\) \['colour'\]"):
        _generate(llm, [(PROMPTS[0], {"colour": "red"})])
    with pytest.raises(ValueError, match=r"this model emits 1\.\.256 tokens"):
        llm.generate([{"prompt_token_ids": _served(PROMPTS[0])}], SamplingParams(max_tokens=257), use_tqdm=False)
    assert _generate(llm, [(PROMPTS[0], None)]) == oracle["cond"][:1]     # the engine keeps serving


def test_guided_greedy_equals_transformers_generate(engines, janus, oracle):
    llm = engines.get("janus_cfg", janus[0], additional_config={"cfg": {"scale": SCALE}})
    requests = [(p, None) for p in PROMPTS] + [(PROMPTS[1], {"cfg": {"scale": 1.0}})]
    assert _generate(llm, requests) == oracle["cfg"] + oracle["cond"][1:2]


def test_adsa_covering_budget_equals_full_attention_and_a_real_budget_evicts_without_leaks(engines, janus, oracle):
    from adsa_vllm.engine.observe import engine_scheduler
    from test_vllm_adsa import HeldRecorder
    llm = engines.get("janus_adsa", janus[0], attention_backend="adsa",
                      additional_config={"cfg": {"scale": SCALE}, "adsa": {"budget": 512, "policy": "topk_v"}})
    m = engine_scheduler(llm).adsa_managers[0]
    free0 = m.block_pool.get_num_free_blocks()
    rec = HeldRecorder(llm)
    # Real budgets per request: the engine's policy, one query-dependent policy, and token granularity.
    evicting = [{"adsa": {"budget": 0.5}}, {"adsa": {"budget": 0.5, "policy": "attention_mass"}},
                {"adsa": {"budget": 0.5, "granularity": "token"}}]
    try:
        tokens = _generate(llm, [(p, None) for p in PROMPTS] + list(zip(PROMPTS, evicting)))
    finally:
        rec.remove()
    assert tokens[:3] == oracle["cfg"]
    assert all(len(t) == GRID * GRID and all(0 <= c < CODEBOOK for c in t) for t in tokens[3:])
    assert m.total_freed > 0
    evicted = [rid for rid, layout in rec.layout.items() if layout.budget_blocks < layout.max_blocks]
    assert len(evicted) == len(evicting)
    for rid in evicted:
        layout = rec.layout[rid]
        assert max(rec.log[rid]) <= layout.held_bound < layout.max_blocks, (rid, max(rec.log[rid]), layout)
    assert m.block_pool.get_num_free_blocks() == free0 and not m.requests
