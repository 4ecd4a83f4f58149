"""The ledger, in code, of every vLLM internal the project relies on outside a patch module ("touchpoints"), each with
the file(s) that hold it, why, what upstream change retires it, and its own guard.

A patch module (adsa_vllm_patches.PATCHES) changes vLLM; a touchpoint only relies on something vLLM does not promise:
a private method overridden or wrapped, an attribute given to a vLLM object, a field vLLM reads but does not document
as a setting. `check()` runs the guards of the serving touchpoints once per process (adsa_vllm.plugin.register(),
before any patch is applied): an unknown vLLM fails there with one message naming each touchpoint that broke, instead
of an AttributeError deep inside a step. Guards are attribute, signature and field checks (`Has`, `Fields`, `Reads`,
`OpenInstances`); `Series` pins a release series where no attribute check can see the contract.

patches/README.md lists the same rows; tests/test_touchpoints.py checks that the two agree, that every touchpoint the
source scan finds (tests/touchpoint_scan.py) is a row here, and that every guard passes on the installed vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass

from adsa_vllm_patches import release_series


def _resolve(path: str):
    """"package.module:Class.attr" -> the object."""
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def _code_names(code) -> set[str]:
    """Attribute and global names a function's code uses, nested functions and comprehensions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


@dataclass(frozen=True)
class Has:
    """`path` exists; with `params`, its signature starts with these parameters (self / cls left out)."""
    path: str
    params: tuple[str, ...] | None = None

    def problem(self) -> str | None:
        try:
            obj = _resolve(self.path)
        except (ImportError, AttributeError) as e:
            return f"{self.path} is gone ({e})"
        if self.params is not None:
            names = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
            if tuple(names[:len(self.params)]) != self.params:
                return f"{self.path} takes ({', '.join(names)}), not ({', '.join(self.params)}, ...)"
        return None


@dataclass(frozen=True)
class Fields:
    """The class at `path` declares these fields (dataclass fields, or class annotations)."""
    path: str
    names: tuple[str, ...]

    def problem(self) -> str | None:
        try:
            cls = _resolve(self.path)
        except (ImportError, AttributeError) as e:
            return f"{self.path} is gone ({e})"
        declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        for klass in cls.__mro__:
            declared |= set(getattr(klass, "__annotations__", {}))
        missing = [n for n in self.names if n not in declared]
        return f"{self.path} has no field(s) {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class Reads:
    """The function at `path` still uses these attribute names (its code's names): the contract the touchpoint
    relies on, e.g. the attribute vLLM's own method reads or sets."""
    path: str
    names: tuple[str, ...]

    def problem(self) -> str | None:
        try:
            fn = inspect.unwrap(_resolve(self.path))
        except (ImportError, AttributeError) as e:
            return f"{self.path} is gone ({e})"
        missing = [n for n in self.names if n not in _code_names(fn.__code__)]
        return f"{self.path} no longer uses {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class OpenInstances:
    """Instances of the class at `path` take new attributes (they have a __dict__ and are not frozen)."""
    path: str

    def problem(self) -> str | None:
        try:
            cls = _resolve(self.path)
        except (ImportError, AttributeError) as e:
            return f"{self.path} is gone ({e})"
        params = getattr(cls, "__dataclass_params__", None)
        if cls.__dictoffset__ == 0 or (params is not None and params.frozen):
            return f"instances of {self.path} no longer take new attributes (__slots__ or frozen)"
        return None


@dataclass(frozen=True)
class Series:
    """The installed vLLM is of one of these release series ("0.26"), for contracts no attribute check sees."""
    versions: tuple[str, ...]

    def problem(self) -> str | None:
        import vllm
        if release_series(vllm.__version__) not in self.versions:
            return f"checked by hand for vLLM {', '.join(self.versions)}.x only, found {vllm.__version__}"
        return None


@dataclass(frozen=True)
class Touchpoint:
    name: str
    target: str                 # the vLLM internal relied on
    holders: tuple[str, ...]    # the files that use it, relative to the repository root
    names: tuple[str, ...]      # the attribute / module names those files use (what tests/touchpoint_scan.py finds)
    why: str
    retired_by: str
    guards: tuple
    serving: bool = True        # False: demo / benchmark / test tooling only; register() does not check it
    unseen: bool = False        # public names the source scan cannot see: the test greps every file for them

    def problems(self) -> list[str]:
        return [p for p in (g.problem() for g in self.guards) if p]


