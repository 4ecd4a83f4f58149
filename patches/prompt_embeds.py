"""A family's prompt_embeds condition (a LlamaGen t2i caption): checked against the width vLLM's runner really uses."""

from __future__ import annotations

import functools

from adsa_vllm_patches import check_version

TARGET = "vllm.renderers.base.safe_load_prompt_embeds, vllm.renderers.base.BaseRenderer._process_embeds"
WHY = ("A text-to-image LlamaGen's prompt is caption features, caption_dim (2048) wide, while its hidden size is the "
       "model width (1280 for XL). vLLM sizes the runner's inputs_embeds buffer by ModelConfig.get_inputs_embeds_size "
       "(the config's projection_dim), but checks an HTTP prompt_embeds payload against get_hidden_size, so every "
       "caption would be refused with HTTP 400. The check is made against get_inputs_embeds_size for every model of "
       "a family (adsa_vllm/family.py) whose condition is prompt embeds (ModelSpec.uses_prompt_embeds: t2i LlamaGen). "
       "A class-to-image LlamaGen runs without prompt embeds, and vLLM's answer to a prompt_embeds request "
       "('You must set --enable-prompt-embeds') names a fix that cannot work: it is told to send class ids instead.")
VLLM_VERSIONS = ("0.26",)   # release series, see adsa_vllm_patches.check_version
RETIRED_BY = ("an upstream safe_load_prompt_embeds that checks get_inputs_embeds_size (the width the runner "
              "allocates); the c2i message needs a model-level prompt validation hook")


def _spec(model_config):
    """The ModelSpec of a family's engine (adsa_vllm/family.py), None for other models."""
    from adsa_vllm.family import model_spec
    return model_spec(model_config)


def _caption_form(config) -> str:
    try:
        config.check_prompt_embeds((0, 0))
    except ValueError as e:
        return str(e).split("; got shape")[0]
    return ""


class _InputsEmbedsWidth:
    """A ModelConfig view whose hidden size is the inputs_embeds width (what the runner's buffer holds)."""

    def __init__(self, model_config):
        self._model_config = model_config

    def __getattr__(self, name):
        return getattr(self._model_config, name)

    def get_hidden_size(self) -> int:
        return self._model_config.get_inputs_embeds_size()


def apply() -> None:
    import vllm.renderers.base as base
    if getattr(base.BaseRenderer, "_adsa_embeds_patched", False):
        return
    check_version(VLLM_VERSIONS, __name__)
    orig_load, orig_process = base.safe_load_prompt_embeds, base.BaseRenderer._process_embeds

    @functools.wraps(orig_load)
    def safe_load_prompt_embeds(model_config, embed):
        config = _spec(model_config)
        if config is None:
            return orig_load(model_config, embed)
        if not config.uses_prompt_embeds:
            config.check_prompt_embeds(())   # raises: a class-to-image model takes class ids
        try:
            return orig_load(_InputsEmbedsWidth(model_config), embed)
        except ValueError as e:   # vLLM's own message (e.g. a width mismatch), plus what a caption must be
            raise type(e)(f"{e}; {_caption_form(config)}") from None

    @functools.wraps(orig_process)
    def _process_embeds(self, prompt):
        config = _spec(self.model_config)
        if config is not None and not config.uses_prompt_embeds:
            config.check_prompt_embeds(())
        return orig_process(self, prompt)

    # The renderer binds its async loader from this module-level name when it is built (after plugins load).
    base.safe_load_prompt_embeds = safe_load_prompt_embeds
    base.BaseRenderer._process_embeds = _process_embeds
    base.BaseRenderer._adsa_embeds_patched = True
    base.BaseRenderer._adsa_orig_embeds = (orig_load, orig_process)
