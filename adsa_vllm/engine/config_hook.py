"""Engine configuration for the models of every family (adsa_vllm/family.py), run by vLLM at the top of
`VllmConfig.__post_init__` (registered in `MODELS_CONFIG_MAP[arch]` for each family architecture, vLLM's
per-architecture hook; process 0 only, the result is pickled to EngineCore and workers). The model is read only
through its `ModelSpec` (condition length, grid, heads, condition form).

* Image-token models have no tokenizer: skip its initialisation (prompts are token ids, or caption features for a
  model whose condition is prompt embeds, e.g. a text-to-image caption: prompt embeds are turned on for those).
* The settings are resolved here, once, into an `EngineSettings` (adsa_vllm/settings.py says how every process
  reads it back); the user's additional_config dict is left as given.
* `--attention-backend adsa` turns ADSA on, and the attention backend is reset to the kernel ADSA wraps
  (`adsa.inner_backend`, default the platform's choice), so every later consumer of the backend setting sees a
  real kernel.
* With classifier-free guidance on (``"cfg"``), the config declares twice the attention heads (see
  a family's model, e.g. adsa_vllm/llamagen/model.py: a request's cond and uncond branches are one sequence with
  2H heads).
* With ADSA or classifier-free guidance on: the plugin's worker (it feeds the model's runtimes every
  SchedulerOutput and tells them the batch order on the host, with vLLM's V1 or V2 model runner alike).
* With ADSA or guidance on: the plugin's scheduler (the async variant when async scheduling is on: GPU default);
  it finishes requests that fail inside the worker alone, and with ADSA frees evicted blocks.
* With ADSA on: validate the settings now (clear startup errors: `ADSASettings` builds the default layout, which
  checks the block size too), block size 16 unless the user chose one,
  prefix caching off (holes in block lists and hashed prefixes do not mix), and CUDA graphs up to `max_num_seqs`
  tokens per step unless the user chose graph sizes (`graphs_cover_max_num_seqs`).
"""

from __future__ import annotations

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from adsa_vllm.config import ADSAConfigError
from adsa_vllm.family import ModelSpec, model_spec
from adsa_vllm.request_validation import check_tensor_parallel
from adsa_vllm.settings import ENGINE_KEY, ADSASettings, EngineSettings, UserSettings

ADSA_BACKEND_NAME = "ADSA"


