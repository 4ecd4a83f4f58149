"""Reject bad LlamaGen requests in the API process with errors that name the valid range."""

from __future__ import annotations

import functools

from patches import check_version

TARGET = ("vllm.v1.engine.input_processor.InputProcessor._validate_model_inputs, "
          "InputProcessor._validate_params")
WHY = ("vLLM validates prompts against a text vocabulary: a class id past the table, or max_tokens past the image, "
       "would surface as an index error or a generic 'maximum context length' message, and a bad per-request "
       "ADSA or guidance (cfg) setting would only fail inside EngineCore. These checks run where vLLM's own input "
       "checks run (the API process), so the request fails alone with a ValueError (HTTP 400) and the engine "
       "keeps serving.")
VLLM_VERSIONS = ("0.26.0",)
RETIRED_BY = "no upstream hook for model-specific request validation yet (a model-level validate_request would do)"

_ARCH = "LlamaGenForCausalLM"


def _llamagen(processor):
    cfg = getattr(processor, "_adsa_llamagen", False)
    if cfg is False:
        cfg = None
        mc = processor.model_config
        if _ARCH in (getattr(mc.hf_config, "architectures", None) or []):
            from adsa_vllm.llamagen.config import LlamaGenConfig
            from adsa_vllm.guidance.settings import GuidanceSettings
            from adsa_vllm.settings import ADSASettings
            vc = processor.vllm_config
            cfg = (LlamaGenConfig.from_hf_dict(mc.hf_config.to_dict()), ADSASettings.from_vllm_config(vc),
                   vc.cache_config, GuidanceSettings.from_vllm_config(vc))
        processor._adsa_llamagen = cfg
    return cfg


def apply() -> None:
    from vllm.v1.engine.input_processor import InputProcessor as P
    if getattr(P, "_adsa_patched", False):
        return
    check_version(VLLM_VERSIONS, __name__)
    orig_inputs, orig_params = P._validate_model_inputs, P._validate_params

    @functools.wraps(orig_inputs)
    def _validate_model_inputs(self, encoder_input, decoder_input):
        found = _llamagen(self)
        if found is not None:
            ids = decoder_input.get("prompt_token_ids") if isinstance(decoder_input, dict) else None
            if decoder_input.get("type") == "embeds" or ids is None:
                raise ValueError("LlamaGen prompts are token ids (codebook_size + class_id), not embeddings")
            found[0].check_prompt(list(ids))
        return orig_inputs(self, encoder_input, decoder_input)

    @functools.wraps(orig_params)
    def _validate_params(self, params, supported_tasks):
        found = _llamagen(self)
        if found is not None and hasattr(params, "max_tokens"):
            model_cfg, settings, cache, guidance = found
            n = model_cfg.image_tokens
            if params.max_tokens is not None and not 1 <= params.max_tokens <= n:
                raise ValueError(f"max_tokens={params.max_tokens} is outside the image: this model emits "
                                 f"1..{n} tokens ({model_cfg.grid_size}x{model_cfg.grid_size} grid)")
            if settings.enabled:
                from adsa_vllm.settings import request_overrides
                settings.defaults.merged(request_overrides(params.extra_args)).layout(
                    block_size=cache.block_size, cls_token_num=model_cfg.cls_token_num,
                    grid_size=model_cfg.grid_size)
            guidance.for_request(params.extra_args)  # a "cfg" without guidance on, or a bad scale / interval
            if guidance.enabled and params.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs are not available with classifier-free guidance (the prompt is "
                                 "the condition, which the model does not predict); use logprobs for image tokens")
        return orig_params(self, params, supported_tasks)

    P._validate_model_inputs, P._validate_params = _validate_model_inputs, _validate_params
    P._adsa_patched = True
    P._adsa_orig = (orig_inputs, orig_params)
