"""Token granularity's slot refills in every layer at once: one Triton kernel over all layers' caches.

At each selection a head's winning new tokens overwrite its losing slot entries, in every layer. Done with torch
indexing layer by layer, that was ~8 small kernels per layer (read the candidate blocks, pick the winners, write
them), ~300 launches per selection on a 36-layer model: the likely main part of token mode's extra host time (it ran
at 0.85x of block mode's throughput for random, 0.71x for TopK-V, H200; not profiled). The per-layer fallback below
is two kernels a layer (`kv_views.copy_tokens`). Here one kernel copies every (layer, token, head) entry: the layers'
caches are separate allocations with one shape and stride, so the kernel reads a table of their base addresses (the
pattern of Triton's grouped GEMM) and each entry's source and destination as offsets inside its layer's cache, in
the widest word (8, 4, 2 or 1 bytes) that every address and stride is a multiple of.

Used where it applies: CUDA caches in a layout whose token-head entry (K then V, 2 x head_size values) is contiguous
(FLASH_ATTN / TRITON_ATTN / FLEX_ATTENTION), all layers alike, Triton importable. Elsewhere (CPU_ATTN, whose keys are
stored transposed) each layer copies with `kv_views.copy_tokens`, the semantics both paths share.
"""

from __future__ import annotations

import torch

from adsa_vllm.worker.kv_views import copy_tokens

try:
    import triton
    import triton.language as tl
except ImportError:   # a CPU install without Triton: the per-layer copy
    triton = None

ENTRIES_PER_PROGRAM = 16


if triton is not None:
    @triton.jit
    def _copy_entries(bases, src, dst, entries_per_layer, total, ENTRY_WORDS: tl.constexpr,
                      WORDS_BLOCK: tl.constexpr, ENTRIES: tl.constexpr, WORD: tl.constexpr):
        """Entries [pid * ENTRIES, (pid + 1) * ENTRIES) of the layer-major list: copy ENTRY_WORDS words of WORD
        bytes from word offset src[i] to dst[i] of layer i // entries_per_layer's cache (address bases[layer])."""
        i = tl.program_id(0) * ENTRIES + tl.arange(0, ENTRIES)
        live = i < total
        address = tl.load(bases + i // entries_per_layer, mask=live, other=0)
        if WORD == 8:
            base = address.to(tl.pointer_type(tl.int64), bitcast=True)
        elif WORD == 4:
            base = address.to(tl.pointer_type(tl.int32), bitcast=True)
        elif WORD == 2:
            base = address.to(tl.pointer_type(tl.int16), bitcast=True)
        else:
            base = address.to(tl.pointer_type(tl.uint8), bitcast=True)
        s = tl.load(src + i, mask=live, other=0)
        d = tl.load(dst + i, mask=live, other=0)
        cols = tl.arange(0, WORDS_BLOCK)
        m = live[:, None] & (cols[None, :] < ENTRY_WORDS)
        x = tl.load(base[:, None] + s[:, None] + cols[None, :], mask=m)
        tl.store(base[:, None] + d[:, None] + cols[None, :], x, mask=m)


def fused_copy_applies(caches: list[torch.Tensor], backend: str) -> bool:
    """Whether `copy_tokens_all_layers` can use the one kernel for these caches."""
    if triton is None or backend == "CPU_ATTN" or not caches:
        return False
    first = caches[0]
    return (first.device.type == "cuda" and first.stride(-1) == 1
            and all(c.shape == first.shape and c.stride() == first.stride() and c.dtype == first.dtype
                    for c in caches))


def copy_tokens_all_layers(caches: list[torch.Tensor], src_blocks: torch.Tensor, src_offsets: torch.Tensor,
                           heads: torch.Tensor, dst_blocks: torch.Tensor, dst_offsets: torch.Tensor, backend: str,
                           head_size: int, fused: bool | None = None) -> None:
    """For every layer l: copy entry i of row l (arguments [layers, entries]) as `kv_views.copy_tokens` does in
    caches[l]. `fused`: force (True) or forbid (False) the one kernel; by default it runs where it applies."""
    if fused is None:
        fused = fused_copy_applies(caches, backend)
    if not fused:
        for li, cache in enumerate(caches):
            copy_tokens(cache, src_blocks[li], src_offsets[li], heads[li], dst_blocks[li], dst_offsets[li], backend,
                        head_size)
        return
    first = caches[0]
    strides = [x * first.element_size() for x in first.stride()[:3]]
    entry_bytes = first.shape[-1] * first.element_size()          # K and V of one token and head
    table, addresses = _base_addresses(caches)
    word = next(w for w in (8, 4, 2, 1)                           # the widest word every address is aligned to
                if entry_bytes % w == 0 and all(x % w == 0 for x in (*strides, *addresses)))
    s_block, s_head, s_slot = (x // word for x in strides)
    src = src_blocks * s_block + heads * s_head + src_offsets * s_slot
    dst = dst_blocks * s_block + heads * s_head + dst_offsets * s_slot
    total = src.numel()
    if total == 0:
        return
    grid = (triton.cdiv(total, ENTRIES_PER_PROGRAM),)
    _copy_entries[grid](table, src.reshape(-1).contiguous(), dst.reshape(-1).contiguous(), src.shape[1], total,
                        ENTRY_WORDS=entry_bytes // word, WORDS_BLOCK=triton.next_power_of_2(entry_bytes // word),
                        ENTRIES=ENTRIES_PER_PROGRAM, WORD=word)


_BASES: dict = {}


def _base_addresses(caches: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The caches' base addresses as an int64 tensor on their device (and as ints), made once per set of caches
    (vLLM allocates them once; a new allocation gives new addresses and so a new table)."""
    key = tuple(c.data_ptr() for c in caches)
    table = _BASES.get(key)
    if table is None:
        _BASES.clear()
        table = _BASES[key] = torch.tensor(key, dtype=torch.int64, device=caches[0].device)
    return table, key
