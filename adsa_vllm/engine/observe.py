"""Watch a running engine's scheduler from outside: per-step callbacks and counts of steps, preemptions and the
largest running batch, for the demo, the benchmarks and the tests. Works on vLLM's stock scheduler as well as on
ADSAScheduler.

vLLM has no scheduler events, so `SchedulerWatch` wraps two methods of one scheduler *instance* (never its class),
`schedule()` and `_preempt_request()`, and puts back what was there when it closes. Watches nest; close them in
reverse order (`with` blocks do). Both rely on vLLM internals: touchpoints `scheduler-watch` and `engine-in-process`
in patches/touchpoints.py.
"""

from __future__ import annotations

from collections.abc import Callable


def engine_scheduler(llm):
    """The scheduler of a `vllm.LLM` (or its `LLMEngine`) whose EngineCore runs in this process."""
    try:
        return getattr(llm, "llm_engine", llm).engine_core.engine_core.scheduler
    except AttributeError:   # a client of an EngineCore in another process has no `engine_core`
        raise RuntimeError("watching the scheduler needs the EngineCore in this process: set "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is imported") from None


class SchedulerWatch:
    """`before_step(step)` runs before each `schedule()` (step counts from 0 at the watch's start), `on_step(scheduler)`
    after it, when this step's requests are running and their blocks allocated."""

    def __init__(self, scheduler, on_step: Callable | None = None, before_step: Callable | None = None):
        self.scheduler = scheduler
        self.steps = 0
        self.preemptions = 0
        self.max_running = 0          # most requests running after a schedule()
        self._closed = False
        # What an enclosing watch installed on the instance (None: the class's method shows through).
        self._outer = vars(scheduler).get("schedule"), vars(scheduler).get("_preempt_request")
        schedule, preempt = scheduler.schedule, scheduler._preempt_request

        def watched_schedule(*args, **kwargs):
            if before_step is not None:
                before_step(self.steps)
            out = schedule(*args, **kwargs)
            self.steps += 1
            self.max_running = max(self.max_running, len(scheduler.running))
            if on_step is not None:
                on_step(scheduler)
            return out

        def counted_preempt(*args, **kwargs):
            self.preemptions += 1
            return preempt(*args, **kwargs)

        scheduler.schedule, scheduler._preempt_request = watched_schedule, counted_preempt

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        s = self.scheduler
        del s.schedule, s._preempt_request
        outer_schedule, outer_preempt = self._outer
        if outer_schedule is not None:
            s.schedule = outer_schedule
        if outer_preempt is not None:
            s._preempt_request = outer_preempt

    def __enter__(self) -> SchedulerWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
