"""row_anchored and head_split (issue 24): their scores against direct, loop-written formulas, the head classes
setting, and the calibration that measures them. Pure torch, no vLLM (the vLLM == reference checks are the
registry-driven matrix of tests/test_vllm_adsa.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adsa_vllm.config import ADSAConfig, ADSAConfigError
from adsa_vllm.policy import ScoreInputs, resolve_scorers
from adsa_vllm.policy.attention_mass import AttentionMass
from adsa_vllm.policy.head_split import HeadSplit, TokenHeadSplit
from adsa_vllm.policy.row_anchored import RowAnchored, TokenRowAnchored
from adsa_vllm.policy.token_scores import TokenAttentionMass, TokenInputs

ROOT = Path(__file__).resolve().parent.parent


def block_inputs(r=2, c=5, bs=4, h=4, d=8, seed=0, layer=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(r, c, dtype=torch.bool)
    valid[1, -2:] = False                                              # padding in row 1
    return ScoreInputs(keys=torch.randn(r, c, bs, h, d, generator=g), values=None, valid=valid,
                       block_index=torch.arange(2, 2 + c).expand(r, c).clone(), positions=torch.full((r,), 90),
                       query=torch.randn(r, h, d, generator=g), scale=d ** -0.5, layer=layer)


def token_inputs(r=2, n=24, h=4, d=8, seed=0, layer=0, lo=7):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(r, h, n, generator=g) > 0.3
    return TokenInputs(keys=torch.randn(r, n, h, d, generator=g), values=None, valid=valid,
                       positions=torch.arange(lo, lo + n), query_pos=lo + n + 9,
                       query=torch.randn(r, h, d, generator=g), scale=d ** -0.5, layer=layer)


def probs(q, k, scale, valid):
    """Loop-free reference softmax of one head: q [D], k [N, D], valid [N] -> [N] (0 off valid)."""
    logits = (k @ q) * scale
    return torch.where(valid, logits, -torch.inf).softmax(0)


# ====================================================================== row_anchored

@pytest.mark.parametrize("cond,row", [(1, 6), (3, 5)])
def test_row_anchored_block_score_is_the_mean_row_mass_of_its_tokens(cond, row):
    x = block_inputs()
    r, c, bs, h, _ = x.keys.shape
    got = RowAnchored(cond_tokens=cond, row_tokens=row).score(x)
    for i in range(r):
        pos = [int(b) * bs + j for b in x.block_index[i] for j in range(bs)]
        valid = x.valid[i].repeat_interleave(bs)
        want = torch.zeros(c)
        for head in range(h):
            p = probs(x.query[i, head], x.keys[i, :, :, head].reshape(c * bs, -1), x.scale, valid)
            rows = [(t - cond) // row for t in pos]
            mass = {w: sum(float(p[t]) for t in range(c * bs) if rows[t] == w) for w in set(rows)}
            want += torch.tensor([sum(mass[rows[b * bs + j]] for j in range(bs)) / bs for b in range(c)]) / h
        torch.testing.assert_close(got[i][x.valid[i]], want[x.valid[i]], rtol=1e-5, atol=1e-6)


def test_row_anchored_keeps_rows_whole_where_blocks_tile_rows():
    """Rows of exactly two blocks: both blocks of a row score the same, so the top blocks are whole rows."""
    x = block_inputs(c=6, bs=4)
    s = RowAnchored(cond_tokens=0, row_tokens=8).score(x)[0]           # blocks 2..7: rows 1, 1, 2, 2, 3, 3
    torch.testing.assert_close(s[0::2], s[1::2])
    assert not torch.allclose(s, AttentionMass().score(x)[0])          # not plain attention mass


def test_token_row_anchored_scores_each_heads_tokens_by_their_row():
    x = token_inputs()
    got = TokenRowAnchored(cond_tokens=1, row_tokens=5).score(x)
    rows = (x.positions - 1) // 5
    for i in range(2):
        for head in range(4):
            p = probs(x.query[i, head], x.keys[i, :, head], x.scale, x.valid[i, head])
            want = torch.stack([p[rows == rows[t]].sum() for t in range(len(rows))])
            torch.testing.assert_close(got[i, head], want, rtol=1e-5, atol=1e-6)


def test_row_anchored_needs_the_geometry():
    with pytest.raises(ValueError, match="row_tokens"):
        RowAnchored().score(block_inputs())


# ====================================================================== head_split

def test_head_split_block_votes_with_the_sink_heads_of_its_layer():
    heads = "SLLS/LLSL"
    for layer, sinks in ((0, [0, 3]), (1, [2])):
        x = block_inputs(layer=layer)
        got = HeadSplit(heads=heads).score(x)
        only = ScoreInputs(keys=x.keys[..., sinks, :], values=None, valid=x.valid, block_index=x.block_index,
                           positions=x.positions, query=x.query[:, sinks], scale=x.scale)
        torch.testing.assert_close(got, AttentionMass().score(only), rtol=1e-5, atol=1e-6)


def test_head_split_block_all_local_gives_no_vote_and_none_equals_attention_mass():
    x = block_inputs()
    assert torch.equal(HeadSplit(heads="LLLL").score(x), torch.zeros(2, 5))   # ties: the newest blocks (streaming)
    torch.testing.assert_close(HeadSplit().score(x), AttentionMass().score(x))


def test_head_split_block_cfg_pair_heads_share_their_class():
    """A CFG pair scores [conditional, null] heads together (2 x heads per layer): head h has class h mod 2."""
    x = block_inputs(h=4)
    pair = HeadSplit(heads="SL").score(x)
    torch.testing.assert_close(pair, HeadSplit(heads="SLSL").score(x))


@pytest.mark.parametrize("layer", [0, torch.tensor([1, 0])])
def test_token_head_split_local_heads_keep_recency_sink_heads_their_attention(layer):
    heads = "SLLS/LLSS"
    x = token_inputs(layer=layer)
    got = TokenHeadSplit(heads=heads).score(x)
    mass = TokenAttentionMass().score(x)
    layers = [layer] * 2 if isinstance(layer, int) else layer.tolist()
    for i in range(2):
        for head in range(4):
            want = mass[i, head] if heads.split("/")[layers[i]][head] == "S" else x.positions.float()
            torch.testing.assert_close(got[i, head], want)


def test_token_head_split_reads_its_rank_slice_of_the_classes():
    x = token_inputs(h=2)
    shifted = TokenInputs(**{**x.__dict__, "head_offset": 2})
    got = TokenHeadSplit(heads="SSLL").score(shifted)                   # this rank holds heads 2, 3: local
    assert torch.equal(got, x.positions.float().expand(2, 2, -1))


def test_head_classes_that_do_not_fit_the_model_are_refused_naming_the_calibration():
    with pytest.raises(ValueError, match="calibrate-heads"):
        TokenHeadSplit(heads="SL").score(token_inputs(h=4))
    with pytest.raises(ValueError, match="calibrate-heads"):
        HeadSplit(heads="SLS").score(block_inputs(h=4))
    with pytest.raises(ValueError, match="calibrate-heads"):
        HeadSplit(heads="SLSL").score(block_inputs(h=4, layer=1))


@pytest.mark.parametrize("bad", ["", "LX", "LS/L", "LS//LS", 3])
def test_heads_setting_is_validated(bad):
    with pytest.raises(ADSAConfigError, match="adsa.heads"):
        ADSAConfig(policy="head_split", heads=bad)


def test_settings_reach_the_scorers():
    config = ADSAConfig(policy="head_split", heads="LS/SS", granularity="token")
    assert resolve_scorers(config.layout(block_size=16, cls_token_num=1, grid_size=16))[1].heads == "LS/SS"
    lay = ADSAConfig(policy="row_anchored").layout(block_size=16, cls_token_num=3, grid_size=12)
    assert resolve_scorers(lay)[0] == RowAnchored(cond_tokens=3, row_tokens=12)


# ====================================================================== the calibration

def test_shipped_head_classes_fit_the_shipped_model_and_follow_the_rule():
    shipped = json.loads((ROOT / "adsa_vllm" / "assets" / "head_classes.json").read_text())
    config = json.loads((ROOT / "adsa_vllm" / "assets" / "config.json").read_text())["llamagen"]
    rows = shipped["heads"].split("/")
    assert len(rows) == config["n_layer"] and {len(r) for r in rows} == {config["n_head"]}
    for row, window in zip(rows, shipped["window_mass"]):
        assert row == "".join("L" if w >= shipped["local_share"] else "S" for w in window)
    ADSAConfig(policy="head_split", heads=shipped["heads"])               # a valid setting


def test_calibration_masses_on_a_tiny_model():
    from adsa_vllm.llamagen.head_calibration import head_masses
    from adsa_vllm.llamagen.config import LlamaGenConfig
    from adsa_vllm.reference.model import LlamaGenReference
    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=2, codebook_size=16, num_classes=3, grid_size=6)
    model = LlamaGenReference(cfg).init_random_(seed=1).eval()
    tokens = torch.randint(0, 16, (2, 36))
    with torch.no_grad():
        m = head_masses(model, torch.tensor([0, 2]), tokens, prefix=7, local=7)
    assert m.shape == (2, 2, 2) and bool((m >= 0).all()) and bool((m.sum(-1) <= 1 + 1e-5).all())
    assert bool((m[..., 0] > 0.05).all())   # a query always attends to itself, inside the window


def test_a_head_with_no_query_spreads_its_attention_evenly_and_the_masses_say_so():
    """Oracle: a head whose query weights are zero has logits 0, so query t attends uniformly to keys 0..t: its
    window mass is mean_t(local / (t + 1)) and its prefix mass mean_t(prefix / (t + 1)) over the measured t."""
    from adsa_vllm.llamagen.config import LlamaGenConfig
    from adsa_vllm.llamagen.head_calibration import head_masses
    from adsa_vllm.reference.model import LlamaGenReference
    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=2, codebook_size=16, num_classes=3, grid_size=6)
    model = LlamaGenReference(cfg).init_random_(seed=3).eval()
    with torch.no_grad():
        model.layers[1].attention.wqkv.weight[cfg.head_dim:2 * cfg.head_dim] = 0     # layer 1, head 1: no query
        model.layers[1].attention.wqkv.weight[:cfg.head_dim] *= 1000                # head 0: a sharp one
        tokens = torch.randint(0, 16, (2, 36), generator=torch.Generator().manual_seed(0))
        m = head_masses(model, torch.tensor([1, 2]), tokens, prefix=7, local=7)
    t = torch.arange(7 + 7, 1 + 35).double()                    # fed positions: the condition + 35 image tokens
    assert m[1, 1, 0].item() == pytest.approx((7 / (t + 1)).mean().item(), abs=1e-5)
    assert m[1, 1, 1].item() == pytest.approx((7 / (t + 1)).mean().item(), abs=1e-5)
    assert abs(m[1, 0, 0].item() - m[1, 1, 0].item()) > 0.05                  # the sharp head is not even


def test_classify_heads_is_the_rule_and_refuses_a_share_outside_0_1():
    from adsa_vllm.policy.head_split import classify_heads
    assert classify_heads([[0.5, 0.49], [0.9, 0.1]]) == "LS/LS"
    assert classify_heads([[0.5, 0.49]], local_share=0.4) == "LL"
    with pytest.raises(ValueError, match="local_share"):
        classify_heads([[0.5]], local_share=0)


def test_calibrate_heads_writes_the_classes_an_engine_on_the_folder_uses(tmp_path, capsys):
    """`adsa-vllm calibrate-heads MODEL_DIR` on a c2i checkpoint: its own samples, no data; the classes land in the
    folder, fit the model and follow the rule; a t2i model and a family without the tool are refused, naming the
    fix."""
    from adsa_vllm.cli import main
    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.engine.config_hook import model_head_classes
    from adsa_vllm.llamagen.config import LlamaGenConfig
    cfg = LlamaGenConfig(dim=32, n_layer=3, n_head=2, codebook_size=16, num_classes=4, grid_size=4)
    d = make_random_model_dir(tmp_path / "c2i", cfg, seed=0, std=0.3)
    main(["calibrate-heads", str(d), "--images", "3", "--device", "cpu", "--local-share", "0.3"])
    got = json.loads((d / "head_classes.json").read_text())
    rows = got["heads"].split("/")
    assert len(rows) == 3 and {len(r) for r in rows} == {2} and "samples of the model itself" in got["images"]
    assert rows == ["".join("L" if w >= 0.3 else "S" for w in layer) for layer in got["window_mass"]]
    assert model_head_classes(ADSAConfig(), str(d)).heads == got["heads"]
    assert "wrote" in capsys.readouterr().out
    t2i = make_random_model_dir(tmp_path / "t2i", LlamaGenConfig(dim=32, n_layer=2, n_head=2, codebook_size=16,
                                                                  grid_size=4, model_type="t2i", cls_token_num=4,
                                                                  caption_dim=32), seed=0)
    with pytest.raises(SystemExit):
        main(["calibrate-heads", str(t2i), "--device", "cpu"])
    assert "text-to-image" in capsys.readouterr().err and not (t2i / "head_classes.json").exists()
    janus = tmp_path / "janus"
    janus.mkdir()
    (janus / "config.json").write_text('{"architectures": ["JanusForConditionalGeneration"]}')
    with pytest.raises(SystemExit):
        main(["calibrate-heads", str(janus)])
    assert "no head calibration; set adsa.heads by hand" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate-heads", str(d), "--local-share", "1.5"])
    assert "local_share=1.5" in capsys.readouterr().err


def test_an_engine_defaults_to_the_head_classes_of_its_model_folder(tmp_path):
    from adsa_vllm.default_model import SHIPPED_DIR
    from adsa_vllm.engine.config_hook import model_head_classes
    shipped = json.loads((SHIPPED_DIR / "head_classes.json").read_text())["heads"]
    assert model_head_classes(ADSAConfig(), str(SHIPPED_DIR)).heads == shipped
    assert model_head_classes(ADSAConfig(heads="LS/SL"), str(SHIPPED_DIR)).heads == "LS/SL"   # the user's win
    assert model_head_classes(ADSAConfig(), str(tmp_path)).heads is None                        # none measured


@pytest.mark.parametrize("scorer", [AttentionMass(), HeadSplit(heads="LS/SL"),
                                    RowAnchored(cond_tokens=1, row_tokens=6)], ids=lambda s: s.name)
def test_query_block_scorers_score_rows_of_several_layers_as_each_layer_alone(scorer):
    """The vLLM path scores every layer in one call, rows = layers x requests with a layer per row
    (worker/query_scoring.py): each row must get what its layer's call alone gives."""
    x0, x1 = block_inputs(seed=1, layer=0), block_inputs(seed=2, layer=1)
    both = ScoreInputs(keys=torch.cat([x0.keys, x1.keys]), values=None, valid=torch.cat([x0.valid, x1.valid]),
                       block_index=torch.cat([x0.block_index, x1.block_index]),
                       positions=torch.cat([x0.positions, x1.positions]), query=torch.cat([x0.query, x1.query]),
                       scale=x0.scale, layer=torch.tensor([0, 0, 1, 1]))
    got = scorer.score(both)
    torch.testing.assert_close(got, torch.cat([scorer.score(x0), scorer.score(x1)]), rtol=1e-6, atol=1e-7)
