"""ADSA policies, block layout and per-sequence tracker: pure torch, no vLLM."""

from __future__ import annotations

import math

import pytest
import torch

from adsa_vllm.config import ADSAConfig, ADSAConfigError
from adsa_vllm.policy import BlockLayout, ScoreInputs, SequenceTracker, make_scorer, top_blocks

POLICIES = [("topk_v", "diverse"), ("topk_v", "similar"), ("streaming", "diverse"), ("random", "diverse"),
            ("attention_mass", "diverse")]
IDS = [f"{p}-{k}" if p == "topk_v" else p for p, k in POLICIES]


def make_inputs(r=3, c=5, bs=4, hkv=2, h=4, d=8, seed=0, valid=None, dtype=torch.float32) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(r, c, bs, hkv, d, generator=g).to(dtype)
    values = torch.randn(r, c, bs, hkv, d, generator=g).to(dtype)
    if valid is None:
        valid = torch.ones(r, c, dtype=torch.bool)
    block_index = torch.stack([torch.randperm(c + 10, generator=g)[:c] + 2 for _ in range(r)])
    positions = block_index.max(1).values * bs + 40
    query = torch.randn(r, h, d, generator=g).to(dtype)
    return ScoreInputs(keys=keys, values=values, valid=valid, block_index=block_index, positions=positions,
                       query=query, scale=d ** -0.5)


def subset(x: ScoreInputs, rows=slice(None), cols=slice(None)) -> ScoreInputs:
    return ScoreInputs(keys=x.keys[rows][:, cols], values=x.values[rows][:, cols], valid=x.valid[rows][:, cols],
                       block_index=x.block_index[rows][:, cols], positions=x.positions[rows],
                       query=x.query[rows], scale=x.scale)


# ====================================================================== scorers

@pytest.mark.parametrize("policy,keep", POLICIES, ids=IDS)
def test_scores_shape_dtype_and_finite(policy, keep):
    x = make_inputs(r=3, c=5)
    s = make_scorer(policy, keep=keep).score(x)
    assert s.shape == (3, 5) and s.dtype == torch.float32
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("policy,keep", POLICIES, ids=IDS)
def test_padding_candidates_do_not_change_valid_scores(policy, keep):
    """Row i scored with extra padded candidates (garbage K/V, valid False) == row i scored alone, unpadded."""
    scorer = make_scorer(policy, keep=keep)
    x = make_inputs(r=3, c=6, seed=1)
    n_valid = [6, 4, 2]
    valid = torch.zeros(3, 6, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        valid[i, :n] = True
    x = ScoreInputs(keys=x.keys * 1, values=x.values * 1, valid=valid, block_index=x.block_index,
                    positions=x.positions, query=x.query, scale=x.scale)
    x.keys[~valid] = 1e3      # garbage in padding: must not leak into valid scores
    x.values[~valid] = -1e3
    batched = scorer.score(x)
    for i, n in enumerate(n_valid):
        alone = scorer.score(subset(x, rows=slice(i, i + 1), cols=slice(0, n)))[0]
        torch.testing.assert_close(batched[i, :n], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy,keep", POLICIES, ids=IDS)
def test_rows_are_scored_independently(policy, keep):
    """A row's scores do not depend on the other rows of the batch (padding rows included)."""
    scorer = make_scorer(policy, keep=keep)
    x = make_inputs(r=4, c=5, seed=2)
    valid = x.valid.clone()
    valid[3] = False             # an all-padding row
    x = ScoreInputs(keys=x.keys, values=x.values, valid=valid, block_index=x.block_index, positions=x.positions,
                    query=x.query, scale=x.scale)
    batched = scorer.score(x)
    for i in range(3):
        torch.testing.assert_close(batched[i], scorer.score(subset(x, rows=slice(i, i + 1)))[0],
                                   rtol=1e-5, atol=1e-6)
    assert torch.isfinite(batched[:3]).all()


def test_make_scorer_rejects_unknown_policy():
    with pytest.raises(ValueError, match="unknown ADSA policy 'nope'"):
        make_scorer("nope")
    with pytest.raises(ValueError, match="keep='both'"):
        make_scorer("topk_v", keep="both")


# ---------------------------------------------------------------------- TopK-V

def pairwise_topk_v(x: ScoreInputs, keep: str) -> torch.Tensor:
    """The paper's O(N^2) form, explicitly: per row and head, the cosine-similarity matrix of every valid candidate
    token's value with every valid candidate token's value (self included, nothing excluded); a token's redundancy
    is its row mean; a block's score is the mean over its tokens and heads."""
    r, c, bs, hkv, d = x.values.shape
    out = torch.full((r, c), float("nan"), dtype=torch.float64)
    for i in range(r):
        cols = x.valid[i].nonzero()[:, 0]
        v = x.values[i, cols].double()                             # [n, bs, H, D]
        per_head = []
        for h in range(hkv):
            tok = v[:, :, h].reshape(-1, d)                         # [n*bs, D]
            norm = tok.norm(dim=-1)
            cos = (tok @ tok.T) / (norm[:, None] * norm[None, :])   # [N, N]
            per_head.append(cos.mean(dim=1).reshape(len(cols), bs))  # mean over all j
        sim = torch.stack(per_head, -1).mean(dim=(1, 2))            # [n]
        out[i, cols] = -sim if keep == "diverse" else sim
    return out


@pytest.mark.parametrize("keep", ["diverse", "similar"])
def test_topk_v_linear_form_equals_pairwise_cosine(keep):
    x = make_inputs(r=3, c=6, bs=4, hkv=3, d=16, seed=3)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 4:] = False
    x = ScoreInputs(keys=x.keys, values=x.values, valid=valid, block_index=x.block_index, positions=x.positions,
                    query=x.query, scale=x.scale)
    got = make_scorer("topk_v", keep=keep).score(x).double()
    want = pairwise_topk_v(x, keep)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", ["diverse", "similar"])
def test_topk_v_from_block_summaries_equals_direct_score_summed_over_layers(keep):
    """What the vLLM worker computes (one summary per block and layer, all layers scored at once) equals the
    reference's per-layer `score` summed over layers, padding included."""
    scorer = make_scorer("topk_v", keep=keep)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False], [True] * 4 + [False]])
    layers = [make_inputs(seed=s, valid=valid) for s in range(3)]
    direct = sum(scorer.score(x) for x in layers)
    r, c, bs = layers[0].values.shape[:3]
    summaries = torch.stack([scorer.summarize(x.values.reshape(r * c, *x.values.shape[2:])).reshape(
        r, c, *x.values.shape[3:]) for x in layers], dim=2)                      # [R, C, L, H, D]
    via_summaries = scorer.score_summaries(summaries, valid, bs)
    assert torch.allclose(via_summaries[valid], direct[valid], atol=1e-6, rtol=1e-5)


