"""`register()`: the `vllm.general_plugins` entry point. vLLM calls it in every process it starts (API server,
EngineCore, workers, the model-inspection subprocess); it must be idempotent and must not touch CUDA. It first
checks the vLLM internals the plugin relies on (patches/touchpoints.py), then applies the patches (patches/).
"""

from __future__ import annotations

ARCH = "LlamaGenForCausalLM"   # the default model's architecture; register() serves every one in FAMILIES
_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    import adsa_vllm_patches
    from adsa_vllm_patches import touchpoints

    from adsa_vllm.family import FAMILIES, family_of

    touchpoints.check()   # before anything is changed: an unknown vLLM fails here, naming what broke
    adsa_vllm_patches.apply_all()
    for arch in FAMILIES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, family_of(arch).model_cls)

    # Fill the registry with vLLM's built-ins first: it registers them lazily only while it is empty, so a
    # worker that registered ADSASpec first would never learn FullAttentionSpec (touchpoint kv-spec-registry-fill).
    KVCacheSpecRegistry._ensure_registered()
    from adsa_vllm.engine.manager import ADSAManager
    from adsa_vllm.engine.spec import ADSASpec
    KVCacheSpecRegistry.register(ADSASpec, ADSAManager, uniform_type_base_spec=FullAttentionSpec)

    from adsa_vllm.engine.config_hook import ADSAConfigHook
    for arch in FAMILIES:
        MODELS_CONFIG_MAP[arch] = ADSAConfigHook
    _done = True
