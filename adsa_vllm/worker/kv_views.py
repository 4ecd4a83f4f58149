"""Read whole K/V blocks of a paged cache (for scoring) and copy single tokens of one head inside it (token
granularity's slot replacements), in each inner kernel's layout.

Returned shapes: keys, values [n, block_size, num_kv_heads, head_dim] for the n requested physical blocks.
  * CPU_ATTN: tensor (nb, H, bs, 2D) reinterpreted as (nb, H, 2bs, D); the first half holds keys *transposed*
    ([D, bs] per block and head, for the vectorised kernels), the second half values [bs, D]. The layout is
    checked once against the kernel's own writer (`check_cpu_layout`), so a kernel change fails loudly.
  * FLASH_ATTN / TRITON_ATTN / FLEX_ATTENTION: logical (nb, H, bs, 2D), K then V in the last dim.
"""

from __future__ import annotations

import functools

import torch


def gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, backend: str, head_size: int):
    if backend == "CPU_ATTN":
        nb, h, bs, _ = kv_cache.shape
        blocks = kv_cache.view(nb, h, 2 * bs, head_size)[block_ids]           # [n, H, 2bs, D]
        keys = blocks[:, :, :bs].reshape(-1, h, head_size, bs).permute(0, 3, 1, 2)
        values = blocks[:, :, bs:].permute(0, 2, 1, 3)
        return keys, values
    blocks = kv_cache[block_ids].transpose(1, 2)                               # [n, bs, H, 2D]
    return blocks[..., :head_size], blocks[..., head_size:]


def gather_part(kv_cache: torch.Tensor, block_ids: torch.Tensor, part: str, backend: str,
                head_size: int) -> torch.Tensor:
    """Only the keys or only the values (`part`) of the requested blocks, [n, block_size, num_kv_heads, head_dim]:
    half the reads of `gather_blocks` when a scorer needs one of them."""
    if backend == "CPU_ATTN":
        nb, h, bs, _ = kv_cache.shape
        halves = kv_cache.view(nb, h, 2, bs * head_size)
        if part == "keys":
            return halves[:, :, 0][block_ids].view(-1, h, head_size, bs).permute(0, 3, 1, 2)
        return halves[:, :, 1][block_ids].view(-1, h, bs, head_size).transpose(1, 2)
    half = kv_cache[..., :head_size] if part == "keys" else kv_cache[..., head_size:]
    return half[block_ids].transpose(1, 2)


def copy_tokens(kv_cache: torch.Tensor, src_blocks: torch.Tensor, src_offsets: torch.Tensor, heads: torch.Tensor,
                dst_blocks: torch.Tensor, dst_offsets: torch.Tensor, backend: str, head_size: int) -> None:
    """Copy one head's K and V of single tokens inside one layer's cache, in place: entry i goes from (block
    src_blocks[i], KV head heads[i], slot src_offsets[i]) to (dst_blocks[i], heads[i], dst_offsets[i]). Sources and
    destinations must not overlap (token granularity copies newly aged tokens over slot entries: other blocks)."""
    if backend == "CPU_ATTN":   # per (block, head): keys transposed [D, bs], then values [bs, D]
        nb, h, bs, _ = kv_cache.shape
        flat = kv_cache.view(nb, h, 2 * bs * head_size)
        d = torch.arange(head_size, device=kv_cache.device)
        hh, src_o, dst_o = heads[:, None], src_offsets[:, None], dst_offsets[:, None]
        for dst_at, src_at in ((d * bs + dst_o, d * bs + src_o),                                 # keys, then values
                               (bs * head_size + dst_o * head_size + d, bs * head_size + src_o * head_size + d)):
            flat[dst_blocks[:, None], hh, dst_at] = flat[src_blocks[:, None], hh, src_at]
        return
    kv_cache[dst_blocks, heads, dst_offsets] = kv_cache[src_blocks, heads, src_offsets]


def value_blocks(kv_cache: torch.Tensor, backend: str, head_size: int) -> torch.Tensor:
    """A view of the values only, [num_blocks, num_kv_heads, block_size, head_dim] (no copy)."""
    if backend == "CPU_ATTN":
        nb, h, bs, _ = kv_cache.shape
        return kv_cache.view(nb, h, 2 * bs, head_size)[:, :, bs:]
    return kv_cache[..., head_size:]


@functools.lru_cache(maxsize=None)
def check_cpu_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> None:
    """Write known K/V with the CPU kernel's writer and read them back through `gather_blocks`."""
    from vllm import _custom_ops as ops
    h, nb = 2, 3
    cache = torch.zeros(nb, h, block_size, 2 * head_size, dtype=dtype)
    key_cache, value_cache = cache.view(nb, h, 2 * block_size, head_size).chunk(2, dim=2)
    k = torch.randn(block_size, h, head_size).to(dtype)
    v = torch.randn(block_size, h, head_size).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(block_size) + block_size, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    rk, rv = gather_blocks(cache, torch.tensor([1]), "CPU_ATTN", head_size)
    if not (torch.equal(rk[0], k) and torch.equal(rv[0], v)):
        raise NotImplementedError(
            f"ADSA cannot read the CPU KV layout of ISA {isa!r} ({dtype}, block {block_size}); "
            "run with --dtype float32 or --block-size 16, whose layouts are supported")


def check_layout(kv_cache: torch.Tensor, backend: str, head_size: int) -> None:
    """Before reading the CPU kernel's cache: its layout depends on the ISA (checked once per kind, cached)."""
    if backend == "CPU_ATTN":
        check_cpu_layout(_cpu_isa(kv_cache.dtype, kv_cache.shape[2], head_size), kv_cache.dtype,
                         kv_cache.shape[2], head_size)


_ISA: dict = {}


def _cpu_isa(dtype, block_size, head_size) -> str:
    key = (dtype, block_size, head_size)
    if key not in _ISA:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        _ISA[key] = _get_attn_isa(dtype, block_size, head_size, "auto")
    return _ISA[key]
