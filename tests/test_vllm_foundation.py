"""Foundation: LlamaGen on vllm.LLM (CPU, fp32, full attention) matches the plain-PyTorch reference token for token;
checkpoints round-trip; bad requests fail alone with a ValueError naming the valid range; the plugin registers.
"""

from __future__ import annotations

import importlib.metadata
import pickle

import pytest
import torch

from adsa_vllm.config import ADSAConfig

CLASSES16 = (0, 3, 7, 10)   # 10 = the null class (unconditional)
CLASSES24 = (1, 5)


def _params(n, **kw):
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, detokenize=False, **kw)


def _run(llm, config, class_ids, n=None, **kw):
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c in class_ids],
                        _params(config.image_tokens if n is None else n, **kw), use_tqdm=False)
    return outs


def _tokens(outs):
    return torch.tensor([list(o.outputs[0].token_ids) for o in outs], dtype=torch.int64)


def _chosen_logprobs(outs):
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append([step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)])
    return torch.tensor(rows, dtype=torch.float64)


def _first_mismatch(a, b):
    bad = (a != b).nonzero()
    return None if bad.numel() == 0 else tuple(bad[0].tolist())


@pytest.fixture
def full16(engines, model16):
    model_dir, config = model16
    return engines.get("full16", model_dir), config, model_dir


# ---------------------------------------------------------------- greedy == reference

def _check_greedy_and_logprobs(grid, engines, model16, model24, reference):
    model_dir, config = model16 if grid == 16 else model24
    classes = CLASSES16 if grid == 16 else CLASSES24
    llm = engines.get(f"full{grid}", model_dir)
    outs = _run(llm, config, classes)
    toks = _tokens(outs)
    ref = reference.greedy(model_dir, classes, logprobs=True)
    assert toks.shape == (len(classes), grid * grid) == ref.tokens.shape
    assert torch.equal(toks, ref.tokens), f"first (row, step) mismatch: {_first_mismatch(toks, ref.tokens)}"
    ref_lp = ref.logprobs.gather(-1, ref.tokens[..., None])[..., 0].double()
    got_lp = _chosen_logprobs(outs)
    err = (got_lp - ref_lp).abs().max().item()
    assert err < 1e-4, f"sample logprobs differ from the reference log_softmax by up to {err}"
    assert [list(o.prompt_token_ids) for o in outs] == [config.prompt(c) for c in classes]


def test_greedy_equals_reference_with_logprobs_16x16(engines, model16, model24, reference):
    _check_greedy_and_logprobs(16, engines, model16, model24, reference)


def test_prompt_logprobs_single_token_prompt_has_nothing_to_compare(full16):
    llm, config, _ = full16
    out = _run(llm, config, [3], n=4, prompt_logprobs=1)[0]
    # One prompt token: the only entry is None (no context to score it against).
    assert out.prompt_logprobs is None or all(p is None for p in out.prompt_logprobs)


# ---------------------------------------------------------------- bad input

def _bad_inputs(config):
    cb, nc = config.codebook_size, config.num_classes
    return {
        "class id past num_classes": [cb + nc + 1],
        "class id far past the table": [cb + nc + 100],
        "negative class id": [cb - 1],
        "image-token id (codebook range)": [5],
        "negative token id": [-1],
        "empty prompt": [],
        "two condition tokens": [cb + 1, cb + 2],
    }


BAD_CASES = ("class id past num_classes", "class id far past the table", "negative class id",
             "image-token id (codebook range)", "negative token id", "empty prompt", "two condition tokens")


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_prompt_raises_value_error_naming_valid_range(case, full16):
    llm, config, _ = full16
    ids = _bad_inputs(config)[case]
    lo, hi = config.codebook_size, config.codebook_size + config.num_classes
    with pytest.raises(ValueError) as exc:
        llm.generate([{"prompt_token_ids": ids}], _params(4), use_tqdm=False)
    msg = str(exc.value)
    assert f"{lo}..{hi}" in msg and f"0..{config.num_classes - 1}" in msg, msg


@pytest.mark.parametrize("max_tokens", [257, 1000])
def test_max_tokens_past_the_image_raises(max_tokens, full16):
    llm, config, _ = full16
    with pytest.raises(ValueError, match=r"1\.\.256") as exc:
        _run(llm, config, [1], n=max_tokens)
    assert str(max_tokens) in str(exc.value)


def test_engine_keeps_serving_after_bad_requests(full16, reference):
    llm, config, model_dir = full16
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    for ids in _bad_inputs(config).values():
        with pytest.raises(ValueError):
            llm.generate([{"prompt_token_ids": ids}], _params(4), use_tqdm=False)
    # A batch mixing a bad prompt with good ones is rejected as a whole, before anything is queued.
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": config.prompt(3)}, {"prompt_token_ids": [config.codebook_size + 99]}],
                     _params(4), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests() and not sched.requests
    got = _tokens(_run(llm, config, [3], n=64))
    want = reference.greedy(model_dir, CLASSES16).tokens[CLASSES16.index(3), :64]
    assert torch.equal(got[0], want)


