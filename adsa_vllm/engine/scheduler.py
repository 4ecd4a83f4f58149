"""`ADSAScheduler`: vLLM's scheduler plus the two things ADSA needs from it.

1. Evictions: the worker's report rides on ModelRunnerOutput (`adsa_evictions`: req id -> logical blocks);
   `update_from_output` hands it to `ADSAManager.evict` *before* the step's results are processed, so the freed
   blocks are in the pool for the very next `schedule()`. Requests that failed inside the worker (`adsa_failed`)
   are finished with an error there, alone.
2. Admission by exact lookahead: vLLM's gate counts only the tokens a request has now (1 for c2i), so it admits
   far more sequences than can grow, then preempts them (recompute!). Image requests always run to max_tokens and
   grow one token per step, so the blocks every running request will hold at each future step are known:
       held_r(t) = min(bound_r, cdiv(len_r + t + 1, bs))   while len_r + t + 1 < final_len_r, else 0
   (a request of final length L stores L - 1 tokens: its last sampled token is never fed back).
   A waiting request is admitted only if the peak over t of the sum (with it) fits the pool minus the watermark.
   The sum is kept incrementally (`DemandProfile`), so a check costs O(horizon), not O(running x horizon).
   That rules out preemption (held never exceeds bound, see ADSAManager) while letting staggered requests share
   the blocks that finished requests give back. With ADSA the bound is budget + slack blocks, not the whole
   sequence: that is where the extra capacity comes from.
   That is "peak" admission, the default. "overcommit" admits like vLLM (blocks free now) and preempts by swap
   when the running requests outgrow the pool: exact, because the kept blocks travel to host memory and back
   (adsa_vllm/engine/swap.py says what each rule buys, measured). The peak rule still bounds what may sit on the
   host: future peak + blocks on the host <= pool + swap space.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from vllm.utils.math_utils import cdiv

from adsa_vllm.engine.demand import RESUME_HORIZON, DemandProfile, life_average
from adsa_vllm.engine.manager import ADSAManager
from adsa_vllm.engine.stats import ADSAStats, with_adsa
from adsa_vllm.engine.swap import SwapCounters, SwapOrders
from adsa_vllm.settings import request_overrides

logger = init_logger(__name__)


class ADSASchedulerMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self.adsa_managers = [m for m in managers if isinstance(m, ADSAManager)]
        self.num_preemptions = 0
        self.num_worker_failures = 0
        self.max_running = 0
        self.num_admission_waits = 0                 # /metrics: times `_fits` said "not yet"
        self.requests_by_policy: dict[str, int] = {}   # /metrics: registered requests per eviction policy
        self.finished_by_reason: dict[str, int] = {}   # /metrics: requests that left, by vLLM's finish reason
        self.swaps = SwapCounters()
        self._orders = SwapOrders()                  # this schedule()'s copies, for the workers
        self._life: dict[str, float] = {}            # "average" rule: admitted, unfinished requests' life averages
        if self.adsa_managers:
            m = self.adsa_managers[0]
            self.demand = DemandProfile(m.block_size)
            self._stock_allocate_slots = self.kv_cache_manager.allocate_slots
            self.kv_cache_manager.allocate_slots = self._allocate_slots
            settings = m.kv_cache_spec.adsa
            # Swap needs the request's whole KV in ADSA layers (one group); otherwise peak admission, no preemption.
            self.admission_rule = settings.admission if len(managers) == 1 else "peak"
            self.swap_preemption = self.admission_rule != "peak"   # may preempt, by swap
            layers = len(self.kv_cache_config.kv_cache_groups[0].layer_names)
            self.block_bytes = m.kv_cache_spec.page_size_bytes * layers
            self.swap_blocks = int(settings.swap_space_gib * (1 << 30)) // self.block_bytes

    # ---- lifecycle ----
    def add_request(self, request) -> None:
        is_new = request.request_id not in self.requests
        super().add_request(request)
        if is_new and self.adsa_managers:
            params = request.sampling_params
            max_len = _final_len(request)
            try:
                overrides = request_overrides(params.extra_args if params is not None else None)
                for m in self.adsa_managers:   # the prompt is the condition (a t2i caption's rows vary)
                    m.register(request.request_id, overrides, max_len, request.num_prompt_tokens)
                policy = self.adsa_managers[0].requests[request.request_id].layout.policy
                self.requests_by_policy[policy] = self.requests_by_policy.get(policy, 0) + 1
            except Exception as e:  # noqa: BLE001 - validated in the API process; never let it kill EngineCore
                logger.error("request %s fails (the engine keeps serving): %r", request.request_id, e)
                for m in self.adsa_managers:
                    m.register(request.request_id, None, max_len)
                self.grammar_compile_error_reqs.add(request.request_id)   # finished with an error, see below

    def _free_request(self, request, delay_free_blocks: bool = False):
        if self.adsa_managers:
            self.demand.remove(request.request_id)
            self._life.pop(request.request_id, None)
            self._orders.out.pop(request.request_id, None)   # aborted before the workers copied it out
            # Aborts (a client that hung up) end here too, and vLLM's own request_success_total never sees them:
            # the API process drops an aborted request before the engine reports on it.
            reason = request.get_finished_reason()
            name = reason.name.lower() if reason is not None else "other"
            self.finished_by_reason[name] = self.finished_by_reason.get(name, 0) + 1
        out = super()._free_request(request, delay_free_blocks)
        for m in self.adsa_managers:
            m.forget(request.request_id)
        return out

    def _preempt_request(self, request, timestamp: float) -> None:
        self.num_preemptions += 1
        if not self.adsa_managers:
            return super()._preempt_request(request, timestamp)
        rid = request.request_id
        self.demand.remove(rid)
        m = self.adsa_managers[0]
        held = m.held_blocks(rid)
        copy = None
        if self.swap_preemption and self._blocks_on_host() + held <= self.swap_blocks:
            copy = m.swap_out(rid)
        computed = request.num_computed_tokens
        super()._preempt_request(request, timestamp)
        if copy is None:   # recomputed by vLLM from the tokens (not what the evicting sequence computed)
            self.swaps.recomputed += 1
            self._life.pop(rid, None)
            return
        # Resumed like a request whose KV came from a connector: only the tokens after `computed` are scheduled.
        request.num_computed_tokens = computed
        self._orders.out[rid] = copy
        self.swaps.swapped_out += 1
        self.swaps.blocks_out += len(copy[0])

    # ---- admission ----
    def _allocate_slots(self, request, num_new_tokens: int, *args, **kwargs):
        admitting = request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        if not admitting:
            return self._stock_allocate_slots(request, num_new_tokens, *args, **kwargs)
        rid, m = request.request_id, self.adsa_managers[0]
        if rid in m.swapped:
            return self._swap_in(request, num_new_tokens, *args, **kwargs)
        if not self._fits(request):
            self.num_admission_waits += 1
            return None
        out = self._stock_allocate_slots(request, num_new_tokens, *args, **kwargs)
        entry = m.requests.get(rid)
        if out is not None and entry is not None:
            final = _final_len(request)
            self.demand.add(rid, request.num_computed_tokens, final, entry.bound)
            if self.admission_rule == "average" and rid not in self._life:
                self._life[rid] = life_average(request.num_computed_tokens, final, entry.bound, m.block_size)
        return out

    def _swap_in(self, request, num_new_tokens: int, *args, **kwargs):
        """Resume a swapped request: fresh blocks for its kept ones (copied back by the worker), then vLLM's own
        allocation for the tokens it schedules now."""
        rid, m = request.request_id, self.adsa_managers[0]
        record = m.swapped[rid]
        grow = max(0, cdiv(request.num_computed_tokens + num_new_tokens, m.block_size) - record.length)
        need = m.blocks_to_swap_in(rid) + grow + self.kv_cache_manager.watermark_blocks
        if m.block_pool.get_num_free_blocks() < need or not self._stays_resumed(request):
            self.num_admission_waits += 1
            return None
        logical, physical = m.swap_in(rid)
        out = self._stock_allocate_slots(request, num_new_tokens, *args, **kwargs)
        if out is None:   # not expected (the room was checked); stay on the host
            m.undo_swap_in(rid, logical)
            return None
        self._orders.into[rid] = (logical, physical)
        self.swaps.swapped_in += 1
        self.swaps.blocks_in += len(logical)
        self.demand.add(rid, request.num_computed_tokens, _final_len(request), m.requests[rid].bound)
        return out

    def _stays_resumed(self, request) -> bool:
        """Hysteresis: resume only if the running requests and this one fit the pool for the next RESUME_HORIZON
        steps; otherwise the newest would be swapped out again within them (benchmarks/admission_model.py, XL (a)
        overcommit: 223 -> 198 swaps, a closed run of 1,024 requests 2,327 -> 1,364, no more steps)."""
        m = self.adsa_managers[0]
        if len(self.demand) != len(self.running):
            return True   # requests ADSA does not track: vLLM's own gate only
        bound = m.requests[request.request_id].bound
        peak = self.demand.peak_with(request.num_computed_tokens, _final_len(request), bound, horizon=RESUME_HORIZON)
        return peak + self.kv_cache_manager.watermark_blocks <= self._capacity()

    def _fits(self, new_request) -> bool:
        m = self.adsa_managers[0]
        entry = m.requests.get(new_request.request_id)
        if entry is None or len(self.demand) != len(self.running):
            return True  # a request ADSA does not track: leave it to vLLM's own gate
        length, final = new_request.num_computed_tokens, _final_len(new_request)
        peak = self.demand.peak_with(length, final, entry.bound)
        capacity = self._capacity()
        watermark = self.kv_cache_manager.watermark_blocks if self.running else 0
        if not self.swap_preemption:
            return peak + watermark <= capacity
        # Swap room: even if every running request reached its peak, what cannot stay on the device fits the host.
        if peak + self._blocks_on_host() + watermark > capacity + self.swap_blocks:
            return False
        if self.admission_rule == "overcommit":
            return True   # vLLM's own rule follows: blocks free now
        life = life_average(length, final, entry.bound, m.block_size)
        return sum(self._life.values()) + life + watermark <= capacity

    def _capacity(self) -> int:
        """Blocks the running requests may share: free now + what they hold."""
        m = self.adsa_managers[0]
        return m.block_pool.get_num_free_blocks() + sum(m.held_blocks(r.request_id) for r in self.running)

    def _blocks_on_host(self) -> int:
        return sum(len(r.logical) for r in self.adsa_managers[0].swapped.values())

    # ---- evictions ----
    def schedule(self, *args, **kwargs):
        if self.adsa_managers:
            self.demand.advance({r.request_id: r.num_computed_tokens for r in self.running})
        out = super().schedule(*args, **kwargs)
        self.max_running = max(self.max_running, len(self.running))
        if self._orders:
            out.adsa_swaps = self._orders   # the workers copy before this step's forward (touchpoint)
            self._orders = SwapOrders()
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        evictions = getattr(model_runner_output, "adsa_evictions", None)
        if evictions:
            for m in self.adsa_managers:
                for req_id, blocks in evictions.items():
                    m.evict(req_id, blocks)
        failed = getattr(model_runner_output, "adsa_failed", None)
        if failed:
            # vLLM's own channel for requests that must end in error (filled by grammar compile failures):
            # super() finishes them with FINISHED_ERROR, emits their final output and frees their blocks.
            self.num_worker_failures += len(failed)
            self.grammar_compile_error_reqs.update(failed)
        return super().update_from_output(scheduler_output, model_runner_output)

    # ---- observability ----
    def make_stats(self, *args, **kwargs):
        """vLLM's per-step SchedulerStats plus ADSA's numbers; they reach the API server's stat loggers
        (adsa_vllm/metrics.py: /metrics). Why this carrier: adsa_vllm/engine/stats.py."""
        stats = super().make_stats(*args, **kwargs)
        if stats is None or not self.adsa_managers:
            return stats
        return with_adsa(stats, self.adsa_step_stats())

    def adsa_step_stats(self) -> ADSAStats:
        """Running totals and what the running requests hold now (O(running): held_blocks is O(1))."""
        m = self.adsa_managers[0]
        held = sum(m.held_blocks(r.request_id) for r in self.running)
        full = sum(len(m.req_to_blocks.get(r.request_id, ())) for r in self.running)   # evicted entries are nulls
        return ADSAStats(blocks_freed=m.total_freed, blocks_held=held, blocks_full_attention=full,
                         admission_waits=self.num_admission_waits, preemptions=self.num_preemptions,
                         requests_by_policy=dict(self.requests_by_policy),
                         finished_by_reason=dict(self.finished_by_reason),
                         preemptions_by_kind=self.swaps.by_kind(), swap_bytes=self.swaps.bytes(self.block_bytes),
                         blocks_on_host=self._blocks_on_host())

    def adsa_stats(self) -> dict:
        """Per-request held/peak/freed blocks and pool-wide counters (tests and benchmarks read this)."""
        if not self.adsa_managers:
            return {"enabled": False, "num_preemptions": self.num_preemptions}
        m = self.adsa_managers[0]
        per_request = {}
        for rid, e in list(m.requests.items()) + list(m.finished_stats.items()):
            held = m.held_blocks(rid)
            per_request[rid] = {"held_blocks": held, "peak_held_blocks": max(e.peak_held, held),
                                "freed_blocks": e.freed, "bound_blocks": e.bound,
                                "budget_blocks": e.layout.budget_blocks, "slack_blocks": e.layout.slack_blocks,
                                "finished": rid not in m.requests}
        return {"enabled": True, "num_preemptions": self.num_preemptions, "max_running": self.max_running,
                "admission": self.admission_rule,
                "admission_waits": self.num_admission_waits, "blocks_on_host": self._blocks_on_host(),
                "swaps": {**self.swaps.by_kind(), **{f"bytes_{d}": b for d, b in
                                                     self.swaps.bytes(self.block_bytes).items()}},
                "total_freed_blocks": m.total_freed, "free_blocks": m.block_pool.get_num_free_blocks(),
                "requests": per_request}


def _final_len(request) -> int:
    return request.num_prompt_tokens + (request.max_tokens or 0)


class ADSAScheduler(ADSASchedulerMixin, Scheduler):
    """Synchronous scheduling (CPU, or --no-async-scheduling)."""


class ADSAAsyncScheduler(ADSASchedulerMixin, AsyncScheduler):
    """Async scheduling (GPU default): step s+1 is scheduled before step s's output arrives, so evictions are
    returned one step later; the layouts count that step in their slack (`ADSASettings.lag`, set by the config
    hook)."""
