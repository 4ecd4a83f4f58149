"""Reject bad requests to a family's model (adsa_vllm/family.py) in the API process with errors that name the field
and the fix."""

from __future__ import annotations

import functools

from adsa_vllm_patches import check_version

TARGET = ("vllm.v1.engine.input_processor.InputProcessor._validate_model_inputs, InputProcessor.process_inputs, "
          "vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.render_completion_request")
WHY = ("vLLM validates prompts and token-id fields against a text tokenizer, which an image model does not have: a "
       "class id past the table, an id outside the codebook (allowed_token_ids, stop_token_ids with min_tokens), a "
       "per-request ADSA or guidance setting of the wrong type would only fail inside EngineCore and kill the "
       "engine for everyone; stop strings and bad_words would be ignored silently, and logprobs over HTTP would "
       "generate the whole image before failing to detokenize. These checks run where vLLM's own input checks run "
       "(the API process, before the request is queued), so the request fails alone with a ValueError (HTTP 400) "
       "and the engine keeps serving; logprobs come back as 'token_id:N'. The prompt is checked where vLLM checks "
       "prompts (_validate_model_inputs); the request's parameters and settings once, in process_inputs, for "
       "class- and text-to-image alike, when the processed prompt gives the condition length (class ids or a "
       "caption's rows) its ADSA layout depends on, as the scheduler and worker will count it (still before the "
       "request is queued).")
VLLM_VERSIONS = ("0.26",)   # release series, see adsa_vllm_patches.check_version
RETIRED_BY = "no upstream hook for model-specific request validation yet (a model-level validate_request would do)"

def _limits(processor):
    """The EngineLimits of a family's engine (decided once, cached on the InputProcessor), None for other models."""
    limits = getattr(processor, "_adsa_limits", False)
    if limits is False:
        limits = None
        from adsa_vllm.family import family_for
        if family_for(processor.model_config.hf_config) is not None:
            from adsa_vllm.request_validation import EngineLimits
            limits = EngineLimits.from_vllm_config(processor.vllm_config)
        processor._adsa_limits = limits
    return limits


def _check_completion_request(request, limits) -> None:
    """/v1/completions fields that never become SamplingParams, checked before anything is generated."""
    from adsa_vllm.request_validation import RequestFieldError
    if request.use_beam_search:
        raise RequestFieldError("use_beam_search is not supported for image generation (vLLM's beam search ranks "
                                "text continuations through a tokenizer); sample several images with n or seeds")
    if request.echo:
        raise RequestFieldError("echo needs a text tokenizer to print the prompt; send return_token_ids: true to "
                                "get the prompt ids back in prompt_token_ids")
    wants_logprobs = request.logprobs is not None or request.prompt_logprobs is not None \
        or bool(request.logprob_token_ids)
    if wants_logprobs:
        if request.return_tokens_as_token_ids is False:
            raise RequestFieldError("logprobs of an image model can only name tokens by id: drop "
                                    "return_tokens_as_token_ids: false (tokens come back as 'token_id:N')")
        request.return_tokens_as_token_ids = True   # no tokenizer to decode them; ids are the honest names


def apply() -> None:
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion as S
    from vllm.v1.engine.input_processor import InputProcessor as P
    if getattr(P, "_adsa_patched", False):
        return
    check_version(VLLM_VERSIONS, __name__)
    orig_inputs, orig_process = P._validate_model_inputs, P.process_inputs
    orig_render = S.render_completion_request

    @functools.wraps(orig_inputs)
    def _validate_model_inputs(self, encoder_input, decoder_input):
        limits = _limits(self)
        if limits is not None:
            if decoder_input.get("type") == "embeds":   # e.g. a t2i caption (a model of ids names its prompt form)
                embeds = decoder_input["prompt_embeds"]
                limits.model.check_prompt_embeds(tuple(embeds.shape), embeds.is_floating_point())
            else:
                ids = decoder_input.get("prompt_token_ids")
                limits.model.check_prompt([] if ids is None else list(ids))
        return orig_inputs(self, encoder_input, decoder_input)

    @functools.wraps(orig_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        limits = _limits(self)
        if limits is not None and hasattr(params, "max_tokens"):   # a generation request (SamplingParams)
            # Every model kind here, once: the processed prompt (checked by _validate_model_inputs) gives the
            # condition length as the scheduler and worker count it. The original params, not
            # request.sampling_params: vLLM filled in an unset max_tokens on the copy.
            from adsa_vllm.request_validation import validate_request
            from adsa_vllm.worker.new_requests import prompt_length
            validate_request(params, limits, prompt_len=prompt_length(request))
        return request

    @functools.wraps(orig_render)
    async def render_completion_request(self, request):
        limits = _limits(self.input_processor)
        if limits is not None:
            _check_completion_request(request, limits)
        return await orig_render(self, request)

    P._validate_model_inputs, P.process_inputs = _validate_model_inputs, process_inputs
    S.render_completion_request = render_completion_request
    P._adsa_patched = True
    P._adsa_orig = (orig_inputs, orig_process)
    S._adsa_orig = orig_render
