"""benchmarks/oracle_bound.py, the per-query and hindsight oracles that bound what a KV selection could reach
(issue 24): its forward equals the model's, a budget that covers the sequence changes nothing, each mask reads what
its docstring says, and the hindsight evictions follow ADSA's schedule and budget. Pure torch, tiny random model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import oracle_bound as ob  # noqa: E402

from adsa_vllm.config import ADSAConfig  # noqa: E402
from adsa_vllm.llamagen.config import LlamaGenConfig  # noqa: E402
from adsa_vllm.policy import selection_schedule  # noqa: E402
from adsa_vllm.reference.model import LlamaGenReference  # noqa: E402

GRID, BS = 8, 16
HINDSIGHT_GRID = 16   # 256 image tokens: at 50%, 4 top-k blocks besides the prefix and window


def tiny():
    config = LlamaGenConfig(dim=32, n_layer=2, n_head=2, codebook_size=16, num_classes=3, grid_size=GRID)
    model = LlamaGenReference(config).init_random_(seed=0, std=0.2).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.tensor([0, 2]), torch.randint(0, 16, (2, GRID * GRID), generator=g)


def layout(budget, grid=HINDSIGHT_GRID):
    return ADSAConfig(budget=budget, policy="random").layout(block_size=BS, cls_token_num=1, grid_size=grid)


def test_full_path_is_the_models_forward_and_a_covering_budget_changes_nothing():
    model, labels, tokens = tiny()
    full = ob.bits_per_token(model, labels, tokens)
    with torch.no_grad():
        lp = model.forward_full(tokens[:, :-1], labels).float().log_softmax(-1)
    own = -lp.gather(-1, tokens[..., None])[..., 0].mean(1).double() / ob.LN2
    torch.testing.assert_close(full, own, rtol=0, atol=1e-5)
    S = tokens.shape[1]
    forced = ob.forced_keys(layout(0.5, grid=GRID), S, "cpu")
    for mask_of in (lambda _, lg: ob.token_mask(lg, S, forced), lambda _, lg: ob.block_mask(lg, S, forced, BS, False)):
        torch.testing.assert_close(ob.bits_per_token(model, labels, tokens, mask_of), full, rtol=0, atol=1e-6)
    # a small budget does change the result (the check above can fail)
    small = ob.bits_per_token(model, labels, tokens, lambda _, lg: ob.token_mask(lg, 8, None))
    assert (small - full).abs().max() > 1e-4


def test_token_mask_reads_each_querys_top_keys_and_the_forced_ones():
    g = torch.Generator().manual_seed(0)
    S, keep = 12, 5
    logits = torch.randn(1, 2, S, S, generator=g).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -torch.inf)
    forced = torch.zeros(S, S, dtype=torch.bool)
    forced[:, 0] = True
    m = ob.token_mask(logits, keep, forced)
    for h in range(2):
        for q in range(S):
            if q + 1 <= keep:
                assert m[0, h, q, :q + 1].all() and not m[0, h, q, q + 1:].any()
                continue
            want = {0} | set(logits[0, h, q, 1:q + 1].topk(keep - 1).indices.add(1).tolist())
            assert set(m[0, h, q].nonzero().flatten().tolist()) == want


def test_block_mask_reads_whole_blocks_of_most_attention():
    g = torch.Generator().manual_seed(0)
    S, bs = 40, 4
    logits = torch.randn(1, 3, S, S, generator=g).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -torch.inf)
    forced = torch.zeros(S, S, dtype=torch.bool)
    m = ob.block_mask(logits, 3 * bs, forced, bs, per_head=False)
    q = S - 1
    mass = logits.softmax(-1)[0, :, q].sum(0).view(-1, bs).sum(-1)
    want = set(mass.topk(3).indices.tolist())
    got = m[0, 0, q].view(-1, bs)
    assert set(got.any(-1).nonzero().flatten().tolist()) == want and got[list(want)].all()
    assert torch.equal(m[0, 0], m[0, 2])                    # one set for the layer's heads


def test_hindsight_follows_adsas_schedule_keeps_the_top_future_blocks_and_never_reinstates():
    lay = layout(0.5)
    assert lay.topk_blocks >= 2 and not lay.token_edges
    S = HINDSIGHT_GRID ** 2
    nb = -(-S // BS)
    g = torch.Generator().manual_seed(3)
    future = torch.rand(2, S, nb, generator=g)
    evicted_at = ob.hindsight_evictions(lay, future, first=0)
    sched = sorted(selection_schedule(lay, 0))
    assert sched, "the budget must evict for this test to mean anything"
    for p in sched:
        s = p + 1
        cands = list(lay.candidate_range(s))
        alive_before = [j for j in cands if evicted_at[0, j] >= s]
        kept = [j for j in cands if evicted_at[0, j] > s]
        assert len(kept) == lay.topk_blocks
        want = sorted(alive_before, key=lambda j: -float(future[0, s, j]))[:lay.topk_blocks]
        assert sorted(kept) == sorted(want)
    for q in range(S):   # never more than ADSA's bound of blocks attended
        written = torch.arange(nb) * BS <= q
        assert int((written & (evicted_at[0] > q)).sum()) <= lay.held_bound


def test_token_hindsight_keeps_the_same_count_per_head():
    lay = layout(0.5)
    S = HINDSIGHT_GRID ** 2
    g = torch.Generator().manual_seed(4)
    future = torch.rand(1, 2, 2, S, S, generator=g)
    evicted_at = ob.hindsight_evictions(lay, future, first=0, keys_per_block=BS)
    last = max(selection_schedule(lay, 0)) + 1
    r = lay.candidate_range(last)
    alive = (evicted_at[..., r.start * BS:r.stop * BS] > last).sum(-1)
    assert (alive == lay.topk_blocks * BS).all()
    assert not torch.equal(evicted_at[0, 0, 0], evicted_at[0, 1, 1])   # each head its own tokens
