"""Token granularity's slot refills in every layer at once: one Triton kernel over all layers' caches.

At each selection a head's winning new tokens overwrite its losing slot entries, in every layer. Done with torch
indexing layer by layer, that was ~8 small kernels per layer (read the candidate blocks, pick the winners, write
them), ~300 launches per selection on a 36-layer model: the likely main part of token mode's extra host time (it ran
at 0.85x of block mode's throughput for random, 0.71x for TopK-V, H200; not profiled). Here one kernel copies every
(layer, token, head) entry through the table of the layers' caches (cache_table.py); where that does not apply, each
layer copies with `kv_views.copy_tokens` (two kernels a layer), the semantics both share.
"""

from __future__ import annotations

import torch

from adsa_vllm.worker import cache_table
from adsa_vllm.worker.kv_views import copy_tokens

triton, tl = cache_table.triton, cache_table.tl
ENTRIES_PER_PROGRAM = 16


if triton is not None:
    @triton.jit
    def _copy_entries(addresses, src, dst, entries_per_layer, total, ENTRY_WORDS: tl.constexpr,
                      WORDS_BLOCK: tl.constexpr, ENTRIES: tl.constexpr, WORD: tl.constexpr):
        """Entries [pid * ENTRIES, (pid + 1) * ENTRIES) of the layer-major list: copy ENTRY_WORDS words from word
        offset src[i] to dst[i] of layer i // entries_per_layer's cache."""
        i = tl.program_id(0) * ENTRIES + tl.arange(0, ENTRIES)
        live = i < total
        base = cache_table.layer_base(addresses, i // entries_per_layer, live, WORD)
        s = tl.load(src + i, mask=live, other=0)
        d = tl.load(dst + i, mask=live, other=0)
        cols = tl.arange(0, WORDS_BLOCK)
        m = live[:, None] & (cols[None, :] < ENTRY_WORDS)
        x = tl.load(base[:, None] + s[:, None] + cols[None, :], mask=m)
        tl.store(base[:, None] + d[:, None] + cols[None, :], x, mask=m)


def copy_tokens_all_layers(caches: list[torch.Tensor], src_blocks: torch.Tensor, src_offsets: torch.Tensor,
                           heads: torch.Tensor, dst_blocks: torch.Tensor, dst_offsets: torch.Tensor, backend: str,
                           head_size: int, fused: bool | None = None) -> None:
    """For every layer l: copy entry i of row l (arguments [layers, entries]) as `kv_views.copy_tokens` does in
    caches[l]. `fused`: force (True) or forbid (False) the one kernel; by default it runs where it applies."""
    def per_layer():
        for li, cache in enumerate(caches):
            copy_tokens(cache, src_blocks[li], src_offsets[li], heads[li], dst_blocks[li], dst_offsets[li], backend,
                        head_size)

    def one_kernel(t: cache_table.CacheTable):
        if src_blocks.numel() == 0:
            return
        src = src_blocks * t.block + heads * t.head + src_offsets * t.slot
        dst = dst_blocks * t.block + heads * t.head + dst_offsets * t.slot
        total, entry_words = src.numel(), 2 * t.half                 # K and V of one token and head
        _copy_entries[(triton.cdiv(total, ENTRIES_PER_PROGRAM),)](
            t.addresses, src.reshape(-1).contiguous(), dst.reshape(-1).contiguous(), src.shape[1], total,
            ENTRY_WORDS=entry_words, WORDS_BLOCK=triton.next_power_of_2(entry_words), ENTRIES=ENTRIES_PER_PROGRAM,
            WORD=t.word)

    cache_table.run(one_kernel, per_layer, fused, caches, backend, head_size)