def test_position_only_scorers_read_no_kv():
    for policy in ("streaming", "random"):
        x = make_inputs()
        blind = ScoreInputs(keys=None, values=None, valid=x.valid, block_index=x.block_index,
                            positions=x.positions, query=None, scale=x.scale)
        scorer = make_scorer(policy)
        assert not scorer.reads_kv and torch.equal(scorer.score(blind), scorer.score(x))
    assert make_scorer("topk_v").reads_kv and make_scorer("attention_mass").reads_kv


def test_topk_v_diverse_is_negated_similar():
    x = make_inputs(seed=4)
    torch.testing.assert_close(make_scorer("topk_v", keep="diverse").score(x),
                               -make_scorer("topk_v", keep="similar").score(x))


def test_topk_v_ignores_value_scale_and_keys():
    """Cosine similarity: scaling a token's value or changing the keys leaves the scores unchanged."""
    x = make_inputs(seed=5)
    s = make_scorer("topk_v").score(x)
    y = ScoreInputs(keys=torch.randn_like(x.keys), values=x.values * 7.5, valid=x.valid, block_index=x.block_index,
                    positions=x.positions, query=None, scale=x.scale)
    torch.testing.assert_close(make_scorer("topk_v").score(y), s, rtol=1e-5, atol=1e-6)


def test_topk_v_diverse_keeps_the_outlier_block():
    """Blocks whose values all point the same way are redundant; one block pointing elsewhere is kept (diverse)
    or dropped first (similar)."""
    r, c, bs, h, d = 1, 5, 4, 1, 8
    base = torch.zeros(d)
    base[0] = 1
    noise = torch.randn(r, c, bs, h, d, generator=torch.Generator().manual_seed(0))
    values = base.repeat(r, c, bs, h, 1) + 0.01 * noise
    values[0, 2] = -base + 0.01
    x = ScoreInputs(keys=values.clone(), values=values, valid=torch.ones(r, c, dtype=torch.bool),
                    block_index=torch.arange(c)[None] + 2, positions=torch.tensor([200]), query=None, scale=1.0)
    assert int(make_scorer("topk_v", keep="diverse").score(x).argmax()) == 2
    assert int(make_scorer("topk_v", keep="similar").score(x).argmin()) == 2


