"""`ADSAManager`: the scheduler-side KV manager of ADSA layers. It frees evicted blocks back to the BlockPool.

`req_to_blocks` stays position-indexed (entry j = tokens [j*bs, (j+1)*bs)); an evicted entry becomes the null
block, so vLLM's allocation math (one new block every block_size tokens, nulls counted) keeps working unchanged.

Who decides: the worker (see adsa_vllm/worker/runtime.py). Its report of step s arrives through
`ADSAScheduler.update_from_output(s)`, i.e. after step s finished and before step s+1 is scheduled; from step s on
the worker no longer reads those blocks, so returning them to the pool here can never race with a read.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from adsa_vllm.engine.spec import ADSASpec
from adsa_vllm.policy import BlockLayout


@dataclass
class RequestKV:
    layout: BlockLayout
    bound: int              # most blocks this request may ever hold (what admission reserves)
    freed: int = 0
    peak_held: int = 0      # most blocks held so far, recorded before each eviction and at the final free
    nulls: int = 0          # evicted entries in the request's current block list (held = len(list) - nulls)


class ADSAManager(FullAttentionManager):
    kv_cache_spec: ADSASpec

    def __init__(self, kv_cache_spec: ADSASpec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        self.requests: dict[str, RequestKV] = {}
        self.finished_stats: dict[str, RequestKV] = {}   # last few finished requests, for observability
        self.total_freed = 0

    # ---- request lifecycle (called by ADSAScheduler) ----
    def register(self, req_id: str, overrides: dict | None, max_len: int, prompt_len: int | None = None) -> RequestKV:
        """max_len: prompt + max_tokens. The last sampled token is never fed back, so it needs no KV slot.
        prompt_len: the condition length (a t2i caption's rows); None: the model's cls_token_num."""
        layout = self.kv_cache_spec.layout(overrides, prompt_len)
        full = cdiv(min(max_len, layout.seq_len) - 1, self.block_size)
        entry = RequestKV(layout=layout, bound=min(layout.held_bound, full))
        self.requests[req_id] = entry
        return entry

    def held_blocks(self, req_id: str) -> int:
        """Blocks the request holds now. O(1): the scheduler asks for every running request at every step."""
        blocks, entry = self.req_to_blocks.get(req_id, ()), self.requests.get(req_id)
        if entry is None:
            return sum(not b.is_null for b in blocks)
        return len(blocks) - entry.nulls if blocks else 0

    def free(self, request_id: str) -> None:
        """Finish or preemption: the whole list goes back to the pool (a resumed request starts a new one)."""
        entry = self.requests.get(request_id)
        if entry is not None:
            entry.peak_held = max(entry.peak_held, self.held_blocks(request_id))
            entry.nulls = 0
        super().free(request_id)

    def evict(self, req_id: str, logical_blocks: list[int]) -> int:
        """Null the given logical blocks of a running request and return them to the pool."""
        entry, blocks = self.requests.get(req_id), self.req_to_blocks.get(req_id)
        if entry is None or not blocks:
            return 0  # finished or preempted in the same step: its blocks were already freed whole
        # Held blocks only grow between evictions, so the peak is always the count just before one (or before
        # the final free): recording it here costs nothing per step.
        entry.peak_held = max(entry.peak_held, len(blocks) - entry.nulls)
        prefix = entry.layout.prefix_blocks
        freed = []
        for j in logical_blocks:
            # The worker never evicts prefix blocks or the tail; refuse rather than corrupt the pool if it did.
            if not prefix <= j < len(blocks) - 1:
                raise RuntimeError(f"ADSA worker reported block {j} of {req_id}, outside the evictable range "
                                   f"[{prefix}, {len(blocks) - 1})")
            if not blocks[j].is_null:
                freed.append(blocks[j])
                blocks[j] = self.block_pool.null_block
        self.block_pool.free_blocks(freed)
        entry.nulls += len(freed)
        entry.freed += len(freed)
        self.total_freed += len(freed)
        return len(freed)

    def forget(self, req_id: str) -> None:
        """The request finished (or was aborted); its blocks were freed by `free()`. Keep its stats a while."""
        entry = self.requests.pop(req_id, None)
        if entry is not None:
            self.finished_stats[req_id] = entry
            while len(self.finished_stats) > 4096:
                self.finished_stats.pop(next(iter(self.finished_stats)))

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        # Cascade attention would read a shared prefix through the uncompacted table; never offer one.
        return 0
