"""Measure which attention heads attend locally and which to sinks: the `adsa.heads` setting of head_split.

One teacher-forced full-attention pass over a few Fashion-MNIST *training* images (not the test images the quality
benchmark scores). For every (layer, head) it averages, over the image queries t whose window and prefix do not
overlap (t >= prefix + local), the attention mass the head puts
  inside the local window (t - local, t]   (local = grid + 1 tokens: the row above and the row so far), and
  on the prefix [0, prefix)                (prefix = condition + the first image row: the sinks),
with the layout's default prefix and local window. A head is "L" (local) when its window mass is at least
--local-share (default 0.5: most of its attention falls where every layout keeps the tokens anyway), else "S".
Writes JSON: the per-head masses, the rule, and `heads`, the string `adsa.heads` takes.

  python benchmarks/head_calibration.py --images 16 --out adsa_vllm/assets/head_classes.json   # the shipped file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.default_model import SHIPPED_DIR  # noqa: E402
from adsa_vllm.llamagen.convert import load_reference  # noqa: E402


def head_masses(model, cond: torch.Tensor, tokens: torch.Tensor, prefix: int, local: int) -> torch.Tensor:
    """[layers, heads, 2] mean (window mass, prefix mass) over the queries t >= prefix + local of every image."""
    cfg = model.config
    t_cond = cfg.cls_token_num
    h = torch.cat([model.embed_cond(cond), model.tok_embeddings(tokens[:, :-1])], dim=1)   # fed positions
    n = h.shape[1]
    pos = torch.arange(n)
    caches = [(torch.zeros(len(cond), cfg.kv_heads, n, cfg.head_dim), torch.zeros(len(cond), cfg.kv_heads, n,
                                                                                  cfg.head_dim))
              for _ in range(cfg.n_layer)]
    t = torch.arange(prefix + local, n)
    key = torch.arange(n)
    window = (key[None] > t[:, None] - local) & (key[None] <= t[:, None])                  # [T, n]
    sinks = (key[None] < prefix).expand_as(window)
    out = torch.zeros(cfg.n_layer, cfg.n_head, 2)

    def hook(layer, q):   # q [B, H, n, D] post-RoPE; this layer's K is cached
        k = caches[layer][0].repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
        logits = (q[:, :, t] @ k.transpose(-1, -2)) * cfg.head_dim ** -0.5                # [B, H, T, n]
        p = logits.masked_fill(key[None] > t[:, None], float("-inf")).softmax(-1)
        out[layer, :, 0] = (p * window).sum(-1).mean(dim=(0, 2))
        out[layer, :, 1] = (p * sinks).sum(-1).mean(dim=(0, 2))

    causal = (key[None] <= key[:, None])[None, None]
    model.forward_hidden(h, pos, caches, causal, hook=hook, rope_offset=cfg.position_offset(t_cond))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(SHIPPED_DIR))
    ap.add_argument("--images", type=int, default=16, help="training images (the first N)")
    ap.add_argument("--local-share", type=float, default=0.5, help="window mass at which a head counts as local")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_reference(a.model, device="cpu", dtype=torch.float32).eval()
    cfg = model.config
    x, y = fm.load("train")
    tokens = torch.as_tensor(fm.tokenize(x[:a.images])).long()
    prefix, local = cfg.cls_token_num + cfg.grid_size, cfg.grid_size + 1      # the layout's defaults
    with torch.no_grad():
        m = head_masses(model, torch.as_tensor(y[:a.images]).long(), tokens, prefix, local)
    heads = "/".join("".join("L" if w >= a.local_share else "S" for w in layer[:, 0].tolist()) for layer in m)
    result = {"model": str(a.model), "images": f"the first {a.images} Fashion-MNIST training images",
              "prefix_tokens": prefix, "local_tokens": local, "local_share": a.local_share,
              "window_mass": [[round(v, 4) for v in layer[:, 0].tolist()] for layer in m],
              "prefix_mass": [[round(v, 4) for v in layer[:, 1].tolist()] for layer in m],
              "heads": heads}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
