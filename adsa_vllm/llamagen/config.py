"""Transitional: the LlamaGen hyper-parameters moved to `adsa_vllm.model_config` (pure, top level; issue 11).

Only adsa_vllm/engine/config_hook.py and patches/llamagen_request_validation.py still import this name (their
owner is changing them to `from adsa_vllm.model_config import LlamaGenConfig`); delete this file once they do.
Nothing else may import it (tests/test_imports.py)."""

from adsa_vllm.model_config import LlamaGenConfig

__all__ = ["LlamaGenConfig"]