# ---------------------------------------------------------------------- streaming, random, attention mass

def test_streaming_keeps_the_newest_blocks():
    x = make_inputs(r=2, c=7, seed=6)
    s = make_scorer("streaming").score(x)
    for i in range(2):
        for k in range(0, 8):
            kept = sorted(x.block_index[i][top_blocks(x.block_index[i], s[i], k)].tolist())
            newest = sorted(x.block_index[i].tolist())[::-1][:k]
            assert kept == sorted(newest)


def test_random_is_reproducible_seed_and_position_dependent():
    x = make_inputs(r=3, c=40, seed=7)
    a, b = make_scorer("random", seed=0).score(x), make_scorer("random", seed=0).score(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_scorer("random", seed=1).score(x))
    moved = ScoreInputs(keys=x.keys, values=x.values, valid=x.valid, block_index=x.block_index,
                        positions=x.positions + 1, query=x.query, scale=x.scale)
    assert not torch.equal(a, make_scorer("random", seed=0).score(moved))
    # Content-independent: other K/V, same scores; and within [0, 1].
    other = ScoreInputs(keys=torch.randn_like(x.keys), values=torch.randn_like(x.values), valid=x.valid,
                        block_index=x.block_index, positions=x.positions, query=None, scale=x.scale)
    assert torch.equal(a, make_scorer("random", seed=0).score(other))
    assert ((a >= 0) & (a <= 1)).all()
    # Roughly uniform selections: not always the same blocks across seeds.
    picks = {tuple(sorted(top_blocks(x.block_index[0], make_scorer("random", seed=s).score(x)[0], 5).tolist()))
             for s in range(10)}
    assert len(picks) > 5


def direct_attention_mass(x: ScoreInputs) -> torch.Tensor:
    """Per row and query head: softmax over every valid candidate token of scale * q.k (the KV head of a query
    head is h // (H / Hkv)); a block's mass is the sum over its tokens; averaged over heads."""
    r, c, bs, hkv, d = x.keys.shape
    h = x.query.shape[1]
    out = torch.full((r, c), float("nan"), dtype=torch.float64)
    for i in range(r):
        cols = x.valid[i].nonzero()[:, 0]
        masses = []
        for head in range(h):
            kv = head // (h // hkv)
            k = x.keys[i, cols, :, kv].double().reshape(-1, d)            # [n*bs, D]
            p = torch.softmax((k @ x.query[i, head].double()) * x.scale, dim=0)
            masses.append(p.reshape(len(cols), bs).sum(1))
        out[i, cols] = torch.stack(masses).mean(0)
    return out


@pytest.mark.parametrize("hkv,h", [(4, 4), (2, 4), (1, 4)])
def test_attention_mass_equals_direct_softmax(hkv, h):
    x = make_inputs(r=3, c=5, hkv=hkv, h=h, seed=8)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    x = ScoreInputs(keys=x.keys, values=x.values, valid=valid, block_index=x.block_index, positions=x.positions,
                    query=x.query, scale=x.scale)
    got = make_scorer("attention_mass").score(x).double()
    want = direct_attention_mass(x)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-6)
    # A row's masses sum to 1 over its valid candidates.
    for i in range(3):
        assert got[i, valid[i]].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_attention_mass_needs_the_query_and_topk_v_does_not():
    assert make_scorer("attention_mass").needs_query
    assert not make_scorer("topk_v").needs_query and not make_scorer("streaming").needs_query


# ====================================================================== top_blocks

@pytest.mark.parametrize("seed", range(25))
def test_top_blocks_picks_exactly_the_best_ties_to_more_recent(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 30, (1,), generator=g))
    block_index = torch.randperm(60, generator=g)[:n] + 1
    # Few distinct values: many ties.
    scores = torch.randint(0, 4, (n,), generator=g).float() / 3
    for k in range(0, n + 2):
        got = top_blocks(block_index, scores, k)
        expect = sorted(range(n), key=lambda i: (-scores[i].item(), -block_index[i].item()))[:k]
        assert got.tolist() == expect, (k, scores.tolist(), block_index.tolist())
        # Exactly min(k, n) distinct indices; every chosen score >= every unchosen score.
        assert len(set(got.tolist())) == min(k, n)
        rest = [i for i in range(n) if i not in set(got.tolist())]
        if got.numel() and rest:
            assert scores[got].min() >= scores[rest].max()


