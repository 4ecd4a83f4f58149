"""Worker classes that connect the model's runtimes to the step loop (installed by the config hook when ADSA or
classifier-free guidance is on): the `ADSARuntime` and the `GuidanceRuntime` (adsa_vllm/guidance/runtime.py).

Before each step the ADSA runtime scores the selections the last forward saved queries for
(worker/saved_queries.py), and the runtimes learn which requests started, resumed, were preempted or finished (from
the SchedulerOutput); after the step, the evictions its builder decided ride back to the scheduler as
`ModelRunnerOutput.adsa_evictions`, and requests that failed inside the worker as `adsa_failed`
(ModelRunnerOutput is a plain dataclass, pickled with its __dict__; touchpoint `runner-output-report`). Under
tensor parallelism every rank decides the same evictions (scores are all-reduced; the ranks compare digests of them,
worker/rank_agreement.py); rank 0's report is the one the scheduler receives. The vLLM internals used here are in
the ledger, patches/touchpoints.py.
"""

from __future__ import annotations

import copy
import functools

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput


class ADSAWorkerMixin:
    _adsa_rt = None   # the model's ADSARuntime (None: ADSA off)
    _step_rts = ()    # runtimes fed with every SchedulerOutput
    _order = None     # n -> the first n request ids of the batch being run (see _batch_order)

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        # Bind now: the profiling run that follows already calls the model's compute_logits.
        model = self.model_runner.get_model()
        model = getattr(model, "unwrap", lambda: model)()
        self._adsa_rt = getattr(model, "adsa_runtime", None)
        self._step_rts = tuple(rt for rt in (self._adsa_rt, getattr(model, "guidance_runtime", None)) if rt)
        self._order = _batch_order(self.model_runner)
        for rt in self._step_rts:
            rt.batch_req_ids = self._order
        return out

    def initialize_from_config(self, *args, **kwargs):
        out = super().initialize_from_config(*args, **kwargs)
        if self._adsa_rt is not None:   # the caches exist now: size the host buffer of swap preemption by them
            self._adsa_rt.reserve_swap_space()
        return out

    def execute_model(self, scheduler_output, *args, **kwargs):
        if self._adsa_rt is not None:   # first: this step's swap-ins may write the blocks those scores read
            from adsa_vllm.worker.planner import score_saved_queries
            score_saved_queries(self._adsa_rt)
        for rt in self._step_rts:
            rt.on_schedule(scheduler_output)
        if isinstance(self._order, LastPreparedBatch):
            self._order.forget()   # a dummy batch (profiling, graph capture) must not look like the last real one
        return self._attach(super().execute_model(scheduler_output, *args, **kwargs))

    def sample_tokens(self, *args, **kwargs):
        return self._attach(super().sample_tokens(*args, **kwargs))

    def adsa_rank_digest(self) -> dict | None:
        """This rank's running digest of the evictions it decided (worker/rank_agreement.py), by name through
        `llm.collective_rpc("adsa_rank_digest")`: every tensor-parallel rank must return the same steps and digest.
        None with ADSA off."""
        return None if self._adsa_rt is None else self._adsa_rt.agreement.report()

    def _attach(self, output):
        if not self._step_rts or not isinstance(output, ModelRunnerOutput | AsyncModelRunnerOutput):
            return output
        failed = {}
        for rt in self._step_rts:
            failed.update(rt.failures.drain())
        evictions = self._adsa_rt.drain_evictions() if self._adsa_rt is not None else {}
        if not (evictions or failed):
            return output
        if isinstance(output, AsyncModelRunnerOutput):
            # The V2 runner (GPU default) returns an AsyncOutput even with synchronous scheduling; the executor
            # calls get_output() right after, so attach there (touchpoint `async-output-get-output`).
            get_output = output.get_output
            output.get_output = lambda: _with_report(get_output(), evictions, failed)
            return output
        return _with_report(output, evictions, failed)


def _batch_order(runner):
    """n -> the request ids of the first n rows of the batch being run, read on the host (no GPU wait).
    V1 runner (and the CPU runner): its persistent `input_batch.req_ids`. V2 runner (GPU default): see
    LastPreparedBatch."""
    batch = getattr(runner, "input_batch", None)
    if batch is not None and hasattr(batch, "req_ids"):
        return lambda n: batch.req_ids[:n]
    if not (hasattr(runner, "prepare_inputs") and hasattr(runner, "req_states")):
        return None
    return LastPreparedBatch(runner)


class LastPreparedBatch:
    """The V2 runner's batch order: each step's InputBatch is the return value of its `prepare_inputs`, which runs
    before the attention metadata is built and the logits are computed. That method is wrapped on the runner
    instance (touchpoint `v2-runner-prepare-inputs`) to remember the ids of the last batch; dummy batches are
    built elsewhere, and `forget()` before each step keeps one from reading the previous step's."""

    def __init__(self, runner):
        self.req_ids: list = []
        prepare = runner.prepare_inputs

        def prepare_inputs(*args, **kwargs):
            batch = prepare(*args, **kwargs)
            self.req_ids[:] = batch.req_ids
            return batch

        runner.prepare_inputs = prepare_inputs

    def __call__(self, n: int) -> list:
        return self.req_ids[:n]

    def forget(self) -> None:
        self.req_ids.clear()


def _with_report(output: ModelRunnerOutput, evictions: dict, failed: dict) -> ModelRunnerOutput:
    """Evictions (req id -> logical blocks) and failed requests (req id -> error) for the scheduler; attributes
    vLLM does not declare (touchpoint `runner-output-report`)."""
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)  # never mutate the shared singleton
    if evictions:
        output.adsa_evictions = evictions
    if failed:
        output.adsa_failed = failed
    return output


@functools.cache
def _cpu_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class ADSACPUWorker(ADSAWorkerMixin, CPUWorker):
        pass
    return ADSACPUWorker


@functools.cache
def _gpu_worker():
    from vllm.v1.worker.gpu_worker import Worker

    class ADSAGPUWorker(ADSAWorkerMixin, Worker):
        pass
    return ADSAGPUWorker


def __getattr__(name):
    # Resolved lazily by qualname ("adsa_vllm.worker.worker.ADSACPUWorker"): only the platform's base is imported.
    if name == "ADSACPUWorker":
        return _cpu_worker()
    if name == "ADSAGPUWorker":
        return _gpu_worker()
    raise AttributeError(name)