class ADSAConfigHook(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        model_config = vllm_config.model_config
        model_config.skip_tokenizer_init = True
        spec = model_spec(model_config)
        if spec is None:
            raise ADSAConfigError(f"no adsa_vllm model family serves architectures "
                                  f"{getattr(model_config.hf_config, 'architectures', None)} (adsa_vllm/family.py)")
        if spec.uses_prompt_embeds:
            # E.g. a caption (adsa_vllm/llamagen/caption.py); vLLM then runs its V1 model runner (the V2 runner has
            # no prompt embeds yet).
            model_config.enable_prompt_embeds = True

        user = vllm_config.additional_config or {}   # the user's dict: read, never written
        choice = UserSettings.from_additional_config(user)
        attn = vllm_config.attention_config
        # A second run on this config (the backend is no longer "ADSA" then) keeps what the first decided.
        adsa_on = choice.adsa_enabled or EngineSettings.from_vllm_config(vllm_config).adsa is not None
        if attn.backend is not None and attn.backend.name == ADSA_BACKEND_NAME:
            adsa_on = True
            attn.backend = _inner_backend(choice.inner_backend)
        elif choice.inner_backend and adsa_on:
            attn.backend = _inner_backend(choice.inner_backend)

        guidance = choice.guidance
        from vllm.platforms import current_platform
        _declare_attention_heads(model_config, spec, 2 if guidance.enabled else 1)
        # The sampler's width (logit bias, allowed-token masks) is vLLM's vocabulary: the model's logits rows, which
        # cover codebook and condition ids; a family whose config.json names a text vocabulary only (Janus) differs.
        model_config.model_arch_config.vocab_size = spec.input_vocab_size
        if guidance.enabled or adsa_on:
            parallel = vllm_config.parallel_config
            if parallel.worker_cls == "auto":
                parallel.worker_cls = ("adsa_vllm.worker.worker.ADSACPUWorker" if current_platform.is_cpu()
                                       else "adsa_vllm.worker.worker.ADSAGPUWorker")
            # The plugin's scheduler, also for guidance alone: it finishes requests that fail inside the worker
            # with an error, alone (adsa_vllm/worker/failures.py); with ADSA it also frees evicted blocks.
            sched = vllm_config.scheduler_config
            if current_platform.is_cpu():
                sched.async_scheduling = False  # the CPU platform forces it off anyway
            elif sched.async_scheduling is None:
                sched.async_scheduling = True
            sched.scheduler_cls = ("adsa_vllm.engine.scheduler.ADSAAsyncScheduler" if sched.async_scheduling
                                   else "adsa_vllm.engine.scheduler.ADSAScheduler")
        adsa = None
        if adsa_on:
            cache = vllm_config.cache_config
            if not cache.user_specified_block_size:
                cache.block_size = 16
                cache.user_specified_block_size = True  # or the CPU platform raises it to 128 afterwards
            adsa = ADSASettings(defaults=model_head_classes(choice.adsa_defaults, model_config.model),
                                block_size=cache.block_size,   # validates
                                cls_token_num=spec.cls_token_num, grid_size=spec.grid_size,
                                lag=int(bool(vllm_config.scheduler_config.async_scheduling)),
                                admission=choice.admission, swap_space_gib=choice.swap_space_gib)
            check_tensor_parallel(adsa.layout(), vllm_config.parallel_config.tensor_parallel_size, spec.kv_heads)
            cache.enable_prefix_caching = False
            model_config.disable_cascade_attn = True  # a cascade prefix would be read through uncompacted tables
            graphs_cover_max_num_seqs(vllm_config)
        settings = EngineSettings(adsa=adsa, guidance=guidance)
        vllm_config.additional_config = {**user, ENGINE_KEY: settings.to_json()}


def model_head_classes(defaults, model: str):
    """The engine's defaults, with head_split's head classes measured for this model (its folder's
    head_classes.json, written by `adsa-vllm calibrate-heads`) unless the user gave `heads`."""
    import dataclasses
    import json
    from pathlib import Path
    from adsa_vllm.policy.head_split import HEAD_CLASSES_FILE
    calibrated = Path(model) / HEAD_CLASSES_FILE
    if defaults.heads is not None or not calibrated.is_file():
        return defaults
    return dataclasses.replace(defaults, heads=json.loads(calibrated.read_text())["heads"])


def graphs_cover_max_num_seqs(vllm_config) -> None:
    """Capture decode CUDA graphs up to `max_num_seqs` tokens per step when the user set no graph sizes.

    vLLM captures up to min(2 * max_num_seqs, 512) tokens by default; a step with more tokens runs without graphs.
    ADSA's admission keeps the batch at `max_num_seqs` for most of a run (1024 running throughout setting (b) of
    benchmarks/results/README.md), so with the default every one of its steps paid eager launches: on an H200 the
    worker's host time per step was 28.5 ms without graphs and 8.9 ms with graphs up to 1024 (ratio to stock 0.96x
    vs 1.14x, stock given the same graph sizes). vLLM still caps the size at `max_num_batched_tokens`.
    """
    comp = vllm_config.compilation_config
    n = vllm_config.scheduler_config.max_num_seqs
    if comp.max_cudagraph_capture_size is None and comp.cudagraph_capture_sizes is None and isinstance(n, int) \
            and n > 512:
        comp.max_cudagraph_capture_size = n


def _declare_attention_heads(model_config, spec: ModelSpec, branches: int) -> None:
    """The head counts vLLM's attention builders read from the config (FlashAttention, Triton and CPU builders
    call model_config.get_num_attention_heads / get_num_kv_heads, answered from `model_arch_config`, derived
    from hf_config when ModelConfig was built): under CFG a layer attends over both branches' heads. Set from the
    model's own numbers, so running the hook twice changes nothing."""
    heads, kv_heads = branches * spec.n_head, branches * spec.kv_heads
    for target in (model_config.hf_config, model_config.hf_text_config):
        target.head_dim = spec.head_dim
        target.num_attention_heads, target.num_key_value_heads = heads, kv_heads
    arch = model_config.model_arch_config
    arch.total_num_attention_heads, arch.total_num_kv_heads, arch.head_size = heads, kv_heads, spec.head_dim


def _inner_backend(name: str | None):
    if name is None:
        return None
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    try:
        return AttentionBackendEnum[name.upper()]
    except (KeyError, ValueError):
        raise ADSAConfigError(f"adsa.inner_backend={name!r} is not a vLLM attention backend; use e.g. "
                              "FLASH_ATTN or TRITON_ATTN (CPU always uses CPU_ATTN)") from None
