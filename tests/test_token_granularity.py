"""Token-level, per-(layer, KV head) ADSA selection (`granularity="token"`, issue 12 step 1) in the plain-PyTorch
reference: settings, the per-head scores and top-k rule, the state machine against block mode's schedule and
budget, and the reference decoder's per-layer, per-head masks (CPU, float32, tiny random models); and the pure pieces
of the vLLM path (slot replacements, token writes into the paged layouts). The vLLM path end to end:
tests/test_vllm_adsa.py and tests/test_cfg.py (token granularity cases)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adsa_vllm.config import ADSAConfig, ADSAConfigError
from adsa_vllm.guidance.settings import GuidanceSettings
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import LockstepTrackers, ScoreInputs, make_scorer, top_blocks
from adsa_vllm.policy.random_blocks import RandomBlocks
from adsa_vllm.policy.token_scores import TokenInputs, TokenScorer, make_token_scorer
from adsa_vllm.policy.token_select import TokenTrackers, replacements, select, winners
from adsa_vllm.reference import LlamaGenReference, generate, score_tokens, score_tokens_batched
from adsa_vllm.reference.token_decoder import TokenDecoder
from adsa_vllm.settings import ADSASettings, EngineSettings
from adsa_vllm.worker.kv_views import copy_tokens, gather_blocks, gather_part


def tiny(grid=8, kv=None, seed=0, layers=2) -> LlamaGenReference:
    config = LlamaGenConfig(dim=64, n_layer=layers, n_head=4, n_kv_head=kv, codebook_size=64, num_classes=10,
                            grid_size=grid)
    return LlamaGenReference(config).init_random_(seed, 0.2).eval()


def tokens_of(m, rows=2, seed=1):
    return torch.randint(0, m.config.codebook_size, (rows, m.config.image_tokens),
                         generator=torch.Generator().manual_seed(seed))


# 12x12 grid: prefix 13 -> 1 block, local 13 -> 2 blocks; budget 80 = 5 blocks -> top-2 blocks = 32 tokens per head.
GRID, SMALL = 12, dict(budget=80)


# ---- settings ----
def test_invalid_granularity_raises_naming_the_choices():
    for bad in ("tokens", "head", None, 1):
        with pytest.raises(ADSAConfigError, match=r"granularity.*'block', 'token'"):
            ADSAConfig(granularity=bad)
    with pytest.raises(ADSAConfigError, match="granularity"):
        ADSAConfig().merged({"granularity": "layer"})
    assert ADSAConfig().granularity == "block" and ADSAConfig.from_dict({"granularity": "token"}).granularity == "token"


def test_vllm_settings_accept_token_granularity_and_the_layout_carries_it():
    kw = dict(block_size=16, cls_token_num=1, grid_size=16)
    assert ADSASettings(defaults=ADSAConfig(granularity="token"), **kw).layout().granularity == "token"
    engine = ADSASettings(defaults=ADSAConfig(), **kw)
    token, block = engine.layout({"granularity": "token"}), engine.layout({"granularity": "block"})
    assert block.granularity == "block" and token.evicts
    assert replace(token, granularity="block") == block   # the same blocks: only what the slots hold differs
    es = EngineSettings(adsa=engine, guidance=GuidanceSettings(False))   # the field survives the JSON hop
    assert EngineSettings.from_json(es.to_json()) == es


# ---- pure policy: scores and the top-k rule ----
def _inputs(r=2, n=12, h=3, d=8, seed=0, rep=1):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(r, h, n, generator=g) < 0.7
    return TokenInputs(keys=torch.randn(r, n, h, d, generator=g), values=torch.randn(r, n, h, d, generator=g) * 3,
                       valid=valid, positions=torch.arange(20, 20 + n), query_pos=40,
                       query=torch.randn(r, h * rep, d, generator=g), scale=d ** -0.5, layer=1)


@pytest.mark.parametrize("keep", ["diverse", "similar"])
def test_token_topk_v_is_each_heads_mean_cosine_to_its_own_candidates(keep):
    x = _inputs()
    got = make_token_scorer("topk_v", keep=keep).score(x)
    v = torch.nn.functional.normalize(x.values, dim=-1)
    for r in range(2):
        for h in range(3):
            c = x.valid[r, h]
            sim = (v[r, :, h] @ v[r, c, h].T).mean(1)      # pairwise cosine, mean over the head's candidates
            want = -sim if keep == "diverse" else sim
            torch.testing.assert_close(got[r, h, c], want[c], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rep", [1, 2])
def test_token_attention_mass_is_each_heads_softmax_over_its_candidates(rep):
    x = _inputs(rep=rep)
    got = make_token_scorer("attention_mass").score(x)
    for r in range(2):
        for h in range(3):
            c = x.valid[r, h]
            p = torch.stack([(x.keys[r, c, h] @ x.query[r, h * rep + i] * x.scale).softmax(0) for i in range(rep)])
            torch.testing.assert_close(got[r, h, c], p.mean(0), atol=1e-6, rtol=0)


def test_token_random_is_seeded_and_differs_between_heads_and_layers():
    x = _inputs()
    a = make_token_scorer("random", seed=3).score(x)
    assert torch.equal(a, make_token_scorer("random", seed=3).score(x))
    assert not torch.equal(a, make_token_scorer("random", seed=4).score(x))
    assert not torch.equal(a[:, 0], a[:, 1])
    assert not torch.equal(a, make_token_scorer("random", seed=3).score(TokenInputs(**{**vars(x), "layer": 0})))


def test_select_keeps_the_k_best_valid_ties_to_the_more_recent_like_top_blocks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (5, 3, 20), generator=g).float()     # many ties
    valid = torch.rand(5, 3, 20, generator=g) < 0.8
    keep = select(scores, valid, 6)
    for s, v, k in zip(scores.reshape(-1, 20), valid.reshape(-1, 20), keep.reshape(-1, 20)):
        idx = torch.nonzero(v)[:, 0]
        want = set(idx[top_blocks(idx, s[idx], 6)].tolist())
        assert set(torch.nonzero(k)[:, 0].tolist()) == want


# ---- the state machine against block mode, no model ----
class _Noise(TokenScorer):
    name = None

    def score(self, x):
        return torch.rand(x.valid.shape, generator=torch.Generator().manual_seed(x.query_pos * 31 + x.layer))


@pytest.mark.parametrize("fields", [dict(budget=0.5), dict(budget=0.4, refresh=40), dict(budget=0.4, refresh=5)])
def test_every_head_keeps_topk_tokens_prefix_and_window_and_as_many_entries_as_block_mode(fields):
    lay = ADSAConfig(**fields).layout(block_size=16, cls_token_num=1, grid_size=16)
    R, L, H = 2, 3, 4
    tok = TokenTrackers(lay, _Noise(), R, L, H)
    blk = LockstepTrackers(lay, make_scorer("random"), R)
    bs, prefix = lay.block_size, lay.prefix_blocks * lay.block_size
    kv = torch.zeros(R, lay.seq_len, H, 2)
    for pos in range(lay.seq_len - 1):
        before = tok.selections
        tok.begin_step(pos)
        blk.begin_step(pos)
        ev = tok.evicted[..., : pos + 1]                                   # [R, L, H, pos + 1]
        window = lay.local_start(pos) * bs
        assert not ev[..., :prefix].any() and not ev[..., window:].any(), pos      # prefix + window always kept
        aged = (~ev[..., prefix:window]).sum(-1)
        if tok.selections > before:                                        # a selection happened at pos
            assert (aged == tok.topk_tokens).all(), pos
        if tok.selections:                                                 # never fewer afterwards
            assert (aged >= tok.topk_tokens).all() and (aged <= tok.topk_tokens + lay.slack_blocks * bs).all()
        blocks_kept = (~blk.evicted[:, : pos // bs + 1]).repeat_interleave(bs, 1)[:, : pos + 1].sum(1)   # [R]
        assert ((~ev).sum(-1) == blocks_kept[:, None, None]).all(), pos    # same KV entries per head
        req = tok.scoring_request(pos)
        breq = blk.scoring_request(pos)
        assert (req is None) == (breq is None), pos
        if req is not None:
            blk.add_layer_scores(torch.zeros(breq.shape))
            for layer in range(L):
                tok.score_layer(layer, kv[:, req[0]:req[1]], kv[:, req[0]:req[1]], None, pos, 1.0)
    assert tok.selections == len(tok.schedule) > 2
    assert len({tuple(e.tolist()) for e in tok.evicted.reshape(R * L * H, -1)}) > 1   # heads chose differently


# ---- the reference decoder ----
def test_budget_covering_everything_is_full_attention_exactly():
    """Bitwise equal to the full-attention forward of the same shapes (one token per step, or the batched
    chunks); the per-row trackers' full attention reads every cache slot, so it differs by float rounding only."""
    m = tiny(grid=8)
    t = tokens_of(m)
    steps = score_tokens_batched(m, [1, 4], t, max_chunk=1)
    chunks = score_tokens_batched(m, [1, 4], t)
    for budget in (None, m.config.image_tokens + 16):
        adsa = ADSAConfig(budget=budget, granularity="token")
        torch.testing.assert_close(score_tokens(m, [1, 4], t, adsa=adsa), steps, atol=0, rtol=0)
        torch.testing.assert_close(score_tokens_batched(m, [1, 4], t, adsa=adsa), chunks, atol=0, rtol=0)
    torch.testing.assert_close(steps, score_tokens(m, [1, 4], t), atol=1e-5, rtol=0)


