"""Every field of a request to a family's model checked before the engine sees it (duck-typed; no vLLM import).

Called by patches/request_validation.py in the API process (offline: the LLM's process), where vLLM runs
its own input checks, so a bad request fails alone with a `SettingsError` (HTTP 400 online) instead of raising
inside EngineCore, where any exception kills the engine for everyone. What vLLM would check against a text
tokenizer is checked here against the model's codebook (its `ModelSpec`, adsa_vllm/family.py): the model has no
tokenizer (it emits codebook ids, e.g. adsa_vllm/llamagen/model.py), so vLLM skips those checks, and an id outside
the logits row crashes the worker.

Per-request settings (`extra_args["adsa"]`, `extra_args["cfg"]`, a dict offline or its JSON string over HTTP) are
parsed with the same code the worker and scheduler run (`ADSASettings.layout`, `GuidanceSettings.for_request`), and
fully: the ADSA layout is built here with the request's own condition length, and the scorers that would run are
resolved (`adsa_vllm.policy.resolve_scorers`), so whatever passes is a setting the worker can use. What only the
engine's configuration decides is checked too: a query-dependent policy cannot run where attention replays from
CUDA graphs that save no query, nor token edges where it replays from any (`attention_in_cuda_graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.errors import ADSAConfigError, SettingsError
from adsa_vllm.guidance.settings import Guidance
from adsa_vllm.family import ModelSpec, model_spec
from adsa_vllm.policy import BlockLayout, needs_query
from adsa_vllm.settings import EngineSettings, request_overrides

# extra_args keys: the plugin's, plus those vLLM itself puts there (kv/ec transfer parameters).
EXTRA_ARG_KEYS = ("adsa", "cfg", "kv_transfer_params", "ec_transfer_params")


class RequestFieldError(SettingsError):
    """A stock request field this model cannot honour as given; the message names the field and the fix."""


@dataclass(frozen=True)
class RequestSettings:
    layout: BlockLayout | None   # the request's ADSA layout; None when the engine runs without ADSA
    guidance: Guidance           # the request's guidance (the engine defaults when it gave none)


def attention_in_cuda_graphs(compilation_config, engine: EngineSettings) -> bool:
    """Whether this engine's attention layers run inside CUDA graphs, so that Python in their forward runs only while
    a graph is captured. Two kinds of request need it to run: a query-dependent policy (`needs_query`) on an engine
    whose default policy needs none (its graphs capture no copy of the query: worker/saved_queries.py), whose
    selection would fail in the worker; and a layout with token edges (worker/token_edges.py).

    Read from vLLM's CompilationConfig (duck-typed) as `VllmConfig.__post_init__` left it, which is what the API
    process holds (the config hook runs at its start, before the mode is resolved):
      * cudagraph_mode NONE: no graphs. `enforce_eager` sets it, and so does a platform without static graphs (CPU)
        or a piecewise mode without VLLM_COMPILE;
      * a mode with full graphs (FULL_AND_PIECEWISE, the GPU default; FULL_DECODE_ONLY; FULL): decode steps replay
        whole forwards, attention included;
      * PIECEWISE: attention runs eagerly between the captured pieces when the attention ops are splitting ops
        (vLLM's default), else it is inside a piece.
    An engine whose default layout has token edges has none: its backend reports AttentionCGSupport.NEVER
    (worker/backend.py), so vLLM's worker drops full graphs to PIECEWISE, or refuses to start. The answer is
    conservative where vLLM's worker later lowers the mode for another reason (an inner kernel without graph
    support): such an engine refuses what it could have run."""
    if engine.adsa is None or engine.adsa.layout().token_edges:
        return False
    mode = compilation_config.cudagraph_mode
    if mode is None or mode.name == "NONE":
        return False
    return mode.has_full_cudagraphs() or not compilation_config.splitting_ops_contain_attention()


def check_tensor_parallel(layout: BlockLayout, tensor_parallel_size: int, kv_heads: int) -> None:
    """Per-head selection under tensor parallelism needs each rank to know which of the model's heads it holds.
    head_split at block granularity reads its head classes by the query heads a rank holds, with no rank offset
    (policy/head_split.py); token granularity offsets by rank, assuming the KV heads are split evenly
    (worker/token_gather.head_offset), which vLLM does not do when there are fewer KV heads than ranks (it
    replicates them). Either would select by the wrong heads silently, so they are refused (engine start: the
    defaults; each request: its own settings)."""
    if tensor_parallel_size <= 1:
        return
    if layout.policy == "head_split" and layout.granularity == "block":
        raise ADSAConfigError(
            f"adsa.policy 'head_split' at block granularity cannot run at tensor_parallel_size "
            f"{tensor_parallel_size}: each rank holds a slice of the heads and the block form has no head offset; "
            'use {"granularity": "token"} (each rank scores its own heads) or tensor_parallel_size 1')
    if layout.granularity == "token" and kv_heads % tensor_parallel_size:
        raise ADSAConfigError(
            f"adsa granularity 'token' selects per KV head, and this model's {kv_heads} KV heads do not split evenly "
            f"over tensor_parallel_size {tensor_parallel_size} (vLLM replicates them); use "
            '{"granularity": "block"} or a tensor_parallel_size that divides the KV heads')


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against: the model's shape and the engine's settings."""
    model: ModelSpec
    engine: EngineSettings
    attention_in_cuda_graphs: bool = False   # see `attention_in_cuda_graphs`
    tensor_parallel_size: int = 1

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EngineLimits":
        """The limits of a family's engine, decided once from its resolved VllmConfig (the API process's)."""
        engine = EngineSettings.from_vllm_config(vllm_config)
        return cls(model=model_spec(vllm_config.model_config), engine=engine,
                   attention_in_cuda_graphs=attention_in_cuda_graphs(vllm_config.compilation_config, engine),
                   tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size)


