"""Swap preemption: how freed blocks become concurrency without giving up exactness.

Why: admission that reserves each request's peak (`DemandProfile`, "peak" mode) never preempts, but a closed batch
then runs pool / peak sequences, all in phase: every one of them ramps up to its bound at the same time. Admitting by
the *life-average* footprint ("average" mode, the default) runs about a third more sequences at a 50% budget; when
the in-phase ramp outgrows the pool, vLLM preempts the youngest request. vLLM's own preemption recomputes: it would
re-prefill the sequence with full attention, which is not what the evicted sequence computed. Here an ADSA request is
preempted by **swap**: its kept blocks (at most its bound) are copied to pinned host memory by the worker, before the
next forward lets a new owner write them, and copied back into fresh blocks when it resumes; its eviction state stays
in the worker. The resumed request computes exactly what it would have (tests/test_swap.py).

The protocol rides on vLLM's own preemption: `_preempt_request` frees the blocks and queues the request first among
the waiting; ADSAScheduler keeps its `num_computed_tokens`, so vLLM resumes it like a request whose KV arrived from a
connector (only the remaining tokens are scheduled), and its `allocate_slots` rebuilds the block list first. The
copies are ordered on `SchedulerOutput.adsa_swaps` (touchpoint `scheduler-output-swaps`), and the worker runs them
in `on_schedule`, before vLLM's own state update and the forward.

Host memory is bounded: admission keeps (running requests' future peak + blocks on the host) within the pool plus
`swap_space_gib`, so a preemption always finds room; if it did not, the request would be recomputed (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SwapOrders:
    """One step's copies, req id -> (logical blocks, physical blocks): `out` device -> host, `into` host -> device."""
    out: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    into: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.out or self.into)


@dataclass
class SwapCounters:
    """Totals since start (/metrics: adsa:preemption_events_total{kind}, adsa:swap_bytes_total{direction})."""
    swapped_out: int = 0
    swapped_in: int = 0
    recomputed: int = 0
    blocks_out: int = 0
    blocks_in: int = 0

    def by_kind(self) -> dict[str, int]:
        return {"swap_out": self.swapped_out, "swap_in": self.swapped_in, "recomputed": self.recomputed}

    def bytes(self, block_bytes: int) -> dict[str, int]:
        """KV bytes moved per worker (a block's bytes over this worker's ADSA layers; TP ranks each move theirs)."""
        return {"out": self.blocks_out * block_bytes, "in": self.blocks_in * block_bytes}