# ====================================================================== BlockLayout

def layout(budget=0.5, grid=16, cls=1, bs=16, **kw) -> BlockLayout:
    return ADSAConfig(budget=budget, **kw).layout(block_size=bs, cls_token_num=cls, grid_size=grid)


@pytest.mark.parametrize("refresh,slack", [(None, 1), (16, 1), (17, 2), (32, 2), (64, 4)])
def test_layout_16x16_half_budget(refresh, slack):
    lay = layout(refresh=refresh)
    assert (lay.prefix_tokens, lay.local_tokens) == (17, 17)          # condition + first row; row + 1
    assert (lay.prefix_blocks, lay.local_blocks) == (2, 2)
    assert lay.budget_blocks == 8 and lay.topk_blocks == 4            # int(0.5 * 256) // 16
    assert lay.max_blocks == 16 and lay.seq_len == 257 and lay.evicts    # 256 stored tokens (last one never fed)
    assert lay.refresh == (refresh or 16)
    assert lay.slack_blocks == slack and lay.held_bound == 8 + slack
    lagged = ADSAConfig(budget=0.5, refresh=refresh).layout(block_size=16, cls_token_num=1, grid_size=16, lag=1)
    assert lagged.slack_blocks == slack + 1       # async scheduling returns evicted blocks one step later


def test_layout_other_shapes():
    lay = layout(grid=24)                  # 577 tokens, 288 budget tokens
    assert (lay.prefix_blocks, lay.local_blocks, lay.budget_blocks, lay.topk_blocks, lay.max_blocks) == \
        (2, 3, 18, 13, 36)
    lay = layout(bs=32)
    assert (lay.prefix_blocks, lay.local_blocks, lay.budget_blocks, lay.topk_blocks, lay.held_bound) == \
        (1, 2, 4, 1, 5)
    lay = layout(budget=100, prefix=1, local=2)
    assert (lay.prefix_blocks, lay.local_blocks, lay.budget_blocks, lay.topk_blocks) == (1, 2, 6, 3)
    lay = layout(cls=2)                    # two condition tokens: prefix 2 + 16
    assert lay.prefix_tokens == 18 and lay.seq_len == 258


@pytest.mark.parametrize("budget", [None, 257, 1000])
def test_layout_budget_covering_sequence_never_evicts(budget):
    lay = layout(budget=budget)
    assert not lay.evicts and lay.budget_blocks == lay.max_blocks == lay.held_bound == 16


def test_layout_positions():
    lay = layout()
    assert lay.num_blocks(0) == 1 and lay.num_blocks(15) == 1 and lay.num_blocks(16) == 2
    assert lay.local_start(16) == 0 and lay.local_start(32) == 1 and lay.local_start(100) == 5
    assert list(lay.candidate_range(10)) == [] and list(lay.candidate_range(100)) == [2, 3, 4]
    # Window [t - local + 1, t] always lies inside blocks local_start..t//bs, at most local_blocks of them.
    for t in range(300):
        first = lay.local_start(t)
        assert first <= max(0, t - lay.local_tokens + 1) // lay.block_size
        assert t // lay.block_size - first + 1 <= lay.local_blocks


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=16), r"adsa\.budget=16 gives 1 blocks .*prefix \(2 blocks for 17 tokens\) \+ local window "
                      r"\(2 blocks for 17 tokens\); raise the budget to at least 64 tokens"),
    (dict(budget=0.1), r"adsa\.budget=0\.1 gives 1 blocks .*at least 64 tokens"),
    (dict(budget=0.0), r"fractional budget must lie in \(0, 1\]"),
    (dict(budget=1.5), r"give larger budgets as a token count"),
    (dict(budget=-4), r"token budget must be positive"),
    (dict(budget=0), r"token budget must be positive"),
    (dict(budget=True), r"use a token count \(int\), a fraction in \(0, 1\], or null"),
    (dict(budget="0.5"), r"use a token count"),
    (dict(bs=64), r"block size 64 is not supported by ADSA; use --block-size 16 or 32"),
    (dict(prefix=0), r"adsa\.prefix=0 would evict condition tokens; use at least 1"),
    (dict(local=1), r"adsa\.local=1: the window must hold at least the query and its predecessor"),
    (dict(refresh=0), r"adsa\.refresh=0: must be a positive"),
    (dict(policy="nope"), r"adsa\.policy='nope' is unknown; choose one of attention_mass, head_split, random, "
     r"row_anchored, streaming, topk_v"),
    (dict(keep="both"), r"adsa\.keep='both' is unknown; choose one of diverse, similar"),
])
def test_layout_errors_name_the_fix(kwargs, match):
    with pytest.raises(ADSAConfigError, match=match):
        layout(**kwargs)


