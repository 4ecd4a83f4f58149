"""Swap preemption: how freed blocks become concurrency without giving up exactness.

Why: admission that reserves each request's peak (`DemandProfile`, "peak") never preempts, but a closed batch then
runs pool / bound sequences, all in phase, and the blocks an ADSA sequence does not hold yet (it ramps up to its bound
over its budget) buy nothing. Admitting more means that the pool can run short, and then vLLM preempts the newest
request. vLLM's own preemption recomputes: it would re-prefill the sequence with full attention, which is not what
the evicting sequence computed. Here an ADSA request is preempted by **swap**: its kept blocks (at most its bound)
are copied to pinned host memory by the worker, before the next forward lets a new owner write them, and copied back
into fresh blocks when it resumes; its eviction state stays in the worker. The resumed request computes exactly what
it would have (tests/test_swap.py).

Admission rules that preempt (ADSAScheduler._fits): "overcommit" is vLLM's own rule, blocks free now; "average"
admits while the running requests' life-average footprints fit the pool. A step-level model on the scheduler's own
footprint formula (benchmarks/admission_model.py, which the engine reproduces step for step) shows what each buys:
in a closed batch the requests stay in phase, so a life-average rule admits a cohort whose ramps all collide, swaps
the surplus out and runs no more than peak admission (CPU engine, 64 requests of 1024 tokens, 729 blocks, 50%: 3,072
steps for both), while overcommit fills the pool during every ramp (2,576 steps, mean running 25.4 against 21.3;
stock vLLM 3,431). On an H100 (XL, 256 requests, 8 GiB) overcommit ran 1.30x stock's mean running, but its 388
swaps of about 62 MB each way made the step 9.2 ms against peak's 5.3: 0.94x stock against peak's 1.36x
(benchmarks/results/throughput_admission_h100.md). So "peak" stays the default until the copies leave the step's
critical path; the preempting rules are there, exact, to be chosen where a step is long or copies are cheap.

The protocol rides on vLLM's own preemption: `_preempt_request` frees the blocks and queues the request first among
the waiting; ADSAScheduler keeps its `num_computed_tokens`, so vLLM resumes it like a request whose KV arrived from a
connector (only the remaining tokens are scheduled), and its `allocate_slots` rebuilds the block list first, once
the running requests and it fit the pool for the next RESUME_HORIZON steps (else it would soon be swapped again). The
copies are ordered on `SchedulerOutput.adsa_swaps` (touchpoint `scheduler-output-swaps`), and the worker runs them
in `on_schedule`, before vLLM's own state update and the forward.

Host memory is bounded: admission keeps (running requests' future peak + blocks on the host) within the pool plus
`swap_space_gib`, so a preemption always finds room; if it did not, the request would be recomputed (counted). With
`swap_space_gib` 0 a preempting rule admits only what fits at peak.
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
