"""`ADSAScheduler`: vLLM's scheduler plus the two things ADSA needs from it.

1. Evictions: the worker's report rides on ModelRunnerOutput (`adsa_evictions`: req id -> logical blocks);
   `update_from_output` hands it to `ADSAManager.evict` *before* the step's results are processed, so the freed
   blocks are in the pool for the very next `schedule()`.
2. Admission with a per-request bound: vLLM's gate counts only the tokens a request has now (1 for c2i), so it
   would admit far more sequences than can grow, then preempt them (recompute!). Here a waiting request is admitted
   only if the free pool covers its whole bound plus the growth every running request may still need:
       free - watermark >= bound(new) + sum over running r of (bound(r) - held(r)).
   With ADSA the bound is budget + slack blocks, not the full sequence: that is where the extra capacity comes from.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from adsa_vllm.engine.manager import ADSAManager
from adsa_vllm.settings import request_overrides


class ADSAScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.adsa_managers = [m for m in managers if isinstance(m, ADSAManager)]
        self.num_preemptions = 0
        self.max_running = 0
        if self.adsa_managers:
            self._stock_allocate_slots = self.kv_cache_manager.allocate_slots
            self.kv_cache_manager.allocate_slots = self._allocate_slots

    # ---- lifecycle ----
    def add_request(self, request) -> None:
        is_new = request.request_id not in self.requests
        super().add_request(request)
        if is_new:
            params = request.sampling_params
            overrides = request_overrides(params.extra_args if params is not None else None)
            max_len = request.num_prompt_tokens + (request.max_tokens or 0)
            for m in self.adsa_managers:
                m.register(request.request_id, overrides, max_len)

    def _free_request(self, request, delay_free_blocks: bool = False):
        out = super()._free_request(request, delay_free_blocks)
        for m in self.adsa_managers:
            m.forget(request.request_id)
        return out

    def _preempt_request(self, request, timestamp: float) -> None:
        self.num_preemptions += 1
        super()._preempt_request(request, timestamp)

    # ---- admission ----
    def _allocate_slots(self, request, *args, **kwargs):
        if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            reserve = sum(self._growth(r.request_id) for r in self.running if r is not request)
            need = self._growth(request.request_id)
            watermark = self.kv_cache_manager.watermark_blocks if self.running else 0
            if need + reserve + watermark > self.kv_cache_manager.block_pool.get_num_free_blocks():
                return None
        return self._stock_allocate_slots(request, *args, **kwargs)

    def _growth(self, req_id: str) -> int:
        """Blocks the request may still take from the pool before it finishes (max over KV groups)."""
        growth = 0
        for m in self.adsa_managers:
            entry = m.requests.get(req_id)
            if entry is not None:
                growth = max(growth, entry.bound - m.held_blocks(req_id))
        return max(growth, 0)

    # ---- evictions ----
    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        self.max_running = max(self.max_running, len(self.running))
        for m in self.adsa_managers:
            for r in self.running:
                m.note_step(r.request_id)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        evictions = getattr(model_runner_output, "adsa_evictions", None)
        if evictions:
            for m in self.adsa_managers:
                for req_id, blocks in evictions.items():
                    m.evict(req_id, blocks)
        return super().update_from_output(scheduler_output, model_runner_output)

    # ---- observability ----
    def adsa_stats(self) -> dict:
        """Per-request held/peak/freed blocks and pool-wide counters (tests and benchmarks read this)."""
        if not self.adsa_managers:
            return {"enabled": False, "num_preemptions": self.num_preemptions}
        m = self.adsa_managers[0]
        per_request = {}
        for rid, e in list(m.requests.items()) + list(m.finished_stats.items()):
            held = m.held_blocks(rid)
            per_request[rid] = {"held_blocks": held, "peak_held_blocks": e.peak_held, "freed_blocks": e.freed,
                                "bound_blocks": e.bound, "budget_blocks": e.layout.budget_blocks,
                                "slack_blocks": e.layout.slack_blocks, "finished": rid not in m.requests}
        return {"enabled": True, "num_preemptions": self.num_preemptions, "max_running": self.max_running,
                "total_freed_blocks": m.total_freed, "free_blocks": m.block_pool.get_num_free_blocks(),
                "requests": per_request}