def test_config_merge_rejects_unknown_keys():
    with pytest.raises(ADSAConfigError, match=r"unknown adsa setting\(s\) \['bugdet'\]; valid keys are \["):
        ADSAConfig().merged({"bugdet": 0.5})
    assert ADSAConfig().merged({"budget": 0.25}).budget == 0.25
    assert ADSAConfig().merged(None) == ADSAConfig()


# ====================================================================== SequenceTracker

def _simulate(lay: BlockLayout, policy: str, keep: str, seed: int = 0, kv_heads=2, head_dim=8):
    """Drive one tracker through a whole sequence exactly as the reference does, with random K/V per position.
    Returns per-position logs (kept blocks, newly evicted blocks, evicted set)."""
    g = torch.Generator().manual_seed(seed)
    n_pos = lay.seq_len - 1
    keys = torch.randn(n_pos, kv_heads, head_dim, generator=g)
    values = torch.randn(n_pos, kv_heads, head_dim, generator=g)
    tr = SequenceTracker(lay, make_scorer(policy, keep=keep, seed=seed))
    log = []
    bs = lay.block_size
    for pos in range(n_pos):
        newly = tr.begin_step(pos)
        kept = list(tr.kept_blocks(pos))
        log.append(dict(pos=pos, newly=list(newly), kept=kept, evicted=set(tr.evicted),
                        selected=tr.last_selection == pos))
        cands = tr.scoring_request(pos)
        if cands is not None:
            idx = (torch.tensor(cands)[:, None] * bs + torch.arange(bs)).flatten()
            k = keys[idx].reshape(len(cands), bs, kv_heads, head_dim)
            v = values[idx].reshape(len(cands), bs, kv_heads, head_dim)
            for _ in range(2):   # two layers
                tr.score_layer(k, v, torch.randn(kv_heads * 2, head_dim, generator=g), pos, head_dim ** -0.5)
    return log


@pytest.mark.parametrize("refresh", [None, 64])
@pytest.mark.parametrize("policy,keep", POLICIES, ids=IDS)
def test_tracker_invariants(policy, keep, refresh):
    lay = layout(refresh=refresh)
    log = _simulate(lay, policy, keep)
    selections = [e for e in log if e["selected"]]
    assert selections, "no selection happened: the invariants below would be vacuous"
    prev_evicted: set[int] = set()
    for e in log:
        pos = e["pos"]
        if e["selected"]:
            assert len(e["kept"]) <= lay.budget_blocks, e
        # Between selections a sequence may grow by at most the slack.
        assert len(e["kept"]) <= lay.budget_blocks + lay.slack_blocks
        assert all(b >= lay.prefix_blocks for b in e["evicted"]), "a prefix block was evicted"
        assert all(b < lay.local_start(pos) for b in e["newly"]), "a local-window block was evicted"
        assert pos // lay.block_size in e["kept"], "the tail block must always be kept"
        assert prev_evicted <= e["evicted"], "an eviction was undone"
        assert not set(e["kept"]) & e["evicted"]
        assert set(e["kept"]) | e["evicted"] == set(range(lay.num_blocks(pos)))
        assert set(range(min(lay.prefix_blocks, lay.num_blocks(pos)))) <= set(e["kept"])
        prev_evicted = e["evicted"]
    # Selections respect the refresh interval.
    sel_pos = [e["pos"] for e in selections]
    assert all(b - a >= lay.refresh for a, b in zip(sel_pos, sel_pos[1:])), sel_pos


