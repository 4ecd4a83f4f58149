"""Text-to-image reference: compact captions equal LlamaGen's left padding + mask; generation, CFG and ADSA on the
compact sequence (CPU, float32)."""

import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import SequenceTracker
from adsa_vllm.reference import (LlamaGenReference, decoder, generate, generate_t2i, official_t2i_logits,
                                 score_tokens_t2i)

CAPTION_DIM, GRID = 96, 10


def tiny_t2i(seed=0) -> LlamaGenReference:
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=4, codebook_size=64, grid_size=GRID, model_type="t2i",
                            cls_token_num=120, caption_dim=CAPTION_DIM)
    return LlamaGenReference(config).init_random_(seed, 0.2).eval()


def caption(v: int, seed: int) -> torch.Tensor:
    return torch.randn(v, CAPTION_DIM, generator=torch.Generator().manual_seed(seed))


def t5_style(rows: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded [120, C] feature block (padding rows hold junk, as T5's do) and its mask."""
    v = rows.shape[0]
    feats = torch.randn(120, CAPTION_DIM, generator=torch.Generator().manual_seed(seed)) * 3
    feats[:v] = rows
    return feats, (torch.arange(120) < v).long()


class KeptLog(SequenceTracker):
    """A tracker that records the blocks it kept at every position."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.kept_log = {}

    def kept_blocks(self, pos):
        self.kept_log[pos] = super().kept_blocks(pos)
        return self.kept_log[pos]


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("v", [1, 7, 64, 120])
def test_compact_caption_equals_left_padded_masked_caption(v, null):
    m = tiny_t2i()
    rows = torch.stack([caption(v, 1), caption(v, 2)])
    feats, masks = zip(*(t5_style(r, 10 + k) for k, r in enumerate(rows)))
    idx = torch.randint(0, 64, (2, GRID * GRID - 1), generator=torch.Generator().manual_seed(v))
    with torch.no_grad():
        official = official_t2i_logits(m, torch.stack(feats), torch.stack(masks), idx, null=null)
        compact = m.forward_caption(idx, rows, null=null)
    assert official.shape == compact.shape == (2, GRID * GRID, 64)
    torch.testing.assert_close(compact, official, atol=2e-5, rtol=1e-5)
    if not null and v < 120:   # the compact form is not the unshifted one: rows at 0..v-1 turn image tokens wrong
        with torch.no_grad():
            unshifted = m.forward_hidden(torch.cat([m.embed_caption(rows), m.tok_embeddings(idx)], 1),
                                         torch.arange(v + idx.shape[1]))[:, v - 1:]
        assert not torch.allclose(unshifted, official, atol=1e-3)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generation_matches_teacher_forced_compact_forward(cfg_scale):
    m = tiny_t2i()
    caps, n = [caption(5, 1), caption(1, 2), caption(5, 3), caption(30, 4)], 16
    res = generate_t2i(m, caps, greedy=True, return_logprobs=True, cfg_scale=cfg_scale, max_new_tokens=n)
    assert res.tokens.shape == (4, n) and res.trackers is None
    for b, c in enumerate(caps):
        t = res.tokens[b:b + 1, :-1]
        with torch.no_grad():
            cond = m.forward_caption(t, c[None]).log_softmax(-1)
            null = m.forward_caption(t, c[None], null=True).log_softmax(-1)
        want = cond if cfg_scale == 1.0 else (null + cfg_scale * (cond - null)).log_softmax(-1)
        torch.testing.assert_close(res.logprobs[b:b + 1], want, atol=1e-4, rtol=0)
        assert torch.equal(want.argmax(-1), res.tokens[b:b + 1])
    lp = score_tokens_t2i(m, caps, res.tokens, cfg_scale=cfg_scale)
    torch.testing.assert_close(lp, res.logprobs, atol=0, rtol=0)
    # Captions run in groups by length: the same tokens as one call per caption.
    alone = torch.cat([generate_t2i(m, [c], greedy=True, cfg_scale=cfg_scale, max_new_tokens=n).tokens
                       for c in caps])
    assert torch.equal(alone, res.tokens)


def test_whole_sequence_budget_is_full_attention():
    m, bs = tiny_t2i(), 16
    caps, n = [caption(3, 1), caption(40, 2)], 24
    kw = dict(greedy=True, return_logprobs=True, cfg_scale=2.0, max_new_tokens=n, block_size=bs)
    full = generate_t2i(m, caps, **kw)
    everything = -(-(120 + GRID * GRID) // bs) * bs                   # covers the longest compact sequence
    for adsa in [ADSAConfig(budget=None), ADSAConfig(budget=everything), ADSAConfig(budget=1.0)]:
        res = generate_t2i(m, caps, adsa=adsa, **kw)
        assert torch.equal(full.tokens, res.tokens) and res.trackers is None
        torch.testing.assert_close(full.logprobs, res.logprobs, atol=0, rtol=0)
    # A budget in tokens is a whole sequence for a caption only when it covers its v + image tokens.
    short = -(-(3 + GRID * GRID) // bs) * bs
    res = generate_t2i(m, caps, adsa=ADSAConfig(budget=short), **kw)
    assert res.trackers[0] is None and res.trackers[1] is not None and torch.equal(res.tokens[0], full.tokens[0])


def test_adsa_on_the_compact_sequence_equals_masked_forward(monkeypatch):
    monkeypatch.setattr(decoder, "SequenceTracker", KeptLog)
    m, bs, s = tiny_t2i(), 16, 2.5
    caps = [caption(3, 1), caption(9, 2)]
    adsa = ADSAConfig(budget=80, policy="topk_v")
    res = generate_t2i(m, caps, greedy=True, cfg_scale=s, adsa=adsa, block_size=bs)
    assert len(res.trackers) == 2                                    # shared selection: one per CFG pair
    for c, tr in zip(caps, res.trackers):
        v = c.shape[0]
        assert (tr.layout.seq_len, tr.layout.prefix_tokens) == (v + GRID * GRID, v + GRID)
        assert tr.evicted
    assert torch.equal(generate_t2i(m, caps, greedy=True, cfg_scale=s, adsa=adsa, batched=True).tokens, res.tokens)
    # Teacher-forced: both CFG halves attend to the blocks their pair kept, on sequence indices [v caption rows,
    # image tokens].
    rs = score_tokens_t2i(m, caps, res.tokens, cfg_scale=s, adsa=adsa, block_size=bs, return_result=True)
    for b, (c, tr) in enumerate(zip(caps, rs.trackers)):
        L = c.shape[0] + GRID * GRID - 1
        j = torch.arange(L)
        mask = torch.zeros(1, L, L, dtype=torch.bool)
        assert min(tr.kept_log) == c.shape[0] or c.shape[0] == 1     # a multi-row caption prefills causally
        for p in range(L):
            kept = torch.zeros(L // bs + 1, dtype=torch.bool)
            kept[tr.kept_log.get(p, slice(None))] = True
            mask[0, p] = kept[j // bs] & (j <= p)
        t = res.tokens[b:b + 1, :-1]
        with torch.no_grad():
            cond = m.forward_caption(t, c[None], mask=mask)
            null = m.forward_caption(t, c[None], null=True, mask=mask)
        torch.testing.assert_close(rs.logprobs[b:b + 1], (null + s * (cond - null)).log_softmax(-1), atol=1e-4,
                                   rtol=0)
        assert torch.equal(rs.logprobs[b].argmax(-1), res.tokens[b])


def test_sampling_is_seeded_and_separate_selection_gives_a_tracker_per_row():
    m = tiny_t2i()
    caps = [caption(4, 1), caption(2, 2)]
    kw = dict(seed=3, top_k=5, top_p=0.9, max_new_tokens=8, cfg_scale=2.0)
    assert torch.equal(generate_t2i(m, caps, **kw).tokens, generate_t2i(m, caps, **kw).tokens)
    assert torch.equal(generate_t2i(m, caps, **{**kw, "top_k": 1}).tokens,
                       generate_t2i(m, caps, greedy=True, max_new_tokens=8, cfg_scale=2.0).tokens)
    res = generate_t2i(m, caps, greedy=True, cfg_scale=2.0, cfg_selection="separate", adsa=ADSAConfig(budget=80))
    assert [tr.layout.seq_len for tr in res.trackers] == [4 + GRID * GRID, 2 + GRID * GRID] * 2


def test_t2i_inputs_are_checked():
    m = tiny_t2i()
    with pytest.raises(ValueError, match="caption_prompt"):
        generate_t2i(m, [torch.randn(4, CAPTION_DIM + 1)])
    with pytest.raises(ValueError, match="caption_prompt"):
        generate_t2i(m, [torch.randn(121, CAPTION_DIM)])
    with pytest.raises(ValueError, match="text-to-image"):
        generate(m, [1])
    with pytest.raises(ValueError, match="embed_caption"):
        m.embed_cond(torch.tensor([1]))
    c2i = LlamaGenReference(LlamaGenConfig(dim=64, n_layer=1, n_head=4, codebook_size=64, grid_size=4))
    with pytest.raises(ValueError, match="class-to-image"):
        generate_t2i(c2i, [torch.randn(4, CAPTION_DIM)])
    sd = m.state_dict()
    assert sd["cls_embedding.uncond_embedding"].shape == (120, CAPTION_DIM)
    assert sd["cls_embedding.cap_proj.fc1.weight"].shape == (64, CAPTION_DIM)
    assert sd["cls_embedding.uncond_embedding"].abs().sum() > 0      # init_random_ draws it
