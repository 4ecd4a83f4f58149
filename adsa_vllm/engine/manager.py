"""`ADSAManager`: the scheduler-side KV manager of ADSA layers. It frees evicted blocks back to the BlockPool.

`req_to_blocks` stays position-indexed (entry j = tokens [j*bs, (j+1)*bs)); an evicted entry becomes the null
block, so vLLM's allocation math (one new block every block_size tokens, nulls counted) keeps working unchanged.

Who decides: the worker (see adsa_vllm/worker/runtime.py). Its report of step s arrives through
`ADSAScheduler.update_from_output(s)`, i.e. after step s finished and before step s+1 is scheduled; from step s on
the worker no longer reads those blocks, so returning them to the pool here can never race with a read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class SwappedKV:
    """A request whose kept blocks went to host memory (swap preemption, see adsa_vllm/engine/swap.py)."""
    logical: list[int]      # logical blocks copied out, ascending
    length: int             # entries of its block list at swap-out (nulls included)
    late_evictions: set[int] = field(default_factory=set)   # evicted by the worker after the swap-out (async lag)

    @property
    def kept(self) -> list[int]:
        """The logical blocks that come back on resume."""
        return [j for j in self.logical if j not in self.late_evictions]


class ADSAManager(FullAttentionManager):
    kv_cache_spec: ADSASpec

    def __init__(self, kv_cache_spec: ADSASpec, **kwargs):
        super().__init__(kv_cache_spec, **kwargs)
        self.requests: dict[str, RequestKV] = {}
        self.finished_stats: dict[str, RequestKV] = {}   # last few finished requests, for observability
        self.swapped: dict[str, SwappedKV] = {}          # requests preempted by swap, until they resume or finish
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

    # ---- swap preemption (called by ADSAScheduler; the worker copies, see adsa_vllm/worker/host_kv.py) ----
    def swap_out(self, req_id: str) -> tuple[list[int], list[int]] | None:
        """Record the request's kept blocks before vLLM frees its list: -> (logical, physical) for the worker's
        copy to host, or None (nothing held). The copy runs before the next forward, so before any new owner
        writes the freed blocks."""
        blocks, entry = self.req_to_blocks.get(req_id), self.requests.get(req_id)
        if entry is None or not blocks:
            return None
        logical = [j for j, b in enumerate(blocks) if not b.is_null]
        self.swapped[req_id] = SwappedKV(logical, len(blocks))
        return logical, [blocks[j].block_id for j in logical]

    def blocks_to_swap_in(self, req_id: str) -> int:
        return len(self.swapped[req_id].kept)

    def swap_in(self, req_id: str) -> tuple[list[int], list[int]]:
        """Rebuild the request's block list with fresh blocks at its kept positions and nulls elsewhere:
        -> (logical, physical) for the worker's copy from host. The caller checked that the pool has them."""
        record = self.swapped.pop(req_id)
        kept = record.kept
        fresh = self.block_pool.get_new_blocks(len(kept))
        blocks = [self.block_pool.null_block] * record.length
        for j, b in zip(kept, fresh):
            blocks[j] = b
        self.req_to_blocks[req_id] = blocks
        self.requests[req_id].nulls = record.length - len(kept)
        return kept, [b.block_id for b in fresh]

    def undo_swap_in(self, req_id: str, logical: list[int]) -> None:
        """vLLM did not schedule the request after all: back to the host copy (which the worker still has)."""
        length = len(self.req_to_blocks.get(req_id, ()))
        self.free(req_id)
        self.swapped[req_id] = SwappedKV(logical, length)

    def evict(self, req_id: str, logical_blocks: list[int]) -> int:
        """Null the given logical blocks of a running request and return them to the pool."""
        if req_id in self.swapped:   # decided in the step before the swap-out; its blocks were freed whole
            self.swapped[req_id].late_evictions.update(logical_blocks)
            return 0
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
        self.swapped.pop(req_id, None)
        entry = self.requests.pop(req_id, None)
        if entry is not None:
            self.finished_stats[req_id] = entry
            while len(self.finished_stats) > 4096:
                self.finished_stats.pop(next(iter(self.finished_stats)))

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        # Cascade attention would read a shared prefix through the uncompacted table; never offer one.
        return 0
