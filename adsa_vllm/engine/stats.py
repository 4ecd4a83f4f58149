"""What the ADSA scheduler reports each step, and how it reaches vLLM's stat loggers.

The EngineCore (scheduler) and the API server (stat loggers, /metrics) are separate processes in a server. vLLM
moves per-step numbers between them as `SchedulerStats`, built by `Scheduler.make_stats()` and carried inside the
msgspec-serialised `EngineCoreOutputs` to `StatLoggerBase.record(scheduler_stats, ...)`. The carrier chosen here:
`ADSASchedulerMixin.make_stats` returns `ADSASchedulerStats`, vLLM's SchedulerStats plus one field `adsa`.
Why not an existing field: none is free (`kv_connector_stats` would be handed to the KV-connector loggers, which
assert a connector is configured; the LoRA dicts feed the LoRA gauges). msgspec encodes the subclass's extra field
but decodes into the declared type (`SchedulerStats`) and drops it, so the API process decodes with
patches/engine_core_outputs_adsa_stats.py (the same struct, `scheduler_stats` typed as this subclass); in-process
engines (no serialisation) need nothing.

Counters are sent as running totals, not per-step deltas: make_stats may be called for a step whose stats are
then dropped (vLLM attaches them to one front-end only), and a total loses nothing; the logger exports the totals
as they are, merged by max over API processes (adsa_vllm/metrics.py says why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vllm.v1.metrics.stats import SchedulerStats


@dataclass
class ADSAStats:
    blocks_freed: int = 0          # total evicted blocks returned to the pool since start
    blocks_held: int = 0           # blocks the running requests hold now
    blocks_full_attention: int = 0  # blocks the same requests would hold now without eviction
    admission_waits: int = 0       # total times the admission gate said "not yet" to a waiting request
    preemptions: int = 0           # total preemptions (peak admission has none; average admission swaps)
    preemptions_by_kind: dict[str, int] = field(default_factory=dict)   # totals: swap_out, swap_in, recomputed
    swap_bytes: dict[str, int] = field(default_factory=dict)   # total KV bytes swapped, per direction (out, in)
    blocks_on_host: int = 0        # kept blocks of swapped-out requests waiting in host memory now
    requests_by_policy: dict[str, int] = field(default_factory=dict)   # total requests registered, per policy
    finished_by_reason: dict[str, int] = field(default_factory=dict)   # total requests finished, per finish reason

    @property
    def kept_ratio(self) -> float:
        """held / full attention; 1.0 when nothing is held (no eviction in effect)."""
        return self.blocks_held / self.blocks_full_attention if self.blocks_full_attention else 1.0


@dataclass
class ADSASchedulerStats(SchedulerStats):
    adsa: ADSAStats | None = None


def with_adsa(stats: SchedulerStats, adsa: ADSAStats) -> ADSASchedulerStats:
    """vLLM's stats of this step (fields shared, not copied) plus the ADSA numbers."""
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(SchedulerStats)}
    return ADSASchedulerStats(**fields, adsa=adsa)
