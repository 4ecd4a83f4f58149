"""Per physical KV block, the TopK-V summary of every layer, so a selection never re-reads the KV cache.

TopK-V's score of a candidate block is a function of one [H, D] summary per layer (the sum of its unit value
vectors, `TopKV.summarize`). A block's values never change once it is complete, so each sequence summarises a
block exactly once, when it first becomes a candidate, into the row of its physical block id; every later selection
reads only the summaries of its candidates ([R, C, L, H, D], ~1/(2 * block_size) of their K/V bytes) and scores all
layers at once. Without this, every selection gathered every layer's K and V of every candidate (~1 GB per step at
LlamaGen-XL scale).

Why the rows are safe to share between sequences: a sequence only reads rows of blocks it holds and has summarised
itself (the `summarized` watermark of its LiveSequence); a block that is freed and handed to another sequence is
summarised again by that sequence before it ever reads the row. A preempted sequence restarts with a fresh watermark.
An fp8 cache is read in fp8 (see `_typed`). Memory: num_blocks * L * H * D in float32 for float32 caches, else
bfloat16: 1/(2 * block_size) of the KV cache in
bf16 (~3% at block size 16), allocated on first use beside vLLM's KV budget.
"""

from __future__ import annotations

import torch

from adsa_vllm.worker.kv_views import value_blocks

# Temporary device memory a summary write or a scoring call may use at once (beside vLLM's KV budget).
SCRATCH_BYTES = 256 << 20


class BlockSummaries:
    def __init__(self):
        self.table: torch.Tensor | None = None   # [num_blocks, L, H, D]

    def _ensure(self, layers: list, backend: str) -> torch.Tensor:
        if self.table is None:
            kv = layers[0].kv_cache
            heads = kv.shape[1]
            dtype = torch.float32 if kv.dtype == torch.float32 else torch.bfloat16
            self.table = torch.zeros(kv.shape[0], len(layers), heads, layers[0].head_size, dtype=dtype,
                                     device=kv.device)
        return self.table

    def write(self, scorer, block_ids: torch.Tensor, layers: list, backend: str) -> None:
        """Summarise the physical blocks `block_ids` [n] in every layer: per chunk of blocks, one gather per layer
        into one buffer, then one summary and one write for all layers (few kernel launches: this runs on the step
        path). Chunks bound the temporary memory when many sequences reach their first selection at once."""
        table = self._ensure(layers, backend)
        views = [value_blocks(layer.kv_cache, backend, layer.head_size) for layer in layers]
        _, heads, bs, dim = views[0].shape
        per_block = len(views) * heads * bs * dim * 4    # bytes of one block in every layer, in float32
        chunk = max(1, SCRATCH_BYTES // per_block)
        for ids in block_ids.split(chunk):
            n = ids.numel()
            buf = torch.empty((len(views), n, heads, bs, dim), dtype=views[0].dtype, device=table.device)
            for i, v in enumerate(views):
                torch.index_select(v, 0, ids, out=buf[i])    # a byte copy also for fp8 caches (stored as uint8)
            values = _typed(buf, layers[0]).view(-1, heads, bs, dim).transpose(1, 2)    # [L * n, bs, H, D]
            summary = scorer.summarize(values)                                           # [L * n, H, D]
            table[ids] = summary.view(len(views), n, heads, dim).transpose(0, 1).to(table.dtype)

    def rows_per_chunk(self, num_candidates: int) -> int:
        """How many rows of `num_candidates` summaries one scoring call may read (float32) within the scratch
        budget."""
        _, layers, heads, dim = self.table.shape
        return max(1, SCRATCH_BYTES // (num_candidates * layers * heads * dim * 4 * 3))

    def read(self, block_ids: torch.Tensor) -> torch.Tensor:
        """block_ids [R, C] -> summaries [R, C, L, H, D] (padding reads row 0, the null block; masked by `valid`)."""
        return self.table[block_ids]


def _typed(values: torch.Tensor, layer) -> torch.Tensor:
    """Values in their element type: vLLM stores an fp8 cache as uint8. The per-tensor fp8 scale does not matter
    here: a summary adds *unit* value vectors, and a common scale leaves every direction unchanged."""
    if values.dtype != torch.uint8:
        return values
    e5m2 = str(getattr(layer, "kv_cache_dtype", "")).endswith("e5m2")
    return values.view(torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn)
