"""The kernels over every layer's cache (adsa_vllm/worker/cache_table.py) equal the per-layer torch paths: the slot
refill (token_copy.py) and the candidate reads (layer_gather.py).

The kernel is Triton; on a machine without a GPU it runs in Triton's interpreter (TRITON_INTERPRET=1, set before
the kernel is defined, hence a fresh process). On a GPU the compiled kernel is checked the same way, and the whole
token path by benchmarks/gpu_check.py --checks token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from adsa_vllm.worker.layer_gather import gather_part_all_layers
    from adsa_vllm.worker.token_copy import copy_tokens_all_layers

    def caches(layers, nb, h, bs, d, dtype, dev, seed):
        # vLLM's FLASH_ATTN cache: logical (blocks, heads, slots, 2 x head_size), stored NHD (blocks, slots, heads, .)
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 255, (nb, bs, h, 2 * d), generator=g).to(dtype).to(dev).permute(0, 2, 1, 3)
                if dtype == torch.uint8 else
                torch.randn(nb, bs, h, 2 * d, generator=g).to(dtype).to(dev).permute(0, 2, 1, 3)
                for _ in range(layers)]

    dev = "{dev}"
    # words of 8 bytes (float32, bfloat16 at head_size 8), 2 and 1 bytes (fp8-sized caches at head_size 2, 3)
    for dtype, d in ((torch.float32, 8), (torch.bfloat16, 8), (torch.uint8, 2), (torch.uint8, 3)):
        layers, nb, h, bs, n = 3, 9, 4, 16, 37
        g = torch.Generator().manual_seed(1)
        src_b = torch.randint(5, nb, (layers, n), generator=g)      # sources: blocks 5..8, destinations 0..4
        dst_b = torch.randint(0, 5, (layers, n), generator=g)
        heads, src_o, dst_o = (torch.randint(0, m, (layers, n), generator=g) for m in (h, bs, bs))
        # unique destinations per layer, except the null block 0 that pairs which are not real all go to
        key = dst_b * h * bs + heads * bs + dst_o
        for li in range(layers):
            seen = set()
            for i in range(n):
                if dst_b[li, i] != 0 and int(key[li, i]) in seen:
                    dst_b[li, i] = 0
                seen.add(int(key[li, i]))
        args = [t.to(dev) for t in (src_b, src_o, heads, dst_b, dst_o)]
        fused, loop = caches(layers, nb, h, bs, d, dtype, dev, 0), caches(layers, nb, h, bs, d, dtype, dev, 0)
        before = [c.clone() for c in fused]
        copy_tokens_all_layers(fused, *args, "FLASH_ATTN", d, fused=True)
        copy_tokens_all_layers(loop, *args, "FLASH_ATTN", d, fused=False)
        for f, l, b in zip(fused, loop, before):
            real = slice(1, None)    # block 0 is the null block: what lands there is undefined
            assert torch.equal(f[real], l[real]), dtype
            assert not torch.equal(f[real], b[real])
        assert torch.equal(caches(1, nb, h, bs, d, dtype, dev, 0)[0][5:], fused[0][5:])  # sources intact
        ids = torch.tensor([7, 2, 2, 8, 0], device=dev)
        for part in ("keys", "values"):
            got = gather_part_all_layers(fused, ids, part, "FLASH_ATTN", d, fused=True)
            want = gather_part_all_layers(fused, ids, part, "FLASH_ATTN", d, fused=False)
            assert got.shape == (layers * 5, bs, h, d) and got.is_contiguous() and torch.equal(got, want), part
    print("ok")
""")


def _run(dev: str, env: dict) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK.format(dev=dev)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_one_kernel_copy_and_gather_equal_the_per_layer_torch_in_triton_interpreter():
    _run("cpu", {"TRITON_INTERPRET": "1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the interpreter case runs everywhere)")
def test_one_kernel_copy_and_gather_equal_the_per_layer_torch_on_gpu():
    _run("cuda", {})


def test_a_kernel_that_fails_is_turned_off_and_the_torch_path_gives_the_result(monkeypatch, caplog):
    """Chosen by default, a kernel that raises (e.g. it does not compile on this Triton) warns once, returns the
    per-layer result, and is not tried again in the process; forced (`fused=True`, tests and benchmarks) it raises."""
    from adsa_vllm.worker import cache_table
    monkeypatch.setattr(cache_table, "_failed", [])
    monkeypatch.setattr(cache_table, "applies",                                  # as on a GPU + Triton
                        lambda c, b, d: None if cache_table._failed else cache_table.cache_table(c, d))
    caches = [torch.zeros(2, 1, 16, 4)]
    tries = []

    def kernel(table):
        tries.append(table.word)
        raise RuntimeError("PassManager::run failed")

    assert cache_table.run(kernel, lambda: "torch", None, caches, "FLASH_ATTN", 2) == "torch"
    assert cache_table.run(kernel, lambda: "torch", None, caches, "FLASH_ATTN", 2) == "torch"
    assert len(tries) == 1 and "PassManager::run failed" in caplog.text
    assert len(cache_table._failed) == 1                           # `applies` says no for the rest of the process
    with pytest.raises(RuntimeError, match="PassManager"):
        cache_table.run(kernel, lambda: "torch", True, caches, "FLASH_ATTN", 2)
