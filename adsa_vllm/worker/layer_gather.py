"""The keys or values of the same blocks in many layers, read in one Triton kernel into one contiguous tensor.

The query-dependent scorers (worker/query_scoring.py) and token granularity's query-free ones (token_gather.py) read
every candidate block of a chunk of layers. Per layer in torch that is a gather into a temporary, then a `cat` into
the tensor the scorer reads: each key copied twice and ~3 launches a layer. Here one kernel reads each (layer, block,
slot, head) entry once through the table of the layers' caches (cache_table.py) and writes it where the `cat` would
have. Where that does not apply, the per-layer torch path (`kv_views.gather_part`) runs, the semantics both share.
"""

from __future__ import annotations

import torch

from adsa_vllm.worker import cache_table
from adsa_vllm.worker.kv_views import gather_part

triton, tl = cache_table.triton, cache_table.tl
ENTRIES_PER_PROGRAM = 64   # 64 entries of one head_size each: a few KB a program


if triton is not None:
    @triton.jit
    def _gather_entries(addresses, src, out, entries_per_layer, total, ENTRY_WORDS: tl.constexpr,
                        WORDS_BLOCK: tl.constexpr, ENTRIES: tl.constexpr, WORD: tl.constexpr):
        """Entry i (layer-major) of `out`: ENTRY_WORDS words from word offset src[i % entries_per_layer] of layer
        i // entries_per_layer's cache."""
        i = tl.program_id(0) * ENTRIES + tl.arange(0, ENTRIES)
        live = i < total
        base = cache_table.layer_base(addresses, i // entries_per_layer, live, WORD)
        s = tl.load(src + i % entries_per_layer, mask=live, other=0)
        cols = tl.arange(0, WORDS_BLOCK)
        m = live[:, None] & (cols[None, :] < ENTRY_WORDS)
        x = tl.load(base[:, None] + s[:, None] + cols[None, :], mask=m)
        tl.store(out + i[:, None] * ENTRY_WORDS + cols[None, :], x, mask=m)


def gather_part_all_layers(caches: list[torch.Tensor], block_ids: torch.Tensor, part: str, backend: str,
                           head_size: int, fused: bool | None = None) -> torch.Tensor:
    """[layers * n, block_size, kv_heads, head_size]: `kv_views.gather_part` of the n blocks `block_ids` ("keys" or
    "values") in each cache, layer-major, as `torch.cat` of the per-layer reads would give. `fused`: force (True) or
    forbid (False) the one kernel; by default it runs where it applies."""
    def per_layer():
        return torch.cat([gather_part(c, block_ids, part, backend, head_size) for c in caches])

    def one_kernel(t: cache_table.CacheTable):
        first = caches[0]
        _, heads, bs, _ = first.shape
        n, layers = block_ids.numel(), len(caches)
        out = torch.empty(layers * n, bs, heads, head_size, dtype=first.dtype, device=first.device)
        if out.numel() == 0:
            return out
        dev = block_ids.device
        src = (block_ids.reshape(-1, 1, 1).long() * t.block + torch.arange(bs, device=dev)[None, :, None] * t.slot
               + torch.arange(heads, device=dev)[None, None, :] * t.head + (t.half if part == "values" else 0))
        per_layer_entries = n * bs * heads                   # entries in the order of `out`: (block, slot, head)
        total = layers * per_layer_entries
        _gather_entries[(triton.cdiv(total, ENTRIES_PER_PROGRAM),)](
            t.addresses, src.reshape(-1), out.view(cache_table.WORD_DTYPES[t.word]), per_layer_entries, total,
            ENTRY_WORDS=t.half, WORDS_BLOCK=triton.next_power_of_2(t.half), ENTRIES=ENTRIES_PER_PROGRAM, WORD=t.word)
        return out

    return cache_table.run(one_kernel, per_layer, fused, caches, backend, head_size)
