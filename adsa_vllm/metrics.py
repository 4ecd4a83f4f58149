"""`ADSAStatLogger`: ADSA's numbers on the server's /metrics, through vLLM's stat-logger plugin path.

vLLM's AsyncLLM (the API server process) instantiates every class of the `vllm.stat_logger_plugins` entry-point
group (pyproject.toml) next to its own PrometheusStatLogger and calls `record(scheduler_stats, ...)` with each
step's stats from the EngineCore; ADSA's part rides in `scheduler_stats.adsa` (adsa_vllm/engine/stats.py). The
metrics land in prometheus_client's default registry, which /metrics serves. Side effect of any stat-logger
plugin in vLLM 0.26: AsyncLLM keeps stats on even with --disable-log-stats (vLLM's own loggers stay off then).
The offline `vllm.LLM` does not load stat-logger plugins; there `scheduler.adsa_stats()` is the interface.

Names start with `adsa:`, not `vllm:`: PrometheusStatLogger is built after plugin loggers and unregisters every
`vllm:` collector it finds. Labels follow vLLM's (`model_name`, `engine`), plus `policy` on the request totals.

The `adsa:..._total` series are gauges holding the engine's running total (`# TYPE gauge`), aggregated by max
across processes, not Counters. Why: `vllm serve --data-parallel-size N` starts N API-server processes by default,
each with its own AsyncLLM and its own copy of this logger, and vLLM then runs prometheus_client in multiprocess
mode (vllm/entrypoints/cli/serve.py sets PROMETHEUS_MULTIPROC_DIR): /metrics merges every process's values, and
merges Counters by sum. Each engine sends its stats with any one front-end's outputs, so every API process sees
(part of) every engine's totals; a Counter advanced by the totals each process saw counted them once per process
(16 requests read 32 with two API servers). The totals only grow, so the largest any process has seen is the true
latest total, and no increment is lost whichever front-end a step's stats went to: multiprocess_mode="max" (the
non-live mode, so a process's last value outlives the process). With one process it is a plain gauge set to the
total. PromQL's rate()/increase() work on these series as on counters; a total never resets while the server
lives (an engine's death ends the server). The live gauges use "mostrecent": the last stats recorded are the
engine's current state, whichever process recorded them.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Gauge
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from adsa_vllm.config import POLICIES
from adsa_vllm.settings import EngineSettings

PREFIX = "adsa:"


def _unregister_adsa_metrics() -> None:
    """A second engine in the same process (tests, notebooks) registers the metrics again: drop the old ones."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)


class _LabelledTotal:
    """A running-total gauge with one extra label (policy, finish reason): a child per (engine, value)."""

    def __init__(self, gauge: Gauge, children: dict[int, dict], per_engine: dict[int, list[str]]):
        self.gauge, self.children, self.per_engine = gauge, children, per_engine

    def set(self, engine_idx: int, totals: dict[str, int]) -> None:
        for value, total in totals.items():
            child = self.children[engine_idx].get(value)
            if child is None:   # a value outside the pre-made ones (not expected; exported rather than dropped)
                child = self.children[engine_idx][value] = self.gauge.labels(*self.per_engine[engine_idx], value)
            child.set(total)


class ADSAStatLogger(AggregateStatLoggerBase):
    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        self.engine_indexes = engine_indexes or [0]
        self.enabled = EngineSettings.from_vllm_config(vllm_config).adsa is not None
        if not self.enabled:
            return  # not an ADSA engine: register nothing, so /metrics shows no idle ADSA series
        _unregister_adsa_metrics()
        model = vllm_config.model_config.served_model_name
        labels = ["model_name", "engine"]
        per_engine = {i: [model, str(i)] for i in self.engine_indexes}

        def gauge(name, doc, mode="mostrecent"):
            g = Gauge(PREFIX + name, doc, labelnames=labels, multiprocess_mode=mode)
            return {i: g.labels(*v) for i, v in per_engine.items()}

        def total(name, doc):
            return gauge(name + "_total", doc + " Running total since start.", mode="max")

        def labelled_total(name, doc, label, values):
            g = Gauge(PREFIX + name + "_total", doc + " Running total since start.", labelnames=labels + [label],
                      multiprocess_mode="max")
            return _LabelledTotal(g, {i: {v: g.labels(*lv, v) for v in values} for i, lv in per_engine.items()},
                                  per_engine)

        self.blocks_held = gauge("blocks_held", "KV blocks the running requests hold now (ADSA evicts the rest).")
        self.blocks_full = gauge("full_attention_blocks",
                                 "KV blocks the running requests would hold now without eviction.")
        self.kept_ratio = gauge("kept_ratio", "blocks_held / full_attention_blocks (1 when nothing is held).")
        self.blocks_freed = total("blocks_freed", "KV blocks evicted by ADSA and returned to vLLM's pool.")
        self.admission_waits = total("admission_waits",
                                     "Times the ADSA admission gate kept a waiting request waiting (not yet).")
        self.preemptions = total("preemptions", "Requests preempted by the ADSA scheduler.")
        self.preemption_events = labelled_total(
            "preemption_events", "Preemption events by kind: swap_out (kept KV blocks copied to host memory, exact), "
            "swap_in (copied back on resume), recomputed (vLLM's re-prefill; only without host room or with "
            "peak admission, which aims at none).", "kind", ["swap_out", "swap_in", "recomputed"])
        self.swap_bytes = labelled_total("swap_bytes", "KV bytes copied by swap preemption, per worker, by "
                                         "direction (out: to host, in: back to the device).",
                                         "direction", ["out", "in"])
        self.blocks_on_host = gauge("blocks_on_host", "Kept KV blocks of swapped-out requests in host memory now.")
        # Every label's series exists from the start (at 0), so rates work before a policy or reason is first seen.
        self.requests = labelled_total("requests", "Requests admitted to the ADSA scheduler, by eviction policy.",
                                       "policy", POLICIES)
        self.finished = labelled_total("requests_finished", "Requests that left the ADSA scheduler, by finish "
                                       "reason (abort: the client hung up or the request was cancelled; vLLM's "
                                       "request_success_total does not count aborts).",
                                       "reason", [r.name.lower() for r in FinishReason])
        for g in self.kept_ratio.values():
            g.set(1.0)   # idle: nothing held, nothing evicted (the gauge would otherwise read 0 until the first step)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        adsa = getattr(scheduler_stats, "adsa", None)
        if not self.enabled or adsa is None:
            return
        self.blocks_held[engine_idx].set(adsa.blocks_held)
        self.blocks_full[engine_idx].set(adsa.blocks_full_attention)
        self.kept_ratio[engine_idx].set(adsa.kept_ratio)
        self.blocks_on_host[engine_idx].set(adsa.blocks_on_host)
        for name in ("blocks_freed", "admission_waits", "preemptions"):
            getattr(self, name)[engine_idx].set(getattr(adsa, name))
        self.requests.set(engine_idx, adsa.requests_by_policy)
        self.finished.set(engine_idx, adsa.finished_by_reason)
        self.preemption_events.set(engine_idx, adsa.preemptions_by_kind)
        self.swap_bytes.set(engine_idx, adsa.swap_bytes)

    def log_engine_initialized(self) -> None:
        pass