_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"

TOUCHPOINTS = (
    Touchpoint(
        "scheduler-preempt", "vllm.v1.core.sched.scheduler.Scheduler._preempt_request",
        ("adsa_vllm/engine/scheduler.py", "tests/test_swap.py"), ("_preempt_request",),
        "vLLM has no preemption hook: ADSAScheduler overrides it to swap the request's kept blocks out "
        "(adsa_vllm/engine/swap.py), count preemptions by kind and drop the request from the admission lookahead; "
        "tests/test_swap.py calls it to force preemptions where vLLM's scheduler would.",
        "a preemption callback or event for scheduler subclasses",
        (Has(f"{_SCHED}._preempt_request", ("request", "timestamp")),)),
    Touchpoint(
        "scheduler-free", "vllm.v1.core.sched.scheduler.Scheduler._free_request",
        ("adsa_vllm/engine/scheduler.py",), ("_free_request",),
        "The one place a finished or aborted request leaves the scheduler: ADSAScheduler drops its admission "
        "bookkeeping there and hands the request's KV statistics to the manager.",
        "a request-finished hook for scheduler subclasses",
        (Has(f"{_SCHED}._free_request", ("request", "delay_free_blocks")),)),
    Touchpoint(
        "scheduler-error-channel", "vllm.v1.core.sched.scheduler.Scheduler.grammar_compile_error_reqs",
        ("adsa_vllm/engine/scheduler.py",), ("grammar_compile_error_reqs",),
        "vLLM's only way to finish one request with an error from inside the scheduler (meant for grammar compile "
        "failures): requests whose ADSA settings fail in EngineCore or the worker go there and fail alone.",
        "a per-request error path for scheduler subclasses / model runners",
        (Reads(f"{_SCHED}.update_from_output", ("grammar_compile_error_reqs",)),), unseen=True),
    Touchpoint(
        "kv-manager-allocate-slots",
        "vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots, rebound on the scheduler's own manager",
        ("adsa_vllm/engine/scheduler.py",), ("allocate_slots",),
        "vLLM's admission decision sits inside Scheduler.schedule(), which asks kv_cache_manager.allocate_slots for "
        "each waiting request; answering None there is the only way to keep a request waiting (exact lookahead, no "
        "preemption) without copying schedule(). Only this scheduler's manager instance is rebound.",
        "an admission hook in Scheduler.schedule (a can-admit callback)",
        (Has("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots", ("request", "num_new_tokens")),
         Reads(f"{_SCHED}.schedule", ("kv_cache_manager", "allocate_slots")))),
    Touchpoint(
        "resume-computed-tokens", "vllm.v1.request.Request.num_computed_tokens, kept through a preemption",
        ("adsa_vllm/engine/scheduler.py",), ("num_computed_tokens",),
        "A swapped request resumes with its KV restored, not recomputed: ADSAScheduler sets num_computed_tokens "
        "back after vLLM's _preempt_request zeroed it, and schedule() then resumes it the way it resumes a request "
        "whose KV a connector loaded (only the tokens after num_computed_tokens are scheduled).",
        "swap preemption in vLLM's scheduler (or a connector hook told of preemptions)",
        (Reads(f"{_SCHED}.schedule", ("num_computed_tokens",)),
         Reads(f"{_SCHED}._preempt_request", ("num_computed_tokens",)))),
    Touchpoint(
        "scheduler-output-swaps", "vllm.v1.core.sched.output.SchedulerOutput: attribute adsa_swaps",
        ("adsa_vllm/engine/scheduler.py",), ("adsa_swaps",),
        "The workers must copy a swapped request's blocks out before the step's forward writes them, and back in "
        "before it reads them; SchedulerOutput has no field for plugin data, so the step's copies ride as an extra "
        "attribute (a plain dataclass, pickled with its __dict__) that the worker's runtime reads in on_schedule.",
        "an extension field on SchedulerOutput for plugin data (or swap support in vLLM's scheduler)",
        (OpenInstances("vllm.v1.core.sched.output:SchedulerOutput"),)),
    Touchpoint(
        "runner-output-report", "vllm.v1.outputs.ModelRunnerOutput: attributes adsa_evictions, adsa_failed",
        ("adsa_vllm/worker/worker.py", "adsa_vllm/engine/scheduler.py"), ("adsa_evictions", "adsa_failed"),
        "The worker's evictions and failed requests must reach the scheduler with the step's output; "
        "ModelRunnerOutput has no field for plugin data, so they ride as extra attributes (a plain dataclass, "
        "pickled with its __dict__).",
        "an extension field on ModelRunnerOutput for plugin data",
        (OpenInstances("vllm.v1.outputs:ModelRunnerOutput"),)),
    Touchpoint(
        "async-output-get-output", "vllm.v1.outputs.AsyncModelRunnerOutput.get_output, rebound on the instance",
        ("adsa_vllm/worker/worker.py",), ("get_output",),
        "The V2 model runner returns an AsyncModelRunnerOutput even with synchronous scheduling; the report "
        "(runner-output-report) must be attached to the ModelRunnerOutput its get_output() produces.",
        "an extension field on ModelRunnerOutput for plugin data",
        (Has("vllm.v1.outputs:AsyncModelRunnerOutput.get_output", ()),)),
    Touchpoint(
        "v2-runner-prepare-inputs",
        "vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs, rebound on the runner instance",
        ("adsa_vllm/worker/worker.py", "tests/test_batch_order.py"), ("prepare_inputs",),
        "The V2 model runner (GPU default) keeps no persistent batch: a step's request order exists only as the "
        "InputBatch prepare_inputs returns, before the attention metadata is built and the logits computed; ADSA's "
        "planner and guidance's per-row scales need it on the host. tests/test_batch_order.py stands in for it.",
        "a public batch-order accessor on the model runner (or in the forward context)",
        (Has("vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_inputs", ("scheduler_output", "batch_desc")),
         Reads("vllm.v1.worker.gpu.model_runner:GPUModelRunner.__init__", ("req_states",)),
         Fields("vllm.v1.worker.gpu.input_batch:InputBatch", ("req_ids",)))),
    Touchpoint(
        "kv-spec-registry-fill", "vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry._ensure_registered",
        ("adsa_vllm/plugin.py",), ("_ensure_registered",),
        "The registry adds vLLM's built-in specs lazily, only while it is empty: a process that registered ADSASpec "
        "first would never learn FullAttentionSpec, so register() fills it first.",
        "a registry that registers the built-in specs eagerly, or register() that does",
        (Has("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", ("vllm_config",)),)),
    Touchpoint(
        "attn-metadata-private-fields",
        "vllm.v1.attention.backend.CommonAttentionMetadata fields _seq_lens_cpu, _num_computed_tokens_cpu, "
        "_num_computed_tokens_cache (reset through replace())",
        ("adsa_vllm/worker/backend.py",), ("_seq_lens_cpu", "_num_computed_tokens_cpu", "_num_computed_tokens_cache"),
        "The ADSA builder hands the inner builder compacted seq_lens; these caches derived from the uncompacted ones "
        "must be dropped, or the inner builder reads the full lengths.",
        "CommonAttentionMetadata.replace() resetting its derived caches itself",
        (Fields("vllm.v1.attention.backend:CommonAttentionMetadata",
                ("seq_lens_cpu_upper_bound", "_seq_lens_cpu", "_num_computed_tokens_cpu",
                 "_num_computed_tokens_cache")),)),
    Touchpoint(
        "attn-metadata-edges", "the inner backends' attention metadata (CPU_ATTN, FLASH_ATTN, TRITON_ATTN): "
        "attribute adsa_edges",
        ("adsa_vllm/worker/backend.py",), ("adsa_edges",),
        "Token edges (worker/token_edges.py) run inside each layer's forward and need the step's plan; the metadata "
        "object the inner builder returns is the only per-step object the forward receives. (Query-dependent scoring "
        "needs none: the forward saves the query rows a persistent index names, worker/saved_queries.py.)",
        "an extension field on attention metadata for wrapping backends",
        (OpenInstances("vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata"),
         OpenInstances("vllm.v1.attention.backends.triton_attn:TritonAttentionMetadata"),
         OpenInstances("vllm.v1.attention.backends.flash_attn:FlashAttentionMetadata"))),
    Touchpoint(
        "cpu-attn-isa", "vllm.v1.attention.backends.cpu_attn._get_attn_isa",
        ("adsa_vllm/worker/kv_views.py",), ("_get_attn_isa",),
        "The CPU kernel's KV layout depends on the instruction set it picked; ADSA reads the cache for scoring and "
        "checks that layout once per kind (worker/kv_views.py).",
        "a public accessor for the CPU attention ISA / cache layout",
        (Has("vllm.v1.attention.backends.cpu_attn:_get_attn_isa",
             ("dtype", "block_size", "head_size", "kv_cache_dtype")),)),
    Touchpoint(
        "cpu-kv-writer", "vllm._custom_ops.cpu_attn_reshape_and_cache",
        ("adsa_vllm/worker/kv_views.py",), ("_custom_ops",),
        "The CPU layout check writes known K/V with the kernel's own writer and reads them back, so a kernel change "
        "fails loudly instead of scoring garbage.",
        "a public accessor for the CPU attention ISA / cache layout",
        (Has("vllm._custom_ops:cpu_attn_reshape_and_cache",
             ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa")),)),
    Touchpoint(
        "config-hook-fields", "VllmConfig fields written by ADSAConfigHook (MODELS_CONFIG_MAP, one entry per "
        "family architecture): "
        "CacheConfig.user_specified_block_size, ModelConfig.model_arch_config (ModelArchitectureConfig head counts, "
        "vocab_size), "
        "hf_config / hf_text_config head counts, and the public settings it decides",
        ("adsa_vllm/engine/config_hook.py",),
        ("skip_tokenizer_init", "additional_config", "backend", "worker_cls", "async_scheduling", "scheduler_cls",
         "user_specified_block_size", "enable_prefix_caching", "disable_cascade_attn", "num_attention_heads",
         "num_key_value_heads", "head_size", "total_num_attention_heads", "total_num_kv_heads",
         "max_cudagraph_capture_size", "enable_prompt_embeds", "vocab_size"),
        "The per-architecture hook is vLLM's place to change the config, but two of the fields are internal: "
        "user_specified_block_size (else the CPU platform raises the block size to 128 afterwards) and "
        "model_arch_config, derived from hf_config when ModelConfig was built and read by the attention builders "
        "(under guidance a layer has twice the model's heads) and the sampler (its vocab_size: the model's logits "
        "width, codebook + condition ids, where a family's config.json names a text vocabulary only).",
        "a model-level way to declare the block size and attention head counts",
        (Fields("vllm.config:CacheConfig", ("block_size", "user_specified_block_size", "enable_prefix_caching")),
         Fields("vllm.config:ModelConfig", ("skip_tokenizer_init", "disable_cascade_attn", "hf_config",
                                            "hf_text_config", "enable_prompt_embeds")),
         Fields("vllm.config.model_arch:ModelArchitectureConfig",
                ("total_num_attention_heads", "total_num_kv_heads", "head_size", "vocab_size")),
         Reads("vllm.config:ModelConfig.get_num_attention_heads", ("model_arch_config",)),
         Fields("vllm.config:SchedulerConfig", ("scheduler_cls", "async_scheduling", "max_num_seqs")),
         Fields("vllm.config:CompilationConfig", ("max_cudagraph_capture_size", "cudagraph_capture_sizes")),
         Fields("vllm.config:ParallelConfig", ("worker_cls",)),
         Fields("vllm.config:AttentionConfig", ("backend",)),
         Fields("vllm.config:VllmConfig", ("additional_config",)))),
    Touchpoint(
        "cudagraph-mode-read", "vllm.config.CompilationConfig.cudagraph_mode as VllmConfig resolved it, "
        "CUDAGraphMode.has_full_cudagraphs, CompilationConfig.splitting_ops_contain_attention",
        ("adsa_vllm/request_validation.py", "benchmarks/graph_refusal_check.py", "benchmarks/gpu_check.py"),
        ("cudagraph_mode", "has_full_cudagraphs", "splitting_ops_contain_attention"),
        "Token edges run Python inside each attention forward, and a query-dependent policy needs a query copy that "
        "only engines with such a default capture; a CUDA graph replay runs neither, so the API process refuses such "
        "per-request settings where attention runs in graphs, and decides where that is from the resolved "
        "compilation config: any full-graph mode, or piecewise graphs whose split points leave attention inside a "
        "piece (request_validation.attention_in_cuda_graphs). The GPU checks record the mode an engine resolved.",
        "a per-backend way to run Python in the forward under CUDA graphs, or a documented query of which ops "
        "run in graphs",
        (Fields("vllm.config:CompilationConfig", ("cudagraph_mode", "splitting_ops")),
         Has("vllm.config:CompilationConfig.splitting_ops_contain_attention", ()),
         Has("vllm.config.compilation:CUDAGraphMode.has_full_cudagraphs", ())),
        unseen=True),
    # ---- demo, benchmark and test tooling (not checked by register())
    Touchpoint(
        "scheduler-watch", "vllm.v1.core.sched.scheduler.Scheduler.schedule and ._preempt_request, wrapped on one "
        "scheduler instance; Scheduler.running read after each step",
        ("adsa_vllm/engine/observe.py",), ("schedule", "_preempt_request"),
        "vLLM has no scheduler events: SchedulerWatch (the demo's, the benchmarks' and the tests' one way to watch "
        "a scheduler, stock or ADSA) counts steps and preemptions and calls back after each step.",
        "scheduler step / preemption events (or the stats vLLM already logs, exposed in process)",
        (Has(f"{_SCHED}.schedule"), Has(f"{_SCHED}._preempt_request", ("request", "timestamp")),
         Reads(f"{_SCHED}.__init__", ("running",))),
        serving=False),
    Touchpoint(
        "test-running-cap", "vllm.v1.core.sched.scheduler.Scheduler.max_num_running_reqs, lowered for a few steps",
        ("tests/test_swap.py",), ("max_num_running_reqs",),
        "tests/test_swap.py keeps preempted requests waiting on the host for a few steps (so the copy out and the "
        "copy back run in different steps, as under memory pressure) by capping how many requests schedule() runs.",
        "none needed for serving",
        (Reads(f"{_SCHED}.schedule", ("max_num_running_reqs",)),),
        serving=False),
    Touchpoint(
        "engine-in-process", "vllm.LLM's in-process EngineCore: llm_engine.engine_core.engine_core "
        "(.scheduler, .model_executor.driver_worker.worker)",
        ("adsa_vllm/engine/observe.py", "benchmarks/gpu_check.py", "benchmarks/throughput.py", "tests/conftest.py",
         "tests/test_cfg.py", "tests/test_vllm_adsa.py", "tests/test_vllm_foundation.py", "tests/test_vllm_t2i.py",
         "tests/test_swap.py", "tests/test_worker_failures.py"),
        ("engine_core.engine_core", "driver_worker"),
        "With VLLM_ENABLE_V1_MULTIPROCESSING=0 the EngineCore lives in the caller's process; the demo, benchmarks "
        "and tests read the scheduler's and the worker's state there (adsa_vllm.engine.observe.engine_scheduler).",
        "none needed for serving; a public in-process stats / introspection API would replace it",
        (Reads("vllm.v1.engine.core_client:InprocClient.__init__", ("engine_core",)),
         Reads("vllm.v1.engine.core:EngineCore.__init__", ("scheduler", "model_executor")),
         Reads("vllm.v1.executor.uniproc_executor:UniProcExecutor._init_executor", ("driver_worker",))),
        serving=False, unseen=True),
    Touchpoint(
        "worker-step-timing", "the driver worker's execute_model / sample_tokens, rebound on the instance",
        ("benchmarks/throughput.py",), ("execute_model", "sample_tokens"),
        "The benchmark's host time per step: the worker's two step calls, timed around the original methods.",
        "none needed for serving; vLLM's own per-step timing stats would replace it",
        (Has("vllm.v1.worker.worker_base:WorkerBase.execute_model", ("scheduler_output",)),
         Has("vllm.v1.worker.worker_base:WorkerBase.sample_tokens")),
        serving=False),
    Touchpoint(
        "model-registry-load", "vllm.ModelRegistry._try_load_model_cls",
        ("tests/test_vllm_foundation.py",), ("_try_load_model_cls",),
        "The test that the registered architecture resolves to the plugin's model class, as vLLM resolves it.",
        "a public resolve-architecture call on ModelRegistry",
        (Has("vllm:ModelRegistry._try_load_model_cls", ("model_arch",)),), serving=False),
)


def problems(serving_only: bool = True) -> list[tuple[Touchpoint, str]]:
    return [(tp, p) for tp in TOUCHPOINTS if tp.serving or not serving_only for p in tp.problems()]


def check(serving_only: bool = True) -> None:
    """Raise one RuntimeError naming every touchpoint whose guard fails on the installed vLLM."""
    found = problems(serving_only)
    if found:
        import vllm
        lines = [f"  {tp.name} ({', '.join(tp.holders)}): {p}" for tp, p in found]
        raise RuntimeError(f"adsa-vllm relies on vLLM internals that vLLM {vllm.__version__} changed (ledger: "
                           "patches/README.md, section Touchpoints; each row says why and what replaces it):\n"
                           + "\n".join(lines))