def validate_settings(extra_args, limits: EngineLimits, prompt_len: int | None = None) -> RequestSettings:
    """Parses and checks a request's extra_args exactly as the scheduler and worker will; raises SettingsError.
    prompt_len: the request's condition length (its prompt's ids or caption rows, as the scheduler and worker count
    it), on which its ADSA layout depends; None: the model's cls_token_num."""
    if extra_args is not None and not isinstance(extra_args, dict):
        raise RequestFieldError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    unknown = sorted(map(repr, set(extra_args or {}) - set(EXTRA_ARG_KEYS)))
    if unknown:
        raise RequestFieldError(f"unknown extra_args / vllm_xargs key(s) [{', '.join(unknown)}]; this model reads "
                                '"adsa" and "cfg" (e.g. "vllm_xargs": {"adsa": "{\\"budget\\": 0.25}"})')
    overrides = request_overrides(extra_args)
    layout = None
    if limits.engine.adsa is not None:
        layout = limits.engine.adsa.layout(overrides, prompt_len)   # its ADSAConfig resolved the scorers
        check_tensor_parallel(layout, limits.tensor_parallel_size, limits.model.kv_heads)
        if limits.attention_in_cuda_graphs and needs_query(layout) and not needs_query(limits.engine.adsa.defaults):
            raise ADSAConfigError(
                f"adsa.policy={layout.policy!r} scores with each step's query, which this engine's CUDA graphs do not "
                "save (its default policy needs none); start the engine with it as the default "
                f"policy (--additional-config '{{\"adsa\": {{\"policy\": \"{layout.policy}\"}}}}') or with "
                "--enforce-eager (offline: LLM(..., enforce_eager=True))")
        if limits.attention_in_cuda_graphs and layout.token_edges:
            raise ADSAConfigError(
                f"adsa settings {overrides!r} leave a budget below whole prefix and window blocks, so the prefix and "
                "window are cut at token edges, whose attention runs in the forward (worker/token_edges.py), which this "
                "engine runs in CUDA graphs; start the engine with these settings as its default or with "
                "--enforce-eager (offline: LLM(..., enforce_eager=True)), or raise the budget to at least "
                f"{(layout.prefix_blocks + layout.local_blocks) * layout.block_size} tokens")
    elif overrides is not None:
        raise RequestFieldError('this engine runs without ADSA, so extra_args["adsa"] cannot apply: start it with '
                                "--attention-backend adsa (offline: LLM(..., attention_backend=\"adsa\"))")
    return RequestSettings(layout=layout, guidance=limits.engine.guidance.for_request(extra_args))


def _ids_in_codebook(field: str, ids, codebook_size: int) -> None:
    bad = sorted({i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < codebook_size},
                 key=repr)
    if bad:
        raise RequestFieldError(f"{field} has id(s) {bad[:8]} outside the codebook: image tokens are 0.."
                                f"{codebook_size - 1} (condition ids are never sampled)")


def validate_sampling_fields(params, model) -> None:
    """The stock SamplingParams fields that vLLM checks against a tokenizer, checked against the codebook."""
    n = model.image_tokens
    if params.max_tokens is not None and not 1 <= params.max_tokens <= n:
        raise RequestFieldError(f"max_tokens={params.max_tokens} is outside the image: this model emits 1..{n} "
                                f"tokens ({model.grid_size}x{model.grid_size} grid)")
    if params.allowed_token_ids is not None:
        _ids_in_codebook("allowed_token_ids", params.allowed_token_ids, model.codebook_size)
    if params.logit_bias:
        _ids_in_codebook("logit_bias", params.logit_bias, model.codebook_size)
    if params.stop_token_ids:
        _ids_in_codebook("stop_token_ids", params.stop_token_ids, model.codebook_size)
    if params.logprob_token_ids:
        _ids_in_codebook("logprob_token_ids", params.logprob_token_ids, model.codebook_size)
    if params.stop:
        raise RequestFieldError("stop strings need a text tokenizer, which an image model does not have; stop at "
                                "image tokens with stop_token_ids, or lower max_tokens")
    if params.bad_words:
        raise RequestFieldError("bad_words need a text tokenizer, which an image model does not have; forbid "
                                "image tokens with logit_bias {id: -100} or allow some with allowed_token_ids")


def validate_request(params, limits: EngineLimits, prompt_len: int | None = None) -> RequestSettings:
    """All checks of one generation request (SamplingParams); raises SettingsError naming the field and the fix.
    prompt_len: as for `validate_settings` (a t2i request must give its caption's rows)."""
    validate_sampling_fields(params, limits.model)
    settings = validate_settings(params.extra_args, limits, prompt_len)
    if limits.engine.guidance.enabled and params.prompt_logprobs is not None:
        raise RequestFieldError("prompt_logprobs are not available with classifier-free guidance (the prompt is "
                                "the condition, which the model does not predict); use logprobs for image tokens")
    return settings


__all__ = ["EXTRA_ARG_KEYS", "EngineLimits", "RequestFieldError", "RequestSettings", "attention_in_cuda_graphs",
           "check_tensor_parallel", "validate_request", "validate_sampling_fields", "validate_settings"]
