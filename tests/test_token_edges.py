"""Budgets down to 10% (issue 24): the prefix and the local window at token granularity where whole blocks do not
fit the budget (`BlockLayout.token_edges`, policy/layout.py; worker/token_edges.py).

  * layout: 28x28 at 10% turns token edges on and attends prefix + window + what the rest of the budget pays for;
    every budget whose block-rounded prefix and window fit keeps them off (the same layout as before); a budget
    below prefix + window tokens is refused with the fix.
  * reference: the trackers' decoder, the batched one and the token decoder agree at token edges.
  * vLLM (CPU fp32, engine `edges16`: a 16x16 model whose default budget 0.1 has token edges): block granularity
    (random, streaming) and token granularity equal the reference (margin-aware, tests/greedy_match.py), every
    request frees blocks and holds at most its bound, nothing leaks, and the images differ from the same blocks
    attended whole (so the masking really ran).
"""

from __future__ import annotations

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.errors import ADSAConfigError
from adsa_vllm.policy import BlockLayout

FASHION = dict(block_size=16, cls_token_num=1, grid_size=28)


def _layout(budget, **kw) -> BlockLayout:
    grid = kw.pop("grid_size", 28)
    return ADSAConfig(budget=budget, **kw).layout(block_size=kw.pop("block_size", 16), cls_token_num=1,
                                                  grid_size=grid)


# ---------------------------------------------------------------------------------------------------- layout


