"""Classifier-free guidance for LlamaGen under vLLM's continuous batching: each request is a cond/uncond pair
inside one sequence (adsa_vllm/llamagen/model.py). settings.py (pure) -> runtime.py (worker) -> api.py (users)."""

from adsa_vllm.guidance.settings import Guidance, GuidanceConfigError, GuidanceSettings

__all__ = ["Guidance", "GuidanceConfigError", "GuidanceSettings"]