def test_tracker_streaming_evicts_oldest_candidates_first():
    lay = layout()
    log = _simulate(lay, "streaming", "diverse")
    for e in log:
        if e["newly"]:
            survivors = [b for b in e["kept"] if lay.prefix_blocks <= b < lay.local_start(e["pos"])]
            assert max(e["newly"]) < min(survivors, default=math.inf)


def test_tracker_never_evicts_when_budget_covers_sequence():
    lay = layout(budget=None)
    log = _simulate(lay, "topk_v", "diverse")
    assert not any(e["newly"] for e in log) and not any(e["selected"] for e in log)
    assert log[-1]["kept"] == list(range(lay.num_blocks(lay.seq_len - 2)))


def test_tracker_without_scores_does_not_select():
    """begin_step selects only if the previous forward scored the candidates for exactly this position."""
    lay = layout()
    tr = SequenceTracker(lay, make_scorer("topk_v"))
    pos = 150
    cands = tr.scoring_request(pos - 1)
    assert cands is not None and len(cands) > lay.topk_blocks
    assert tr.begin_step(pos) == []         # no scores arrived: nothing evicted, request dropped
    assert tr.last_selection is None
    cands = tr.scoring_request(pos - 1)
    tr.add_layer_scores(torch.arange(len(cands), dtype=torch.float32))
    assert tr.begin_step(pos + 1) == []     # scores for another position: ignored
    cands = tr.scoring_request(pos - 1)
    tr.add_layer_scores(torch.arange(len(cands), dtype=torch.float32))
    newly = tr.begin_step(pos)
    assert newly == cands[: len(cands) - lay.topk_blocks]   # lowest scores = oldest here


class _NoFastPath(SequenceTracker):
    def _quiet_until(self) -> int:
        return 0


@pytest.mark.parametrize("kw", [dict(budget=0.5), dict(budget=0.25), dict(budget=0.25, refresh=40),
                                dict(budget=160, local=2), dict(budget=0.75, prefix=40, local=50),
                                dict(budget=0.3, refresh=5)])
@pytest.mark.parametrize("grid,bs", [(16, 16), (24, 16), (32, 32)])
def test_tracker_fast_path_changes_nothing(kw, grid, bs):
    """`scoring_request` skips its work until a selection can be due; the requests are exactly those of the
    tracker without that shortcut, at every position, under the same scores."""
    lay = ADSAConfig(**kw).layout(block_size=bs, cls_token_num=1, grid_size=grid)
    fast, slow = SequenceTracker(lay, make_scorer("random", seed=3)), _NoFastPath(lay, make_scorer("random", seed=3))
    requested = 0
    for pos in range(lay.seq_len - 1):
        assert fast.begin_step(pos) == slow.begin_step(pos)
        assert fast.kept_blocks(pos) == slow.kept_blocks(pos)
        a, b = fast.scoring_request(pos), slow.scoring_request(pos)
        assert a == b, pos
        if a is not None:
            requested += 1
            scores = torch.rand(len(a), generator=torch.Generator().manual_seed(pos))
            fast.add_layer_scores(scores)
            slow.add_layer_scores(scores)
    assert requested > 0 or not lay.evicts


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(
                                              not torch.cuda.is_available(), reason="the half-precision branch "
                                              "(bmm with float32 output) runs on CUDA only"))])
def test_query_key_logits_are_the_float32_logits_of_each_query_head_against_its_kv_head(device, dtype):
    """GQA: query head h scores against KV head h // (Hq / Hkv); half-precision inputs give the float32 logits of
    their values (the CUDA branch multiplies them without upcasting: products of bf16 values are exact in float32)."""
    from adsa_vllm.policy.dense_attention import query_key_logits
    g = torch.Generator().manual_seed(0)
    r, n, hkv, rep, d = 3, 40, 2, 4, 64
    query = torch.randn(r, hkv * rep, d, generator=g).to(device, dtype)
    keys = torch.randn(r, n, hkv, d, generator=g).to(device, dtype)
    got = query_key_logits(query, keys, 0.125)
    assert got.dtype == torch.float32 and got.shape == (r, hkv * rep, n)
    q, k = query.double().cpu(), keys.double().cpu()
    want = torch.stack([torch.stack([q[i, h] @ k[i, :, h // rep].T for h in range(hkv * rep)]) for i in range(r)])
    torch.testing.assert_close(got.double().cpu(), want * 0.125, rtol=1e-5, atol=1e-5)
