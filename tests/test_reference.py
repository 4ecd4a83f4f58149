"""Plain-PyTorch LlamaGen reference: cached decoding, 2D RoPE, CFG and mask-based ADSA (CPU, float32)."""

import math

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import SequenceTracker
from adsa_vllm.reference import LlamaGenReference, decoder, generate, score_tokens
from adsa_vllm.reference.model import apply_rotary_emb, precompute_freqs_cis_2d


def tiny(grid=16, cls=1, kv=None, codebook=64, seed=0, std=0.2) -> LlamaGenReference:
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=4, n_kv_head=kv, codebook_size=codebook, num_classes=10,
                         cls_token_num=cls, grid_size=grid)
    return LlamaGenReference(config).init_random_(seed, std).eval()


class Recorder(SequenceTracker):
    """Tracker that logs what the reference asked: kept blocks per position, selections, score_layer calls."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.kept_log, self.selections, self.layer_calls, self.requests = {}, [], {}, []

    def begin_step(self, pos):
        evicted = super().begin_step(pos)
        if self.last_selection == pos:
            self.selections.append((pos, len(super().kept_blocks(pos))))
        return evicted

    def kept_blocks(self, pos):
        self.kept_log[pos] = super().kept_blocks(pos)
        return self.kept_log[pos]

    def scoring_request(self, pos):
        cands = super().scoring_request(pos)
        if cands is not None:
            self.requests.append(pos)
        return cands

    def score_layer(self, keys, values, query, pos, scale, layer=0):
        assert keys.shape == values.shape and keys.shape[:2] == (len(self.pending_blocks), self.layout.block_size)
        assert query.shape[-1] == keys.shape[-1] and scale == pytest.approx(keys.shape[-1] ** -0.5)
        assert layer == self.layer_calls.get(pos, 0) or not self.scorer.reads_kv   # layers in order, each once
        self.layer_calls[pos] = self.layer_calls.get(pos, 0) + 1
        super().score_layer(keys, values, query, pos, scale, layer)


@pytest.mark.parametrize("grid,cls,kv", [(16, 1, None), (4, 2, 2)])
def test_cached_decoding_matches_full_forward(grid, cls, kv):
    m = tiny(grid, cls, kv)
    res = generate(m, [1, 7], greedy=True, return_logprobs=True)
    assert res.tokens.shape == (2, grid * grid) and res.tokens.dtype == torch.int64
    with torch.no_grad():
        full = m.forward_full(res.tokens[:, :-1], torch.tensor([1, 7]))
    assert torch.equal(full.argmax(-1), res.tokens)
    torch.testing.assert_close(res.logprobs, full.log_softmax(-1), atol=1e-4, rtol=0)


def test_rope_table_matches_direct_formula_and_zeroes_condition_tokens():
    grid, hd, base, cls = 5, 16, 10000.0, 2
    table = precompute_freqs_cis_2d(grid, hd, base, cls)
    assert table.shape == (cls + grid * grid, hd // 2, 2) and not table[:cls].any()
    x = torch.randn(1, cls + grid * grid, 3, hd, dtype=torch.float64)
    out = apply_rotary_emb(x, table)
    assert not out[:, :cls].any()
    # Independent formula: pair i of (x[2i], x[2i+1]) as a complex number, rotated by row (first hd/4 pairs) or
    # column (last hd/4 pairs) times base ** (-4k / hd).
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        for i in range(hd // 2):
            k, coord = (i, r) if i < hd // 4 else (i - hd // 4, c)
            z = torch.complex(x[0, cls + p, :, 2 * i], x[0, cls + p, :, 2 * i + 1]) * complex(
                math.cos(coord * base ** (-4 * k / hd)), math.sin(coord * base ** (-4 * k / hd)))
            torch.testing.assert_close(out[0, cls + p, :, 2 * i], z.real, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[0, cls + p, :, 2 * i + 1], z.imag, atol=1e-5, rtol=1e-5)
    # Inside the model: the condition tokens' queries and keys are exactly zero, their values are not.
    m = tiny(4, cls=2)
    h = m.layers[0].attention_norm(m.embed_cond(torch.tensor([3])))
    q, k, v = m.layers[0].attention.project(h, m.freqs_cis[:2])
    assert not q.any() and not k.any() and v.abs().sum() > 0


def test_cfg_scale_one_equals_conditional_and_guidance_formula():
    m = tiny(8)
    plain = generate(m, [2, 5], greedy=True, return_logprobs=True)
    doubled = generate(m, [2, 5], greedy=True, return_logprobs=True, cfg_scale=1.0, force_cfg=True)
    assert torch.equal(plain.tokens, doubled.tokens)
    torch.testing.assert_close(plain.logprobs, doubled.logprobs, atol=1e-4, rtol=0)
    # Guided logprobs = log_softmax(u + s (c - u)), u scored with the null class on the same tokens.
    s = 4.0
    guided = generate(m, [2, 5], greedy=True, return_logprobs=True, cfg_scale=s)
    c = score_tokens(m, [2, 5], guided.tokens)
    u = score_tokens(m, [10, 10], guided.tokens)
    torch.testing.assert_close(guided.logprobs, (u + s * (c - u)).log_softmax(-1), atol=1e-4, rtol=0)
    assert len(guided.trackers or []) == 0


@pytest.mark.parametrize("grid,cls", [(16, 1), (16, 2), (4, 1)])
def test_adsa_without_budget_is_full_attention(grid, cls):
    m = tiny(grid, cls)
    full = generate(m, [1, 4], greedy=True, return_logprobs=True)
    everything = (grid * grid + cls + 15) // 16 * 16      # whole-sequence budget
    for adsa in [ADSAConfig(budget=None), ADSAConfig(budget=everything)]:
        res = generate(m, [1, 4], greedy=True, return_logprobs=True, adsa=adsa)
        assert torch.equal(full.tokens, res.tokens) and res.trackers is None
        torch.testing.assert_close(full.logprobs, res.logprobs, atol=0, rtol=0)


@pytest.mark.parametrize("grid,cls", [(16, 2), (24, 1), (4, 1)])
def test_layout_budget_none_never_evicts(grid, cls):
    assert not ADSAConfig(budget=None).layout(block_size=16, cls_token_num=cls, grid_size=grid).evicts
    assert not ADSAConfig(budget=1024).layout(block_size=16, cls_token_num=cls, grid_size=grid).evicts


@pytest.mark.parametrize("policy", ["streaming", "topk_v", "attention_mass", "random"])
def test_adsa_respects_budget_and_equals_masked_full_forward(policy, monkeypatch):
    monkeypatch.setattr(decoder, "SequenceTracker", Recorder)
    m, adsa, bs = tiny(16), ADSAConfig(budget=96, policy=policy), 16   # 6 blocks: prefix 2 + local 2 + top-2
    full = generate(m, [1, 4], greedy=True)
    res = generate(m, [1, 4], greedy=True, adsa=adsa, cfg_scale=3.0, return_logprobs=True)
    assert len(res.trackers) == 4                                    # 2 conditional + 2 null rows
    for tr in res.trackers:
        assert tr.selections and all(n <= tr.layout.budget_blocks for _, n in tr.selections)
        # Position seq_len - 1 (the last image token) is never fed, so a request made for it is never used.
        last_fed = tr.layout.seq_len - 2
        assert {p + 1 for p in tr.requests if p < last_fed} == {p for p, _ in tr.selections}
        # Once per layer; a position-only score (streaming, random) once per selection, as in the vLLM path.
        calls = m.config.n_layer if tr.scorer.reads_kv else 1
        assert all(tr.layer_calls[p] == calls for p in tr.requests)
        assert all(len(k) <= tr.layout.held_bound for k in tr.kept_log.values())
    if policy == "streaming":  # content-free: survivors are the newest candidates
        tr = res.trackers[0]
        pos = tr.selections[-1][0]
        cands = [j for j in tr.layout.candidate_range(pos)]
        assert [j for j in cands if j not in tr.evicted] == cands[-tr.layout.topk_blocks:]
    plain = generate(m, [1, 4], greedy=True, adsa=adsa)
    assert not torch.equal(plain.tokens, full.tokens)                # eviction changes the image
    # The same run as one masked causal forward: row r at position p sees kept blocks of p, causally.
    monkeypatch.setattr(decoder, "SequenceTracker", Recorder)
    rs = score_tokens(m, [1, 4], plain.tokens, adsa=adsa, return_result=True)
    L = m.config.cls_token_num + plain.tokens.shape[1] - 1
    j = torch.arange(L)
    mask = torch.zeros(2, L, L, dtype=torch.bool)
    for r, tr in enumerate(rs.trackers):
        for p in range(L):
            kept = torch.zeros(L // bs + 1, dtype=torch.bool)
            kept[tr.kept_log[p]] = True
            mask[r, p] = kept[j // bs] & (j <= p)
    with torch.no_grad():
        masked = m.forward_full(plain.tokens[:, :-1], torch.tensor([1, 4]), mask=mask)
    torch.testing.assert_close(rs.logprobs, masked.log_softmax(-1), atol=1e-4, rtol=0)
    assert torch.equal(rs.logprobs.argmax(-1), plain.tokens)


@pytest.mark.parametrize("adsa,cfg_scale", [(None, 1.0), (None, 2.5), (ADSAConfig(budget=0.4), 2.0)])
def test_score_tokens_argmax_reproduces_greedy(adsa, cfg_scale):
    m = tiny(16)
    res = generate(m, [0, 9], greedy=True, adsa=adsa, cfg_scale=cfg_scale, return_logprobs=True)
    lp = score_tokens(m, [0, 9], res.tokens, adsa=adsa, cfg_scale=cfg_scale)
    assert lp.shape == (2, 256, 64)
    assert torch.equal(lp.argmax(-1), res.tokens)
    torch.testing.assert_close(lp, res.logprobs, atol=0, rtol=0)


def test_sampling_is_seeded_and_filters():
    m = tiny(4)
    a = generate(m, [1, 2], seed=3, temperature=1.0, top_k=5, top_p=0.9)
    b = generate(m, [1, 2], seed=3, temperature=1.0, top_k=5, top_p=0.9)
    assert torch.equal(a.tokens, b.tokens)
    g = generate(m, [1, 2], greedy=True)
    assert torch.equal(generate(m, [1, 2], seed=0, top_k=1).tokens, g.tokens)
    with pytest.raises(ValueError, match="class id"):
        generate(m, [11])