def test_fashion_ten_percent_has_token_edges():
    lay = _layout(0.1)
    assert lay.token_edges and lay.evicts
    assert (lay.prefix_blocks, lay.local_blocks, lay.topk_blocks) == (2, 3, 1)   # 78 - 29 - 29 = 20 -> one block
    assert lay.budget_blocks == 6 and lay.held_bound == 7
    # After a selection (one candidate survives) a query attends 29 + 29 + 16 tokens, within the 78 of the budget.
    pos = 500
    kept = set(range(lay.prefix_blocks)) | {lay.prefix_blocks} | set(range(lay.local_start(pos), pos // 16 + 1))
    positions = torch.arange(pos + 1)
    attended = lay.attended(pos, positions) & torch.tensor([p // 16 in kept for p in range(pos + 1)])
    assert int(attended.sum()) == 29 + 29 + 16 <= int(0.1 * 784)
    assert set(torch.nonzero(attended).flatten().tolist()) == (set(range(29)) | set(range(pos - 28, pos + 1))
                                                              | set(range(32, 48)))


@pytest.mark.parametrize("grid", [16, 24, 28])
def test_token_edges_only_where_whole_blocks_do_not_fit(grid):
    """Every budget that passed validation before (block-rounded prefix + window fit) gives the same layout with
    token edges off, so it attends the very same tokens; the others get token edges or a clear error."""
    image = grid * grid
    for tokens in range(8, image + 2, 3):
        lay = None
        try:
            lay = _layout(tokens, grid_size=grid)
        except ADSAConfigError as e:
            assert tokens < (grid + 1) * 2 and f"at least {2 * (grid + 1)} tokens" in str(e), (tokens, e)
            continue
        whole = (lay.prefix_blocks + lay.local_blocks) * 16
        if tokens >= whole or tokens >= grid * grid + 1:
            assert not lay.token_edges, tokens
            assert lay.budget_blocks == min(tokens // 16, lay.max_blocks) or tokens >= image + 1, tokens
        else:
            assert lay.token_edges or not lay.evicts, tokens
            assert lay.topk_blocks == (tokens - 2 * (grid + 1)) // 16 or not lay.evicts
        if not lay.token_edges:   # all tokens of kept blocks are attended
            assert bool(lay.attended(100, torch.arange(120)).all())


def test_too_small_budget_names_the_fix():
    with pytest.raises(ADSAConfigError, match=r"adsa\.budget=0\.05 gives 2 blocks of 16 tokens, fewer than prefix "
                                              r"\(2 blocks for 29 tokens\) \+ local window \(3 blocks for 29 "
                                              r"tokens\); raise the budget to at least 80 tokens \(whole blocks\), "
                                              r"or to at least 58 tokens \(0\.074 of the 784 image tokens"):
        _layout(0.05)
    with pytest.raises(ADSAConfigError, match="at least 58 tokens"):
        _layout(57)
    assert _layout(58).token_edges and _layout(58).topk_blocks == 0


def test_attended_matches_its_definition():
    lay = _layout(0.1)
    for pos in (0, 28, 57, 58, 59, 63, 64, 100, 333, 783):
        got = lay.attended(pos, torch.arange(pos + 1)).tolist()
        for p in range(pos + 1):
            block = p // 16
            want = p < 29 or p > pos - 29 or 2 <= block < max(0, pos - 28) // 16
            assert got[p] == want, (pos, p)


# ------------------------------------------------------------------------------------------------- reference


def _model(model16, reference):
    """The reference model of `model16` (loaded by the session's reference cache)."""
    model_dir, _ = model16
    reference.greedy(model_dir, (0,), max_new_tokens=1)
    return reference.models[str(model_dir)]


EDGES16 = dict(budget=0.1, prefix=5, local=4)   # 25 tokens: prefix 5 + window 4 + one top-k block (16)


@pytest.mark.parametrize("policy,granularity", [("random", "block"), ("streaming", "block"),
                                                ("attention_mass", "block"), ("random", "token")])
def test_reference_decoders_agree_at_token_edges(policy, granularity, model16, reference):
    """The per-row trackers (score_tokens), the batched decoder (score_tokens_batched, what quality.py runs) and the
    token decoder give the same logprobs at token edges, and differ from the same blocks attended whole."""
    from adsa_vllm.reference.batched import score_tokens_batched
    from adsa_vllm.reference.generate import score_tokens
    model = _model(model16, reference)
    adsa = ADSAConfig(policy=policy, granularity=granularity, seed=3, **EDGES16)
    assert adsa.layout(block_size=16, cls_token_num=1, grid_size=16).token_edges
    tokens = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(1))
    exact = score_tokens(model, [0, 3], tokens, adsa=adsa)
    batched = score_tokens_batched(model, [0, 3], tokens, adsa=adsa, max_chunk=40)
    torch.testing.assert_close(batched, exact, atol=2e-5, rtol=0)
    whole = score_tokens(model, [0, 3], tokens, adsa=ADSAConfig(policy=policy, granularity=granularity, seed=3,
                                                                budget=64, prefix=5, local=4))
    assert (whole - exact).abs().max() > 1e-3   # the same blocks (4 of them), every token attended


# ------------------------------------------------------------------------------------------------------ vLLM

ENGINE = dict(EDGES16, policy="random", seed=3)
C = (2, 7)
REQUESTS = [("random", c, None) for c in C] + [
    ("streaming", C[0], {"policy": "streaming"}),
    ("tok_random", C[1], {"granularity": "token"}),
    ("whole", C[0], {"budget": 64})]   # the same blocks attended whole: no token edges


@pytest.fixture(scope="module")
def edges16(engines, model16):
    from recorded_run import recorded_run
    model_dir, config = model16
    llm = engines.get("edges16", model_dir, attention_backend="adsa", additional_config={"adsa": ENGINE})
    return recorded_run(llm, config, REQUESTS)


@pytest.mark.parametrize("label,overrides", [("random", {}), ("streaming", {"policy": "streaming"}),
                                             ("tok_random", {"granularity": "token"})])
def test_vllm_equals_reference_at_ten_percent(label, overrides, edges16, model16, reference):
    from greedy_match import assert_greedy_matches_reference
    model_dir, config = model16
    adsa = ADSAConfig(**{**ENGINE, **overrides})
    assert adsa.layout(block_size=16, cls_token_num=1, grid_size=16).token_edges
    classes = [c for lab, c, _ in REQUESTS if lab == label]
    got = torch.stack([edges16["tokens"][f"{label}/{c}"] for c in classes])
    assert got.shape == (len(classes), config.image_tokens)
    own = reference.greedy(model_dir, tuple(classes), adsa)
    assert_greedy_matches_reference(got, reference.models[str(model_dir)], classes, own=own, adsa=adsa,
                                    block_size=16, label=label)
    assert not torch.equal(got, reference.greedy(model_dir, tuple(classes)).tokens), f"{label}: full attention"


def test_vllm_masks_inside_blocks(edges16, model16, reference):
    """The same blocks attended whole (budget 64 tokens = 4 blocks, no token edges) give another image, and vLLM
    ran that one too (it equals the reference without edges)."""
    c = C[0]
    assert not torch.equal(edges16["tokens"][f"random/{c}"], edges16["tokens"][f"whole/{c}"])
    lay = ADSAConfig(**{**ENGINE, "budget": 64}).layout(block_size=16, cls_token_num=1, grid_size=16)
    assert not lay.token_edges and lay.budget_blocks == 4


def test_held_within_bound_and_no_leak(edges16):
    rec = edges16["rec"]
    for rid, held in rec.log.items():
        layout, st = rec.layout[rid], edges16["stats"]["requests"][rid]
        label = edges16["labels"][rid]
        assert st["freed_blocks"] > 0, label
        assert max(held) <= layout.held_bound == st["bound_blocks"], (label, max(held), layout.held_bound)
        assert st["peak_held_blocks"] == max(held)
        if layout.token_edges:
            assert layout.held_bound == 5, label   # prefix 1 + window 2 + top-k 1 + slack 1
    assert edges16["free_after"] == edges16["free_before"] == edges16["num_blocks"] - 1
    assert edges16["live_after"] == {}


# ------------------------------------------------------------------------------------------------ CUDA graphs


@pytest.mark.parametrize("graphs", [False, True])
def test_token_edges_keep_attention_out_of_cuda_graphs(graphs):
    """Token edges run Python in the attention forward (worker/token_edges.py): an engine whose default has them
    reports AttentionCGSupport.NEVER, and an engine that captures attention refuses a request that has them."""
    from types import SimpleNamespace

    from test_request_rules import MODEL, _compilation, _engine
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from adsa_vllm.errors import SettingsError
    from adsa_vllm.request_validation import EngineLimits, attention_in_cuda_graphs, validate_settings
    from adsa_vllm.worker.backend import make_adsa_backend
    edges = _engine(**EDGES16)
    builder = make_adsa_backend(CPUAttentionBackend).get_builder_cls()
    assert builder.get_cudagraph_support(None, SimpleNamespace(adsa=edges.adsa)) == AttentionCGSupport.NEVER
    compilation = _compilation("FULL_AND_PIECEWISE" if graphs else "NONE")
    assert not attention_in_cuda_graphs(compilation, edges)
    engine = _engine(budget=0.5)
    limits = EngineLimits(model=MODEL, engine=engine,
                          attention_in_cuda_graphs=attention_in_cuda_graphs(compilation, engine))
    extra = {"adsa": EDGES16}
    if not graphs:
        assert validate_settings(extra, limits).layout.token_edges
        return
    with pytest.raises(SettingsError, match=r"token edges.*--enforce-eager.*at least 48 tokens"):
        validate_settings(extra, limits)
    assert not validate_settings({"adsa": {"budget": 0.25}}, limits).layout.token_edges
