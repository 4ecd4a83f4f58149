"""Classifier-free guidance for a family's image model under vLLM's continuous batching: each request is a
cond/uncond pair inside one sequence (e.g. adsa_vllm/llamagen/model.py). settings.py (pure) -> runtime.py (worker)
-> api.py (users)."""

from adsa_vllm.guidance.settings import Guidance, GuidanceConfigError, GuidanceSettings

__all__ = ["Guidance", "GuidanceConfigError", "GuidanceSettings"]