class _BlockRandom(TokenScorer):
    """The random policy's block score given to every token of the block, in every layer and head."""
    name = None

    def score(self, x):
        return RandomBlocks(seed=0).score(_block_inputs(x.positions // 16, x.query_pos))[0].expand(x.valid.shape)


def _block_inputs(block_index, pos):
    return ScoreInputs(keys=None, values=None, valid=torch.ones(1, len(block_index), dtype=torch.bool),
                       block_index=block_index[None], positions=torch.tensor([pos]), query=None, scale=1.0)


@pytest.mark.parametrize("policy,scorer", [("random", _BlockRandom()), ("streaming", None)])
def test_block_constant_head_constant_scores_reproduce_block_mode(policy, scorer):
    m, bs = tiny(grid=GRID), 16
    t = tokens_of(m)
    adsa = ADSAConfig(**SMALL, policy=policy)
    blp, bdec = score_tokens_batched(m, [1, 4], t, adsa=adsa, max_chunk=1, return_state=True)
    tdec = TokenDecoder(m, m.embed_cond(torch.tensor([1, 4])), m.config.cls_token_num + t.shape[1],
                        replace(adsa, granularity="token"), bs,
                        scorer=scorer)
    lps = [tdec.prefill()] + [tdec.step(t[:, i - 1], i) for i in range(1, t.shape[1])]
    tlp = torch.stack(lps, 1).log_softmax(-1)
    ev = tdec.evicted_tokens()
    for r, blocks in enumerate(bdec.evicted_sets()):
        assert blocks
        want = torch.zeros(ev.shape[-1], dtype=torch.bool)
        for b in blocks:
            want[b * bs:(b + 1) * bs] = True
        assert (ev[r] == want).all()
    torch.testing.assert_close(tlp, blp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["topk_v", "attention_mass"])
def test_per_layer_head_masks_equal_one_masked_forward(policy, monkeypatch):
    """Step-by-step teacher forcing == one cache-free forward whose mask, per layer and head, is what each head
    kept at each position (logged), causally. The heads must really differ, else this tests little."""
    m = tiny(grid=GRID)
    t = tokens_of(m)
    log = {}
    orig = TokenTrackers.begin_step

    def logged(self, pos):
        orig(self, pos)
        log[pos] = self.evicted.clone()
    monkeypatch.setattr(TokenTrackers, "begin_step", logged)
    adsa = ADSAConfig(**SMALL, policy=policy, granularity="token")
    lp = score_tokens(m, [1, 4], t, adsa=adsa)
    T = t.shape[1]                                                          # positions 0 .. T-1 (cls = 1)
    j = torch.arange(T)
    masks = torch.zeros(m.config.n_layer, 2, m.config.n_head, T, T, dtype=torch.bool)
    for p in range(T):
        masks[:, :, :, p] = (~log[p][..., :T]).permute(1, 0, 2, 3) & (j <= p)
    final = log[T - 1]
    assert len({tuple(e.tolist()) for e in final.reshape(-1, final.shape[-1])}) > 4
    with torch.no_grad():
        h = torch.cat([m.embed_cond(torch.tensor([1, 4])), m.tok_embeddings(t[:, :-1])], dim=1)
        full = m.forward_hidden(h, j, mask=lambda layer: masks[layer])
    torch.testing.assert_close(lp, full.log_softmax(-1), atol=1e-4, rtol=0)


def test_cfg_token_mode_selects_per_half_or_shared_per_pair(monkeypatch):
    m = tiny(grid=GRID)
    adsa = ADSAConfig(**SMALL, policy="topk_v", granularity="token")   # value-dependent: halves differ
    seen = {}
    monkeypatch.setattr(TokenTrackers, "begin_step", lambda self, pos, f=TokenTrackers.begin_step: (
        f(self, pos), seen.__setitem__(self.pairs, self.evicted))[0])
    out = {sel: generate(m, [1, 2], greedy=True, adsa=adsa, cfg_scale=2.0, return_logprobs=True, cfg_selection=sel)
           for sel in ("separate", "shared")}
    assert all(torch.isfinite(r.logprobs).all() for r in out.values())
    separate, shared = seen[0], seen[2]                                   # rows: cond 1, cond 2, null, null
    assert separate.shape[0] == shared.shape[0] == 4 and not torch.equal(separate[0], separate[2])
    assert torch.equal(shared[:2], shared[2:]) and shared.any()           # a pair decides once
    assert len({tuple(e.tolist()) for e in shared[:2].reshape(-1, shared.shape[-1])}) > 1   # heads still differ


def test_shared_selection_keeps_each_heads_best_by_the_pairs_summed_scores():
    lay = ADSAConfig(budget=0.5).layout(block_size=16, cls_token_num=1, grid_size=16)
    B, L, H = 2, 2, 3
    tok = TokenTrackers(lay, _Noise(), 2 * B, L, H, pairs=B)
    kv = torch.zeros(2 * B, lay.seq_len, H, 2)
    checked = 0
    for pos in range(lay.seq_len - 1):
        pend = tok._pending
        if pend is not None and pend[0] == pos:
            _, lo, hi = pend
            valid, s = tok.candidates(lo, hi), tok._scores
            want = valid & ~select((s[:B] + s[B:]).repeat(2, 1, 1, 1), valid, tok.topk_tokens)
            before = tok.evicted[..., lo:hi].clone()
        tok.begin_step(pos)
        if pend is not None and pend[0] == pos:
            assert torch.equal(tok.evicted[..., lo:hi] & ~before, want), pos
            checked += 1
        req = tok.scoring_request(pos)
        if req is not None:
            for layer in range(L):
                tok.score_layer(layer, kv[:, req[0]:req[1]], kv[:, req[0]:req[1]], None, pos, 1.0)
    assert checked == len(tok.schedule) > 2
    with pytest.raises(ValueError, match="2 x pairs rows"):
        TokenTrackers(lay, _Noise(), 3, L, H, pairs=B)


# ---------------------------------------------------------------------- the vLLM path's pieces (worker/token_gather.py)

def test_replacements_leave_the_slots_holding_exactly_the_winners():
    """Overwriting each losing slot entry with a winning new token (`replacements`) leaves every head's slots with
    the very tokens `winners` picks, ties included (scores drawn from 5 values, so ties are everywhere)."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        k = int(torch.randint(1, 24, (1,), generator=g))
        n = k + int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.randint(0, 5, (3, 2, n), generator=g).float()
        pos = torch.stack([torch.randperm(200, generator=g)[:n] for _ in range(6)]).reshape(3, 2, n)
        dst, src, valid = replacements(scores, pos, k)
        slots = pos[..., :k].clone()
        real = valid.nonzero().tolist()
        for a, b, j in real:
            slots[a, b, dst[a, b, j]] = pos[a, b, src[a, b, j]]
        want = pos.gather(-1, winners(scores, pos, k))
        assert torch.equal(slots.sort(-1).values, want.sort(-1).values)
        assert (src >= k).all() and (dst < k).all()
        checked += len(real)
    assert checked > 500


@pytest.mark.parametrize("backend", ["CPU_ATTN", "FLASH_ATTN"])
def test_token_copies_and_partial_reads_agree_with_whole_block_reads(backend):
    """copy_tokens puts one head's K/V of one token where gather_blocks reads it, taken from where gather_blocks
    reads the source (and nothing else changes); gather_part returns gather_blocks' keys or values alone.
    gather_blocks itself is checked against the CPU kernel's own writer (check_cpu_layout) and on the GPU by
    benchmarks/gpu_check.py --checks token."""
    nb, h, bs, d = 6, 3, 16, 8
    kv = torch.randn(nb, h, bs, 2 * d)
    before = kv.clone()
    keys0, values0 = gather_blocks(before, torch.arange(nb), backend, d)
    src_b, src_o = torch.tensor([2, 3, 2]), torch.tensor([7, 0, 15])
    blocks, heads, offsets = torch.tensor([4, 1, 4]), torch.tensor([0, 2, 1]), torch.tensor([3, 15, 0])
    copy_tokens(kv, src_b, src_o, heads, blocks, offsets, backend, d)
    keys, values = gather_blocks(kv, blocks, backend, d)
    for i in range(3):
        assert torch.equal(keys[i, offsets[i], heads[i]], keys0[src_b[i], src_o[i], heads[i]])
        assert torch.equal(values[i, offsets[i], heads[i]], values0[src_b[i], src_o[i], heads[i]])
    assert int((kv != before).sum()) == 3 * 2 * d
    ids = torch.tensor([5, 0, 4])
    keys, values = gather_blocks(kv, ids, backend, d)
    assert torch.equal(gather_part(kv, ids, "keys", backend, d), keys)
    assert torch.equal(gather_part(kv, ids, "values", backend, d), values)
