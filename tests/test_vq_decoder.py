"""VQDecoder against an independent functional implementation of LlamaGen's vq_model.py decoder equations, read
straight from a random state dict in the official key layout (small config: ch 32, ch_mult [1, 2])."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adsa_vllm.vq import VQCheckpointError, VQConfig, VQDecoder

SMALL = dict(codebook_size=64, codebook_embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=2)
GRID = 4


def _random_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names, including the encoder-side keys a full checkpoint carries."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in VQDecoder(VQConfig(**SMALL)).state_dict().items():
        scale = 1.0 if "norm" in k else 1.0 / math.sqrt(max(v[0].numel(), 1))
        sd[k] = (torch.randn(v.shape, generator=g) * scale + (1.0 if k.endswith("norm1.weight") else 0.0))
    sd["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3, generator=g)
    sd["quant_conv.weight"] = torch.randn(8, 16, 1, 1, generator=g)
    sd["quantize.codebook_used"] = torch.zeros(65536)
    return sd


# ---- the independent implementation: vq_model.py's equations as functional ops on the state dict ----

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, pad):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=pad)


def _silu(x):
    return x * torch.sigmoid(x)


def _resnet(sd, p, x):
    h = _conv(sd, p + ".conv1", _silu(_gn(sd, p + ".norm1", x)), 1)
    h = _conv(sd, p + ".conv2", _silu(_gn(sd, p + ".norm2", h)), 1)
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x, 0)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    n = _gn(sd, p + ".norm", x)
    q, k, v = (_conv(sd, f"{p}.{name}", n, 0).reshape(b, c, hh * ww) for name in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=2)  # w[b, query i, key j]
    out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out, 0)


def reference_decode(sd, codes, grid, num_res_blocks, levels, l2_norm=True):
    emb = sd["quantize.embedding.weight"]
    if l2_norm:
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = emb[codes].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z, 0), 1)
    h = _attn(sd, "decoder.mid.1", _resnet(sd, "decoder.mid.0", h))
    h = _resnet(sd, "decoder.mid.2", h)
    for lvl in range(levels):
        for i in range(num_res_blocks + 1):
            h = _resnet(sd, f"decoder.conv_blocks.{lvl}.res.{i}", h)
            if lvl == 0:  # attention only at the lowest resolution
                h = _attn(sd, f"decoder.conv_blocks.{lvl}.attn.{i}", h)
        if lvl != levels - 1:
            h = _conv(sd, f"decoder.conv_blocks.{lvl}.upsample.conv", F.interpolate(h, scale_factor=2), 1)
    x = _conv(sd, "decoder.conv_out", _silu(_gn(sd, "decoder.norm_out", h)), 1)
    return torch.round((x.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), x


def _codes(batch=2, seed=1):
    return torch.randint(0, SMALL["codebook_size"], (batch, GRID * GRID), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("l2_norm", [True, False])
def test_decoder_matches_functional_equations(l2_norm):
    sd = _random_official_state_dict()
    vq = VQDecoder(VQConfig(**SMALL, codebook_l2_norm=l2_norm)).eval()
    vq.load_decoder_state(sd)
    codes = _codes()
    want_u8, want = reference_decode(sd, codes, GRID, SMALL["num_res_blocks"], len(SMALL["ch_mult"]), l2_norm)
    got = vq.decode(codes, GRID)
    assert got.shape == (2, 3, GRID * 2, GRID * 2)
    assert want.abs().max() > 0.5  # weights big enough that every layer matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got_u8 = vq.decode_codes(codes.numpy(), GRID)
    assert got_u8.dtype == np.uint8 and got_u8.shape == (2, GRID * 2, GRID * 2, 3)
    assert np.abs(got_u8.astype(int) - want_u8.astype(int)).max() <= 1  # rounding at a .5 boundary


def test_checkpoint_round_trip(tmp_path):
    sd = _random_official_state_dict(seed=3)
    path = tmp_path / "vq_small.pt"
    torch.save({"model": sd}, path)
    vq = VQDecoder.from_checkpoint(path, **SMALL)
    direct = VQDecoder(VQConfig(**SMALL)).eval()
    direct.load_decoder_state(sd)
    codes = _codes(seed=5)
    np.testing.assert_array_equal(vq.decode_codes(codes, GRID), direct.decode_codes(codes, GRID))
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in vq.state_dict())


def test_missing_and_mismatched_keys_are_named(tmp_path):
    sd = _random_official_state_dict()
    del sd["decoder.conv_blocks.1.res.2.conv2.weight"], sd["post_quant_conv.bias"]
    path = tmp_path / "broken.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(VQCheckpointError, match=r"2 missing key\(s\): post_quant_conv\.bias, "
                                                r"decoder\.conv_blocks\.1\.res\.2\.conv2\.weight"):
        VQDecoder.from_checkpoint(path, **SMALL)
    torch.save({"model": _random_official_state_dict()}, path)
    with pytest.raises(VQCheckpointError, match=r"quantize\.embedding\.weight: checkpoint \[64, 8\], config "
                                                r"\[16384, 8\]"):
        VQDecoder.from_checkpoint(path)  # official defaults against the small checkpoint


def test_out_of_range_codes_rejected():
    vq = VQDecoder(VQConfig(**SMALL)).eval()
    with pytest.raises(ValueError, match="0..63"):
        vq.decode_codes(np.full((1, GRID * GRID), 64), GRID)
