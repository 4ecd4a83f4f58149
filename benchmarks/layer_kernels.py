"""Host and device time of the kernels over every layer's cache (worker/cache_table.py) against the per-layer
torch paths they replace, on LlamaGen-XL's cache shapes:
- copy: token granularity's slot refill (worker/token_copy.py): a selection copies each head's winning new tokens
  over its losing slot entries in every layer, R requests x KV heads x a block of entries per head;
- gather: the candidate keys a query-dependent scorer reads (worker/layer_gather.py), R requests x C blocks, every
  layer (per-layer: a gather per layer, then `cat`).
Pure torch + Triton (no vLLM): runs on the GPU machine without staging.
  python benchmarks/layer_kernels.py --out benchmarks/results/layer_kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel_report import save_and_print  # noqa: E402
from adsa_vllm.worker.layer_gather import gather_part_all_layers  # noqa: E402
from adsa_vllm.worker.token_copy import copy_tokens_all_layers  # noqa: E402


def caches(layers: int, blocks: int, heads: int, bs: int, d: int, dev) -> list[torch.Tensor]:
    """vLLM's FLASH_ATTN caches: logical (blocks, heads, slots, 2 x head_size), stored NHD, one tensor a layer."""
    return [torch.randn(blocks, bs, heads, 2 * d, device=dev).to(torch.bfloat16).permute(0, 2, 1, 3)
            for _ in range(layers)]


def timed(fn, sync, reps: int = 50) -> tuple[float, float]:
    """Median (host ms: until the call returns, total ms: until its work is done)."""
    for _ in range(5):
        fn()
    host, total = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        host.append((t1 - t0) * 1e3)
        total.append((time.perf_counter() - t0) * 1e3)
    return sorted(host)[reps // 2], sorted(total)[reps // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[4, 16, 64], help="sequences selecting in one step")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2048, help="blocks per layer's cache")
    ap.add_argument("--candidates", type=int, default=16, help="candidate blocks per request (gather)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run in Triton's interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bs, h, d, n_layers = a.block_size, a.heads, a.head_size, a.layers
    fused_caches, loop_caches = (caches(n_layers, a.blocks, h, bs, d, dev) for _ in range(2))
    for f, lp in zip(fused_caches, loop_caches):
        lp.copy_(f)
    results = []
    for r in a.requests:
        g = torch.Generator(device=dev).manual_seed(r)
        entries = r * h * bs                                   # a block's worth of winners per request and head
        # each request: sources in its 2 newly aged blocks, destinations in its own slot blocks (distinct per head)
        req = torch.arange(r, device=dev).repeat_interleave(h * bs).expand(n_layers, -1)
        heads = torch.arange(h, device=dev).repeat_interleave(bs).repeat(r).expand(n_layers, -1)
        slot = torch.arange(bs, device=dev).repeat(r * h).expand(n_layers, -1)
        src_b = 1 + 4 * req + torch.randint(0, 2, (n_layers, entries), device=dev, generator=g)
        src_o = torch.randint(0, bs, (n_layers, entries), device=dev, generator=g)
        dst_b = 3 + 4 * req
        args = [t.contiguous() for t in (src_b, src_o, heads, dst_b, slot)]
        copy_tokens_all_layers(fused_caches, *args, "FLASH_ATTN", d, fused=True)
        copy_tokens_all_layers(loop_caches, *args, "FLASH_ATTN", d, fused=False)
        same = all(torch.equal(f, lp) for f, lp in zip(fused_caches, loop_caches))
        fh, ft = timed(lambda: copy_tokens_all_layers(fused_caches, *args, "FLASH_ATTN", d, fused=True), sync)
        lh, lt = timed(lambda: copy_tokens_all_layers(loop_caches, *args, "FLASH_ATTN", d, fused=False), sync)
        row = {"kernel": "copy", "requests": r, "entries_per_layer": entries, "same": same,
               "per_layer_host_ms": lh, "per_layer_total_ms": lt, "fused_host_ms": fh, "fused_total_ms": ft}
        results.append(row)
        print(json.dumps(row), flush=True)
        ids = torch.randint(1, a.blocks, (r * a.candidates,), device=dev, generator=g)

        def gather(fused):
            return gather_part_all_layers(fused_caches, ids, "keys", "FLASH_ATTN", d, fused=fused)
        fh, ft = timed(lambda: gather(True), sync)
        lh, lt = timed(lambda: gather(False), sync)
        row = {"kernel": "gather", "requests": r, "entries_per_layer": r * a.candidates * bs * h,
               "same": torch.equal(gather(True), gather(False)), "per_layer_host_ms": lh, "per_layer_total_ms": lt,
               "fused_host_ms": fh, "fused_total_ms": ft}
        results.append(row)
        print(json.dumps(row), flush=True)
    rep = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "layers": n_layers, "kv_heads": h, "head_size": d, "block_size": bs,
           "results": results}
    save_and_print(rep, a.out, ["kernel", "requests", "entries / layer", "per-layer host / total ms",
                                "one kernel host / total ms", "same"],
                   [[x["kernel"], str(x["requests"]), str(x["entries_per_layer"]),
                     f"{x['per_layer_host_ms']:.3f} / {x['per_layer_total_ms']:.3f}",
                     f"{x['fused_host_ms']:.3f} / {x['fused_total_ms']:.3f}", str(x["same"])] for x in results])


if __name__ == "__main__":
    main()