# ---------------------------------------------------------------- 24x24

def test_greedy_equals_reference_with_logprobs_24x24(engines, model16, model24, reference):
    _check_greedy_and_logprobs(24, engines, model16, model24, reference)


# ---------------------------------------------------------------- round trip

def test_round_trip_official_checkpoint_to_vllm(tmp_path, engines, reference):
    from adsa_vllm.llamagen.convert import convert, load_config
    from adsa_vllm.llamagen.config import LlamaGenConfig
    from adsa_vllm.reference.generate import generate
    from adsa_vllm.reference.model import LlamaGenReference

    config = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
    ref = LlamaGenReference(config).init_random_(7, 0.1).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "c2i.pt")   # the official checkpoint format
    folder = convert(tmp_path / "c2i.pt", tmp_path / "folder", n_head=2, grid_size=16)
    assert load_config(folder) == config
    classes = [2, 9]
    want = generate(ref, classes, greedy=True).tokens
    llm = engines.get(("roundtrip", str(folder)), folder)
    got = _tokens(_run(llm, config, classes))
    assert torch.equal(got, want), f"first mismatch {_first_mismatch(got, want)}"


# ---------------------------------------------------------------- bad ADSA overrides

def test_bad_per_request_adsa_override_raises_with_adsa_on(engines, model16, reference):
    model_dir, config = model16
    llm = engines.get("adsa16_override_check", model_dir, attention_backend="adsa",
                      additional_config={"adsa": {"budget": 0.5, "policy": "topk_v"}})
    with pytest.raises(ValueError, match=r"adsa\.policy='nope' is unknown; choose one of .*topk_v"):
        _run(llm, config, [1], n=8, extra_args={"adsa": {"policy": "nope"}})
    with pytest.raises(ValueError, match=r"adsa\.budget=1 .*raise the budget to at least \d+ tokens"):
        _run(llm, config, [1], n=8, extra_args={"adsa": {"budget": 1}})
    with pytest.raises(ValueError, match=r"unknown adsa setting"):
        _run(llm, config, [1], n=8, extra_args={"adsa": {"bugdet": 0.5}})
    with pytest.raises(ValueError, match=r"must be a dict"):
        _run(llm, config, [1], n=8, extra_args={"adsa": 0.5})
    with pytest.raises(ValueError, match=r"not valid JSON"):      # the HTTP form is a JSON string
        _run(llm, config, [1], n=8, extra_args={"adsa": "budget=0.5"})
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    assert not sched.requests and not sched.adsa_managers[0].requests
    # Still serving, and still exact.
    adsa = ADSAConfig(budget=0.5, policy="topk_v")
    got = _tokens(_run(llm, config, [2]))
    assert torch.equal(got, reference.greedy(model_dir, (2,), adsa).tokens)


# ---------------------------------------------------------------- plugin

def test_register_is_idempotent():
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from adsa_vllm import plugin
    plugin.register()
    members = list(AttentionBackendEnum._member_names_)
    hook = MODELS_CONFIG_MAP[plugin.ARCH]
    plugin._done = False   # force the full body to run again
    try:
        plugin.register()
        plugin.register()
    finally:
        plugin._done = True
    assert list(AttentionBackendEnum._member_names_) == members
    assert members.count("ADSA") == 1
    assert MODELS_CONFIG_MAP[plugin.ARCH] is hook
    assert plugin.ARCH in ModelRegistry.get_supported_archs()


def test_entry_point_resolves_to_register():
    from adsa_vllm import plugin
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = {e.name: e for e in eps}.get("adsa")
    assert ep is not None, f"no vllm.general_plugins entry point named 'adsa' (found {[e.name for e in eps]})"
    assert ep.value == "adsa_vllm.plugin:register"
    assert ep.load() is plugin.register


def test_backend_enum_member_pickles_to_itself():
    from adsa_vllm import plugin
    plugin.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    member = AttentionBackendEnum["ADSA"]
    assert member.name == "ADSA"
    assert pickle.loads(pickle.dumps(member)) is member
    # Stock members still round-trip to themselves too.
    stock = AttentionBackendEnum["CPU_ATTN"]
    assert pickle.loads(pickle.dumps(stock)) is stock


def test_model_registry_knows_llamagen():
    from adsa_vllm import plugin
    plugin.register()
    from vllm import ModelRegistry
    assert "LlamaGenForCausalLM" in ModelRegistry.get_supported_archs()
    cls = ModelRegistry._try_load_model_cls("LlamaGenForCausalLM")
    from adsa_vllm.llamagen.model import LlamaGenForCausalLM
    assert cls is LlamaGenForCausalLM
